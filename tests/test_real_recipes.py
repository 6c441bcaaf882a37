"""The real-model recipes, checked as a user can check them offline, on a machine without a GPU.

Every *.yaml in recipes/gpt2, recipes/qwen2.5-0.5b, recipes/qwen3-8b-zero3, recipes/gsm8k and recipes/smollm2-135m
is picked up by glob, so a recipe added there is covered without editing this file: a stage recipe (`stage:`) by
the stage tests, a pipeline recipe (`stages:`) by the pipeline tests. Offline, a user can:

- run `rlhf recipe validate RECIPE` on the recipe as shipped. It passes for recipes that name hub models and hub
  datasets: validate resolves local paths (data paths must exist, recipe.py `_resolve_path(must_exist=True)`) but
  looks nothing up on the hub. The one failure expected offline is a model path that an earlier stage writes
  (`../../runs/gpt2-sft`): the error must then name the recipe of this repository that makes it, which also checks
  that the path matches that recipe's output_dir (a typo would not be traced back to any recipe). A PPO recipe's
  reward model (`../../runs/gpt2-rm`) is checked the same way, after the policy;
- point those model paths at a local model (what the earlier stage would have produced; here the builtin tiny GPT-2
  saved with its tokenizer) with `--set model.name_or_path=...`, and validate again;
- run `rlhf <command> RECIPE --dry-run`, which reads no hub data (it says so), downloads nothing and starts nothing;
- validate and dry-run a pipeline recipe as shipped (`rlhf recipe validate`, `rlhf pipeline RECIPE --dry-run`): its
  stages read each other's outputs, which the pipeline wires, so no stand-in model is needed.

Recipes for 8 GPUs get a note on a machine without a GPU (`check_hardware(planning=True)`), not an error. The gsm8k
and smollm2-135m recipes read their model and data from ../shared: skipped where that folder is absent. (The broad
`test_every_recipe_validates_and_dry_runs` in test_stages_e2e.py dry-runs every recipe with stand-in paths for
every model; this file checks the real recipes as shipped.)
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import REPO, SHARED

FOLDERS = ("gpt2", "qwen2.5-0.5b", "qwen3-8b-zero3", "gsm8k", "smollm2-135m")
RECIPES = sorted(path for folder in FOLDERS for path in (REPO / "recipes" / folder).glob("*.yaml"))
PIPELINES = [path for path in RECIPES if "stages" in yaml.safe_load(path.read_text(encoding="utf-8"))]
STAGE_RECIPES = [path for path in RECIPES if path not in PIPELINES]
# Model paths a stage recipe may read from an earlier stage's run directory, in the order validation checks them.
MODEL_KEYS = ("model.name_or_path", "ppo.reward.model")


def ids(recipes: list[Path]) -> list[str]:
    return [str(path.relative_to(REPO / "recipes")) for path in recipes]


def invoke(*args: str) -> tuple[int, str]:
    from rlhf_cli.cli import app

    result = CliRunner().invoke(app, list(args))
    return result.exit_code, " ".join(result.output.split())


def raw(recipe: Path) -> dict:
    return yaml.safe_load(recipe.read_text(encoding="utf-8"))


def lookup(spec: dict, key: str):
    for part in key.split("."):
        spec = spec.get(part) if isinstance(spec, dict) else None
    return spec


def made_by_an_earlier_stage(recipe: Path, key: str = "model.name_or_path") -> bool:
    """The model at `key` is a local path that does not exist yet (a run directory of another recipe)."""
    model = lookup(raw(recipe), key)
    return isinstance(model, str) and model.startswith(("./", "../")) and not (recipe.parent / model).exists()


def stand_ins(recipe: Path, local_model: str) -> list[str]:
    """--set overrides pointing every model an earlier stage would make at the local model."""
    return [arg for key in MODEL_KEYS if made_by_an_earlier_stage(recipe, key)
            for arg in ("--set", f"{key}={local_model}")]  # fmt: skip


def needs_shared(recipe: Path) -> None:
    if "../shared/" in recipe.read_text(encoding="utf-8") and not SHARED.is_dir():
        pytest.skip(f"{recipe.name} reads its model and data from {SHARED}, which is absent (a standalone clone)")


def gpus() -> int:
    from rlhf_cli.launch import Hardware

    return Hardware.detect().gpus


def check_hardware_line(recipe: Path, code: int, text: str) -> None:
    """A recipe for more processes than this machine has: a note when it has no GPU, a refusal when it has too few."""
    processes = (raw(recipe).get("distributed") or {}).get("num_processes") or 1
    visible = gpus()
    if processes > 1 and visible == 0:
        assert code == 0, text
        assert "Note: not checked against this machine, which has no GPU" in text
        assert f"distributed.num_processes: {processes} processes" in text
    elif 1 < visible < processes:
        assert code == 2 and "distributed.num_processes" in text, text
    else:
        assert code == 0, text
        assert "Note: not checked against this machine" not in text


@pytest.fixture(scope="module")
def local_model() -> str:
    """A model directory a user could point a recipe at offline: the builtin tiny GPT-2 with its tokenizer."""
    from rlhf_cli.models import materialize_builtin
    from rlhf_cli.recipe import BuiltinSpec

    return str(materialize_builtin("builtin:tiny-gpt2", BuiltinSpec(), seed=42))


@pytest.fixture(autouse=True)
def _from_the_repository_root(monkeypatch):
    monkeypatch.chdir(REPO)  # where the recipes' headers say to run them from


def test_every_folder_has_recipes_and_each_starts_with_a_header_comment():
    for folder in FOLDERS:
        assert any(path.parent.name == folder for path in RECIPES), f"no recipe found in recipes/{folder}"
    for recipe in RECIPES:
        assert recipe.read_text(encoding="utf-8").startswith("# "), f"{recipe} has no header comment"


def test_no_two_recipes_write_the_same_run_directory():
    written = {}
    for recipe in RECIPES:
        out = raw(recipe)["output_dir"]
        assert out not in written, f"{recipe} and {written.get(out)} both write {out}"
        written[out] = recipe


@pytest.mark.parametrize("recipe", STAGE_RECIPES, ids=ids(STAGE_RECIPES))
def test_validate_as_shipped_then_with_a_local_model(recipe, local_model):
    from rlhf_cli.recipe import COMMANDS

    needs_shared(recipe)
    code, text = invoke("recipe", "validate", str(recipe))
    overrides: list[str] = []
    for key in MODEL_KEYS:
        if not made_by_an_earlier_stage(recipe, key):
            continue
        # Offline and before the earlier stage has run, the only problem is the missing model, and the error says
        # which recipe of this folder makes it, run from here (the repository root).
        assert code == 2, text
        assert key in text and "does not exist yet" in text, text
        match = re.search(r"it is made by `(rlhf [\w-]+) ([^`\s]+)`", text)
        assert match, f"no recipe named as the maker of {key}: {text}"
        maker = REPO / match.group(2)
        assert maker.is_file() and maker.parent == recipe.parent, text
        assert match.group(1) == COMMANDS[raw(maker)["stage"]]
        model = (recipe.parent / lookup(raw(recipe), key)).resolve()
        assert (REPO / raw(maker)["output_dir"]).resolve() == model, f"{maker} writes {raw(maker)['output_dir']}"
        overrides += ["--set", f"{key}={local_model}"]
        code, text = invoke("recipe", "validate", str(recipe), *overrides)
    check_hardware_line(recipe, code, text)
    if code == 0:
        assert f"{recipe}: OK ({raw(recipe)['stage']} recipe" in text, text


@pytest.mark.parametrize("recipe", STAGE_RECIPES, ids=ids(STAGE_RECIPES))
def test_dry_run_offline(recipe, local_model, tmp_path):
    from rlhf_cli.recipe import COMMANDS

    needs_shared(recipe)
    spec = raw(recipe)
    overrides = stand_ins(recipe, local_model)
    out = tmp_path / "run"
    code, text = invoke(COMMANDS[spec["stage"]].split()[1], str(recipe), "--dry-run", "-o", str(out), *overrides)
    check_hardware_line(recipe, code, text)
    if code != 0:
        return  # a machine with too few GPUs refused it, as checked above
    assert "Dry run: nothing was started or written." in text, text
    assert not out.exists()
    for key in ("train", "eval"):
        source = spec["data"].get(key)
        # `rlhf ppo --dry-run` prints no Data section (its prompts are read only when it runs), so no line to check
        if source and "name" in source and spec["stage"] != "ppo":
            assert f"data.{key}: hub dataset '{source['name']}', not read in a dry run" in text, text
    if (spec.get("distributed") or {}).get("strategy") == "zero3":
        assert "accelerate.commands.launch" in text and "stage: 3" in text, text


# ---------------------------------------------------------------- pipeline recipes


def pipeline_stages(recipe: Path) -> list[str]:
    from rlhf_cli.pipeline import STAGE_ORDER

    return [name for name in STAGE_ORDER if name in raw(recipe)["stages"]]


def hub_sources(recipe: Path) -> list[str]:
    """Hub dataset names a pipeline recipe's stages read (data.train/eval and eval's prompts, pairs, demonstrations)."""
    names = []
    for section in raw(recipe)["stages"].values():
        for source in [*(section.get("data") or {}).values(), *(section.get("eval") or {}).values()]:
            if isinstance(source, dict) and "name" in source:
                names.append(source["name"])
    return names


@pytest.mark.parametrize("recipe", PIPELINES, ids=ids(PIPELINES))
def test_pipeline_validates_as_shipped(recipe):
    needs_shared(recipe)
    code, text = invoke("recipe", "validate", str(recipe))
    assert code == 0, text
    for name in pipeline_stages(recipe):
        assert f"stage {name} OK" in text, text
    assert "stage ppo OK (rlhf ppo; model from stage sft, ppo.reward.model from stage rm)" in text, text


@pytest.mark.parametrize("recipe", PIPELINES, ids=ids(PIPELINES))
def test_pipeline_dry_run_offline(recipe, tmp_path):
    needs_shared(recipe)
    out = tmp_path / "pipeline"
    code, text = invoke("pipeline", str(recipe), "--dry-run", "-o", str(out))
    assert code == 0, text
    stages = pipeline_stages(recipe)
    assert f"== pipeline {' -> '.join(stages)} -> {out} ==" in text, text
    for name in stages:
        assert f"== stage {name} -> {out / name} ==" in text, text
    assert text.count("Dry run: nothing was started or written.") == len(stages), text
    assert "SFTConfig" in text and "PPOConfig" in text, text
    for name in hub_sources(recipe):
        assert name in text, text  # named in the plan, never downloaded (the hub is off in the tests)
    assert not out.exists()

