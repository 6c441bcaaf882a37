"""data.on_too_long: the truncation rule on hand-made token lists, and training runs whose counts match what the
trainer trained on (TRL's RewardTrainer would otherwise drop every pair longer than max_length, silently)."""

import json
import math

import pytest
from typer.testing import CliRunner

from conftest import TINY, assert_clean_failure
from rlhf_cli.cli import app
from rlhf_cli.errors import UserError
from rlhf_cli.lengths import (
    Encoded,
    budget,
    fit_rows,
    length_for_coverage,
    length_percentiles,
    percentile,
    scoring_split,
    truncate_pair,
    truncate_prompt,
    truncate_prompt_completion,
    truncate_text,
    windows,
)

# ---------------------------------------------------------------- the rule on token lists


def test_nothing_is_cut_when_prompt_and_longest_response_fit():
    assert budget(3, [2, 4], 10) == (3, [2, 4])
    assert budget(3, [7], 10) == (3, [7])


def test_a_short_response_costs_the_prompt_only_what_it_needs():
    # 10 + 5 > 12: the prompt keeps 12 - 5 = 7 tokens (its end), both responses stay whole.
    assert budget(10, [3, 5], 12) == (7, [3, 5])


def test_when_both_sides_are_long_each_keeps_half():
    assert budget(10, [20, 4], 12) == (6, [6, 4])
    assert budget(3, [20], 12) == (3, [9])  # a short prompt stays whole, the response takes the rest


def test_a_prompt_alone_too_long_is_cut_from_the_left():
    assert budget(30, [], 8) == (8, [])
    assert truncate_prompt(list(range(30)), 8) == list(range(22, 30))
    assert budget(30, [2], 8) == (6, [2])


def test_every_response_keeps_at_least_one_token():
    assert budget(5, [5], 1) == (0, [1])
    assert budget(5, [5, 1], 3) == (1, [2, 1])


def test_truncate_pair_keeps_the_prompt_end_and_each_response_start():
    prompt, chosen, rejected = list(range(1, 11)), [11, 12, 13], [21, 22, 23, 24, 25]
    kept_chosen, kept_rejected = truncate_pair(prompt, chosen, rejected, 12)
    assert kept_chosen == [4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert kept_rejected == [4, 5, 6, 7, 8, 9, 10, 21, 22, 23, 24, 25]  # the same prompt tokens for both


def test_sft_rows():
    assert truncate_prompt_completion([1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12], 6) == [4, 5, 6, 7, 8, 9]
    assert truncate_text([1, 2, 3, 4, 5], 3) == [1, 2, 3]  # a text row keeps its start


def test_windows_share_the_prompt_and_none_keeps_the_start():
    assert windows([6, 4], 3, 4) == [(1, 5), (1, 4)]
    assert windows([6, 2], None, 4) == [(0, 4), (0, 2)]


def test_scoring_split_cuts_as_training_and_keeps_a_query_token():
    assert scoring_split([[1, 2, 3, 4, 5, 6]], 3, 4) == [([2, 3], [4, 5])]
    assert scoring_split([[1, 2, 3]], 0, 10) == [([1], [2, 3])]  # no prompt: the first token is the query
    assert scoring_split([[1, 2, 3]], 3, 10) == [([1, 2], [3])]  # no response: the last token is scored


def test_percentiles_are_nearest_rank():
    lengths = list(range(1, 21))
    assert percentile(lengths, 50) == 10 and percentile(lengths, 95) == 19 and percentile(lengths, 99) == 20
    assert length_percentiles(lengths) == {"p50": 10, "p90": 18, "p95": 19, "p99": 20, "max": 20}
    assert length_for_coverage(lengths) == 19  # 19 of the 20 rows fit in 19 tokens
    assert percentile([], 50) == 0


def _rows() -> list[Encoded]:
    return [
        Encoded([[1, 2, 3]], None),
        Encoded([[1, 2, 3, 4, 5, 6]], 4, [{"completion_mask": [0, 0, 0, 0, 1, 1]}]),  # too long
        Encoded([[9, 8, 7, 6, 5], [9, 8, 7, 1]], 3),  # a pair, too long
    ]


def test_fit_rows_truncate_cuts_masks_alike():
    fitted = fit_rows(_rows(), max_length=4, on_too_long="truncate", what="data.train")
    report = fitted.report
    assert (report.rows_in, report.kept, report.truncated, report.dropped) == (3, 3, 2, 0)
    assert report.first_too_long == (2, 6)
    sft, pair = fitted.encodings[1], fitted.encodings[2]
    assert sft.sequences == [[3, 4, 5, 6]] and sft.masks == [{"completion_mask": [0, 0, 1, 1]}] and sft.boundary == 2
    assert pair.sequences == [[8, 7, 6, 5], [8, 7, 1]]
    assert report.counts() == {"rows read": 3, "rows kept": 3, "rows truncated": 2, "rows dropped": 0}
    assert "2 of 3 rows" in report.warning() and "p95" in report.warning()


def test_fit_rows_drop_and_error():
    fitted = fit_rows(_rows(), max_length=4, on_too_long="drop", what="data.train")
    assert fitted.indices == [0] and (fitted.report.kept, fitted.report.dropped) == (1, 2)
    with pytest.raises(UserError, match=r"2 of 3 rows are longer than data.max_length \(4 tokens\); the first is "
                                        r"row 2 \(6 tokens\)"):  # fmt: skip
        fit_rows(_rows(), max_length=4, on_too_long="error", what="data.train")
    inspected = fit_rows(_rows(), max_length=4, on_too_long="error", what="data.train", check=False)
    assert inspected.report.too_long == 2 and "the run would stop (first: row 2, 6 tokens)" in inspected.report.action()
    with pytest.raises(UserError, match="no row is left"):
        fit_rows(_rows()[1:], max_length=4, on_too_long="drop", what="data.train")


def test_no_warning_at_five_percent_or_less():
    rows = [Encoded([[1]], None)] * 19 + [Encoded([[1, 2, 3]], None)]
    assert fit_rows(rows, max_length=2, on_too_long="truncate", what="data.train").report.warning() is None


# ---------------------------------------------------------------- what the trainer sees


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from rlhf_cli.models import load_tokenizer, resolve_model_path
    from rlhf_cli.recipe import ModelSpec

    spec = ModelSpec(name_or_path="builtin:tiny-gpt2")
    return load_tokenizer(spec, resolve_model_path(spec, 42), conversational=True)


def test_pairs_are_tokenized_as_trl_does(tiny_tokenizer):
    from rlhf_cli.lengths import encode_pair

    row = {"prompt": [{"role": "user", "content": "What is 2 plus 2?"}],
           "chosen": [{"role": "assistant", "content": "It is 4."}],
           "rejected": [{"role": "assistant", "content": "No."}]}  # fmt: skip
    encoded = encode_pair(tiny_tokenizer, row)
    full = tiny_tokenizer.apply_chat_template(row["prompt"] + row["chosen"], tokenize=True, return_dict=True)
    head = tiny_tokenizer.apply_chat_template(row["prompt"], tokenize=True, return_dict=True,
                                              add_generation_prompt=True)  # fmt: skip
    assert encoded.sequences[0] == list(full["input_ids"])
    assert encoded.boundary == len(head["input_ids"])  # the prompt ends after the assistant header


def test_reward_trainer_keeps_every_fitted_pair(tiny_tokenizer, tmp_path):
    """The bug this module fixes: given raw pairs TRL drops the long ones; given fitted pairs it keeps them all."""
    import trl

    from rlhf_cli.data import load_data
    from rlhf_cli.lengths import fit_dataset
    from rlhf_cli.models import load_model, resolve_model_path
    from rlhf_cli.recipe import DataSource, ModelSpec

    spec = ModelSpec(name_or_path="builtin:tiny-gpt2")
    model = load_model(spec, resolve_model_path(spec, 42), "reward", tiny_tokenizer)
    raw = load_data(DataSource(path=str(TINY / "data" / "preference.jsonl"), limit=40), "preference")
    fitted, report = fit_dataset(raw, tiny_tokenizer, "preference", max_length=24, on_too_long="truncate",
                                 what="data.train")  # fmt: skip
    assert report.truncated > 0 and report.kept == 40
    config = trl.RewardConfig(output_dir=str(tmp_path), max_length=24, report_to="none", use_cpu=True,
                              activation_checkpointing=False)
    assert len(trl.RewardTrainer(model=model, args=config, train_dataset=fitted,
                                 processing_class=tiny_tokenizer).train_dataset) == 40  # fmt: skip
    unfitted = trl.RewardTrainer(model=model, args=config, train_dataset=raw, processing_class=tiny_tokenizer)
    assert len(unfitted.train_dataset) == 40 - report.truncated  # what TRL alone would have done


@pytest.mark.parametrize("data_file", ["sft.jsonl", "preference.jsonl"])
def test_fitted_rows_equal_trls_own_tokenization(tiny_tokenizer, tmp_path, data_file):
    """With nothing to cut, the pre-tokenized rows are exactly what TRL makes of the raw rows (ids and labels)."""
    import trl

    from rlhf_cli.data import load_data
    from rlhf_cli.lengths import fit_dataset
    from rlhf_cli.models import load_model, resolve_model_path
    from rlhf_cli.recipe import DataSource, ModelSpec

    kind, head = ("sft", "causal_lm") if data_file == "sft.jsonl" else ("preference", "reward")
    spec = ModelSpec(name_or_path="builtin:tiny-gpt2")
    model = load_model(spec, resolve_model_path(spec, 42), head, tiny_tokenizer)
    raw = load_data(DataSource(path=str(TINY / "data" / data_file), limit=8), kind)
    fitted, report = fit_dataset(raw, tiny_tokenizer, kind, max_length=256, on_too_long="error", what="data.train")
    assert report.kept == 8 and report.truncated == 0
    config_class, trainer_class = ("SFTConfig", "SFTTrainer") if kind == "sft" else ("RewardConfig", "RewardTrainer")
    config = getattr(trl, config_class)(output_dir=str(tmp_path), max_length=256, report_to="none", use_cpu=True,
                                        activation_checkpointing=False)  # fmt: skip
    columns = ["input_ids", "labels"] if kind == "sft" else ["chosen_ids", "rejected_ids"]

    def prepared(data):
        trainer = getattr(trl, trainer_class)(model=model, args=config, train_dataset=data,
                                               processing_class=tiny_tokenizer)  # fmt: skip
        return [{key: row[key] for key in columns} for row in trainer.train_dataset]

    ours, theirs = prepared(fitted), prepared(raw)
    assert ours == theirs
    if kind == "sft":  # prompt/completion data keeps TRL's completion-only loss
        assert ours[0]["labels"][0] == -100 and ours[0]["labels"][-1] != -100


def test_eval_cuts_pairs_as_training_does(tiny_tokenizer):
    from rlhf_cli.data import load_data
    from rlhf_cli.lengths import fit_dataset
    from rlhf_cli.recipe import DataSource
    from rlhf_cli.stages.evaluate import pair_ids

    raw = load_data(DataSource(path=str(TINY / "data" / "preference.jsonl"), limit=16), "preference")
    fitted, report = fit_dataset(raw, tiny_tokenizer, "preference", max_length=20, on_too_long="truncate",
                                 what="data.train")  # fmt: skip
    assert report.truncated > 0
    for row, trained in zip(raw, fitted):
        chosen, rejected, shared = pair_ids(tiny_tokenizer, row)
        scored = scoring_split([chosen, rejected], shared, 20)
        assert [query + answer for query, answer in scored] == [trained["chosen_ids"], trained["rejected_ids"]]


# ---------------------------------------------------------------- runs


def _run(args: list[str]):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


RM_FAST = ["--set", "data.train.limit=40", "--set", "data.max_length=24", "--set", "training.num_train_epochs=1",
           "--set", "training.per_device_train_batch_size=8", "--set", "training.logging_steps=1"]  # fmt: skip


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_rm_run_counts_what_it_trained_on(policy, tmp_path):
    out = tmp_path / policy
    result = _run(["train-rm", str(TINY / "rm.yaml"), "-o", str(out), *RM_FAST, "--set",
                   f"data.on_too_long={policy}"])  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows read"] == 40 and "train rows" not in summary
    held = summary["rows held out for evaluation"]  # train-rm's default hold-out: 8 of the 40
    assert held == 8 and summary["held-out rows"] == summary["eval rows kept"]
    if policy == "truncate":
        assert summary["rows kept"] == 40 - held and summary["rows truncated"] > 2
        assert summary["rows dropped as too long"] == 0
    else:
        assert summary["rows dropped as too long"] > 2
        assert summary["rows kept"] == 40 - held - summary["rows dropped as too long"]
    assert summary["steps"] == math.ceil(summary["rows kept"] / 8)  # one epoch over exactly the kept rows
    assert "Warning:" in result.output and "would keep 95% of rows whole" in result.output


def test_rm_run_with_error_stops_before_writing(tmp_path):
    out = tmp_path / "error"
    assert_clean_failure(["train-rm", str(TINY / "rm.yaml"), "-o", str(out), *RM_FAST, "--set",
                          "data.on_too_long=error"], "of 40 rows are longer than data.max_length (24 tokens)",
                         "the first is row 3", out=out)  # fmt: skip


def test_sft_run_counts_truncated_rows(tmp_path):
    out = tmp_path / "sft"
    _run(["sft", str(TINY / "sft.yaml"), "-o", str(out), "--set", "data.train.limit=32", "--set",
          "data.max_length=16", "--set", "training.max_steps=2", "--set", "training.per_device_train_batch_size=8"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows read"] == summary["rows kept"] == 32
    assert 0 < summary["rows truncated"] <= 32 and summary["rows dropped as too long"] == 0


PPO_FAST = ["--set", "model.name_or_path=builtin:tiny-gpt2",
            "--set", "ppo.reward={function: 'rules:starts_with_sure'}", "--set", "training.steps=1", "--set", "training.rollout_batch_size=4", "--set",
            "training.mini_batch_size=4", "--set", "training.response_length=4", "--set", "data.max_length=8"]  # fmt: skip


def test_ppo_counts_truncated_prompts_and_error_stops_it(tmp_path):
    out = tmp_path / "ppo"
    _run(["ppo", str(TINY / "ppo.yaml"), "-o", str(out), *PPO_FAST])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompt rows read"] == summary["prompt rows kept"] == 128
    assert summary["prompt rows truncated"] > 0 and summary["prompt rows dropped"] == 0
    refused = tmp_path / "refused"
    assert_clean_failure(["ppo", str(TINY / "ppo.yaml"), "-o", str(refused), *PPO_FAST, "--set",
                          "data.on_too_long=error"], "rows are longer than data.max_length (8 tokens)", out=refused)


def test_eval_reports_the_pairs_and_demonstrations_it_cut(tmp_path):
    rm = tmp_path / "rm"
    _run(["train-rm", str(TINY / "rm.yaml"), "-o", str(rm), *RM_FAST, "--set", "training.max_steps=1"])
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(json.dumps({"stage": "eval", "model": {"name_or_path": "builtin:tiny-gpt2"}, "eval": {
        "reward_model": str(rm), "max_length": 20,
        "preferences": {"path": str(TINY / "data" / "heldout-preference.jsonl"), "limit": 16},
        "demonstrations": {"path": str(TINY / "data" / "heldout-sft.jsonl"), "limit": 8}}}))  # fmt: skip
    _run(["eval", str(recipe), "-o", str(tmp_path / "eval")])
    meta = json.loads((tmp_path / "eval" / "eval.json").read_text())["meta"]
    pairs, demonstrations = meta["preference pairs truncated"], meta["demonstrations truncated"]
    assert int(pairs.split(" of ")[0]) > 0 and pairs.split(" of ")[1].startswith("16,")
    assert int(demonstrations.split(" of ")[0]) > 0 and demonstrations.split(" of ")[1].startswith("8,")
    assert "preference pairs truncated" in (tmp_path / "eval" / "report.md").read_text()
