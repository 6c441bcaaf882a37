"""The run directory: refusal of a non-empty one, the resolved recipe, metrics.jsonl, Ctrl-C checkpoints, summary.

Layout of a finished run:
    recipe.yaml          the fully resolved recipe (defaults included)
    metrics.jsonl        one JSON object per logging step
    summary.json         final numbers (also printed as a table)
    checkpoint-N/        trainer checkpoints (--resume continues from the newest)
    config.json, model.safetensors, tokenizer files ...   the final model, loadable with from_pretrained
    accelerate_config.yaml, deepspeed.json               distributed runs only
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path

from rlhf_cli.errors import UserError

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def last_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = [p for p in run_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return max(checkpoints, key=lambda p: int(p.name.split("-")[-1]), default=None)


def check_run_dir(run_dir: Path, *, overwrite: bool, resume: bool = False, resumable: bool = True) -> None:
    """Refuse to clobber a previous run unless asked; make sure --resume has something to resume.
    `resumable=False` for commands without checkpoints (eval, generate): the hint then leaves out --resume."""
    if overwrite and resume:
        raise UserError("--overwrite and --resume contradict each other: choose one.")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"Output directory {run_dir} exists and is a file.")
    non_empty = run_dir.is_dir() and any(run_dir.iterdir())
    if resume:
        if not non_empty or last_checkpoint(run_dir) is None:
            raise UserError(f"--resume: {run_dir} holds no checkpoint-* folder to resume from.")
    elif non_empty and not overwrite:
        resume_hint = " --resume to continue its last checkpoint," if resumable else ""
        raise UserError(
            f"Output directory {run_dir} is not empty. Pass --overwrite to replace it,{resume_hint} or choose "
            "another --output-dir."
        )


def prepare_run_dir(run_dir: Path, *, clear: bool) -> None:
    if clear and run_dir.is_dir():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def write_summary(run_dir: Path, summary: dict) -> None:
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")


def print_summary(title: str, summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold cyan")
    table.add_column()
    for key, value in summary.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console = Console()
    console.print()  # the live progress panel leaves the cursor at its end
    console.print(table)


def metrics_callback(run_dir: Path):
    """A TrainerCallback appending every log (train and eval) to metrics.jsonl on the main process."""
    from transformers import TrainerCallback

    class MetricsJsonl(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            record = {"step": state.global_step, "epoch": state.epoch, "time": round(time.time(), 3), **logs}
            with (run_dir / METRICS_FILE).open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, default=float) + "\n")

    return MetricsJsonl()


def interrupt_callback():
    """A TrainerCallback that turns Ctrl-C (or SIGTERM) into: save a checkpoint at the end of this step, then stop.

    A second Ctrl-C stops at once. In multi-process runs the flag is all-reduced so every rank stops on the same
    step (a save is a collective operation under DeepSpeed).
    """
    from transformers import TrainerCallback

    class SaveOnInterrupt(TrainerCallback):
        requested = False
        ctrl_c_count = 0

        def _handler(self, signum, frame):
            # Under `accelerate launch` a Ctrl-C reaches a worker twice: SIGINT from the terminal, then SIGTERM
            # from the launcher. Only a second SIGINT (the user insisting) stops without saving.
            if signum == signal.SIGINT:
                self.ctrl_c_count += 1
                if self.ctrl_c_count > 1:
                    raise KeyboardInterrupt
            self.requested = True

        @contextmanager
        def installed(self):
            previous = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield self
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def on_step_end(self, args, state, control, **kwargs):
            import torch
            import torch.distributed as dist

            stop = self.requested
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                flag = torch.tensor([int(stop)], device=args.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop = bool(flag.item())
            if stop:
                self.requested = True
                control.should_save = True
                control.should_training_stop = True

    return SaveOnInterrupt()
