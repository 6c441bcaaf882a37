"""Faults that destroy work: divergence, --overwrite, a second writer, a full disk, signals, a half-saved checkpoint.

Each test injects the fault (a loss that turns NaN at step k, a save that fails with ENOSPC, a lock held by another
process, a signal at some moment of start-up) and checks that nothing the user had is lost and the exit code says
what happened: 3 divergence, 2 bad input or unusable output location, 130 interrupted.
"""

import fcntl
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import REPO, TINY, assert_clean_failure
from rlhf_cli.cli import app
from test_cli_errors import tiny_recipe

RLHF = [sys.executable, "-m", "rlhf_cli.cli"]
FAST = ["--set", "training.num_train_epochs=1", "--set", "training.max_steps=6", "--set", "training.save_steps=2",
        "--set", "training.logging_steps=1"]  # fmt: skip


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def run_files(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*")}


def nan_after(monkeypatch, trainer_class, step: int) -> None:
    """Make trainer_class's loss NaN from optimizer step `step` on (1-based), as a huge learning rate would."""
    import torch

    original = trainer_class.compute_loss

    def compute_loss(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if self.state.global_step + 1 >= step:
            if isinstance(result, tuple):
                return (result[0] * torch.tensor(float("nan")), *result[1:])
            return result * torch.tensor(float("nan"))
        return result

    monkeypatch.setattr(trainer_class, "compute_loss", compute_loss)


# ---------------------------------------------------------------- divergence


@pytest.mark.parametrize("command, recipe, trainer", [("sft", "sft.yaml", "SFTTrainer"),
                                                      ("train-rm", "rm.yaml", "RewardTrainer")])  # fmt: skip
def test_a_nan_loss_stops_with_exit_3_and_keeps_the_last_finite_checkpoint(tmp_path, monkeypatch, command, recipe,
                                                                            trainer):  # fmt: skip
    import trl

    nan_after(monkeypatch, getattr(trl, trainer), step=4)
    out = tmp_path / "out"
    result = invoke(command, str(TINY / recipe), "-o", str(out), *FAST)
    assert result.exit_code == 3, result.output
    flat = " ".join(result.output.split())
    assert "diverged at step 4" in flat and "checkpoint-2" in flat and "learning_rate" in flat
    assert "Traceback" not in result.output, result.output
    # No final model and no checkpoint of the poisoned weights; checkpoint-2 is the one to resume from.
    assert not (out / "model.safetensors").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    # Every line of metrics.jsonl and summary.json is strict JSON, the NaN written as null.
    records = [json.loads(line, parse_constant=pytest.fail) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]  # logged up to the last finite step
    summary = json.loads((out / "summary.json").read_text(), parse_constant=pytest.fail)
    assert summary["status"] == "diverged"

    monkeypatch.undo()  # the cause is gone: the run continues from the last finite checkpoint and finishes
    resumed = invoke(command, str(TINY / recipe), "-o", str(out), *FAST, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert (out / "model.safetensors").is_file()


def test_ppo_stops_with_exit_3_on_a_nan_loss(tmp_path, monkeypatch):
    import torch

    import rlhf_cli.ppo.trainer as ppo_trainer

    calls = {"n": 0}
    original = ppo_trainer.policy_loss

    def policy_loss(*args, **kwargs):
        loss, stats = original(*args, **kwargs)
        calls["n"] += 1
        return (loss * torch.tensor(float("nan")) if calls["n"] > 2 else loss), stats

    monkeypatch.setattr(ppo_trainer, "policy_loss", policy_loss)
    sft, rm = tmp_path / "sft", tmp_path / "rm"
    for command, recipe, target in (("sft", "sft.yaml", sft), ("train-rm", "rm.yaml", rm)):
        assert invoke(command, str(TINY / recipe), "-o", str(target), "--set", "training.max_steps=2").exit_code == 0
    out = tmp_path / "ppo"
    result = invoke("ppo", str(TINY / "ppo.yaml"), "-o", str(out), "--set", f"model.name_or_path={sft}",
                    "--set", f"ppo.reward.model={rm}", "--set", "training.steps=6", "--set", "training.save_steps=1",
                    "--set", "training.ppo_epochs=1", "--set", "training.mini_batch_size=8",
                    "--set", "training.rollout_batch_size=8")  # fmt: skip
    assert result.exit_code == 3, result.output
    assert "diverged at step 3" in " ".join(result.output.split())
    assert not (out / "model.safetensors").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=pytest.fail)


# ---------------------------------------------------------------- --overwrite and the marker


def test_overwrite_replaces_a_previous_run_only_after_the_new_one_succeeds(tmp_path, monkeypatch):
    import trl

    out = tmp_path / "out"
    assert invoke("sft", str(TINY / "sft.yaml"), "-o", str(out), "--set", "training.max_steps=2").exit_code == 0
    (out / "note.txt").write_text("from the first run")
    before = run_files(out)

    def crash(self, *args, **kwargs):
        raise RuntimeError("the new run crashed")

    monkeypatch.setattr(trl.SFTTrainer, "train", crash)
    failed = invoke("sft", str(TINY / "sft.yaml"), "-o", str(out), "--overwrite")
    assert failed.exit_code == 1 and "Traceback" not in failed.output
    assert run_files(out) == before and (out / "note.txt").read_text() == "from the first run"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing left aside

    monkeypatch.undo()
    replaced = invoke("sft", str(TINY / "sft.yaml"), "-o", str(out), "--overwrite", "--set", "training.max_steps=2")
    assert replaced.exit_code == 0, replaced.output
    assert not (out / "note.txt").exists() and (out / "model.safetensors").is_file() and (out / ".rlhf-run").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_overwrite_never_deletes_a_folder_of_the_users_files(tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    recipe = tiny_recipe(folder)  # the recipe and its data live in the folder given as output
    (folder / "notes.md").write_text("mine")
    before = run_files(folder)
    result = invoke("sft", str(recipe), "-o", str(folder), "--overwrite")
    assert result.exit_code == 2 and "not created by rlhf" in " ".join(result.output.split())
    assert run_files(folder) == before


# ---------------------------------------------------------------- one writer


def lock_in_another_process(run_dir: Path) -> subprocess.Popen:
    """A process holding run_dir's lock as a live run does (its pid inside); kill it to release the lock."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, time\n"
        f"h = open({str(run_dir / '.rlhf-lock')!r}, 'a+')\n"
        "fcntl.flock(h, fcntl.LOCK_EX)\nh.seek(0); h.truncate(); h.write(str(os.getpid())); h.flush()\n"
        "print('locked', flush=True)\ntime.sleep(60)\n")], stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    assert invoke("sft", str(TINY / "sft.yaml"), "-o", str(out), "--set", "training.max_steps=2").exit_code == 0
    before = run_files(out)
    # Another process holds the run's lock (a live run); it is released by the OS when that process ends.
    holder = lock_in_another_process(out)
    try:
        for flags in (["--overwrite"], ["--resume"]):
            result = invoke("sft", str(TINY / "sft.yaml"), "-o", str(out), *flags)
            flat = " ".join(result.output.split())
            assert result.exit_code == 2 and "in use" in flat and f"pid {holder.pid}" in flat, flat
        assert run_files(out) - {".rlhf-lock"} == before - {".rlhf-lock"}
    finally:
        holder.kill()
        holder.wait()
    # The holder died: the OS released its lock, and the directory can be replaced again.
    assert invoke("sft", str(TINY / "sft.yaml"), "-o", str(out), "--overwrite",
                  "--set", "training.max_steps=2").exit_code == 0  # fmt: skip


def test_the_lock_is_held_for_the_whole_run(tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen([*RLHF, "sft", str(TINY / "sft.yaml"), "-o", str(out)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.time() + 120
        while not (out / ".rlhf-lock").exists() and time.time() < deadline:
            time.sleep(0.2)
        with open(out / ".rlhf-lock", "a+") as handle:
            with pytest.raises(BlockingIOError):
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            handle.seek(0)
            assert handle.read().strip() == str(process.pid)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)


# ---------------------------------------------------------------- disk full, half-saved checkpoints


def test_a_full_disk_is_one_paragraph_and_resume_continues_from_the_last_complete_checkpoint(tmp_path, monkeypatch):
    import errno

    import transformers.modeling_utils as modeling_utils

    original = modeling_utils.safe_save_file
    saves = {"n": 0}

    def save_file(tensors, filename, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:  # the second checkpoint: the disk fills up half way
            Path(filename).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(modeling_utils, "safe_save_file", save_file)
    out = tmp_path / "out"
    result = invoke("sft", str(TINY / "sft.yaml"), "-o", str(out), *FAST)
    flat = " ".join(result.output.split())
    assert result.exit_code == 2 and "no space left on device" in flat and "checkpoint-2" in flat, flat
    assert "Traceback" not in result.output
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # the half-written one is gone

    monkeypatch.undo()
    resumed = invoke("sft", str(TINY / "sft.yaml"), "-o", str(out), *FAST, "--resume")
    assert resumed.exit_code == 0, resumed.output


def test_resume_skips_a_checkpoint_whose_weights_are_missing(tmp_path):
    out = tmp_path / "out"
    assert invoke("sft", str(TINY / "sft.yaml"), "-o", str(out), *FAST, "--set", "training.max_steps=4").exit_code == 0
    (out / "checkpoint-4" / "model.safetensors").unlink()
    resumed = invoke("sft", str(TINY / "sft.yaml"), "-o", str(out), *FAST, "--resume")
    assert resumed.exit_code == 0, resumed.output
    flat = " ".join(resumed.output.split())
    assert "checkpoint-4 is incomplete" in flat
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6


def test_an_unwritable_output_location_is_one_paragraph(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = invoke("sft", str(TINY / "sft.yaml"), "-o", str(blocker / "run"), "--set", "training.max_steps=1")
    flat = " ".join(result.output.split())
    assert result.exit_code == 2 and "Cannot create the output directory" in flat, flat
    assert blocker.read_text() == "not a directory"


# ---------------------------------------------------------------- signals at any moment of start-up


@pytest.mark.slow
@pytest.mark.parametrize("sig, times", [(signal.SIGINT, 1), (signal.SIGTERM, 1), (signal.SIGINT, 2)])
@pytest.mark.parametrize("delay", [0.2, 1.0, 2.5, 6.0])
def test_a_signal_during_start_up_exits_130_and_leaves_nothing_half_made(tmp_path, sig, times, delay):
    """Once or twice (a user insisting: the second Ctrl-C stops without saving), at varied moments."""
    out = tmp_path / "out"
    process = subprocess.Popen([*RLHF, "sft", str(TINY / "sft.yaml"), "-o", str(out)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    time.sleep(delay)
    for _ in range(times):
        process.send_signal(sig)
        time.sleep(0.05)
    stdout, stderr = process.communicate(timeout=300)
    if process.returncode == 0:  # it finished before the signal: nothing to check
        return
    assert process.returncode == 130, stdout[-3000:] + stderr[-3000:]
    assert "Traceback" not in stderr, stderr
    assert "nterrupted" in stdout + stderr
    # Either nothing, or a run that --resume accepts.
    if out.exists():
        assert any(out.glob("checkpoint-*")), sorted(p.name for p in out.iterdir())
        resumed = subprocess.run([*RLHF, "sft", str(TINY / "sft.yaml"), "-o", str(out), "--resume",
                                  "--set", "training.num_train_epochs=1"], cwd=REPO, capture_output=True, text=True)  # fmt: skip
        assert resumed.returncode == 0, resumed.stderr


# ---------------------------------------------------------------- data files that cannot be read


def _rm_recipe_on(tmp_path, data_file: Path) -> Path:
    path = tiny_recipe(tmp_path, "rm.yaml")
    text = path.read_text()
    start = text.index("path: ", text.index("train:")) + len("path: ")
    end = text.index("\n", start)
    path.write_text(text[:start] + str(data_file) + text[end:])
    return path


@pytest.mark.parametrize("name, content, fragment", [
    ("latin1.jsonl", b'{"chosen": "caf\xe9", "rejected": "tea"}\n', "is not UTF-8 text: byte 0xe9"),
    ("latin1.csv", b"chosen,rejected\ncaf\xe9,tea\n", "is not UTF-8 text"),
    ("cut.jsonl.gz", None, "the compressed file is truncated or damaged"),
])  # fmt: skip
def test_unreadable_data_files_are_one_paragraph_and_leave_nothing(tmp_path, name, content, fragment):
    import gzip

    data = tmp_path / name
    if content is None:
        rows = "".join(json.dumps({"chosen": f"good {i}", "rejected": f"bad {i}"}) + "\n" for i in range(2000))
        whole = gzip.compress(rows.encode())
        content = whole[: len(whole) // 2]
    data.write_bytes(content)
    out = tmp_path / "out"
    assert_clean_failure(["train-rm", str(_rm_recipe_on(tmp_path, data)), "-o", str(out)], fragment, out=out)


def test_an_optional_loss_spike_rule_stops_the_run(tmp_path, monkeypatch):
    import trl

    original = trl.RewardTrainer.compute_loss

    def compute_loss(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        factor = 1000.0 if self.state.global_step + 1 >= 5 else 1.0  # a finite blow-up from step 5 on
        return (result[0] * factor, *result[1:]) if isinstance(result, tuple) else result * factor

    monkeypatch.setattr(trl.RewardTrainer, "compute_loss", compute_loss)
    out = tmp_path / "out"
    result = invoke("train-rm", str(TINY / "rm.yaml"), "-o", str(out), *FAST, "--set", "divergence.loss_spike=10")
    flat = " ".join(result.output.split())
    assert result.exit_code == 3, flat
    assert "diverged at step 5" in flat and "times the median" in flat
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_a_run_directory_holding_only_its_bookkeeping_is_reused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".rlhf-run").write_text("{}")
    (out / ".rlhf-lock").write_text("12345\n")  # left by a process that died
    result = invoke("sft", str(TINY / "sft.yaml"), "-o", str(out), "--set", "training.max_steps=1")
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file()


def test_a_second_pipeline_on_the_same_directory_is_refused(tmp_path):
    out = tmp_path / "pipe"
    out.mkdir()
    holder = lock_in_another_process(out)
    try:
        flat = assert_clean_failure(["pipeline", str(TINY / "pipeline.yaml"), "-o", str(out)], "in use",
                                    f"pid {holder.pid}")  # fmt: skip
        assert "stage sft" not in flat
        assert sorted(p.name for p in out.iterdir()) == [".rlhf-lock"]
    finally:
        holder.kill()
        holder.wait()
