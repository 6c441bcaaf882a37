"""End to end: `rlhf eval` and `rlhf generate` on real (short) tiny SFT, reward-model and PPO runs.

The three runs are module fixtures made with the real `rlhf` command, cut short: the evaluation needs real
checkpoints of each kind, not good ones. The evaluations themselves run in-process.
"""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import REPO, TINY
from rlhf_cli.cli import app

RLHF = [sys.executable, "-m", "rlhf_cli.cli"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ("reward_distribution.png", "reward_vs_length.png", "training_curves.png", "overoptimisation.png")


def rlhf(*commands: list[str]) -> None:
    """Run `rlhf` commands side by side (most of a tiny run is start-up, which overlaps well) and wait for all."""
    processes = [subprocess.Popen([*RLHF, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  cwd=REPO) for args in commands]  # fmt: skip
    for args, process in zip(commands, processes):
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, f"rlhf {' '.join(args)} failed:\n{output}"


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-runs")
    sft, rm, ppo = root / "sft", root / "rm", root / "ppo"
    rlhf(["sft", str(TINY / "sft.yaml"), "-o", str(sft), "--set", "training.max_steps=32"],
         ["train-rm", str(TINY / "rm.yaml"), "-o", str(rm), "--set", "training.max_steps=24"])
    rlhf(["ppo", str(TINY / "ppo.yaml"), "-o", str(ppo), "--set", f"model.name_or_path={sft}",
          "--set", f"ppo.reward.model={rm}", "--set", "training.steps=6", "--set", "training.rollout_batch_size=8",
          "--set", "training.ppo_epochs=2", "--set", "training.response_length=8", "--set", "training.save_steps=100"])
    return {"sft": sft, "rm": rm, "ppo": ppo}


def assert_valid_png(path: Path) -> None:
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100, (path, width, height)
    assert imread(path).shape[:2] == (height, width)  # decodes as a whole


def test_tiny_eval_recipe_end_to_end(runs, tmp_path):
    out = tmp_path / "eval"
    output = invoke("eval", TINY / "eval.yaml", "-o", out, "--set", f"model.name_or_path={runs['ppo']}",
                    "--set", f"eval.reference={runs['sft']}", "--set", f"eval.reward_model={runs['rm']}",
                    "--set", f"eval.ppo_run={runs['ppo']}", "--set", "eval.num_prompts=24",
                    "--set", "eval.preferences.limit=32", "--set", "eval.demonstrations.limit=16")
    assert "Evaluation: done" in output and "win rate (policy vs reference)" in output
    for name in ("eval.json", "report.md", "recipe.yaml", "samples.jsonl", *FIGURES):
        assert (out / name).is_file(), name
    for name in FIGURES:
        assert_valid_png(out / name)

    results = json.loads((out / "eval.json").read_text())
    assert set(results) == {"meta", "reward_model", "policy", "diversity", "perplexity", "judge"}
    rm = results["reward_model"]
    assert rm["num_pairs"] == 32 and 0 <= rm["accuracy"] <= 1 and len(rm["calibration"]) == 4
    policy = results["policy"]
    assert policy["win_rate"]["n"] == 24 and 0 <= policy["win_rate"]["ci_low"] <= policy["win_rate"]["win_rate"]
    assert policy["kl"]["count"] == 24 and policy["kl"]["stderr"] > 0
    assert policy["policy_score"]["count"] == policy["reference_score"]["count"] == 24
    for label in ("policy", "reference"):
        stats = results["diversity"][label]
        assert 1 <= stats["mean_length"] <= 16 and 0 <= stats["eos_rate"] <= 1 and 0 < stats["distinct_2"] <= 1
        assert results["perplexity"][label] > 1
    assert results["judge"]["name"] == "rlhf_cli.demo:correct_answer"
    assert -1 <= results["judge"]["proxy_correlation"] <= 1
    assert results["meta"]["ppo steps logged"] == 6 and results["meta"]["prompts evaluated"] == 24

    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 24
    mean_log_ratio = sum(row["log_ratio"] for row in rows) / len(rows)
    assert mean_log_ratio == pytest.approx(policy["kl"]["kl"])
    assert sum(row["policy_score"] for row in rows) / 24 == pytest.approx(policy["policy_score"]["mean"])

    report = (out / "report.md").read_text()
    for heading in ("## Reward model", "## Policy vs reference", "## Diversity", "## Perplexity", "## Judge",
                    "## Samples", "## Figures"):  # fmt: skip
        assert heading in report, heading
    for name in FIGURES:
        assert f"]({name})" in report
    assert report.count("| user: What is") == 6  # num_samples_in_report rows of the recipe


def test_a_policy_against_itself_ties_everywhere_with_zero_kl(runs, tmp_path):
    """Policy and reference sample with the same seeds: the same model must give the same responses."""
    out = tmp_path / "self"
    recipe = tmp_path / "self.yaml"
    recipe.write_text(json.dumps({
        "stage": "eval", "model": {"name_or_path": str(runs["sft"])},
        "eval": {"reference": str(runs["sft"]), "reward_model": str(runs["rm"]),
                 "judge": {"function": "rlhf_cli.demo:correct_answer"},
                 "prompts": {"path": str(TINY / "data" / "prompts.jsonl")}, "num_prompts": 16,
                 "demonstrations": {"path": str(TINY / "data" / "heldout-sft.jsonl"), "limit": 8},
                 "max_new_tokens": 12, "batch_size": 5},
    }))  # fmt: skip
    invoke("eval", recipe, "-o", out)
    results = json.loads((out / "eval.json").read_text())
    win = results["policy"]["win_rate"]
    assert (win["win_rate"], win["ties"], win["n"]) == (0.5, 16, 16)
    assert results["policy"]["kl"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert results["judge"]["win_rate"]["ties"] == 16
    assert results["perplexity"]["policy"] == pytest.approx(results["perplexity"]["reference"])
    assert results["diversity"]["policy"] == results["diversity"]["reference"]


def test_reward_model_eval_on_the_shared_hh_pairs(runs, tmp_path, shared_dir):
    pairs = shared_dir / "data" / "hh-rlhf-harmless" / "pairs.jsonl.gz"
    out = tmp_path / "hh"
    recipe = tmp_path / "hh.yaml"
    recipe.write_text(json.dumps({"stage": "eval", "eval": {
        "reward_model": str(runs["rm"]), "preferences": {"path": str(pairs), "limit": 48}, "max_length": 128}}))
    output = invoke("eval", recipe, "-o", out)
    assert "reward model on pairs" in output
    results = json.loads((out / "eval.json").read_text())
    assert set(results) == {"meta", "reward_model"}
    rm = results["reward_model"]
    assert rm["num_pairs"] == 48 and 0 <= rm["accuracy"] <= 1 and sum(b["count"] for b in rm["calibration"]) == 48
    assert rm["length_bias"] is not None  # HH responses differ in length
    written = sorted(path.name for path in out.iterdir() if not path.name.startswith("."))  # not the run's lock
    assert written == ["eval.json", "pair_scores.jsonl", "recipe.yaml", "report.md"]
    rows = [json.loads(line) for line in (out / "pair_scores.jsonl").read_text().splitlines()]
    assert len(rows) == 48 and sum(row["tie"] for row in rows) == rm["ties"]


def test_generate_writes_scored_completions_that_load_as_sft_data(runs, tmp_path):
    from rlhf_cli.data import load_data
    from rlhf_cli.recipe import DataSource

    recipe = tmp_path / "generate.yaml"
    recipe.write_text(json.dumps({
        "stage": "generate", "model": {"name_or_path": str(runs["sft"])},
        "generate": {"prompts": {"path": str(TINY / "data" / "prompts.jsonl")}, "num_prompts": 5, "num_samples": 2,
                     "max_new_tokens": 10, "reward": {"model": str(runs["rm"])}},
    }))  # fmt: skip
    invoke("generate", recipe, "-o", tmp_path / "a")
    rows = [json.loads(line) for line in (tmp_path / "a" / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and [row["sample"] for row in rows[:4]] == [0, 1, 0, 1]
    assert rows[0]["prompt"] == rows[1]["prompt"] and rows[0]["prompt"][0]["role"] == "user"
    for row in rows:
        assert row["completion"][0]["role"] == "assistant" and isinstance(row["completion"][0]["content"], str)
        assert 1 <= row["num_tokens"] <= 10 and isinstance(row["finished"], bool) and isinstance(row["score"], float)
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["completions"] == 10 and summary["prompts"] == 5
    sft_rows = load_data(DataSource(path=str(tmp_path / "a" / "generations.jsonl")), "sft")
    assert sft_rows.column_names == ["prompt", "completion"] and len(sft_rows) == 10

    invoke("generate", recipe, "-o", tmp_path / "b")  # seeded: the same file again
    assert (tmp_path / "b" / "generations.jsonl").read_text() == (tmp_path / "a" / "generations.jsonl").read_text()


def test_eval_recipe_validates_and_dry_runs_without_writing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stand_ins = ["--set", f"model.name_or_path={TINY}", "--set", f"eval.reference={TINY}",
                 "--set", f"eval.reward_model={TINY}", "--set", f"eval.ppo_run={TINY}"]  # fmt: skip
    assert "OK (eval recipe" in invoke("recipe", "validate", TINY / "eval.yaml", *stand_ins)
    output = invoke("eval", TINY / "eval.yaml", "--dry-run", *stand_ins)
    assert "Evaluation — plan" in output and "Dry run: nothing was started or written." in output
    assert list(tmp_path.iterdir()) == []
