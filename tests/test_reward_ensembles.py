"""Reward-model ensembles: the combine functions against hand-computed values, `rlhf train-rm` with `ensemble:`
(member directories, ensemble.json, seeds, bootstrap resamples), PPO and generate scoring with an ensemble, and the
bad inputs (exit 2)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY, assert_clean_failure
from rlhf_cli.rewards import ENSEMBLE_FILE, combine_scores, ensemble_spread

RLHF = [sys.executable, "-m", "rlhf_cli.cli"]

# ---------------------------------------------------------------- combine (pure)

# Three members' scores of two responses: per_member[k][i] = r_k(response i).
PER_MEMBER = [[1.0, 2.0], [3.0, 2.0], [5.0, -4.0]]
# response 0: scores 1, 3, 5 -> mean 3, min 1, population std sqrt(((-2)^2 + 0 + 2^2) / 3) = sqrt(8/3)
# response 1: scores 2, 2, -4 -> mean 0, min -4, population std sqrt((2^2 + 2^2 + 4^2) / 3) = sqrt(8)


def test_combine_mean_min_and_mean_minus_std_by_hand():
    assert combine_scores(PER_MEMBER, "mean") == [3.0, 0.0]
    assert combine_scores(PER_MEMBER, "min") == [1.0, -4.0]
    assert ensemble_spread(PER_MEMBER) == pytest.approx([math.sqrt(8 / 3), math.sqrt(8)])
    assert combine_scores(PER_MEMBER, "mean_minus_std") == pytest.approx([3 - math.sqrt(8 / 3), -math.sqrt(8)])
    assert combine_scores(PER_MEMBER, "mean_minus_std", std_coef=0.5) == pytest.approx(
        [3 - 0.5 * math.sqrt(8 / 3), -0.5 * math.sqrt(8)])
    assert combine_scores(PER_MEMBER, "mean_minus_std", std_coef=0.0) == [3.0, 0.0]  # coef 0: the mean
    # two members 0 and 2: population std 1 (not the sample std sqrt(2))
    assert combine_scores([[0.0], [2.0]], "mean_minus_std") == [0.0]
    assert ensemble_spread([[0.25, -1.0]]) == [0.0, 0.0]  # one member: no spread


def test_combine_refuses_bad_input():
    with pytest.raises(ValueError, match="combine must be one of"):
        combine_scores(PER_MEMBER, "max")
    with pytest.raises(ValueError, match="std_coef"):
        combine_scores(PER_MEMBER, "mean_minus_std", std_coef=-1.0)
    with pytest.raises(ValueError, match="same candidates"):
        combine_scores([[1.0], [1.0, 2.0]])
    with pytest.raises(ValueError, match="no scores"):
        combine_scores([])


def test_label_combine_is_the_shared_one():
    from rlhf_cli.labelling import scorers

    assert scorers.combine_scores(PER_MEMBER, "min") == combine_scores(PER_MEMBER, "min")
    with pytest.raises(ValueError):
        scorers.combine_scores(PER_MEMBER, "mean_minus_std")  # labelling ranks by mean or min only


def test_bootstrap_indices_are_a_seeded_resample_of_the_right_size():
    from rlhf_cli.stages.reward import bootstrap_indices

    drawn = bootstrap_indices(50, seed=7)
    assert len(drawn) == 50 and all(0 <= i < 50 for i in drawn)
    assert drawn == bootstrap_indices(50, seed=7) and drawn != bootstrap_indices(50, seed=8)
    assert len(set(drawn)) < 50  # with replacement: some rows twice (P(no repeat) = 50!/50^50)


# ---------------------------------------------------------------- bad inputs (exit 2, nothing written)


def _recipe(tmp_path: Path, name: str, base: str, changes: dict) -> Path:
    raw = yaml.safe_load((TINY / base).read_text())
    for key, value in changes.items():
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    for data in (TINY / "data").iterdir():  # the recipe's relative data paths
        (tmp_path / "data").mkdir(exist_ok=True)
        target = tmp_path / "data" / data.name
        if not target.exists():
            target.symlink_to(data)
    return path


@pytest.mark.parametrize("base, changes, fragments", [
    ("sft.yaml", {"ensemble": {"members": 2}}, ["`ensemble:` section", "sft stage"]),
    ("rm.yaml", {"ensemble": {"members": 1}}, ["ensemble.members"]),
    ("ppo.yaml", {"ppo.reward": {"models": ["a"]}}, ["at least two reward models"]),
    ("ppo.yaml", {"ppo.reward": {"function": "rules:length", "combine": "min"}}, ["not a rule function"]),
    ("ppo.yaml", {"ppo.reward": {"models": ["a", "b"], "combine": "mean_minus_std", "std_coef": -1}},
     ["std_coef"]),
    ("ppo.yaml", {"ppo.reward": {"models": ["a", "b"], "combine": "mean", "std_coef": 2}},
     ["std_coef weighs the spread of combine: mean_minus_std"]),
    ("ppo.yaml", {"model.name_or_path": "builtin:tiny-gpt2", "training": {}, "ppo.algorithm": "grpo",
                  "ppo.reward": {"models": ["a", "b"]}}, ["grpo (TRL's trainer) takes one reward model"]),
    ("ppo.yaml", {"model.name_or_path": "builtin:tiny-gpt2", "ppo.judge": {"models": ["a", "b"]},
                  "ppo.reward": {"function": "rlhf_cli.rewards:gsm8k_exact_match"}},
     ["the judge is one reward model"]),
])  # fmt: skip
def test_bad_ensemble_recipes_exit_2(tmp_path, base, changes, fragments):
    stage = {"sft.yaml": "sft", "rm.yaml": "train-rm", "ppo.yaml": "ppo"}[base]
    recipe = _recipe(tmp_path, "r.yaml", base, changes)
    assert_clean_failure([stage, str(recipe), "-o", str(tmp_path / "out"), "--dry-run"], *fragments,
                         out=tmp_path / "out")  # fmt: skip


def test_combine_with_a_single_reward_model_exits_2(tmp_path):
    single = tmp_path / "rm"
    single.mkdir()  # a directory without ensemble.json: one reward model
    recipe = _recipe(tmp_path, "r.yaml", "ppo.yaml", {"model.name_or_path": "builtin:tiny-gpt2",
                                                      "ppo.reward": {"model": str(single), "combine": "min"}})
    assert_clean_failure(["ppo", str(recipe), "-o", str(tmp_path / "out"), "--dry-run"],
                         "ppo.reward.combine combines several reward models", "single reward model")  # fmt: skip


def test_ensemble_in_generate_recipe_exits_2(tmp_path):
    recipe = tmp_path / "g.yaml"
    recipe.write_text(yaml.safe_dump({"stage": "generate", "model": {"name_or_path": "builtin:tiny-gpt2"},
                                      "ensemble": {"members": 2},
                                      "generate": {"prompts": {"path": str(TINY / "data" / "prompts.jsonl")}}}))
    assert_clean_failure(["generate", str(recipe), "-o", str(tmp_path / "out")], "takes no `ensemble:` section")


def test_recipe_validate_does_not_import_torch(tmp_path):
    recipe = _recipe(tmp_path, "r.yaml", "rm.yaml", {"ensemble": {"members": 3, "bootstrap": True}})
    code = ("import sys; from typer.testing import CliRunner; from rlhf_cli.cli import app; "
            f"r = CliRunner().invoke(app, ['recipe', 'validate', {str(recipe)!r}, '--stage', 'rm']); "
            "assert r.exit_code == 0, r.output; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ---------------------------------------------------------------- train-rm ensemble -> PPO / generate (end to end)


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ens") / "rm"
    result = subprocess.run([*RLHF, "train-rm", str(TINY / "rm.yaml"), "-o", str(out),
                             "--set", "ensemble.members=2", "--set", "ensemble.bootstrap=true",
                             "--set", "training.max_steps=3", "--set", "training.num_train_epochs=1"],
                            capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.mark.slow
def test_train_rm_ensemble_writes_members_and_record(ensemble):
    from safetensors.torch import load_file

    record = json.loads((ensemble / "ensemble.json").read_text())
    assert record["members"] == ["member-0", "member-1"] and record["seeds"] == [42, 43] and record["bootstrap"]
    rows = 256 - 13  # tiny preference data: 256 pairs, 13 held out (the same for every member)
    for k, detail in enumerate(record["details"]):
        member = ensemble / f"member-{k}"
        assert (member / "rendering.json").is_file() and (member / "config.json").is_file()
        assert detail["train rows (resampled)"] == rows and detail["distinct rows"] < rows
        assert 0 <= detail["held-out accuracy"] <= 1
        summary = json.loads((member / "summary.json").read_text())
        assert summary["held-out rows"] == record["held-out rows"] == 13
        assert yaml.safe_load((member / "recipe.yaml").read_text())["seed"] == 42 + k
    weights = [load_file(ensemble / f"member-{k}" / "model.safetensors") for k in (0, 1)]
    assert any(not (weights[0][name] == weights[1][name]).all() for name in weights[0])  # seeds differ
    summary = json.loads((ensemble / "summary.json").read_text())
    accuracies = [d["held-out accuracy"] for d in record["details"]]
    assert summary["held-out accuracy (min member)"] == min(accuracies)
    assert summary["held-out accuracy (mean of members)"] == pytest.approx(sum(accuracies) / 2)

    own = record["held-out accuracy (ensemble, mean combine)"]
    assert summary["held-out accuracy (ensemble, mean combine)"] == own
    assert 0 <= own <= 1 and own * 13 == pytest.approx(round(own * 13))  # right pairs of the 13 held out

    # each member loads as an ordinary reward model
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(ensemble / "member-1").config.num_labels == 1


@pytest.mark.slow
@pytest.mark.extended
def test_resume_keeps_finished_members_and_continues_the_unfinished_one(ensemble, tmp_path):
    kept = (ensemble / "member-0" / "model.safetensors").stat().st_mtime_ns
    # member 1 as if interrupted after its last checkpoint: no final files, no ensemble.json yet
    (ensemble / "member-1" / "rendering.json").unlink()
    (ensemble / ENSEMBLE_FILE).unlink()
    assert (ensemble / "member-1" / "checkpoint-3").is_dir()
    result = subprocess.run([*RLHF, "train-rm", str(TINY / "rm.yaml"), "-o", str(ensemble), "--resume",
                             "--set", "ensemble.members=2", "--set", "ensemble.bootstrap=true",
                             "--set", "training.max_steps=3", "--set", "training.num_train_epochs=1"],
                            capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("finished earlier, kept") == 1 and "Ensemble member-1 (2 of 2)" in result.stdout
    assert (ensemble / "member-0" / "model.safetensors").stat().st_mtime_ns == kept  # not trained again
    assert (ensemble / "member-1" / "rendering.json").is_file()
    assert json.loads((ensemble / ENSEMBLE_FILE).read_text())["members"] == ["member-0", "member-1"]


@pytest.mark.slow
def test_scoring_with_an_ensemble_combines_its_members(ensemble):
    from rlhf_cli.inference import Responses, load_scorer, score
    from rlhf_cli.recipe import RewardSpec

    prompts = ["What is 2+2?", "Name a colour.", "Say hi."]
    responses = Responses(texts=["4", "Blue, like the sea.", "hi hi hi hi"], finished=[True] * 3)
    members = [score(load_scorer(RewardSpec(model=str(ensemble / f"member-{k}")), "generate.reward", None, None,
                                 conversational=True), prompts, responses, max_prompt_length=64, batch_size=2)
               for k in (0, 1)]  # fmt: skip
    scorer = load_scorer(RewardSpec(model=str(ensemble), combine="mean_minus_std", std_coef=2.0), "generate.reward",
                         None, None, conversational=True)  # fmt: skip
    combined = score(scorer, prompts, responses, max_prompt_length=64, batch_size=2)
    for logged, alone in zip(scorer.member_scores, members, strict=True):
        assert logged == pytest.approx(alone, abs=1e-5)
    by_hand = [(a + b) / 2 - 2.0 * abs(a - b) / 2 for a, b in zip(*members)]  # two members: std = |a - b| / 2
    assert combined == pytest.approx(by_hand, abs=1e-5)
    listed = load_scorer(RewardSpec(models=[str(ensemble / "member-0"), str(ensemble / "member-1")], combine="min"),
                         "generate.reward", None, None, conversational=True)  # fmt: skip
    assert score(listed, prompts, responses, max_prompt_length=64, batch_size=2) == pytest.approx(
        [min(a, b) for a, b in zip(*members)], abs=1e-5)


@pytest.mark.slow
def test_ppo_against_an_ensemble_logs_members_and_spread(ensemble, tmp_path):
    out = tmp_path / "ppo"
    result = subprocess.run([*RLHF, "ppo", str(TINY / "ppo.yaml"), "-o", str(out),
                             "--set", "model.name_or_path=builtin:tiny-gpt2", "--set", f"ppo.reward.model={ensemble}",
                             "--set", "ppo.reward.combine=mean_minus_std", "--set", "ppo.reward.std_coef=0.5",
                             "--set", "training.steps=2", "--set", "training.rollout_batch_size=4",
                             "--set", "training.mini_batch_size=4", "--set", "training.ppo_epochs=1",
                             "--set", "training.response_length=6", "--set", "training.save_steps=100"],
                            capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [step for step in steps if "score/member_0" in step]
    assert len(steps) == 2
    for step in steps:
        assert step["score/ensemble_std"] >= 0
        # score = mean over rollouts of (mean_k r_k - 0.5 * std_k r_k): linear, so from the logged means
        by_hand = (step["score/member_0"] + step["score/member_1"]) / 2 - 0.5 * step["score/ensemble_std"]
        assert step["score"] == pytest.approx(by_hand, abs=1e-5)


@pytest.mark.slow
def test_eval_scores_pairs_with_an_ensemble_directory_by_the_mean(ensemble, tmp_path):
    from typer.testing import CliRunner

    from rlhf_cli.cli import app

    margins = {}
    for name, model in (("ensemble", ensemble), ("m0", ensemble / "member-0"), ("m1", ensemble / "member-1")):
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(yaml.safe_dump({"stage": "eval", "eval": {
            "reward_model": str(model), "preferences": {"path": str(TINY / "data" / "preference.jsonl"), "limit": 8}}}))
        result = CliRunner().invoke(app, ["eval", str(recipe), "-o", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        margins[name] = json.loads((tmp_path / name / "eval.json").read_text())["reward_model"]["mean_margin"]
    # the mean combine is linear: the ensemble's mean margin is the mean of its members' margins
    assert margins["ensemble"] == pytest.approx((margins["m0"] + margins["m1"]) / 2, abs=1e-5)


@pytest.mark.slow
@pytest.mark.extended
def test_ppo_with_an_ensemble_under_zero3_in_two_cpu_processes(ensemble, tmp_path):
    out = tmp_path / "zero3"
    result = subprocess.run([*RLHF, "ppo", str(TINY / "ppo.yaml"), "-o", str(out),
                             "--set", "model.name_or_path=builtin:tiny-gpt2", "--set", f"ppo.reward.model={ensemble}",
                             "--set", "ppo.reward.combine=min", "--set", "distributed.strategy=zero3",
                             "--set", "distributed.num_processes=2", "--set", "training.steps=2",
                             "--set", "training.rollout_batch_size=8", "--set", "training.mini_batch_size=4",
                             "--set", "training.response_length=6", "--set", "training.save_steps=100"],
                            capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [step for step in steps if "score/member_0" in step]
    assert len(steps) == 2
    for step in steps:  # the mean of per-response minima is at most each member's mean
        assert step["score"] <= min(step["score/member_0"], step["score/member_1"]) + 1e-6
        assert step["score/ensemble_std"] > 0


def test_a_reward_says_what_it_is_in_plans():
    from rlhf_cli.recipe import RewardSpec

    assert RewardSpec(function="rules:starts_with_sure").describe() == "rules:starts_with_sure"
    assert RewardSpec(model="runs/rm").describe() == "runs/rm"
    assert RewardSpec(models=["a", "b"]).describe() == "2 reward models combined by mean: a, b"
    assert RewardSpec(models=["a", "b", "c"], combine="mean_minus_std", std_coef=0.5).describe() == \
        "3 reward models combined by mean_minus_std 0.5: a, b, c"
