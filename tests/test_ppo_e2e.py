"""End to end: `rlhf ppo` on the tiny task, in-process and under ZeRO-3 in two CPU processes: learning against a
reward model and a rule, exact resume, LoRA mode, alarms and an independent judge, compiled decoding, and
GRPO/RLOO through TRL."""

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, RLHF, TINY, rlhf


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def ppo_history(out: Path) -> list[dict]:
    return [row for row in metrics(out) if "score" in row]


def test_ppo_raises_the_reward_model_score_with_bounded_kl(tiny_sft, tiny_rm, tmp_path):
    out = tmp_path / "ppo"
    rlhf("ppo", str(TINY / "ppo.yaml"), "-o", str(out), "--set", f"model.name_or_path={tiny_sft}",
         "--set", f"ppo.reward.model={tiny_rm}")
    history = ppo_history(out)
    first = sum(row["score"] for row in history[:8]) / 8
    last = sum(row["score"] for row in history[-8:]) / 8
    assert last > first + 0.2, (first, last)
    assert max(row["kl"] for row in history[-8:]) < 10.0  # the KL penalty keeps the policy near the reference
    for name in ("recipe.yaml", "summary.json", "samples.jsonl", "config.json", "critic/config.json"):
        assert (out / name).is_file(), name


@pytest.mark.slow
@pytest.mark.extended  # PPO with a rule reward runs in the default suite too (test_lengths, test_overoptimisation)
def test_ppo_with_a_rule_reward_known_exactly(tiny_sft, tmp_path):
    out = tmp_path / "rule"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    result = subprocess.run(
        [*RLHF, "ppo", str(TINY / "ppo.yaml"), "-o", str(out), "--set", f"model.name_or_path={tiny_sft}",
         "--set", "ppo.reward={function: 'rules:starts_with_sure'}", "--set", "training.steps=30"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    history = ppo_history(out)
    assert all(0.0 <= row["score"] <= 1.0 for row in history)  # the rule's range, no penalty in the raw score
    first = sum(row["score"] for row in history[:6]) / 6
    last = sum(row["score"] for row in history[-6:]) / 6
    assert last > first, (first, last)


def ppo_run(out: Path, sft: Path, rm: Path, *settings: str) -> list[dict]:
    """A short tiny PPO run; its metrics without the wall-clock fields."""
    rlhf("ppo", str(TINY / "ppo.yaml"), "-o", str(out), "--set", f"model.name_or_path={sft}",
         "--set", f"ppo.reward.model={rm}", "--set", "training.rollout_batch_size=8",
         "--set", "training.mini_batch_size=4", "--set", "training.response_length=8", *settings)
    return [{key: value for key, value in row.items() if key != "time" and not key.startswith("time_")}
            for row in ppo_history(out)]


def test_ppo_resume_gives_the_same_metrics_as_an_uninterrupted_run(tiny_sft, tiny_rm, tmp_path):
    # Running reward statistics and the adaptive KL controller are part of the state to restore.
    settings = ("--set", "training.save_steps=2", "--set", "training.normalize_rewards=true",
                "--set", "training.target_kl=0.5", "--set", "training.kl_horizon=100",
                "--set", f"ppo.judge={{model: {tiny_rm}}}")  # the reward model as its own judge: scores must agree
    straight = ppo_run(tmp_path / "straight", tiny_sft, tiny_rm, "--set", "training.steps=4", *settings)
    first_half = ppo_run(tmp_path / "resumed", tiny_sft, tiny_rm, "--set", "training.steps=2", *settings)
    assert (tmp_path / "resumed" / "checkpoint-2").is_dir()
    resumed = ppo_run(tmp_path / "resumed", tiny_sft, tiny_rm, "--set", "training.steps=4", "--resume", *settings)
    assert len(straight) == 4 and resumed[:2] == first_half
    assert resumed == straight  # exactly: weights, optimizer, RNG, beta, reward statistics and prompt position
    assert straight[1]["beta"] != straight[0]["beta"]  # the controller did move, so its restore was tested
    assert all(row["judge_score"] == pytest.approx(row["score"], abs=1e-5) for row in straight)


def test_ppo_under_deepspeed_zero3_in_two_cpu_processes(tiny_sft, tiny_rm, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    out = tmp_path / "zero3"
    history = ppo_run(out, tiny_sft, tiny_rm, "--set", "distributed.strategy=zero3",
                      "--set", "distributed.num_processes=2", "--set", "training.steps=3",
                      "--set", "training.save_steps=3")  # fmt: skip
    assert [row["step"] for row in history] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(row["score"])) and row["policy_loss"] == row["policy_loss"] for row in history)
    # A real ZeRO-3 checkpoint: optimizer state partitioned over both ranks.
    shards = sorted(path.name for path in (out / "checkpoint-3").rglob("zero_pp_rank_*_optim_states.pt"))
    assert len(shards) == 2, shards
    assert (out / "checkpoint-3" / "random_states_1.pkl").is_file()
    policy = AutoModelForCausalLM.from_pretrained(out)
    critic = AutoModelForSequenceClassification.from_pretrained(out / "critic")
    for model in (policy, critic):  # gathered at save time, not empty shards
        assert all(p.numel() > 0 and torch.isfinite(p).all() for p in model.parameters())
    reference = AutoModelForCausalLM.from_pretrained(tiny_sft)
    changed = any(not torch.equal(a, b) for a, b in zip(policy.parameters(), reference.parameters()))
    assert changed  # the policy trained


def test_grpo_with_a_rule_reward_and_rloo_with_the_reward_model(tiny_sft, tiny_rm, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    short = ["--set", "training.max_steps=3", "--set", "training.per_device_train_batch_size=8",
             "--set", f"model.name_or_path={tiny_sft}"]  # fmt: skip
    grpo = tmp_path / "grpo"
    result = subprocess.run([*RLHF, "ppo", str(TINY / "grpo.yaml"), "-o", str(grpo), *short,
                             "--set", "ppo.reward={function: 'rules:starts_with_sure'}"],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    logged = [row for row in metrics(grpo) if "reward" in row]
    assert len(logged) == 3 and all(0.0 <= row["rewards/starts_with_sure/mean"] <= 1.0 for row in logged)
    rloo = tmp_path / "rloo"
    rlhf("ppo", str(TINY / "rloo.yaml"), "-o", str(rloo), *short, "--set", f"ppo.reward.model={tiny_rm}")
    summary = json.loads((rloo / "summary.json").read_text())
    assert summary["stage"] == "rloo" and summary["steps"] == 3 and "reward (last steps)" in summary
    assert (rloo / "model.safetensors").is_file()


def test_ppo_judge_is_logged_and_a_stop_alarm_saves_and_stops(tiny_sft, tiny_rm, tmp_path):
    out = tmp_path / "alarm"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    result = subprocess.run(
        [*RLHF, "ppo", str(TINY / "ppo.yaml"), "-o", str(out), "--set", f"model.name_or_path={tiny_sft}",
         "--set", f"ppo.reward.model={tiny_rm}", "--set", "ppo.judge={function: 'rules:starts_with_sure'}",
         "--set", "training.steps=8", "--set", "training.rollout_batch_size=8", "--set", "training.mini_batch_size=4",
         "--set", "training.target_kl=0.01", "--set", "ppo.alarms={mode: stop, kl_multiple: 2.0}"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=600)  # fmt: skip
    assert result.returncode == 3, result.stdout + result.stderr  # stopped by the alarm, on purpose
    assert "Stopped by the kl alarm" in " ".join(result.stdout.split())
    history = ppo_history(out)
    assert all(0.0 <= row["judge_score"] <= 1.0 and 0.0 <= row["repetition_rate"] <= 1.0 for row in history)
    assert history[-1]["kl"] > 2.0 * 0.01 and len(history) < 8
    alarms = [json.loads(line) for line in (out / "alarms.jsonl").read_text().splitlines()]
    assert alarms[0]["alarm"] == "kl" and alarms[0]["step"] == history[-1]["step"]
    assert (out / f"checkpoint-{history[-1]['step']}").is_dir()  # saved before stopping


def test_ppo_in_lora_mode_keeps_one_base_and_saves_adapters(tiny_sft, tiny_rm, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    history = ppo_run(out, tiny_sft, tiny_rm, "--set", "model.lora={r: 8, alpha: 16, merge: true}",
                      "--set", "training.steps=3", "--set", "training.learning_rate=1e-3")  # fmt: skip
    assert len(history) == 3 and history[0]["kl"] == 0.0  # adapters start as the identity: policy == reference
    assert history[-1]["kl"] != 0.0  # ... and the policy adapter moved away from the base
    for name in ("adapter/policy/adapter_model.safetensors", "adapter/critic/adapter_model.safetensors",
                 "adapter/critic/value_head.pt", "model.safetensors"):  # fmt: skip
        assert (out / name).is_file(), name
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_sft)
    assert any(not torch.equal(a, b) for a, b in zip(merged.parameters(), base.parameters()))


def test_ppo_rollouts_with_compiled_decoding_in_lora_mode(tiny_sft, tiny_rm, tmp_path):
    """generation.backend compiled in PPO's rollout: the static-cache, compiled decoding step samples from the
    policy adapter (the reference is the base with adapters off), and the summary says which backend ran."""
    out = tmp_path / "compiled"
    history = ppo_run(out, tiny_sft, tiny_rm, "--set", "model.lora={r: 8, alpha: 16}", "--set", "training.steps=2",
                      "--set", "training.learning_rate=1e-3", "--set", "generation={backend: compiled, prompt_bucket: 16}")
    assert len(history) == 2 and history[0]["kl"] == 0.0 and history[-1]["kl"] != 0.0
    assert all(math.isfinite(row["policy_loss"]) for row in history)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["decoding"] == "compiled, prompts padded to multiples of 16 tokens"
