"""Recipe loading, overrides, validation messages and path resolution (no torch involved)."""

import sys
from pathlib import Path

import pytest

from rlhf_cli.errors import UserError
from rlhf_cli.recipe import apply_overrides, describe_keys, load_recipe, parse_yaml, recipe_to_yaml, validate_recipe
from rlhf_cli.trl_fields import check_training_keys, config_default, config_fields, value_matches

REPO = Path(__file__).resolve().parents[1]


def minimal(**extra):
    raw = {"model": {"name_or_path": "builtin:tiny-gpt2"}, "data": {"train": {"name": "org/dataset"}}}
    raw.update(extra)
    return raw


def test_yaml_reads_exponent_floats():
    assert parse_yaml("lr: 1e-5", "x")["lr"] == pytest.approx(1e-5)
    assert parse_yaml("lr: 3.0e-3", "x")["lr"] == pytest.approx(3e-3)
    assert parse_yaml("v: 10", "x")["v"] == 10


def test_overrides_nested_and_typed():
    raw = apply_overrides(minimal(), ["training.learning_rate=1e-4", "distributed.strategy=zero3", "seed=7"])
    assert raw["training"]["learning_rate"] == pytest.approx(1e-4)
    assert raw["distributed"]["strategy"] == "zero3"
    assert raw["seed"] == 7


def test_override_into_a_value_is_an_error():
    with pytest.raises(UserError, match="seed is a value, not a section"):
        apply_overrides(minimal(seed=1), ["seed.x=2"])
    with pytest.raises(UserError, match="key.path=value"):
        apply_overrides(minimal(), ["no-equals-sign"])


def test_unknown_key_suggests_the_right_one():
    raw = minimal()
    raw["model"]["name_or_pth"] = "x"
    with pytest.raises(UserError, match=r"model.name_or_pth: unknown key. Did you mean 'name_or_path'\?"):
        validate_recipe(raw, "sft")


def test_unknown_training_key_and_type_and_bound():
    problems = check_training_keys("SFTConfig", {"learnin_rate": 1e-4, "num_train_epochs": "many", "learning_rate": -1})
    assert any("Did you mean 'learning_rate'" in p for p in problems)
    assert any("num_train_epochs: expected float" in p for p in problems)
    assert any("learning_rate: must be > 0" in p for p in problems)


def test_trl_fields_come_from_installed_source_without_importing_torch():
    before = set(sys.modules)
    fields = config_fields("RewardConfig")
    assert "center_rewards_coefficient" in fields and "learning_rate" in fields
    assert config_default("SFTConfig", "per_device_train_batch_size") == 8
    assert "torch" not in set(sys.modules) - before


@pytest.mark.parametrize(
    ("annotation", "value", "ok"),
    [("float", 1, True), ("float", "x", False), ("int", True, False), ("bool | None", None, True),
     ("Optional[int]", 3, True), ("list[str] | None", ["a"], True), ("SchedulerType | str", "cosine", True),
     ("dict | str | None", 5, False)],
)
def test_value_matches(annotation, value, ok):
    assert value_matches(annotation, value) is ok


def test_training_keys_owned_elsewhere():
    with pytest.raises(UserError, match="training.output_dir is not set here"):
        validate_recipe(minimal(training={"output_dir": "x"}), "sft")


def test_stage_key_must_match_command():
    with pytest.raises(UserError, match="rlhf train-rm"):
        validate_recipe(minimal(stage="rm"), "sft")


def test_distributed_consistency():
    with pytest.raises(UserError, match="offload"):
        validate_recipe(minimal(distributed={"strategy": "ddp", "offload": "optimizer"}), "sft")
    with pytest.raises(UserError, match="main_process_ip"):
        validate_recipe(minimal(distributed={"strategy": "zero3", "num_machines": 2}), "sft")
    with pytest.raises(UserError, match="strategy"):
        validate_recipe(minimal(distributed={"strategy": "zero4"}), "sft")


def test_paths_resolve_relative_to_the_recipe(tmp_path):
    (tmp_path / "sub").mkdir()
    data = tmp_path / "sub" / "d.jsonl"
    data.write_text('{"text": "hi"}\n')
    recipe = tmp_path / "sub" / "r.yaml"
    recipe.write_text("model: {name_or_path: builtin:tiny-gpt2}\ndata: {train: {path: d.jsonl}}\n")
    loaded = load_recipe(recipe, "sft")
    assert loaded.data.train.path == str(data)


def test_override_paths_resolve_against_cwd(tmp_path, monkeypatch):
    (tmp_path / "mine.jsonl").write_text('{"text": "hi"}\n')
    recipe = REPO / "recipes" / "tiny" / "sft.yaml"
    monkeypatch.chdir(tmp_path)
    loaded = load_recipe(recipe, "sft", ["data.train.path=mine.jsonl"])
    assert loaded.data.train.path == str(tmp_path / "mine.jsonl")


def test_missing_local_path_is_an_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name_or_path: ./no-model}\ndata: {train: {path: nothing.jsonl}}\n")
    with pytest.raises(UserError, match="does not exist"):
        load_recipe(recipe, "sft")


def test_show_round_trips_with_defaults():
    loaded = load_recipe(REPO / "recipes" / "tiny" / "sft.yaml", "sft")
    text = recipe_to_yaml(loaded)
    again = validate_recipe(parse_yaml(text, "shown"), "sft")
    assert again == loaded
    assert "distributed:" in text and "strategy: none" in text


def test_describe_keys_lists_nested_keys_with_help():
    keys = {key: (default, meaning) for key, default, meaning in describe_keys()}
    assert keys["distributed.strategy"][0] == "none"
    assert keys["model.lora.r"][0] == "16"
    assert keys["model.name_or_path"][0] == "(required)"
    assert all(meaning for key, (default, meaning) in keys.items() if key != "model")
