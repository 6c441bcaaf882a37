"""Held-out evaluation data (data.eval_split and train-rm's default hold-out), the defaults sized to the run, and
the summary's row counts from the loader's rows read on."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import TINY, assert_clean_failure
from rlhf_cli.cli import app
from rlhf_cli.data import (
    HOLDOUT_MAX_ROWS,
    HOLDOUT_MIN_DATA,
    HOLDOUT_MIN_ROWS,
    default_holdout_size,
    eval_split_size,
    holdout_indices,
)
from rlhf_cli.errors import UserError

# ---------------------------------------------------------------- the split itself (pure)


def test_holdout_is_deterministic_disjoint_and_keeps_the_order():
    train, held = holdout_indices(100, 13, seed=42)
    assert (train, held) == holdout_indices(100, 13, seed=42)  # same seed, same rows
    assert held != holdout_indices(100, 13, seed=43)[1]
    assert len(held) == 13 and len(train) == 87
    assert sorted(train + held) == list(range(100))
    assert train == sorted(train) and held == sorted(held)
    assert holdout_indices(5, 0, seed=1) == ([0, 1, 2, 3, 4], [])
    with pytest.raises(ValueError):
        holdout_indices(5, 6, seed=1)


def test_split_keeps_the_rows_themselves():
    import datasets

    from rlhf_cli.data import split_dataset

    ds = datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(50)]})
    train, held = split_dataset(ds, 5, seed=7)
    _, indices = holdout_indices(50, 5, seed=7)
    assert held["text"] == [f"row {i}" for i in indices]
    assert len(train) == 45 and not set(train["text"]) & set(held["text"])


@pytest.mark.parametrize("rows, split, size", [(256, 0.05, 13), (40, 0.05, 2), (60, 0.05, 3), (10, 0.5, 5),
                                               (3, 0.1, 1), (256, 100, 100), (2, 1, 1)])  # fmt: skip
def test_eval_split_size(rows, split, size):
    assert eval_split_size(rows, split) == size


@pytest.mark.parametrize("rows, split, fragment", [
    (1, 0.5, "leaves no row of data.train"), (256, 256, "at most 255 rows"), (10, 10, "leaves no row"),
])  # fmt: skip
def test_eval_split_size_errors(rows, split, fragment):
    with pytest.raises(UserError, match=fragment):
        eval_split_size(rows, split)


def test_default_holdout_size():
    assert default_holdout_size(HOLDOUT_MIN_DATA - 1, 0.05) == 0  # too few rows: nothing held out
    assert default_holdout_size(HOLDOUT_MIN_DATA, 0.05) == HOLDOUT_MIN_ROWS
    assert default_holdout_size(256, 0.05) == 13
    assert default_holdout_size(10_000, 0.05) == 500
    assert default_holdout_size(1_000_000, 0.05) == HOLDOUT_MAX_ROWS


# ---------------------------------------------------------------- defaults sized to the run (no model)


class _Data:
    """A stand-in for StageData: only the row counts matter to the defaults."""

    def __init__(self, train_rows: int, eval_rows: int | None):
        self.train = [None] * train_rows
        self.eval = None if eval_rows is None else [None] * eval_rows


def _kwargs(stage: str, training: dict, train_rows=243, eval_rows=13, lora=False, distributed=None):
    from rlhf_cli.launch import Hardware, plan_launch
    from rlhf_cli.recipe import validate_recipe
    from rlhf_cli.stages import STAGES
    from rlhf_cli.stages.common import trainer_config_kwargs

    model = {"name_or_path": "builtin:tiny-gpt2", **({"lora": {"r": 4}} if lora else {})}
    raw = {"model": model, "data": {"train": {"name": "org/d"}}, "training": training,
           "distributed": distributed or {}}  # fmt: skip
    recipe = validate_recipe(raw, stage)
    plan = plan_launch(recipe, stage, STAGES[stage].config_class, Path("/runs/x"), Hardware(gpus=0))
    return trainer_config_kwargs(STAGES[stage], recipe, Path("/runs/x"), plan, _Data(train_rows, eval_rows))


def test_reward_model_defaults_where_the_recipe_sets_nothing():
    kwargs = _kwargs("rm", {})
    # 243 rows / batch 8 (TRL's) = 31 optimizer steps in the one default epoch
    assert kwargs["num_train_epochs"] == 1 and kwargs["learning_rate"] == 1e-5
    assert kwargs["save_steps"] == 31 // 4 and kwargs["save_total_limit"] == 2
    assert kwargs["eval_strategy"] == "steps" and kwargs["eval_steps"] == kwargs["save_steps"]
    assert kwargs["logging_steps"] == 3
    assert _kwargs("rm", {}, lora=True)["learning_rate"] == 1e-4


def test_explicit_training_keys_always_win():
    training = {"num_train_epochs": 2, "learning_rate": 3e-4, "save_steps": 50, "save_total_limit": 5,
                "logging_steps": 7, "per_device_train_batch_size": 4}  # fmt: skip
    kwargs = _kwargs("rm", dict(training))
    assert {key: kwargs[key] for key in training} == training
    assert kwargs["eval_steps"] == 50  # evaluation follows the recipe's own checkpoint cadence
    assert _kwargs("rm", {"eval_strategy": "epoch"})["eval_strategy"] == "epoch"
    assert _kwargs("rm", {"save_strategy": "epoch"})["eval_strategy"] == "epoch"
    assert "save_steps" not in _kwargs("rm", {"save_strategy": "epoch"})


def test_sized_cadence_counts_processes_accumulation_and_max_steps():
    base = _kwargs("sft", {}, train_rows=1000, eval_rows=None)  # 3 epochs (TRL's) x 125 steps
    assert base["save_steps"] == 375 // 4 and base["logging_steps"] == 10
    assert "eval_strategy" not in base and "num_train_epochs" not in base and "learning_rate" not in base
    two = _kwargs("sft", {}, train_rows=1000, eval_rows=None, distributed={"strategy": "ddp", "num_processes": 2})
    assert two["save_steps"] == 189 // 4  # ceil(1000 / 16) = 63 batches x 3
    assert _kwargs("sft", {"gradient_accumulation_steps": 4}, 1000, None)["save_steps"] == 96 // 4
    assert _kwargs("sft", {"max_steps": 8}, 1000, None)["save_steps"] == 2
    assert _kwargs("sft", {"max_steps": 3}, 1000, None)["save_steps"] == 1


def test_recipe_show_defaults_states_what_rlhf_sets():
    from rlhf_cli.recipe import describe_keys

    rows = {key: (default, meaning) for key, default, meaning in describe_keys()}
    assert rows["training.num_train_epochs (rm)"][0] == "1"
    assert "TRL's default is 3" in rows["training.num_train_epochs (rm)"][1]
    assert rows["training.learning_rate (rm)"][0] == "1e-05 (LoRA: 0.0001)"
    assert rows["training.save_total_limit (sft, rm, dpo, kto)"][0] == "2"
    assert rows["training.beta (dpo, algorithm simpo)"][0] == "2"  # dpo's algorithms keep their own defaults
    assert rows["data.eval_split (rm)"][0] == "0.05"
    keys = [key for key, _, _ in describe_keys()]
    assert keys.index("training.num_train_epochs (rm)") == keys.index("training") + 1
    assert keys.index("data.eval_split (rm)") == keys.index("data.eval_split") + 1


# ---------------------------------------------------------------- runs


def _run(args: list[str]):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _evals(out: Path) -> list[dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "eval_loss" in line]


def _rm_recipe(tmp_path: Path, drop=("save_steps",), **data) -> Path:
    """recipes/tiny/rm.yaml with some training keys left out (their defaults apply) and data keys changed."""
    raw = yaml.safe_load((TINY / "rm.yaml").read_text())
    raw["data"]["train"]["path"] = str(TINY / "data" / "preference.jsonl")
    raw["data"].update(data)
    for key in drop:
        raw["training"].pop(key)
    path = tmp_path / "rm.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_rm_holds_out_pairs_and_reports_held_out_accuracy(tmp_path):
    out = tmp_path / "rm"
    result = _run(["train-rm", str(_rm_recipe(tmp_path)), "-o", str(out), "--set", "training.max_steps=8"])
    summary = _summary(out)
    held = default_holdout_size(256, 0.05)
    assert summary["rows read"] == 256 and summary["rows held out for evaluation"] == held == 13
    assert summary["rows kept"] == 256 - held and summary["eval rows kept"] == held
    assert summary["held-out rows"] == held and summary["held-out data"].startswith("default hold-out")
    assert 0 <= summary["held-out accuracy"] <= 1 and "held-out margin" in summary and "held-out loss" in summary
    assert "train accuracy (last log window)" in summary and "final accuracy" not in summary
    assert "eval_accuracy" not in summary
    assert f"{held} of 256 rows of data.train held out as evaluation data" in " ".join(result.output.split())
    # The default cadence: a checkpoint (and an evaluation) every 8 // 4 = 2 steps, only the newest 2 kept.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]
    assert [line["step"] for line in _evals(out)] == [2, 4, 6, 8]
    assert summary["held-out accuracy"] == _evals(out)[-1]["eval_accuracy"]
    state = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["save_steps"] == state["eval_steps"] == 2


def test_eval_split_zero_turns_the_hold_out_off(tmp_path):
    out = tmp_path / "rm"
    _run(["train-rm", str(TINY / "rm.yaml"), "-o", str(out), "--set", "data.eval_split=0",
          "--set", "training.max_steps=2"])  # fmt: skip
    summary = _summary(out)
    assert summary["rows read"] == summary["rows kept"] == 256
    assert not any(key.startswith(("held-out", "eval ")) or "held out" in key for key in summary)
    assert _evals(out) == []


def test_explicit_save_steps_is_respected_and_an_eval_split_holds_out_rows(tmp_path):
    out = tmp_path / "rm"
    _run(["train-rm", str(TINY / "rm.yaml"), "-o", str(out), "--set", "training.max_steps=7",
          "--set", "training.save_steps=3", "--set", "data.eval_split=20"])  # fmt: skip
    summary = _summary(out)
    assert summary["rows held out for evaluation"] == summary["held-out rows"] == 20
    assert summary["held-out data"].startswith("data.eval_split: 20 of 256")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-7"]  # 3, 6, the end
    assert [line["step"] for line in _evals(out)] == [3, 6, 7]  # evaluated with each checkpoint and at the end
    state = json.loads((out / "checkpoint-7" / "trainer_state.json").read_text())
    assert state["save_steps"] == 3


def test_rows_read_counts_the_loaders_drops(tmp_path):
    rows = []
    for i in range(50):
        label = 0 if i % 8 == 0 else (1 if i % 2 else 2)  # 7 ties
        first, second = (f"Answer {i}.", f"Other {i}.") if i not in (3, 5) else ("Same.", "Same.")  # 2 identical
        rows.append({"instruction": f"Question {i}?", "output_1": first, "output_2": second, "preference": label})
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = tmp_path / "rm.yaml"
    recipe.write_text(yaml.safe_dump({
        "stage": "rm", "model": {"name_or_path": "builtin:tiny-gpt2"},
        "data": {"train": {"path": str(data), "winner": {"column": "preference", "responses": ["output_1", "output_2"],
                                                         "first": 1, "second": 2, "tie": 0}}, "max_length": 64},
        "training": {"max_steps": 2, "per_device_train_batch_size": 8,
                     "activation_checkpointing": False}}))  # fmt: skip
    out = tmp_path / "out"
    _run(["train-rm", str(recipe), "-o", str(out)])
    summary = _summary(out)
    assert summary["rows read"] == 50
    assert summary["dropped by the loader: rows labelled a tie"] == 7
    assert summary["dropped by the loader: pairs with identical chosen and rejected"] == 2
    held = default_holdout_size(41, 0.05)
    assert summary["rows held out for evaluation"] == held
    assert summary["rows kept"] == 50 - 7 - 2 - held
    keys = list(summary)
    assert keys.index("rows read") < keys.index("dropped by the loader: rows labelled a tie") \
        < keys.index("rows held out for evaluation") < keys.index("rows kept")


def test_dry_run_shows_the_resolved_defaults_and_the_hold_out(tmp_path):
    recipe = _rm_recipe(tmp_path, drop=("num_train_epochs", "learning_rate", "save_steps", "logging_steps"))
    result = _run(["train-rm", str(recipe), "-o", str(tmp_path / "out"), "--dry-run"])
    text = result.output
    # 243 rows / 16 per step = 16 optimizer steps in 1 epoch: save and evaluate every 4, log every 1
    for line in ("num_train_epochs: 1", "learning_rate: 1.0e-05", "save_steps: 4", "save_total_limit: 2",
                 "eval_strategy: steps", "eval_steps: 4", "logging_steps: 1"):  # fmt: skip
        assert line in text.splitlines(), line
    flat = " ".join(text.split())
    assert "hold-out: 13 of 256 rows of data.train held out" in flat
    assert "defaults set by rlhf-cli (not in training:) (16 optimizer steps over 243 training rows)" in flat
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- bad inputs: exit 2, nothing written


@pytest.mark.parametrize("sets, fragments", [
    (["data.eval_split=0.1", f"data.eval.path={TINY / 'data' / 'heldout-preference.jsonl'}"],
     ["give data.eval or data.eval_split, not both"]),
    (["data.eval_split=0.9"], ["data.eval_split: a fraction must be in (0, 0.5]"]),
    (["data.eval_split=256"], ["data.eval_split: 256 rows of 256 leaves no row of data.train to train on",
                               "at most 255 rows"]),
    (["data.train.limit=20", "training.eval_strategy=steps"], ["data.train has 20 rows, fewer than the 40"]),
])  # fmt: skip
def test_bad_hold_outs_fail_cleanly(tmp_path, sets, fragments):
    out = tmp_path / "out"
    args = ["train-rm", str(TINY / "rm.yaml"), "-o", str(out)]
    for setting in sets:
        args += ["--set", setting]
    assert_clean_failure(args, *fragments, out=out)
