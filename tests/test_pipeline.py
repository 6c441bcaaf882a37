"""`rlhf pipeline`: the tiny ladder end to end, skipping by content hash, hand-off checks, resume after Ctrl-C."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import REPO, TINY, assert_clean_failure
from rlhf_cli.cli import app

RLHF = [sys.executable, "-m", "rlhf_cli.cli"]
# The tiny pipeline, shortened so the whole file stays within a few minutes on 2 CPU cores.
SHORT = ["--set", "stages.sft.training.num_train_epochs=3", "--set", "stages.rm.training.num_train_epochs=3",
         "--set", "stages.ppo.training.steps=6", "--set", "stages.eval.eval.num_prompts=32"]  # fmt: skip


def pipeline(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([*RLHF, "pipeline", str(TINY / "pipeline.yaml"), *args], capture_output=True,
                            text=True, cwd=REPO, timeout=900)  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(f"pipeline failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def statuses(out: Path) -> dict[str, str]:
    return {row["stage"]: row["this run"] for row in json.loads((out / "summary.json").read_text())}


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pipeline") / "run"
    pipeline("-o", str(out), *SHORT)
    return out


def test_tiny_pipeline_runs_every_stage_and_wires_them(tiny_pipeline):
    out = tiny_pipeline
    assert statuses(out) == {"sft": "ran", "rm": "ran", "ppo": "ran", "eval": "ran"}
    ppo_recipe = (out / "ppo" / "recipe.yaml").read_text()
    assert f"name_or_path: {out / 'sft'}" in ppo_recipe and f"model: {out / 'rm'}" in ppo_recipe
    assert f"name_or_path: {out / 'sft'}" in (out / "rm" / "recipe.yaml").read_text()  # the RM starts from SFT
    results = json.loads((out / "eval" / "eval.json").read_text())
    assert 0.0 <= results["policy"]["win_rate"]["win_rate"] <= 1.0
    for name in ("report.md", "reward_distribution.png"):
        assert (out / "eval" / name).is_file(), name
    state = json.loads((out / "pipeline.json").read_text())
    assert all(state[stage]["status"] == "done" for stage in ("sft", "rm", "ppo", "eval"))


def test_unchanged_stages_are_skipped_and_a_change_reruns_downstream(tiny_pipeline):
    out = tiny_pipeline
    pipeline("-o", str(out), *SHORT)
    assert set(statuses(out).values()) == {"skipped (unchanged)"}
    pipeline("-o", str(out), *SHORT, "--set", "stages.ppo.training.kl_coef=0.3")
    assert statuses(out) == {"sft": "skipped (unchanged)", "rm": "skipped (unchanged)", "ppo": "ran", "eval": "ran"}
    pipeline("-o", str(out), *SHORT, "--set", "stages.ppo.training.kl_coef=0.3", "--only", "eval")
    assert statuses(out) == {"sft": "kept", "rm": "kept", "ppo": "kept", "eval": "ran"}


def test_dry_run_prints_every_stage_and_writes_nothing(tmp_path):
    out = tmp_path / "dry"
    result = CliRunner().invoke(app, ["pipeline", str(TINY / "pipeline.yaml"), "-o", str(out), "--dry-run"])
    assert result.exit_code == 0, result.output
    for stage in ("sft", "rm", "ppo", "eval"):
        assert f"stage {stage}" in result.output
    assert "SFTConfig" in result.output and "PPOConfig" in result.output
    assert not out.exists()


def assert_refused(args: list[str], *fragments: str) -> None:
    assert_clean_failure(["pipeline", str(TINY / "pipeline.yaml"), *args], *fragments)


def _tokenizer_dir(tmp_path: Path, name: str, **changes) -> Path:
    """A copy of the builtin model's files with one tokenizer fact changed."""
    from transformers import AutoTokenizer

    from rlhf_cli.models import materialize_builtin
    from rlhf_cli.recipe import BuiltinSpec

    source = Path(materialize_builtin("builtin:tiny-gpt2", BuiltinSpec(), seed=42))
    target = tmp_path / name
    shutil.copytree(source, target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    for key, value in changes.items():
        setattr(tokenizer, key, value)
    tokenizer.save_pretrained(target)
    return target


def test_handoff_refuses_a_reward_model_with_another_vocabulary(tmp_path):
    from rlhf_cli.models import materialize_builtin
    from rlhf_cli.recipe import BuiltinSpec

    other = materialize_builtin("builtin:tiny-gpt2", BuiltinSpec(vocab_size=300), seed=1)
    out = tmp_path / "out"
    assert_refused(["-o", str(out), "--set", f"stages.ppo.ppo.reward.model={other}"],
                   "Stage ppo: ppo.reward.model", "vocabulary differs")  # fmt: skip
    assert not out.exists()  # refused before any stage ran


def test_handoff_refuses_another_chat_template_or_pad_token(tmp_path):
    template = _tokenizer_dir(tmp_path, "template", chat_template="{{ messages[0]['content'] }}")
    assert_refused(["-o", str(tmp_path / "a"), "--set", f"stages.eval.eval.reference={template}"],
                   "Stage eval: eval.reference", "chat template differs")  # fmt: skip
    pad = _tokenizer_dir(tmp_path, "pad", pad_token="<|user|>")
    assert_refused(["-o", str(tmp_path / "b"), "--set", f"stages.ppo.ppo.reward.model={pad}"],
                   "Stage ppo: ppo.reward.model", "pad token is '<|user|>'")  # fmt: skip


def test_lora_adapter_handed_to_a_stage_that_needs_full_weights(tmp_path):
    assert_refused(["-o", str(tmp_path / "o"), "--set", "stages.sft.model={lora: {r: 4, merge: false}}"],
                   "Stage sft: model.lora.merge is false", "stages.sft.model.lora.merge: true")  # fmt: skip


def test_a_bad_stage_recipe_is_named(tmp_path):
    assert_refused(["-o", str(tmp_path / "o"), "--set", "stages.rm.training.learnin_rate=1"],
                   "Stage rm:", "learnin_rate")  # fmt: skip


def test_interrupted_middle_stage_resumes_without_redoing_sft(tmp_path):
    out = tmp_path / "run"
    args = [*RLHF, "pipeline", str(TINY / "pipeline.yaml"), "-o", str(out), *SHORT,
            "--set", "stages.rm.training.save_steps=4", "--set", "stages.rm.training.num_train_epochs=30",
            "--set", "stages.rm.training.max_steps=40"]  # long enough to interrupt after checkpoint-4, short to finish
    process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    deadline = time.time() + 300
    while not list((out / "rm").glob("checkpoint-*")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 130, output
    sft_model = (out / "sft" / "model.safetensors").stat().st_mtime
    result = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert statuses(out) == {"sft": "skipped (unchanged)", "rm": "resumed", "ppo": "ran", "eval": "ran"}
    assert (out / "sft" / "model.safetensors").stat().st_mtime == sft_model  # SFT was not redone


def test_pipeline_bad_inputs_are_named(tmp_path):
    out = str(tmp_path / "o")
    assert_refused(["-o", out, "--from", "bogus"], "--from bogus", "sft, rm, ppo, eval")
    assert_refused(["-o", out, "--set", "stages.grpo={}"], "unknown stage(s) grpo")  # dpo and kto are stages now
    assert_refused(["-o", out, "--set", "trainin={}"], "unknown top-level key(s) trainin")
    assert_refused(["-o", out, "--set", "stages.ppo.output_dir=x"], "stages.ppo.output_dir is set by the pipeline")
    assert_refused(["-o", out, "--set", "stages.ppo.training.response_length=600"], "exceeds the model's 512 positions")
    assert_refused(["-o", out, "--set", "stages.ppo.training.mini_batch_size=5"], "Stage ppo:", "must divide")
    assert not (tmp_path / "o").exists()
