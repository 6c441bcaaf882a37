"""End to end: the real `rlhf` command on the tiny recipes (sft, train-rm, LoRA, resume, Ctrl-C, every shipped recipe's
dry run); PPO and GRPO/RLOO are in test_ppo_e2e.py, train-rm under ZeRO-3 in test_distributed_e2e.py."""

import json
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
