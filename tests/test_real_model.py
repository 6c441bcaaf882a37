"""The real SmolLM2-135M-Instruct (GGUF, from ../shared) through `rlhf sft` and `rlhf train-rm`.

Slow (the GGUF dequantizes in ~40 s per load): deselected by default, run with `pytest -m real`.
"""

import json
import subprocess
import sys

import pytest

from conftest import REPO, TINY

pytestmark = pytest.mark.real

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm(shared_dir):
    directory = shared_dir / "models" / "smollm2-135m-instruct"
    if not (directory / GGUF).is_file():
        pytest.skip(f"{directory / GGUF} is absent")
    pytest.importorskip("gguf")
    return directory


def run(*args):
    result = subprocess.run([sys.executable, "-m", "rlhf_cli.cli", *args], capture_output=True, text=True,
                            timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def real_model_overrides(smollm):
    return ["--set", f"model.name_or_path={smollm}", "--set", f"model.gguf_file={GGUF}", "--set", "data.max_length=128",
            "--set", "training.max_steps=3", "--set", "training.per_device_train_batch_size=2",
            "--set", "training.logging_steps=1", "--set", "training.learning_rate=1e-5"]


def test_sft_on_alpaca_with_the_real_model(smollm, shared_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "sft"
    alpaca = shared_dir / "data" / "llama-factory-demo" / "alpaca_en_demo.json"
    run("sft", str(TINY / "sft.yaml"), "-o", str(out), *real_model_overrides(smollm),
        "--set", f"data.train.path={alpaca}", "--set", "data.train.limit=32")
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 3 and all(0 < loss < 10 for loss in losses)  # a pretrained model: far below ln(49152)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "llama"
    assert AutoTokenizer.from_pretrained(out).chat_template


def test_reward_model_on_hh_with_the_real_model(smollm, shared_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "rm"
    pairs = shared_dir / "data" / "hh-rlhf-harmless" / "pairs.jsonl.gz"
    run("train-rm", str(TINY / "rm.yaml"), "-o", str(out), *real_model_overrides(smollm),
        "--set", f"data.train.path={pairs}", "--set", "data.train.limit=32")
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1


def test_ppo_on_gsm8k_with_the_real_model_and_the_rule_reward(smollm, shared_dir, tmp_path, monkeypatch):
    """recipes/gsm8k/ppo.yaml for two tiny steps: GGUF policy, critic from the policy's body, exact-match rule."""
    out = tmp_path / "ppo"
    monkeypatch.setenv("RLHF_GSM8K_FILE", str(shared_dir / "data" / "gsm8k"))
    run("ppo", str(REPO / "recipes" / "gsm8k" / "ppo.yaml"), "-o", str(out), "--set", "training.steps=2",
        "--set", "training.rollout_batch_size=2", "--set", "training.mini_batch_size=2",
        "--set", "training.response_length=8", "--set", "training.ppo_epochs=1", "--set", "training.sample_every=0")
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2 and all(row["score"] in (0.0, 0.5, 1.0) for row in history)  # exact match, 2 samples
    assert (out / "model.safetensors").is_file() and (out / "critic" / "config.json").is_file()
