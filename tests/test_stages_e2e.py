"""End to end: the real `rlhf` command on the tiny recipes, in-process, under ZeRO-3, with LoRA, resume and Ctrl-C."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import REPO, RLHF, TINY, rlhf
from rlhf_cli.cli import app



def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "sft"
    rlhf("sft", str(TINY / "sft.yaml"), "-o", str(out))
    return out


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "rm"
    rlhf("train-rm", str(TINY / "rm.yaml"), "-o", str(out))
    return out


def test_sft_run_directory_and_learning(tiny_sft):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("recipe.yaml", "metrics.jsonl", "summary.json", "config.json", "model.safetensors"):
        assert (tiny_sft / name).is_file(), name
    logged = [row for row in metrics(tiny_sft) if "loss" in row]
    assert len(logged) >= 5
    assert logged[-1]["loss"] < 0.5 * logged[0]["loss"]
    model = AutoModelForCausalLM.from_pretrained(tiny_sft)
    tokenizer = AutoTokenizer.from_pretrained(tiny_sft)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "plus" in answer or "." in answer, answer  # it has learnt the shape of an answer
    summary = json.loads((tiny_sft / "summary.json").read_text())
    assert summary["stage"] == "sft" and summary["steps"] == 128


def test_reward_model_prefers_chosen(tiny_rm):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_rm)
    pairs = [json.loads(line) for line in (TINY / "data" / "preference.jsonl").read_text().splitlines()]

    def score(messages):
        ids = tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            return model(**ids).logits[0, 0].item()

    wins = sum(score(p["prompt"] + p["chosen"]) > score(p["prompt"] + p["rejected"]) for p in pairs)
    assert wins / len(pairs) > 0.8  # chance is 0.5


def test_rm_on_real_hh_pairs(tmp_path, shared_dir):
    out = tmp_path / "hh"
    pairs = shared_dir / "data" / "hh-rlhf-harmless" / "pairs.jsonl.gz"
    rlhf("train-rm", str(TINY / "rm.yaml"), "-o", str(out), "--set", f"data.train.path={pairs}",
         "--set", "data.train.limit=64", "--set", "data.max_length=128", "--set", "training.max_steps=4",
         "--set", "training.per_device_train_batch_size=8", "--set", "training.logging_steps=1")
    logged = [row for row in metrics(out) if "loss" in row]
    assert len(logged) == 4 and all(0 < row["loss"] < 5 for row in logged)


def test_lora_with_merge(tmp_path):
    from peft import PeftConfig
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    rlhf("sft", str(TINY / "sft.yaml"), "-o", str(out), "--set", "model.lora={r: 4, alpha: 8, merge: true}",
         "--set", "training.max_steps=6")
    assert PeftConfig.from_pretrained(out / "adapter").r == 4
    model = AutoModelForCausalLM.from_pretrained(out)  # merged full weights
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_resume_continues_from_the_last_checkpoint(tmp_path):
    out = tmp_path / "resume"
    common = ["--set", "training.save_steps=4", "--set", "training.logging_steps=2"]
    rlhf("sft", str(TINY / "sft.yaml"), "-o", str(out), "--set", "training.max_steps=4", *common)
    assert (out / "checkpoint-4").is_dir()
    rlhf("sft", str(TINY / "sft.yaml"), "-o", str(out), "--resume", "--set", "training.max_steps=8", *common)
    steps = [row["step"] for row in metrics(out) if "loss" in row]
    assert steps == [2, 4, 6, 8]  # no step trained twice
    assert json.loads((out / "summary.json").read_text())["steps"] == 8


def test_ctrl_c_saves_a_checkpoint_then_resume_finishes(tmp_path):
    out = tmp_path / "interrupted"
    args = [*RLHF, "sft", str(TINY / "sft.yaml"), "-o", str(out), "--set", "training.num_train_epochs=200",
            "--set", "training.logging_steps=1", "--set", "training.save_steps=100000"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    assert "Interrupted: checkpoint saved" in output
    checkpoints = list(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1
    stopped_at = int(checkpoints[0].name.split("-")[1])
    rlhf("sft", str(TINY / "sft.yaml"), "-o", str(out), "--resume", "--set", f"training.max_steps={stopped_at + 2}",
         "--set", "training.num_train_epochs=200", "--set", "training.logging_steps=1")
    assert json.loads((out / "summary.json").read_text())["steps"] == stopped_at + 2


@pytest.mark.parametrize("recipe", sorted(str(p.relative_to(REPO)) for p in (REPO / "recipes").glob("*/*.yaml")))
def test_every_recipe_validates_and_dry_runs(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative output_dir lands here, and must not be created
    text = (REPO / recipe).read_text()
    if "\nstages:" in text:
        pytest.skip("a pipeline recipe: tests/test_pipeline.py dry-runs it")
    if re.search(r"^stage: (eval|generate)", text, re.M):
        pytest.skip("tests/test_eval_e2e.py validates and dry-runs eval and generate recipes")
    overrides = []
    if "../shared" in text and not (REPO.parent / "shared").is_dir():
        pytest.skip("this recipe reads ../shared, which is absent")
    reads_a_run = re.search(r"^\s+name_or_path: \.\./\.\./runs/", text, re.M)
    if reads_a_run or re.search(r"^stage: (ppo|dpo|kto|label)", text, re.M):  # earlier stages' outputs: stand-ins
        overrides = ["--set", f"model.name_or_path={TINY}"]
        if re.search(r"^\s+model: \.\./\.\./runs/", text, re.M):
            key = "label.labeller.model" if "stage: label" in text else "ppo.reward.model"
            overrides += ["--set", f"{key}={TINY}"]
        if re.search(r"^\s+models: \[\.\./\.\./runs/", text, re.M):
            overrides += ["--set", f"label.labeller.models=[{TINY}]"]
    runner = CliRunner()
    result = runner.invoke(app, ["recipe", "validate", str(REPO / recipe), *overrides])
    assert result.exit_code == 0, result.output
    stage = re.search(r"^stage: (\w+)", text, re.M).group(1)
    command = {"sft": "sft", "rm": "train-rm", "ppo": "ppo", "dpo": "dpo", "kto": "kto", "label": "label"}[stage]
    result = runner.invoke(app, [command, str(REPO / recipe), "--dry-run", *overrides])
    assert result.exit_code == 0, result.output
    assert ("Command:" in result.output or stage == "label") and "Dry run" in result.output
    if "strategy: zero3" in (REPO / recipe).read_text():
        assert "accelerate.commands.launch" in result.output and "stage: 3" in result.output
    assert list(tmp_path.iterdir()) == []


def test_help_does_not_import_torch():
    code = "import sys; from rlhf_cli.cli import app; app(['--help'], standalone_mode=False); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().endswith("False")
    for args in (["sft", "--help"], ["dpo", "--help"], ["kto", "--help"], ["eval", "--help"], ["generate", "--help"],
                 ["recipe", "validate", str(TINY / "sft.yaml")]):
        code = f"import sys; from rlhf_cli.cli import app; app({args!r}, standalone_mode=False); print('torch' in sys.modules)"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert result.stdout.strip().endswith("False"), args


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
