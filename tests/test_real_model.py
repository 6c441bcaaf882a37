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
