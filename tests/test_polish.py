"""Pipeline recipes through `rlhf recipe validate/show`, missing inputs naming the command that makes them, the
pipeline's proxy-and-judge headline, and the overoptimisation scatter."""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import REPO, TINY, assert_clean_failure
from rlhf_cli.cli import app

PIPELINE = str(TINY / "pipeline.yaml")


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


# ---------------------------------------------------------------- recipe validate / show of a pipeline recipe


def test_recipe_validate_checks_every_stage_of_a_pipeline(tmp_path):
    out = tmp_path / "out"
    lines = invoke("recipe", "validate", PIPELINE, "-o", str(out)).splitlines()
    assert [line.split(": stage ")[1].split()[0:2] for line in lines] == [
        ["sft", "OK"], ["rm", "OK"], ["ppo", "OK"], ["eval", "OK"]]  # fmt: skip
    assert lines[0].startswith(f"{PIPELINE}: stage sft OK") and lines[0].endswith(str(out / "sft"))
    assert "ppo.reward.model from stage rm" in lines[2] and "eval.ppo_run from stage ppo" in lines[3]
    assert invoke("recipe", "validate", PIPELINE, "-o", str(out), "--stage", "pipeline").splitlines() == lines
    assert invoke("recipe", "validate", PIPELINE, "-o", str(out), "--stage", "ppo").splitlines() == [lines[2]]
    assert not out.exists()  # nothing written


def test_recipe_show_prints_each_stage_resolved_as_the_pipeline_builds_it(tmp_path):
    out = tmp_path / "out"
    text = invoke("recipe", "show", PIPELINE, "-o", str(out))
    comments = [line for line in text.splitlines() if line.startswith("# stage ")]
    assert comments == [f"# stage {name} ({command}) -> {out / name}" for name, command in
                        (("sft", "rlhf sft"), ("rm", "rlhf train-rm"), ("ppo", "rlhf ppo"), ("eval", "rlhf eval"))]
    documents = {doc["stage"]: doc for doc in yaml.safe_load_all(text)}
    assert list(documents) == ["sft", "rm", "ppo", "eval"]
    assert documents["rm"]["model"]["name_or_path"] == str(out / "sft")
    assert documents["ppo"]["ppo"]["reward"]["model"] == str(out / "rm")
    assert documents["eval"]["eval"]["ppo_run"] == str(out / "ppo")
    assert documents["eval"]["output_dir"] == str(out / "eval")
    assert documents["sft"]["data"]["train"]["path"] == str(TINY / "data" / "sft.jsonl")
    one = invoke("recipe", "show", PIPELINE, "-o", str(out), "--stage", "rm")
    assert one.startswith(f"# stage rm (rlhf train-rm) -> {out / 'rm'}") and "---" not in one


def test_pipeline_recipe_errors_name_the_stage_and_the_key(tmp_path):
    out = str(tmp_path / "out")
    for command in ("validate", "show"):
        assert_clean_failure(["recipe", command, PIPELINE, "-o", out, "--set", "stages.rm.training.learnin_rate=1"],
                             "Stage rm:", "learnin_rate", "Did you mean 'learning_rate'?")  # fmt: skip
    # the pipeline's own hand-off checks run too
    assert_clean_failure(["recipe", "validate", PIPELINE, "-o", out, "--set", "stages.sft.model={lora: {r: 4}}"],
                         "Stage sft: model.lora.merge is false")  # fmt: skip
    assert_clean_failure(["recipe", "validate", PIPELINE, "-o", out, "--set", "stages.ppo.training.mini_batch_size=5"],
                         "Stage ppo:", "must divide")  # fmt: skip
    assert_clean_failure(["recipe", "validate", PIPELINE, "--stage", "generate"], "pipeline recipe", "--stage")
    assert_clean_failure(["recipe", "validate", str(TINY / "sft.yaml"), "--stage", "pipeline"], "`stages:`")
    assert not Path(out).exists()


def test_validating_a_pipeline_imports_no_heavy_library():
    code = ("import sys; from typer.testing import CliRunner; from rlhf_cli.cli import app; "
            f"r = CliRunner().invoke(app, ['recipe', 'validate', {PIPELINE!r}]); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('torch', 'transformers', 'trl', 'matplotlib') if m in sys.modules))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------- a missing input names the command that makes it


@pytest.fixture()
def checkout(tmp_path, monkeypatch) -> Path:
    """A copy of recipes/tiny in a fresh checkout with no runs/, the current directory at its root."""
    root = tmp_path / "checkout"
    shutil.copytree(TINY, root / "recipes" / "tiny")
    monkeypatch.chdir(root)
    return root


def test_missing_model_names_the_recipe_that_makes_it(checkout):
    made_by_sft = "it is made by `rlhf sft recipes/tiny/sft.yaml` (output_dir of that recipe)"
    for recipe in ("ppo.yaml", "grpo.yaml", "rloo.yaml"):
        assert_clean_failure(["ppo", f"recipes/tiny/{recipe}", "--dry-run"],
                             "model.name_or_path: '../../runs/tiny-sft' does not exist yet", made_by_sft)  # fmt: skip
    assert_clean_failure(["recipe", "validate", "recipes/tiny/eval.yaml"],
                         "model.name_or_path: '../../runs/tiny-ppo' does not exist yet",
                         "it is made by `rlhf ppo recipes/tiny/ppo.yaml`")  # fmt: skip
    (checkout / "runs" / "tiny-sft").mkdir(parents=True)
    assert_clean_failure(["ppo", "recipes/tiny/ppo.yaml", "--dry-run"],
                         "ppo.reward.model: '../../runs/tiny-rm' does not exist yet",
                         "it is made by `rlhf train-rm recipes/tiny/rm.yaml` (output_dir of that recipe)")  # fmt: skip
    (checkout / "runs" / "tiny-ppo").mkdir()
    assert_clean_failure(["recipe", "validate", "recipes/tiny/eval.yaml", "--set", "eval.reference=../../runs/x"],
                         "eval.reference: '../../runs/x' does not exist (looked for")  # fmt: skip
    flat = assert_clean_failure(["recipe", "validate", "recipes/tiny/eval.yaml"], "eval.reward_model",
                                "`rlhf train-rm recipes/tiny/rm.yaml`")  # fmt: skip
    assert "does not exist yet" in flat


def test_missing_input_from_another_directory_says_where_to_run(checkout, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_clean_failure(["ppo", str(checkout / "recipes/tiny/ppo.yaml"), "--dry-run"],
                         f"it is made by `cd {checkout.resolve()} && rlhf sft recipes/tiny/sft.yaml`")  # fmt: skip


def test_an_output_dir_written_as_a_hub_id_is_not_taken_for_one(checkout):
    # `runs/tiny-sft` does not look like a path: before, it passed validation as a hub id and failed at download
    assert_clean_failure(["ppo", "recipes/tiny/ppo.yaml", "--dry-run", "--set", "model.name_or_path=runs/tiny-sft"],
                         "model.name_or_path: 'runs/tiny-sft' does not exist yet",
                         "it is made by `rlhf sft recipes/tiny/sft.yaml`")  # fmt: skip
    # a hub id nobody here makes is still a hub id
    output = invoke("recipe", "validate", "recipes/tiny/rm.yaml", "--set", "model.name_or_path=org/some-model")
    assert "OK" in output and "model org/some-model" in output


def test_a_stage_of_a_pipeline_recipe_names_the_pipeline(checkout):
    (checkout / "recipes" / "tiny" / "ppo.yaml").unlink()  # only the pipeline makes runs/tiny-pipeline/rm now
    assert_clean_failure(["recipe", "validate", "recipes/tiny/eval.yaml", "--set",
                          "model.name_or_path=../../runs/tiny-pipeline/ppo"],
                         "it is made by `rlhf pipeline recipes/tiny/pipeline.yaml` (stage ppo of that pipeline)")  # fmt: skip


# ---------------------------------------------------------------- the pipeline headline: proxy and judge


def _eval_stage(tmp_path: Path, results: dict):
    from rlhf_cli.pipeline import PipelineStage

    run_dir = tmp_path / "eval"
    run_dir.mkdir(parents=True)
    (run_dir / "eval.json").write_text(json.dumps(results))
    return PipelineStage("eval", recipe=None, run_dir=run_dir, status="ran")


def _summary(tmp_path: Path, results: dict) -> tuple[str, str]:
    from rich.console import Console

    from rlhf_cli.pipeline import print_pipeline_summary

    stage = _eval_stage(tmp_path, results)
    buffer = io.StringIO()
    print_pipeline_summary(tmp_path, [stage], {}, Console(file=buffer, width=400))
    row = json.loads((tmp_path / "summary.json").read_text())[0]
    return " ".join(buffer.getvalue().replace(str(tmp_path), "OUT").split()), row["key metrics"]


WIN = {"win_rate": 0.668, "ci_low": 0.583, "ci_high": 0.744, "n": 128}


def test_headline_shows_the_proxy_and_the_judge_win_rate_side_by_side(tmp_path):
    results = {"policy": {"win_rate": WIN, "kl": {"kl": 1.334}},
               "judge": {"name": "rlhf_cli.demo:correct_answer", "proxy_correlation": -0.016,
                         "win_rate": {"win_rate": 0.5, "ci_low": 0.415, "ci_high": 0.585, "n": 128}}}  # fmt: skip
    printed, metrics = _summary(tmp_path, results)
    assert metrics == ("win-rate vs reference: proxy (reward model) 0.668 [0.583, 0.744], judge 0.5 [0.415, 0.585]; "
                       "KL 1.33")  # fmt: skip
    assert f"Eval headline: {metrics} (judge: rlhf_cli.demo:correct_answer; proxy vs judge Pearson r -0.016)" in printed
    assert "reward hacking" in printed  # the proxy's interval is clear of 0.5, the judge's win rate is not


def test_headline_without_a_judge_shows_the_proxy_only(tmp_path):
    printed, metrics = _summary(tmp_path, {"policy": {"win_rate": WIN, "kl": {"kl": 1.334}}})
    assert metrics == "win-rate vs reference: proxy (reward model) 0.668 [0.583, 0.744]; KL 1.33"
    assert "judge" not in printed and "reward hacking" not in printed


def test_a_judge_that_agrees_raises_no_alarm(tmp_path):
    judge = {"name": "j", "win_rate": {"win_rate": 0.62, "ci_low": 0.55, "ci_high": 0.7}}
    printed, metrics = _summary(tmp_path, {"policy": {"win_rate": WIN}, "judge": judge})
    assert "judge 0.62 [0.55, 0.7]" in metrics and "reward hacking" not in printed


# ---------------------------------------------------------------- the overoptimisation plot


def _records(judge: bool) -> list[dict]:
    kls = [0.5, 0.1, 0.9, 0.3, 1.4, 1.1]  # not monotonic in step: the plot must not join points in step order
    records = []
    for step, kl in enumerate(kls, start=1):
        record = {"step": step, "kl": kl, "score": 2 * kl}
        if judge:
            record["judge_score"] = kl - kl**2
        records.append(record)
    records.append({"step": 7, "kl": None, "score": 1.0})  # a step without a KL draws no point
    return records


def _legend(axes) -> list[str]:
    return [text.get_text() for text in axes.get_legend().get_texts()]


def test_overoptimisation_is_a_scatter_of_proxy_and_judge_on_one_axes():
    from rlhf_cli.evaluation.plots import overoptimisation_figure

    figure = overoptimisation_figure(_records(judge=True))
    (axes,) = figure.axes
    assert len(axes.lines) == 0  # no line joining the points in step order
    proxy, judge = axes.collections
    assert [x for x, _ in proxy.get_offsets()] == [0.5, 0.1, 0.9, 0.3, 1.4, 1.1]
    assert [y for _, y in judge.get_offsets()] == pytest.approx([kl - kl**2 for kl in (0.5, 0.1, 0.9, 0.3, 1.4, 1.1)])
    assert _legend(axes) == ["proxy: reward-model score (6 steps)", "judge score (6 steps)"]
    assert axes.get_title() == "Proxy and judge score vs KL"
    assert axes.get_xlabel().startswith("KL(policy || reference)")


def test_overoptimisation_without_judge_says_so():
    from rlhf_cli.evaluation.plots import overoptimisation_figure

    (axes,) = overoptimisation_figure(_records(judge=False)).axes
    assert len(axes.collections) == 1 and len(axes.lines) == 0
    assert _legend(axes) == ["proxy: reward-model score (6 steps)"]
    assert axes.get_title() == "Proxy score vs KL (no judge_score logged)"
    (empty,) = overoptimisation_figure([{"step": 1, "score": 1.0}]).axes
    assert len(empty.collections) == 0 and "no step logged both kl and score" in [t.get_text() for t in empty.texts]


def test_overoptimisation_png_and_caption(tmp_path):
    from rlhf_cli.evaluation.plots import overoptimisation
    from rlhf_cli.evaluation.report import FIGURES

    path = overoptimisation(_records(judge=True), tmp_path / "overoptimisation.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "when the PPO run logged one" in FIGURES["overoptimisation.png"]
