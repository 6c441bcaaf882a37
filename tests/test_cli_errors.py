"""Every bad input ends in one clear paragraph on stderr, exit code 2, no traceback, and no files written."""

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import TINY, assert_clean_failure
from rlhf_cli.cli import app

runner = CliRunner()


def write_recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def tiny_recipe(tmp_path: Path, name: str = "sft.yaml", **replace: str) -> Path:
    """A copy of a tiny recipe next to a copy of its data, with textual replacements."""
    shutil.copytree(TINY / "data", tmp_path / "data", dirs_exist_ok=True)
    text = (TINY / name).read_text()
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / name
    path.write_text(text)
    return path


def test_missing_recipe_file(tmp_path):
    assert_clean_failure(["sft", str(tmp_path / "nope.yaml")], "does not exist")


def test_invalid_yaml(tmp_path):
    path = write_recipe(tmp_path, "model: [unclosed\n")
    assert_clean_failure(["sft", str(path)], "is not valid YAML")


def test_recipe_not_a_mapping(tmp_path):
    path = write_recipe(tmp_path, "- a\n- b\n")
    assert_clean_failure(["sft", str(path)], "must hold a YAML mapping")


def test_unknown_top_level_key(tmp_path):
    out = tmp_path / "out"
    path = tiny_recipe(tmp_path, **{"training:": "trainig:"})
    assert_clean_failure(["sft", str(path), "-o", str(out)], "trainig: unknown key", "Did you mean 'training'?",
                         out=out)


def test_unknown_nested_key(tmp_path):
    path = tiny_recipe(tmp_path, **{"name_or_path:": "name_or_pth:"})
    assert_clean_failure(["sft", str(path)], "model.name_or_pth: unknown key", "'name_or_path'")


def test_missing_required_key(tmp_path):
    path = write_recipe(tmp_path, "data: {train: {path: x.jsonl}}\n")
    assert_clean_failure(["sft", str(path)], "model: required key is missing")


def test_wrong_type_in_recipe(tmp_path):
    path = tiny_recipe(tmp_path, **{"seed: 42": "seed: forty-two"})
    assert_clean_failure(["sft", str(path)], "seed:", "integer")


def test_wrong_type_in_training(tmp_path):
    path = tiny_recipe(tmp_path, **{"num_train_epochs: 8": "num_train_epochs: many"})
    assert_clean_failure(["sft", str(path)], "training.num_train_epochs: expected float, got str 'many'")


def test_unknown_training_key(tmp_path):
    path = tiny_recipe(tmp_path, **{"learning_rate:": "learnig_rate:"})
    assert_clean_failure(["sft", str(path)], "training.learnig_rate: not a field of SFTConfig",
                         "Did you mean 'learning_rate'?")


def test_negative_learning_rate(tmp_path):
    path = tiny_recipe(tmp_path)
    assert_clean_failure(["sft", str(path), "--set", "training.learning_rate=-1e-4"],
                         "training.learning_rate: must be > 0")


def test_bad_strategy(tmp_path):
    path = tiny_recipe(tmp_path)
    assert_clean_failure(["sft", str(path), "--set", "distributed.strategy=zero4"], "distributed.strategy",
                         "'none', 'ddp', 'zero2' or 'zero3'")


def test_offload_without_zero(tmp_path):
    path = tiny_recipe(tmp_path)
    assert_clean_failure(["sft", str(path), "--set", "distributed.offload=optimizer"], "needs strategy zero2 or zero3")


def test_key_owned_by_another_section(tmp_path):
    path = tiny_recipe(tmp_path)
    assert_clean_failure(["sft", str(path), "--set", "training.output_dir=x"], "training.output_dir is not set here")


def test_bad_set_syntax(tmp_path):
    path = tiny_recipe(tmp_path)
    assert_clean_failure(["sft", str(path), "--set", "training.learning_rate"], "--set expects key.path=value")


def test_stage_mismatch(tmp_path):
    path = tiny_recipe(tmp_path, "rm.yaml")
    assert_clean_failure(["sft", str(path)], "says `stage: rm`", "rlhf train-rm")


def test_missing_data_file(tmp_path):
    path = tiny_recipe(tmp_path, **{"data/sft.jsonl": "data/missing.jsonl"})
    assert_clean_failure(["sft", str(path)], "data.train.path", "does not exist")


def test_missing_model_directory(tmp_path):
    path = tiny_recipe(tmp_path, **{"builtin:tiny-gpt2": "./no-such-model"})
    assert_clean_failure(["sft", str(path)], "model.name_or_path", "does not exist")


def test_unknown_builtin_model(tmp_path):
    path = tiny_recipe(tmp_path, **{"builtin:tiny-gpt2": "builtin:tiny-llama"})
    assert_clean_failure(["sft", str(path)], "unknown builtin model 'builtin:tiny-llama'")


def test_no_output_dir(tmp_path):
    path = tiny_recipe(tmp_path, **{"output_dir: runs/tiny-sft": "seed: 1"})
    path.write_text(path.read_text().replace("seed: 42\n", ""))
    assert_clean_failure(["sft", str(path)], "No output directory")


def test_empty_dataset(tmp_path):
    out = tmp_path / "out"
    path = tiny_recipe(tmp_path)
    (tmp_path / "data" / "sft.jsonl").write_text("")
    assert_clean_failure(["sft", str(path), "-o", str(out)], "sft.jsonl", "empty", out=out)


def test_dataset_without_needed_columns(tmp_path):
    out = tmp_path / "out"
    path = tiny_recipe(tmp_path, "rm.yaml", **{"data/preference.jsonl": "data/sft.jsonl"})
    assert_clean_failure(["train-rm", str(path), "-o", str(out)], "data.train", "chosen", out=out)


def test_malformed_row(tmp_path):
    out = tmp_path / "out"
    path = tiny_recipe(tmp_path, "rm.yaml")
    data = tmp_path / "data" / "preference.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    del rows[2]["rejected"]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert_clean_failure(["train-rm", str(path), "-o", str(out)], "preference.jsonl", "row 3", "'rejected'", out=out)


def test_a_folder_the_tool_did_not_create_is_refused_and_left_alone_even_with_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    path = tiny_recipe(tmp_path)
    for flags in ([], ["--overwrite"], ["--resume"]):
        assert_clean_failure(["sft", str(path), "-o", str(out), *flags], "is not empty", "not created by rlhf")
        assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_previous_run_is_refused_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".rlhf-run").write_text("{}")
    (out / "summary.json").write_text("{}")
    path = tiny_recipe(tmp_path)
    assert_clean_failure(["sft", str(path), "-o", str(out)], "holds a previous run", "--overwrite", "--resume")
    assert sorted(p.name for p in out.iterdir()) == [".rlhf-run", "summary.json"]


def test_resume_without_checkpoint(tmp_path):
    out = tmp_path / "out"
    path = tiny_recipe(tmp_path)
    assert_clean_failure(["sft", str(path), "-o", str(out), "--resume"], "no checkpoint", out=out)


def test_overwrite_and_resume_together(tmp_path):
    path = tiny_recipe(tmp_path)
    assert_clean_failure(["sft", str(path), "-o", str(tmp_path / "o"), "--resume", "--overwrite"], "choose one")


def test_hub_model_that_cannot_be_loaded(tmp_path):
    out = tmp_path / "out"
    path = tiny_recipe(tmp_path, **{"builtin:tiny-gpt2": "no-such-org/no-such-model-xyz"})
    assert_clean_failure(["sft", str(path), "-o", str(out)], "no-such-org/no-such-model-xyz", out=out)


def test_tokenizer_larger_than_the_model_vocabulary(tmp_path):
    """A tokenizer from elsewhere whose ids the model cannot embed is refused before training."""
    from rlhf_cli.models import materialize_builtin
    from rlhf_cli.recipe import BuiltinSpec

    # (the builtin model itself sizes its embedding to a tokenizer it is given; a saved model cannot)
    big_tokenizer = materialize_builtin("builtin:tiny-gpt2", BuiltinSpec(), seed=42)
    small_model = materialize_builtin("builtin:tiny-gpt2", BuiltinSpec(vocab_size=300), seed=42)
    out = tmp_path / "out"
    path = tiny_recipe(tmp_path)
    assert_clean_failure(["sft", str(path), "-o", str(out), "--set", f"model.name_or_path={small_model}",
                          "--set", f"model.tokenizer={big_tokenizer}"], "tokenizer", "embeds", out=out)


def test_validate_and_show_need_a_stage(tmp_path):
    path = tiny_recipe(tmp_path)
    path.write_text(path.read_text().replace("stage: sft\n", ""))
    assert_clean_failure(["recipe", "validate", str(path)], "cannot tell which stage")
    result = runner.invoke(app, ["recipe", "validate", str(path), "--stage", "sft"])
    assert result.exit_code == 0, result.output


def test_max_length_beyond_the_builtin_model(tmp_path):
    path = tiny_recipe(tmp_path)
    assert_clean_failure(["sft", str(path), "--set", "data.max_length=4096"], "exceeds model.builtin.n_positions")


def test_ppo_recipe_needs_its_ppo_section(tmp_path):
    path = tiny_recipe(tmp_path, "ppo.yaml")
    text = path.read_text()
    path.write_text(text[: text.index("ppo:\n")] + text[text.index("training:"):])
    assert_clean_failure(["ppo", str(path)], "needs a `ppo:` section")


def test_ppo_reward_needs_exactly_one_source(tmp_path):
    path = tiny_recipe(tmp_path, "ppo.yaml")
    assert_clean_failure(["ppo", str(path), "--set", "ppo.reward={}"], "ppo.reward", "exactly one of 'model'")


def test_ppo_reward_model_with_another_tokenizer(tmp_path):
    """A reward model whose tokenizer differs from the policy's is refused before training."""
    from rlhf_cli.models import materialize_builtin
    from rlhf_cli.recipe import BuiltinSpec

    policy = materialize_builtin("builtin:tiny-gpt2", BuiltinSpec(vocab_size=300), seed=1)
    reward = materialize_builtin("builtin:tiny-gpt2", BuiltinSpec(), seed=1)
    out = tmp_path / "out"
    path = tiny_recipe(tmp_path, "ppo.yaml")
    assert_clean_failure(["ppo", str(path), "-o", str(out), "--set", f"model.name_or_path={policy}",
                          "--set", f"ppo.reward.model={reward}"], "different tokenizer", out=out)


def test_ppo_mini_batch_must_divide_rollout_batch(tmp_path):
    path = tiny_recipe(tmp_path, "ppo.yaml")
    assert_clean_failure(["ppo", str(path), "--set", f"model.name_or_path={TINY}", "--set",
                          f"ppo.reward.model={TINY}", "--set", "training.mini_batch_size=5"], "must divide")


def test_ppo_rule_reward_that_cannot_be_imported(tmp_path):
    out = tmp_path / "out"
    path = tiny_recipe(tmp_path, "ppo.yaml")
    assert_clean_failure(["ppo", str(path), "-o", str(out), "--set", "model.name_or_path=builtin:tiny-gpt2",
                          "--set", "ppo.reward={function: 'no_such_module:score'}"],
                         "ppo.reward.function 'no_such_module:score' cannot be imported", out=out)


def test_distributed_ppo_checks_its_inputs_before_launching(tmp_path):
    out = tmp_path / "out"
    path = tiny_recipe(tmp_path, "ppo.yaml")
    assert_clean_failure(["ppo", str(path), "-o", str(out), "--set", "model.name_or_path=builtin:tiny-gpt2",
                          "--set", "ppo.reward={function: 'no_such_module:score'}", "--set", "distributed.strategy=zero3",
                          "--set", "distributed.num_processes=2"], "cannot be imported", out=out)  # fmt: skip


def test_grpo_has_no_critic_to_set(tmp_path):
    path = tiny_recipe(tmp_path, "grpo.yaml")
    assert_clean_failure(["ppo", str(path), "--set", f"ppo.value_model={TINY}"], "grpo has no critic")


def test_grpo_training_keys_are_grpo_config_keys(tmp_path):
    path = tiny_recipe(tmp_path, "grpo.yaml")
    assert_clean_failure(["ppo", str(path), "--set", "training.ppo_epochs=4"], "GRPOConfig", "ppo_epochs")


@pytest.mark.parametrize(
    ("setting", "fragment"),
    [
        ("ppo.alarms={windw: 3}", "unknown alarms key(s) windw"),
        ("ppo.alarms={mode: loud}", "alarm mode must be one of off, warn, stop"),
        ("training.lr_schedule=cosine", "lr_schedule must be 'constant' or 'linear'"),
        ("training.gradient_accumulation_steps=3", "gradient_accumulation_steps must divide mini_batch_size"),
    ],
)
def test_ppo_bad_alarm_and_schedule_settings(tmp_path, setting, fragment):
    out = tmp_path / "out"
    path = tiny_recipe(tmp_path, "ppo.yaml")
    assert_clean_failure(["ppo", str(path), "-o", str(out), "--set", f"model.name_or_path={TINY}",
                          "--set", f"ppo.reward.model={TINY}", "--set", setting], fragment, out=out)  # fmt: skip


def test_ppo_lora_mode_is_refused_under_zero3(tmp_path):
    path = tiny_recipe(tmp_path, "ppo.yaml")
    assert_clean_failure(["ppo", str(path), "--set", f"model.name_or_path={TINY}", "--set", f"ppo.reward.model={TINY}",
                          "--set", "model.lora={r: 4}", "--set", "distributed.strategy=zero3"],
                         "LoRA mode does not run under zero3")  # fmt: skip


def test_a_bad_input_found_inside_a_distributed_worker_still_exits_2(tmp_path):
    """The launcher turns any worker failure into 1; a worker that stops on a bad input makes it 2 again."""
    import subprocess
    import sys

    empty = tmp_path / "empty-model"
    empty.mkdir()
    out = tmp_path / "out"
    path = tiny_recipe(tmp_path, "rm.yaml")
    result = subprocess.run(
        [sys.executable, "-m", "rlhf_cli.cli", "train-rm", str(path), "-o", str(out),
         "--set", f"model.name_or_path={empty}", "--set", "distributed.strategy=ddp",
         "--set", "distributed.num_processes=2"],
        capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Error: Cannot load the tokenizer" in result.stderr
    assert not out.exists()
