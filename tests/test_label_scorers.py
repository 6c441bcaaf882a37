"""Reward-model and rule labellers (rlhf_cli.labelling.scorers): the combine / margin / Bradley-Terry pieces against
hand-computed values, rules of known scores end to end, and a tiny reward model scored as `rlhf eval` scores it."""

import math

import pytest

from rlhf_cli.errors import UserError
from rlhf_cli.labelling.records import Item, pair_rows
from rlhf_cli.labelling.scorers import (
    bradley_terry,
    combine_scores,
    label_by_scores,
    label_scores,
    load_scorers,
    score_pairs,
)
from rlhf_cli.recipe import RewardSpec


# Rules of known scores, imported by `function: test_label_scorers:...` (tests/ is on sys.path, as for rules.py).
def characters(prompts, completions):
    return [float(len(text)) for text in completions]


def words(prompts, completions):
    return [float(len(text.split())) for text in completions]


def broken(prompts, completions):
    return [float("nan")] * len(completions)


def test_combine_mean_and_min():
    per_scorer = [[2.0, 7.0, 6.0], [1.0, 4.0, 1.0]]
    assert combine_scores(per_scorer, "mean") == [1.5, 5.5, 3.5]
    assert combine_scores(per_scorer, "min") == [1.0, 4.0, 1.0]
    assert combine_scores([[0.25, -1.0]]) == [0.25, -1.0]
    with pytest.raises(ValueError, match="combine"):
        combine_scores(per_scorer, "max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same candidates"):
        combine_scores([[1.0], [1.0, 2.0]])


def test_bradley_terry_is_the_sigmoid_of_the_gap():
    assert bradley_terry(0.0) == 0.5
    assert bradley_terry(1.0) == pytest.approx(0.7310585786)
    assert bradley_terry(-1.0) == pytest.approx(1 - 0.7310585786)
    assert bradley_terry(1000.0) == 1.0 and bradley_terry(-1000.0) == 0.0  # no overflow


def test_score_pairs_all_with_a_margin():
    assert score_pairs([1.0, 3.0, 2.0]) == [(1, 2, "a", 1.0), (1, 0, "a", 2.0), (2, 0, "a", 1.0)]
    assert score_pairs([1.0, 3.0, 2.0], min_margin=1.5) == [(1, 2, "tie", 1.0), (1, 0, "a", 2.0), (2, 0, "tie", 1.0)]
    assert score_pairs([1.0, 3.0, 2.0], min_margin=2.0)[1] == (1, 0, "a", 2.0)  # a gap equal to the margin counts
    assert score_pairs([1.0, 1.0, 2.0]) == [(2, 0, "a", 1.0), (2, 1, "a", 1.0), (0, 1, "tie", 0.0)]


def test_score_pairs_best_vs_worst():
    assert score_pairs([1.0, 3.0, 2.0], "best_vs_worst") == [(1, 0, "a", 2.0)]
    assert score_pairs([1.0, 3.0, 2.0], "best_vs_worst", min_margin=5.0) == [(1, 0, "tie", 2.0)]
    assert score_pairs([4.0, 4.0, 4.0], "best_vs_worst") == [(0, 2, "tie", 0.0)]  # one label per item, always
    with pytest.raises(ValueError, match="min_margin"):
        score_pairs([1.0, 2.0], min_margin=-1.0)


def test_label_scores_keeps_every_scorer_in_the_details():
    labels = label_scores("p0", [1.5, 5.5, 3.5], {"chars": [2.0, 7.0, 6.0], "words": [1.0, 4.0, 1.0]},
                          min_margin=2.5, labeller="rule", annotator="chars,words")  # fmt: skip
    assert [(label.a, label.b, label.outcome) for label in labels] == [(1, 2, "tie"), (1, 0, "a"), (2, 0, "tie")]
    decided = labels[1]
    assert decided.confidence == pytest.approx(1 / (1 + math.exp(-4.0)))
    assert decided.details == {"scores": {"chars": [7.0, 2.0], "words": [4.0, 1.0]}, "combined": [5.5, 1.5],
                               "gap": 4.0}  # fmt: skip
    assert labels[0].confidence is None and "below min_margin 2.5" in labels[0].details["reason"]


ITEMS = [Item("p0", "Describe the sea.", ("aa", "b b b b", "cccccc"), "policy"),
         Item("p1", [{"role": "user", "content": "Hi"}], ("one two", "three"), "policy")]  # fmt: skip


def rule_scorers(*names):
    return load_scorers([RewardSpec(function=f"test_label_scorers:{name}") for name in names], "label.rule", None,
                        None, conversational=False)  # fmt: skip


def test_one_rule_labels_by_its_scores():
    labels, report = label_by_scores(ITEMS, rule_scorers("characters"))
    # p0: lengths 2, 7, 6 -> 1 > 2 > 0; p1: 7, 5 -> 0 > 1
    assert [(l.item_id, l.a, l.b, l.outcome) for l in labels] == [("p0", 1, 2, "a"), ("p0", 1, 0, "a"),
                                                                  ("p0", 2, 0, "a"), ("p1", 0, 1, "a")]  # fmt: skip
    assert all(label.labeller == "rule" and label.annotator == "test_label_scorers:characters" for label in labels)
    assert labels[1].confidence == pytest.approx(bradley_terry(5.0))
    assert report["pairs decided"] == 4 and report["items"] == 2 and report["candidates scored"] == 5
    assert report["mean score (test_label_scorers:characters)"] == pytest.approx((2 + 7 + 6 + 7 + 5) / 5)
    rows, _ = pair_rows({item.item_id: item for item in ITEMS}, labels)
    assert rows[0]["chosen"] == "b b b b" and rows[-1]["chosen"] == [{"role": "assistant", "content": "one two"}]


def test_two_rules_mean_and_min():
    scorers = rule_scorers("characters", "words")
    mean, report = label_by_scores(ITEMS[:1], scorers, combine="mean")  # chars 2,7,6; words 1,4,1 -> 1.5,5.5,3.5
    assert [(l.a, l.b, l.details["gap"]) for l in mean] == [(1, 2, 2.0), (1, 0, 4.0), (2, 0, 2.0)]
    assert report["combined by"] == "mean"
    assert report["scorers all order the decided pair alike"] == pytest.approx(2 / 3)
    lowest, report = label_by_scores(ITEMS[:1], scorers, combine="min")  # -> 1, 4, 1: 0 and 2 tie
    assert [(l.a, l.b, l.outcome) for l in lowest] == [(1, 0, "a"), (1, 2, "a"), (0, 2, "tie")]
    assert report["ties (equal scores)"] == 1 and lowest[0].details["scores"] == {
        "test_label_scorers:characters": [7.0, 2.0], "test_label_scorers:words": [4.0, 1.0]}  # fmt: skip


def test_min_margin_ties_are_counted():
    labels, report = label_by_scores(ITEMS, rule_scorers("characters"), min_margin=2.0)
    assert [l.outcome for l in labels] == ["tie", "a", "a", "a"]  # p0: 7-6 = 1 < 2 ties; p1: 7-5 = 2 decides
    assert report["ties (score gap below min_margin 2.0)"] == 1 and report["pairs decided"] == 3
    best, _ = label_by_scores(ITEMS, rule_scorers("characters"), pairs="best_vs_worst", min_margin=2.0)
    assert [(l.item_id, l.a, l.b, l.outcome) for l in best] == [("p0", 1, 0, "a"), ("p1", 0, 1, "a")]


def test_a_score_that_is_not_a_number_is_refused():
    with pytest.raises(UserError, match="not a finite number"):
        label_by_scores(ITEMS, rule_scorers("broken"))


def test_scorers_need_a_source():
    with pytest.raises(UserError, match="names no reward model or rule"):
        load_scorers([], "label.reward_models", None, None, conversational=False)


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    """A tiny GPT-2 sequence classifier (one output) with the builtin tokenizer, saved as a hub-like directory."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    from rlhf_cli.models import materialize_builtin
    from rlhf_cli.recipe import BuiltinSpec

    source = materialize_builtin("builtin:tiny-gpt2", BuiltinSpec(), seed=0)
    tokenizer = AutoTokenizer.from_pretrained(source)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=1, n_head=2, num_labels=1,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("rm")
    GPT2ForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def test_reward_models_score_as_eval_does_and_an_ensemble_of_one_model_twice_agrees(reward_model):
    from rlhf_cli.inference import Responses, score

    [scorer] = load_scorers([RewardSpec(model=reward_model)], "label.reward_model", None, None, conversational=False)
    texts = [text for item in ITEMS for text in item.candidates]
    prompts = [item.prompt for item in ITEMS for _ in item.candidates]
    direct = score(scorer, prompts, Responses(texts=texts, finished=[True] * len(texts)), max_prompt_length=512,
                   batch_size=4)  # fmt: skip
    labels, report = label_by_scores(ITEMS, [scorer], batch_size=2)
    assert all(label.labeller == "reward_model" and label.annotator == reward_model for label in labels)
    for label in labels:
        offset = 0 if label.item_id == "p0" else 3
        assert label.details["combined"] == pytest.approx([direct[offset + label.a], direct[offset + label.b]],
                                                          abs=1e-5)  # fmt: skip
        assert label.details["combined"][0] > label.details["combined"][1]
        assert label.confidence == pytest.approx(bradley_terry(label.details["gap"]))
    twice, report = label_by_scores(ITEMS, [scorer, scorer], combine="min")
    assert [(l.a, l.b, l.outcome) for l in twice] == [(l.a, l.b, l.outcome) for l in labels]
    assert set(twice[0].details["scores"]) == {reward_model, f"{reward_model}#2"}
    assert report["scorers all order the decided pair alike"] == 1.0


def test_sampled_responses_must_be_the_candidates_in_order():
    from rlhf_cli.inference import Responses

    shuffled = Responses(texts=["b b b b", "aa", "cccccc", "one two", "three"], finished=[True] * 5)
    with pytest.raises(ValueError, match="in order"):
        label_by_scores(ITEMS, rule_scorers("characters"), responses=shuffled)
