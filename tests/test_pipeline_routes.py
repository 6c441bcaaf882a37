"""`rlhf pipeline` routes: the stage sections present choose sft -> rm -> ppo, sft -> dpo, sft -> kto or
sft -> rm -> ppo + dpo (then eval). Route detection, wiring and hash dependencies as pure functions on recipe files
(nothing trains), refusals as one paragraph and exit 2, and the DPO route end to end."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import REPO, TINY, assert_clean_failure
from rlhf_cli.cli import app
from rlhf_cli.errors import UserError
from rlhf_cli.pipeline import (ROUTES, PipelineStage, detect_route, print_pipeline_summary, route_line, stage_hashes,
                               upstream, validate_pipeline)  # fmt: skip

PIPELINE_DPO = str(TINY / "pipeline-dpo.yaml")


def _absolute_data_paths(node):
    """A stage section read from recipes/tiny with its `path: data/...` made absolute, to be written elsewhere."""
    if isinstance(node, dict):
        return {key: (str(TINY / value) if key == "path" and isinstance(value, str) else _absolute_data_paths(value))
                for key, value in node.items()}  # fmt: skip
    return node


def _sections() -> dict:
    """Every stage section the routes are built from: sft, rm, ppo and eval of pipeline.yaml, dpo of
    pipeline-dpo.yaml, and a kto section made from it (KTO has no sigmoid loss_type and no `dpo:`)."""
    ladder = yaml.safe_load((TINY / "pipeline.yaml").read_text())["stages"]
    short = yaml.safe_load((TINY / "pipeline-dpo.yaml").read_text())["stages"]
    sections = _absolute_data_paths({**ladder, "dpo": short["dpo"]})
    kto = copy.deepcopy(sections["dpo"])
    del kto["dpo"], kto["training"]["loss_type"]
    sections["kto"] = kto
    return sections


SECTIONS = _sections()


def write_pipeline(tmp_path: Path, names, changes: dict | None = None, file: str = "pipeline.yaml") -> str:
    """A pipeline recipe in tmp_path with the stage sections `names` (and `changes` merged into stages:)."""
    stages = {name: copy.deepcopy(SECTIONS[name]) for name in names}
    for name, section in (changes or {}).items():
        stages.setdefault(name, {}).update(section)
    recipe = {"model": {"name_or_path": "builtin:tiny-gpt2"}, "seed": 42, "output_dir": str(tmp_path / "out"),
              "stages": stages}  # fmt: skip
    path = tmp_path / file
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(path)


def wired(tmp_path: Path, names, changes=None) -> tuple[Path, dict[str, PipelineStage]]:
    out, stages = validate_pipeline(write_pipeline(tmp_path, names, changes))
    return out, {stage.name: stage for stage in stages}


# ---------------------------------------------------------------- route detection (pure)


@pytest.mark.parametrize("present, route", [
    ({"sft", "rm", "ppo", "eval"}, "ppo"),
    ({"sft", "rm", "ppo"}, "ppo"),
    ({"sft", "dpo", "eval"}, "dpo"),
    ({"sft", "dpo"}, "dpo"),
    ({"sft", "rm", "dpo", "eval"}, "dpo"),  # the rm scores the eval
    ({"sft", "kto", "eval"}, "kto"),
    ({"sft", "rm", "kto"}, "kto"),
    ({"sft", "rm", "ppo", "dpo", "eval"}, "ppo+dpo"),
])  # fmt: skip
def test_the_sections_present_choose_the_route(present, route):
    assert detect_route(present) == route
    assert route in ROUTES


def test_ppo_without_an_rm_stage_needs_a_rule_reward():
    assert detect_route({"sft", "ppo", "eval"}, rule_reward=True) == "ppo"
    with pytest.raises(UserError, match="ppo has no reward model to train against"):
        detect_route({"sft", "ppo", "eval"})


@pytest.mark.parametrize("present, problem", [
    ({"sft", "kto", "dpo", "eval"}, "kto and dpo would each train a policy from SFT"),
    ({"sft", "rm", "ppo", "kto"}, "kto and ppo would each train a policy from SFT"),
    ({"sft", "ppo", "dpo", "eval"}, "ppo has no reward model"),
    ({"rm", "ppo", "eval"}, "there is no sft stage"),
    ({"dpo", "eval"}, "there is no sft stage"),
    ({"eval"}, "there is no sft stage"),
    ({"sft", "eval"}, "no stage trains the policy after SFT"),
    ({"sft", "rm", "eval"}, "no stage trains the policy after SFT"),
])  # fmt: skip
def test_an_invalid_combination_names_the_problem_and_lists_the_routes(present, problem):
    with pytest.raises(UserError) as raised:
        detect_route(present, source="Pipeline recipe p.yaml")
    message = str(raised.value)
    assert problem in message and message.startswith("Pipeline recipe p.yaml: its stages (")
    for route in ROUTES.values():
        assert route in message


# ---------------------------------------------------------------- wiring per route (validated recipes, no training)


def test_dpo_route_wiring(tmp_path):
    out, stages = wired(tmp_path, ["sft", "dpo", "eval"])
    assert list(stages) == ["sft", "dpo", "eval"] and route_line(list(stages.values())) == "sft -> dpo -> eval"
    dpo, evaluation = stages["dpo"].recipe, stages["eval"].recipe
    assert dpo.model.name_or_path == str(out / "sft") and dpo.dpo.ref_model is None  # the start is the reference
    assert evaluation.model.name_or_path == str(out / "dpo")
    assert evaluation.eval.reference == str(out / "sft")
    assert evaluation.eval.reward_model is None and evaluation.eval.ppo_run is None
    assert {name: upstream(stage, out) for name, stage in stages.items()} == {
        "sft": [], "dpo": ["sft"], "eval": ["sft", "dpo"]}  # fmt: skip


def test_kto_route_wiring_and_an_rm_stage_scoring_the_eval(tmp_path):
    out, stages = wired(tmp_path, ["sft", "rm", "kto", "eval"])
    assert route_line(list(stages.values())) == "sft -> rm -> kto -> eval"
    kto, evaluation = stages["kto"].recipe, stages["eval"].recipe
    assert kto.model.name_or_path == str(out / "sft") and kto.kto.ref_model is None
    assert evaluation.model.name_or_path == str(out / "kto")
    assert (evaluation.eval.reference, evaluation.eval.reward_model) == (str(out / "sft"), str(out / "rm"))
    assert upstream(stages["kto"], out) == ["sft"]  # KTO does not read the reward model
    assert upstream(stages["eval"], out) == ["sft", "rm", "kto"]


def test_kto_route_dry_run_prints_every_stage_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["pipeline", write_pipeline(tmp_path, ["sft", "kto", "eval"]), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "sft -> kto -> eval" in result.output and "KTOConfig" in result.output
    for stage in ("sft", "kto", "eval"):
        assert f"stage {stage} -> {out / stage}" in result.output
    assert not out.exists()


def test_ppo_route_wiring_is_unchanged(tmp_path):
    out, stages = wired(tmp_path, ["sft", "rm", "ppo", "eval"])
    ppo, evaluation = stages["ppo"].recipe, stages["eval"].recipe
    assert stages["rm"].recipe.model.name_or_path == str(out / "sft")
    assert (ppo.model.name_or_path, ppo.ppo.reward.model) == (str(out / "sft"), str(out / "rm"))
    assert evaluation.model.name_or_path == str(out / "ppo")
    assert (evaluation.eval.reference, evaluation.eval.reward_model) == (str(out / "sft"), str(out / "rm"))
    assert evaluation.eval.ppo_run == str(out / "ppo")
    assert evaluation.eval.name == "policy" and evaluation.eval.compare == {}
    assert {name: upstream(stage, out) for name, stage in stages.items()} == {
        "sft": [], "rm": ["sft"], "ppo": ["sft", "rm"], "eval": ["sft", "rm", "ppo"]}  # fmt: skip


def test_ppo_with_a_rule_reward_needs_no_rm_stage(tmp_path):
    rule = {"ppo": {"ppo": {"reward": {"function": "rlhf_cli.demo:correct_answer"}}}}
    eval_without_pairs = {"eval": {"eval": {**SECTIONS["eval"]["eval"], "preferences": None}}}
    out, stages = wired(tmp_path, ["sft", "ppo", "eval"], {**rule, **eval_without_pairs})
    assert stages["ppo"].recipe.ppo.reward.model is None
    assert stages["eval"].recipe.eval.reward_model is None
    assert upstream(stages["ppo"], out) == ["sft"] and upstream(stages["eval"], out) == ["sft", "ppo"]


def test_compare_route_wiring(tmp_path):
    out, stages = wired(tmp_path, ["sft", "rm", "ppo", "dpo", "eval"])
    assert route_line(list(stages.values())) == "sft -> rm -> ppo + dpo -> eval"
    spec = stages["eval"].recipe.eval
    assert stages["eval"].recipe.model.name_or_path == str(out / "ppo") and spec.name == "ppo"
    assert spec.compare == {"dpo": str(out / "dpo")}
    assert (spec.reference, spec.reward_model, spec.ppo_run) == (str(out / "sft"), str(out / "rm"), str(out / "ppo"))
    assert stages["dpo"].recipe.model.name_or_path == str(out / "sft")
    assert upstream(stages["dpo"], out) == ["sft"]
    assert upstream(stages["eval"], out) == ["sft", "rm", "ppo", "dpo"]


def test_a_link_set_in_a_section_wins_and_drops_out_of_the_upstream(tmp_path):
    elsewhere = "org/some-reference"  # a hub id: nothing the pipeline makes
    out, stages = wired(tmp_path, ["sft", "dpo", "eval"], {"eval": {"eval": {**SECTIONS["eval"]["eval"],
                                                                             "reference": elsewhere}}})  # fmt: skip
    assert stages["eval"].recipe.eval.reference == elsewhere
    assert upstream(stages["eval"], out) == ["dpo"]
    out, stages = wired(tmp_path, ["sft", "dpo", "eval"], {"dpo": {"dpo": {"ref_model": elsewhere}}})
    assert stages["dpo"].recipe.dpo.ref_model == elsewhere and upstream(stages["dpo"], out) == ["sft"]


# ---------------------------------------------------------------- hashes follow what each stage reads


def test_hashes_change_with_what_a_stage_reads_and_nothing_else(tmp_path):
    names = ["sft", "rm", "dpo", "eval"]

    def hashes(changes=None):
        out, stages = validate_pipeline(write_pipeline(tmp_path, names, changes))
        return stage_hashes(stages, out)

    before = hashes()
    assert len(set(before.values())) == 4
    sft = hashes({"sft": {"training": {**SECTIONS["sft"]["training"], "learning_rate": 1e-3}}})
    assert all(sft[name] != before[name] for name in names)  # everything reads the SFT policy
    rm = hashes({"rm": {"training": {**SECTIONS["rm"]["training"], "learning_rate": 2e-3}}})
    assert [name for name in names if rm[name] != before[name]] == ["rm", "eval"]  # DPO does not read the RM
    dpo = hashes({"dpo": {"training": {**SECTIONS["dpo"]["training"], "beta": 0.2}}})
    assert [name for name in names if dpo[name] != before[name]] == ["dpo", "eval"]


def test_skips_from_and_only_follow_the_route(tmp_path, monkeypatch):
    """Which stages run, with the training replaced by writing each stage's finished marker."""
    import rlhf_cli.pipeline as pipeline

    ran: list[str] = []

    def fake_run_one(stage, **options):
        stage.run_dir.mkdir(parents=True, exist_ok=True)
        (stage.run_dir / ("eval.json" if stage.name == "eval" else "summary.json")).write_text("{}")
        ran.append(stage.name)
        return 0

    monkeypatch.setattr(pipeline, "run_one", fake_run_one)

    def run(recipe, **flags) -> list[str]:
        ran.clear()
        assert pipeline.run_pipeline(recipe, **flags) == 0
        return list(ran)

    (tmp_path / "dpo-route").mkdir()
    dpo = write_pipeline(tmp_path / "dpo-route", ["sft", "dpo", "eval"])
    assert run(dpo) == ["sft", "dpo", "eval"] and run(dpo) == []
    assert run(dpo, from_stage="dpo") == ["dpo", "eval"]  # the eval reads dpo: it runs again
    assert run(dpo, only="dpo") == ["dpo"]
    changed = ["stages.dpo.training.beta=0.2"]
    assert run(dpo, overrides=changed) == ["dpo", "eval"]  # a changed stage and what reads it; sft is kept
    (tmp_path / "compare").mkdir()
    compare = write_pipeline(tmp_path / "compare", ["sft", "rm", "ppo", "dpo", "eval"])
    assert run(compare) == ["sft", "rm", "ppo", "dpo", "eval"]
    assert run(compare, from_stage="ppo") == ["ppo", "eval"]  # dpo does not read ppo: unchanged, skipped
    assert run(compare, overrides=["stages.rm.training.learning_rate=2e-3"]) == ["rm", "ppo", "eval"]


# ---------------------------------------------------------------- through the CLI: refusals, --from/--only, recipe


def test_invalid_combinations_are_one_paragraph_and_exit_2(tmp_path):
    for names, problem in ((["sft", "kto", "dpo", "eval"], "kto and dpo would each train a policy"),
                           (["sft", "eval"], "no stage trains the policy after SFT"),
                           (["eval"], "there is no sft stage"),
                           (["sft", "ppo", "eval"], "ppo has no reward model")):  # fmt: skip
        recipe = write_pipeline(tmp_path, names)
        for command in (["pipeline", recipe], ["recipe", "validate", recipe], ["recipe", "show", recipe]):
            flat = assert_clean_failure(command, problem, "make no pipeline route", "The routes:",
                                        "sft -> dpo -> eval", out=tmp_path / "out")  # fmt: skip
            assert flat.count("Error:") == 1


def test_from_and_only_take_the_stages_of_the_route(tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(["pipeline", PIPELINE_DPO, "-o", str(out), "--from", "ppo"],
                         "--from ppo: this pipeline's stages are sft, dpo, eval.", out=out)  # fmt: skip
    assert_clean_failure(["pipeline", PIPELINE_DPO, "-o", str(out), "--only", "rm"],
                         "--only rm: this pipeline's stages are sft, dpo, eval.", out=out)  # fmt: skip
    # --only dpo needs the stage it reads (sft), not the eval after it
    assert_clean_failure(["pipeline", PIPELINE_DPO, "-o", str(out), "--only", "dpo"],
                         "Stage sft has not finished", str(out / "sft"))  # fmt: skip


def test_recipe_validate_and_show_of_the_dpo_pipeline(tmp_path):
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(app, ["recipe", "validate", PIPELINE_DPO, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"{PIPELINE_DPO}: stage sft OK (rlhf sft; model builtin:tiny-gpt2) -> {out / 'sft'}",
        f"{PIPELINE_DPO}: stage dpo OK (rlhf dpo; model from stage sft) -> {out / 'dpo'}",
        f"{PIPELINE_DPO}: stage eval OK (rlhf eval; model from stage dpo, eval.reference from stage sft) -> "
        f"{out / 'eval'}"]  # fmt: skip
    result = runner.invoke(app, ["recipe", "show", PIPELINE_DPO, "-o", str(out), "--stage", "dpo"])
    assert result.exit_code == 0, result.output
    document = yaml.safe_load(result.output)
    assert document["stage"] == "dpo" and document["model"]["name_or_path"] == str(out / "sft")
    assert document["dpo"]["algorithm"] == "dpo"
    assert_clean_failure(["recipe", "show", PIPELINE_DPO, "--stage", "kto"], "this pipeline has no stage kto")
    assert not out.exists()


def test_compare_recipe_validates_and_dry_runs(tmp_path):
    recipe = str(TINY / "pipeline-compare.yaml")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["recipe", "validate", recipe, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert [line.split(": stage ")[1].split()[0] for line in result.output.splitlines()] == [
        "sft", "rm", "ppo", "dpo", "eval"]  # fmt: skip
    assert "model from stage ppo" in result.output and "eval.compare.dpo from stage dpo" in result.output
    result = CliRunner().invoke(app, ["pipeline", recipe, "-o", str(out), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "sft -> rm -> ppo + dpo -> eval" in result.output
    for stage in ("sft", "rm", "ppo", "dpo", "eval"):
        assert f"stage {stage}" in result.output
    assert "DPOConfig" in result.output and "PPOConfig" in result.output
    assert not out.exists()


# ---------------------------------------------------------------- hand-off checks on the new routes


def test_handoffs_of_dpo_and_kto_are_checked(tmp_path):
    from test_pipeline import _tokenizer_dir

    out = tmp_path / "out"
    recipe = write_pipeline(tmp_path, ["sft", "dpo", "eval"])
    assert_clean_failure(["pipeline", recipe, "--set", "stages.dpo.model={lora: {r: 4, merge: false}}"],
                         "Stage dpo: model.lora.merge is false", "but eval load(s) it as a full model",
                         "stages.dpo.model.lora.merge: true", out=out)  # fmt: skip
    assert_clean_failure(["pipeline", recipe, "--set", "stages.sft.model={lora: {r: 4, merge: false}}"],
                         "Stage sft: model.lora.merge is false", "but dpo, eval load(s) it", out=out)  # fmt: skip
    template = _tokenizer_dir(tmp_path, "template", chat_template="{{ messages[0]['content'] }}")
    assert_clean_failure(["pipeline", recipe, "--set", f"stages.dpo.dpo.ref_model={template}"],
                         "Stage dpo: dpo.ref_model", "chat template differs", out=out)  # fmt: skip
    kto = write_pipeline(tmp_path, ["sft", "kto", "eval"], file="kto.yaml")
    pad = _tokenizer_dir(tmp_path, "pad", pad_token="<|user|>")
    assert_clean_failure(["pipeline", kto, "--set", f"stages.kto.kto.ref_model={pad}"],
                         "Stage kto: kto.ref_model", "pad token is '<|user|>'", out=out)  # fmt: skip


# ---------------------------------------------------------------- the summary of a DPO / KTO route


def _stage(tmp_path: Path, name: str, file: str, content: dict) -> PipelineStage:
    run_dir = tmp_path / name
    run_dir.mkdir(parents=True)
    (run_dir / file).write_text(json.dumps(content))
    return PipelineStage(name, recipe=None, run_dir=run_dir, status="ran")


def _table(tmp_path: Path, stages: list[PipelineStage]) -> tuple[dict, str]:
    import io

    from rich.console import Console

    buffer = io.StringIO()
    print_pipeline_summary(tmp_path, stages, {}, Console(file=buffer, width=400))
    rows = {row["stage"]: row["key metrics"] for row in json.loads((tmp_path / "summary.json").read_text())}
    return rows, " ".join(buffer.getvalue().split())


def test_summary_shows_the_dpo_and_kto_stage_figures(tmp_path):
    dpo = _stage(tmp_path, "dpo", "summary.json", {
        "held-out rewards/accuracies": 0.923, "held-out rewards/margins": 2.28, "held-out rewards/chosen": -0.196,
        "held-out loss": 0.12, "train rewards/accuracies (last log window)": 1.0,
        "warnings": ["likelihood displacement: on held-out pairs the chosen responses fell"]})  # fmt: skip
    kto = _stage(tmp_path, "kto", "summary.json", {  # no held-out data: the last training window
        "train rewards/margins (last log window)": 1.5, "train rewards/chosen (last log window)": 0.4,
        "train rewards/rejected (last log window)": -1.1, "train kl (last log window)": 0.02})  # fmt: skip
    rows, _ = _table(tmp_path, [dpo, kto])
    assert rows["dpo"] == ("held-out rewards/accuracies 0.923, held-out rewards/margins 2.28, held-out "
                           "rewards/chosen -0.196; likelihood displacement: the chosen responses fell below the "
                           "reference (summary.json)")  # fmt: skip
    assert rows["kto"] == ("train rewards/margins (last log window) 1.5, train rewards/chosen (last log window) "
                           "0.4, train rewards/rejected (last log window) -1.1, train kl (last log window) 0.02")


def _win(rate, low, high):
    return {"win_rate": rate, "ci_low": low, "ci_high": high, "n": 128}


def test_eval_headline_of_the_dpo_route_leads_with_the_implicit_reward_accuracy(tmp_path):
    implicit = {"num_pairs": 128, "accuracy": 0.914, "mean_margin": 1.52, "likelihood_displacement": False}
    results = {"implicit_reward": implicit, "policy": {"kl": {"kl": 0.81}},  # no reward model: no proxy win rate
               "judge": {"name": "rlhf_cli.demo:correct_answer", "win_rate": _win(0.55, 0.46, 0.63)}}  # fmt: skip
    rows, printed = _table(tmp_path, [_stage(tmp_path, "eval", "eval.json", results)])
    assert rows["eval"] == ("implicit-reward accuracy 0.914 (128 pairs, margin 1.52); win-rate vs reference: judge "
                            "0.55 [0.46, 0.63]; KL 0.81")  # fmt: skip
    assert f"Eval headline: {rows['eval']} (judge: rlhf_cli.demo:correct_answer)" in printed
    assert "reward hacking" not in printed


def test_eval_headline_of_the_compare_route_shows_each_policy_and_the_head_to_head(tmp_path):
    results = {
        "policy": {"win_rate": _win(0.7, 0.62, 0.77), "kl": {"kl": 1.2}},
        "judge": {"name": "j", "win_rate": _win(0.48, 0.4, 0.57), "proxy_correlation": 0.1},
        "policies": {
            "ppo": {"win_rate": _win(0.7, 0.62, 0.77), "judge_win_rate": _win(0.48, 0.4, 0.57), "kl": {"kl": 1.2}},
            "dpo": {"win_rate": _win(0.6, 0.51, 0.68), "judge_win_rate": _win(0.62, 0.53, 0.7), "kl": {"kl": 0.5},
                    "implicit_reward": {"num_pairs": 128, "accuracy": 0.9, "mean_margin": 2.0,
                                        "likelihood_displacement": True}}},
        "head_to_head": [{"a": "ppo", "b": "dpo", "scorer": "reward_model", **_win(0.58, 0.49, 0.66)},
                         {"a": "ppo", "b": "dpo", "scorer": "judge", **_win(0.4, 0.32, 0.49)}],
    }  # fmt: skip
    rows, printed = _table(tmp_path, [_stage(tmp_path, "eval", "eval.json", results)])
    assert rows["eval"] == (
        "ppo: win-rate vs reference: proxy (reward model) 0.7 [0.62, 0.77], judge 0.48 [0.4, 0.57]; KL 1.2 | "
        "dpo: implicit-reward accuracy 0.9 (128 pairs, margin 2, likelihood displacement); win-rate vs reference: "
        "proxy (reward model) 0.6 [0.51, 0.68], judge 0.62 [0.53, 0.7]; KL 0.5 | "
        "head to head, ppo over dpo: proxy (reward model) 0.58 [0.49, 0.66], judge 0.4 [0.32, 0.49]")  # fmt: skip
    assert f"Eval headline: {rows['eval']} (judge: j; proxy vs judge Pearson r 0.1). The proxy win rate of ppo " \
        in printed
    assert "is not: that policy learnt what the reward model pays for" in printed  # ppo's proxy interval is clear
    assert "of ppo and dpo" not in printed  # of 0.5 and its judge win rate is not; dpo's judge win rate is above


# ---------------------------------------------------------------- the DPO route end to end

RLHF = [sys.executable, "-m", "rlhf_cli.cli"]
# Shortened so the whole route stays near a minute on 2 idle CPU cores.
SHORT_DPO = ["--set", "stages.sft.training.num_train_epochs=3", "--set", "stages.dpo.training.num_train_epochs=2",
             "--set", "stages.eval.eval.num_prompts=32"]  # fmt: skip


def run_dpo_pipeline(out: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([*RLHF, "pipeline", PIPELINE_DPO, "-o", str(out), *SHORT_DPO], capture_output=True,
                            text=True, cwd=REPO, timeout=900)  # fmt: skip
    assert result.returncode == 0, f"pipeline failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
@pytest.mark.extended
def test_dpo_route_end_to_end_then_skipped(tmp_path):
    out = tmp_path / "run"
    result = run_dpo_pipeline(out)
    rows = json.loads((out / "summary.json").read_text())
    assert [(row["stage"], row["this run"]) for row in rows] == [("sft", "ran"), ("dpo", "ran"), ("eval", "ran")]
    assert "sft -> dpo -> eval" in result.stdout
    for stage, files in (("sft", ["model.safetensors", "summary.json"]), ("dpo", ["model.safetensors", "summary.json",
                         "recipe.yaml"]), ("eval", ["eval.json", "report.md"])):  # fmt: skip
        for name in files:
            assert (out / stage / name).is_file(), f"{stage}/{name}"
    dpo_recipe = yaml.safe_load((out / "dpo" / "recipe.yaml").read_text())
    assert dpo_recipe["model"]["name_or_path"] == str(out / "sft") and dpo_recipe["stage"] == "dpo"
    state = json.loads((out / "pipeline.json").read_text())
    assert list(state) == ["sft", "dpo", "eval"] and all(entry["status"] == "done" for entry in state.values())
    results = json.loads((out / "eval" / "eval.json").read_text())
    assert "reward_model" not in results  # no reward model in this route
    accuracy = results["implicit_reward"]["accuracy"]
    assert accuracy > 0.5, results["implicit_reward"]
    assert "held-out rewards/accuracies" in rows[1]["key metrics"]
    assert "implicit-reward accuracy" in rows[2]["key metrics"]

    run_dpo_pipeline(out)
    assert {row["this run"] for row in json.loads((out / "summary.json").read_text())} == {"skipped (unchanged)"}
    assert json.loads((out / "pipeline.json").read_text()) == state


SHORT_COMPARE = [*SHORT_DPO, "--set", "stages.rm.training.num_train_epochs=3", "--set", "stages.ppo.training.steps=6"]


@pytest.mark.slow
@pytest.mark.extended
def test_compare_route_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run([*RLHF, "pipeline", str(TINY / "pipeline-compare.yaml"), "-o", str(out), *SHORT_COMPARE],
                            capture_output=True, text=True, cwd=REPO, timeout=900)  # fmt: skip
    assert result.returncode == 0, f"pipeline failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    rows = {row["stage"]: row for row in json.loads((out / "summary.json").read_text())}
    assert list(rows) == ["sft", "rm", "ppo", "dpo", "eval"] and {row["this run"] for row in rows.values()} == {"ran"}
    for stage in ("ppo", "dpo"):
        assert yaml.safe_load((out / stage / "recipe.yaml").read_text())["model"]["name_or_path"] == str(out / "sft")
    results = json.loads((out / "eval" / "eval.json").read_text())
    assert list(results["policies"]) == ["ppo", "dpo"]
    assert results["policies"]["ppo"]["path"] == str(out / "ppo")
    assert results["policies"]["dpo"]["path"] == str(out / "dpo")
    assert results["policies"]["dpo"]["implicit_reward"]["accuracy"] > 0.5
    assert 0.0 <= results["policies"]["ppo"]["win_rate"]["win_rate"] <= 1.0  # scored by the reward model
    assert {(entry["a"], entry["b"], entry["scorer"]) for entry in results["head_to_head"]} == {
        ("ppo", "dpo", "reward_model"), ("ppo", "dpo", "judge")}  # fmt: skip
    headline = rows["eval"]["key metrics"]
    assert headline.startswith("ppo: win-rate vs reference: proxy (reward model) ")
    assert " | dpo: implicit-reward accuracy " in headline and " | head to head, ppo over dpo: " in headline
