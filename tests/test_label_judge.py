"""The constitution judge (rlhf_cli.labelling.judge): the constitution file, the two-order verdict logic with stub
judges of known bias, the forward pass on the builtin tiny GPT-2, and the critique-and-revise mode."""

import copy
import math

import pytest

from rlhf_cli.errors import UserError
from rlhf_cli.labelling.judge import (
    DEFAULT_CONSTITUTION,
    JUDGE_QUESTION,
    ModelJudge,
    Question,
    Reading,
    answer_token_ids,
    critique_and_revise,
    decide,
    judge_items,
    judge_messages,
    load_constitution,
    load_judge_model,
    parse_constitution,
)
from rlhf_cli.labelling.records import Item, pair_rows

PRINCIPLES = ["Be kind.", "Be brief."]  # short: the tiny model reads 512 positions


# ---------------------------------------------------------------- the constitution


def test_bullets_are_principles_and_prose_headings_comments_are_not():
    text = """# My constitution
<!-- a note
 - not a principle -->
Some prose that explains the list.

- Be honest,
  even when it is awkward.
* Be kind.
1. Be brief.
2) Be safe.
"""
    assert parse_constitution(text) == ["Be honest, even when it is awkward.", "Be kind.", "Be brief.", "Be safe."]


def test_without_bullets_each_paragraph_is_a_principle():
    assert parse_constitution("# Title\n\nFirst rule,\non two lines.\n\n\nSecond rule.\n") == [
        "First rule, on two lines.", "Second rule."]  # fmt: skip


def test_the_default_constitution_ships_and_parses():
    principles = load_constitution()
    assert DEFAULT_CONSTITUTION.name == "constitution.md" and 4 <= len(principles) <= 12
    assert any("honest" in principle.lower() for principle in principles)
    assert all("<!--" not in principle and not principle.startswith("#") for principle in principles)


@pytest.mark.parametrize("text", ["", "   \n\n", "# Only a heading\n<!-- and a comment -->\n"])
def test_a_constitution_without_principles_is_refused(tmp_path, text):
    path = tmp_path / "constitution.md"
    path.write_text(text)
    with pytest.raises(UserError, match="holds no principles"):
        load_constitution(path)


def test_a_missing_constitution_is_refused(tmp_path):
    with pytest.raises(UserError, match="Cannot read the constitution"):
        load_constitution(tmp_path / "absent.md")


# ---------------------------------------------------------------- the verdict from two orders


def test_decide_on_hand_computed_pairs():
    x_wins = decide(0.8, 0.3)  # x first: A (x); y first: B (x)
    assert (x_wins.outcome, x_wins.consistent, x_wins.same_position) == ("a", True, None)
    assert x_wins.p_x == pytest.approx((0.8 + 0.7) / 2) and x_wins.confidence == pytest.approx(0.75)
    y_wins = decide(0.2, 0.9)
    assert y_wins.outcome == "b" and y_wins.p_x == pytest.approx(0.15) and y_wins.confidence == pytest.approx(0.85)
    first = decide(0.8, 0.8)
    assert (first.outcome, first.consistent, first.same_position, first.confidence) == ("skip", False, "first", None)
    assert first.p_x == pytest.approx(0.5)
    assert decide(0.8, 0.8, "tie").outcome == "tie"
    assert decide(0.3, 0.4).same_position == "second" and decide(0.3, 0.4).p_x == pytest.approx(0.45)
    undecided = decide(0.5, 0.2)  # no preference in one order: not consistent, but no position picked twice
    assert not undecided.consistent and undecided.same_position is None


def test_decide_refuses_bad_input():
    with pytest.raises(ValueError, match="inconsistent"):
        decide(0.6, 0.4, "keep")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="probability"):
        decide(1.2, 0.4)


def items_of(*candidate_lists):
    return [Item(f"p{n}", f"prompt {n}", tuple(candidates), "policy") for n, candidates in enumerate(candidate_lists)]


ITEMS = items_of(("short", "a longer one", "the longest response of all"), ("tiny", "a bit longer"))


class Recording:
    """A stub judge: p(first shown is better) = rule(first, second); records every question and call size."""

    def __init__(self, rule):
        self.rule, self.questions, self.calls = rule, [], []

    def __call__(self, questions):
        self.questions += questions
        self.calls.append(len(questions))
        return [Reading(self.rule(q.first, q.second), 0.9) for q in questions]


def test_a_judge_that_always_prefers_the_first_position_is_always_inconsistent():
    judge = Recording(lambda first, second: 0.8)
    labels, stats = judge_items(ITEMS, judge, inconsistent="drop", batch_size=4)
    assert len(labels) == 3 + 1 and all(label.outcome == "skip" for label in labels)
    assert all("both orders picked the first position" in label.details["reason"] for label in labels)
    report = stats.report()
    assert report["pairs judged (both orders)"] == 4 and report["consistent"] == 0
    assert report["inconsistent"] == 4 and report["inconsistent pairs are"] == "dropped"
    assert report["position-bias rate"] == 1.0 and report["first-position preference rate"] == 1.0
    assert report["favoured position"] == "first" and report["mean confidence (consistent)"] is None
    assert pair_rows({item.item_id: item for item in ITEMS}, labels)[0] == []  # nothing to train on
    tied, tied_stats = judge_items(ITEMS, judge, inconsistent="tie")
    assert [label.outcome for label in tied] == ["tie"] * 4 and tied_stats.report()["inconsistent pairs are"] == "ties"


def test_every_pair_is_asked_in_both_orders_in_batches():
    judge = Recording(lambda first, second: 0.5 + 0.4 * (len(first) > len(second)) - 0.4 * (len(first) < len(second)))
    labels, _ = judge_items(ITEMS, judge, batch_size=4)
    asked = [(q.prompt, q.first, q.second) for q in judge.questions]
    assert len(asked) == 2 * (3 + 1) == len(set(asked))  # K(K-1)/2 pairs per item, each in both orders
    for item in ITEMS:
        for label in (label for label in labels if label.item_id == item.item_id):
            x, y = item.candidates[label.a], item.candidates[label.b]
            assert (item.prompt, x, y) in asked and (item.prompt, y, x) in asked
    assert judge.calls == [4, 4] and all(label.a < label.b for label in labels)


def test_a_judge_preferring_the_longer_response_in_both_orders_is_consistent():
    judge = Recording(lambda first, second: 0.9 if len(first) > len(second) else 0.1)
    labels, stats = judge_items(ITEMS, judge)
    assert all(label.outcome in ("a", "b") and label.confidence == pytest.approx(0.9) for label in labels)
    for label in labels:
        item = next(item for item in ITEMS if item.item_id == label.item_id)
        winner = label.a if label.outcome == "a" else label.b
        assert len(item.candidates[winner]) == max(len(item.candidates[label.a]), len(item.candidates[label.b]))
        assert label.details["p_first"] == [pytest.approx(0.9), pytest.approx(0.1)] or \
            label.details["p_first"] == [pytest.approx(0.1), pytest.approx(0.9)]  # fmt: skip
        assert label.labeller == "judge" and label.details["answer_mass"] == [0.9, 0.9]
    report = stats.report()
    assert report["position-bias rate"] == 0.0 and report["first-position preference rate"] == 0.5
    assert report["consistent"] == 4 and report["mean confidence (consistent)"] == pytest.approx(0.9)
    rows, left_out = pair_rows({item.item_id: item for item in ITEMS}, labels)
    assert len(rows) == 4 and not left_out
    assert all(len(row["chosen"]) > len(row["rejected"]) for row in rows)


def test_a_judge_with_a_known_first_position_bias():
    """p(first better) = sigmoid(d + 1), d = length difference in characters / 4: pairs of clearly different
    lengths stay consistent, near-equal ones flip with the order. One pair in three here is near-equal."""
    sigmoid = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    judge = Recording(lambda first, second: sigmoid((len(first) - len(second)) / 4 + 1))
    items = items_of(("abcdefghij", "abcdefghijk", "abcdefghijklmnopqrstuvwxyz"))  # lengths 10, 11, 26
    labels, stats = judge_items(items, judge, inconsistent="tie")
    by_pair = {(label.a, label.b): label for label in labels}
    assert by_pair[0, 1].outcome == "tie" and by_pair[0, 1].details["reason"].endswith("first position")
    assert by_pair[0, 2].outcome == "b" and by_pair[1, 2].outcome == "b"
    expected = (sigmoid(16 / 4 + 1) + 1 - sigmoid(-16 / 4 + 1)) / 2
    assert by_pair[0, 2].confidence == pytest.approx(expected)
    assert by_pair[0, 2].details["p_a"] == pytest.approx(1 - expected)
    assert stats.position_bias_rate == pytest.approx(1 / 3) and stats.favoured_position == "first"
    assert stats.first_position_rate == pytest.approx(4 / 6)


def test_identical_candidates_are_ties_without_asking_and_unread_pairs_are_skipped():
    judge = Recording(lambda first, second: 0.7)
    labels, stats = judge_items(items_of(("same", "same")), judge)
    assert judge.questions == [] and labels[0].outcome == "tie" and stats.identical == 1 and stats.pairs == 0

    def too_long(questions):
        return [Reading(None, note="the judge prompt is 900 tokens, longer than the judge's 512") for _ in questions]

    labels, stats = judge_items(items_of(("x", "y")), too_long)
    assert labels[0].outcome == "skip" and "900 tokens" in labels[0].details["reason"]
    assert stats.unread == 1 and stats.report()["pairs too long for the judge (skipped)"] == 1


# ---------------------------------------------------------------- the model part, on the builtin tiny GPT-2


@pytest.fixture(scope="module")
def tiny():
    from rlhf_cli.recipe import ModelSpec

    return load_judge_model(ModelSpec(name_or_path="builtin:tiny-gpt2"), seed=0)


QUESTIONS = [Question("Say hello.", "Hello there!", "Go away."),
             Question([{"role": "user", "content": "What is two plus two?"}], "Four.", "It is four, of course."),
             Question("Hi", "a much longer response than the other, with many more tokens in it", "ok")]  # fmt: skip


def test_the_judge_reads_p_a_from_the_next_token_distribution(tiny):
    import torch

    model, tokenizer = tiny
    judge = ModelJudge(model, tokenizer, PRINCIPLES, name="tiny")
    a_ids, b_ids = answer_token_ids(tokenizer, "tiny")
    assert [tokenizer.decode([i]).strip() for i in a_ids + b_ids] == ["A"] * len(a_ids) + ["B"] * len(b_ids)
    readings = judge(QUESTIONS)
    for question, reading in zip(QUESTIONS, readings):
        ids = torch.tensor([judge.encode(question)])
        with torch.no_grad():
            probs = model(input_ids=ids).logits[0, -1].float().softmax(-1)
        p_a, p_b = probs[a_ids].sum().item(), probs[b_ids].sum().item()
        assert reading.p_first == pytest.approx(p_a / (p_a + p_b), abs=1e-5)
        assert 1 - reading.p_first == pytest.approx(p_b / (p_a + p_b), abs=1e-5)  # p(A) + p(B) = 1
        assert reading.answer_mass == pytest.approx(p_a + p_b, rel=1e-4)


def test_batched_equals_unbatched(tiny):
    model, tokenizer = tiny
    judge = ModelJudge(model, tokenizer, PRINCIPLES, name="tiny")
    lengths = {len(judge.encode(question)) for question in QUESTIONS}
    assert len(lengths) == len(QUESTIONS)  # different lengths: the batch is left-padded
    batched = [reading.p_first for reading in judge(QUESTIONS)]
    alone = [judge([question])[0].p_first for question in QUESTIONS]
    assert batched == pytest.approx(alone, abs=1e-5)


def test_the_rendered_prompt_holds_the_principles_the_responses_and_the_question(tiny):
    _, tokenizer = tiny
    judge = ModelJudge(tiny[0], tokenizer, PRINCIPLES, name="tiny")
    text = tokenizer.decode(judge.encode(QUESTIONS[1]))
    assert text.startswith("<|system|>") and text.endswith("<|assistant|>")  # the chat template, generation prompt
    assert "1. Be kind.\n2. Be brief." in text and "[Response A]\nFour." in text
    assert "[Response B]\nIt is four, of course." in text and "User: What is two plus two?" in text
    assert JUDGE_QUESTION in text


def test_a_template_without_a_system_role_gets_the_principles_in_the_user_turn(tiny):
    model, tokenizer = tiny
    strict = copy.deepcopy(tokenizer)
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                            "{{ raise_exception('System role not supported') }}{% endif %}"
                            "<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}<|assistant|>")  # fmt: skip
    judge = ModelJudge(model, strict, PRINCIPLES, name="strict")
    text = strict.decode(judge.encode(QUESTIONS[0]))
    assert text.startswith("<|user|>You judge") and "1. Be kind." in text and "<|system|>" not in text


def test_model_judge_labels_every_pair_in_both_orders(tiny):
    model, tokenizer = tiny
    judge = ModelJudge(model, tokenizer, PRINCIPLES, name="tiny")
    items = items_of(("Hello there!", "Go away.", "Hi."))
    labels, stats = judge_items(items, judge, batch_size=3, annotator="builtin:tiny-gpt2")
    assert len(labels) == 3 and stats.pairs == 3
    orders = [(items[0].candidates[label.a], items[0].candidates[label.b]) for label in labels]
    readings = judge([Question(items[0].prompt, *pair) for x, y in orders for pair in ((x, y), (y, x))])
    for n, label in enumerate(labels):
        p1, p2 = readings[2 * n].p_first, readings[2 * n + 1].p_first
        assert label.details["p_first"] == [pytest.approx(p1, abs=1e-5), pytest.approx(p2, abs=1e-5)]
        assert label.outcome == decide(p1, p2).outcome and label.annotator == "builtin:tiny-gpt2"


def test_a_question_longer_than_the_judge_reads_is_skipped_not_cut(tiny):
    model, tokenizer = tiny
    judge = ModelJudge(model, tokenizer, PRINCIPLES, name="tiny", max_length=60)
    readings = judge(QUESTIONS)
    assert all(reading.p_first is None and "longer than the judge's 60" in reading.note for reading in readings)


def test_a_judge_without_a_chat_template_is_refused(tiny, tmp_path):
    model, tokenizer = tiny
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(UserError, match="label.judge.model \\(my-base-model\\) has no chat template"):
        ModelJudge(model, bare, PRINCIPLES, name="label.judge.model (my-base-model)")
    # Loading: the judge's own tokenizer decides, checked before the model loads (no plain template is made up).
    from rlhf_cli.recipe import ModelSpec

    bare.save_pretrained(tmp_path / "bare-tokenizer")
    spec = ModelSpec(name_or_path="builtin:tiny-gpt2", tokenizer=str(tmp_path / "bare-tokenizer"))
    with pytest.raises(UserError, match="has no chat template.*instruction-tuned"):
        load_judge_model(spec, seed=0)


def test_a_tokenizer_that_cannot_spell_a_and_b_in_one_token_is_refused():
    class Spelled:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text] + [0]}  # every letter takes two tokens

        def decode(self, ids):
            return "".join(chr(i) for i in ids if i)

    with pytest.raises(UserError, match="spells neither 'A' nor ' A' as a single token"):
        answer_token_ids(Spelled(), "odd-model")


def test_judge_messages_for_a_text_prompt():
    messages = judge_messages(["Be kind."], Question("Say hi.", "hi", "go away"))
    assert [m["role"] for m in messages] == ["system", "user"] and "1. Be kind." in messages[0]["content"]
    assert messages[1]["content"].startswith("[Prompt]\nSay hi.\n\n[Response A]\nhi\n\n[Response B]\ngo away")


# ---------------------------------------------------------------- critique and revise


def test_critique_and_revise_writes_rows_with_every_key(tiny):
    from rlhf_cli.recipe import SamplingSpec

    model, tokenizer = tiny
    sampling = SamplingSpec(max_new_tokens=3, batch_size=2, temperature=1.0)
    prompts = ["Say hello.", [{"role": "user", "content": "What is two plus two?"}], "Name a colour."]
    responses = ["Go away.", "Five.", "Blue."]
    rows, report = critique_and_revise(model, tokenizer, prompts, responses, PRINCIPLES, sampling, seed=3)
    assert len(rows) == 3 and report["responses revised"] == 3
    for row, prompt, response in zip(rows, prompts, responses):
        assert set(row) == {"prompt", "completion", "original", "critique", "principle"}
        assert row["prompt"] == prompt and row["original"] == response and row["principle"] in PRINCIPLES
        assert isinstance(row["critique"], str)
        if isinstance(prompt, list):  # the completion in the prompt's style
            assert row["completion"][0]["role"] == "assistant" and isinstance(row["completion"][0]["content"], str)
        else:
            assert isinstance(row["completion"], str)
    again, _ = critique_and_revise(model, tokenizer, prompts, responses, PRINCIPLES, sampling, seed=3)
    assert again == rows  # seeded: the same principles, critiques and revisions
    assert set(report) >= {"critiques cut at max_new_tokens", "revisions cut at max_new_tokens", "empty revisions"}


def test_critique_and_revise_needs_a_chat_template(tiny):
    from rlhf_cli.recipe import SamplingSpec

    model, tokenizer = tiny
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(UserError, match="no chat template, and the critique-and-revise mode"):
        critique_and_revise(model, bare, ["hi"], ["yo"], PRINCIPLES, SamplingSpec(max_new_tokens=2), seed=0,
                            name="model (base)")  # fmt: skip


# ---------------------------------------------------------------- the real judge (deselected unless -m real)


@pytest.mark.real
def test_smollm2_answers_the_judge_with_a_letter(shared_dir):
    """SmolLM2-135M-Instruct (GGUF, ../shared) as judge on 4 human-labelled HH pairs: its template and A/B tokens
    work and it puts real probability on the letters. Its agreement with people: benchmarks/judge_agreement.py."""
    from rlhf_cli.data import load_data
    from rlhf_cli.recipe import DataSource, ModelSpec

    directory, gguf = shared_dir / "models" / "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not (directory / gguf).is_file():
        pytest.skip(f"{directory / gguf} is absent")
    pytest.importorskip("gguf")
    model, tokenizer = load_judge_model(ModelSpec(name_or_path=str(directory), gguf_file=gguf), seed=0)
    pairs = load_data(DataSource(path=str(shared_dir / "data" / "hh-rlhf-harmless" / "pairs.jsonl.gz"), limit=4),
                      "preference")  # fmt: skip
    items = [Item(str(n), row["prompt"], (row["chosen"][0]["content"], row["rejected"][0]["content"]), "hh")
             for n, row in enumerate(pairs)]  # fmt: skip
    judge = ModelJudge(model, tokenizer, load_constitution(), name="smollm2")
    labels, stats = judge_items(items, judge, batch_size=8)
    assert stats.pairs == 4 and len(labels) == 4
    assert all(0.0 < p < 1.0 for label in labels for p in label.details["p_first"])
    assert stats.report()["mean answer-token mass p(A)+p(B)"] > 0.1  # it answers with a letter, not with prose
