"""The divergence guard: a non-finite loss or gradient norm stops the run before it saves anything poisoned.

A diverged run exits with code 3 (the alarm code, as PPO's reward-hacking alarms), keeps its last finite checkpoint
as the one `--resume` continues from, and writes no final model. Every save is preceded by the check, so no
checkpoint holds weights updated by a non-finite gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

DIVERGED_EXIT_CODE = 3


@dataclass
class Divergence:
    step: int
    what: str  # e.g. "loss nan", "grad_norm inf"


def non_finite(values: dict) -> str | None:
    """The first of `values` (name -> number) that is NaN or infinite, as "name value"; None when all are finite.

    >>> non_finite({"loss": 0.3, "grad_norm": float("nan")})
    'grad_norm nan'
    """
    for name, value in values.items():
        if value is not None and not math.isfinite(float(value)):
            return f"{name} {float(value)}"
    return None


def divergence_message(divergence: Divergence, checkpoint: Path | None, *, lr_key: str = "learning_rate") -> str:
    """One paragraph: which step diverged, what is kept, what to try."""
    kept = (f"The last finite checkpoint is {checkpoint}; `--resume` continues from it (lower the learning rate "
            "with --set first)." if checkpoint else "No checkpoint was saved before it, so nothing is kept to resume.")  # fmt: skip
    return (
        f"Training diverged at step {divergence.step}: {divergence.what}. The run stopped without saving a final "
        f"model. {kept} Try a smaller training.{lr_key}, gradient clipping (training.max_grad_norm, e.g. 1.0), a "
        "warm-up, or float32 instead of fp16."
    )


def is_spike(loss: float, previous: list[float], factor: float | None) -> bool:
    """True when `loss` > factor * median(previous) (a positive median; at least 3 previous losses).

    >>> is_spike(50.0, [2.0, 3.0, 4.0], 10.0), is_spike(20.0, [2.0, 3.0, 4.0], 10.0)
    (True, False)
    """
    if factor is None or len(previous) < 3:
        return False
    ordered = sorted(previous)
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return median > 0 and loss > factor * median


def install_trainer_guard(trainer, *, loss_spike: float | None = None, spike_window: int = 10) -> dict:
    """Make a transformers Trainer stop at the first non-finite loss or gradient norm, before it logs or saves.

    The Trainer sums the loss on the device between logging steps; with `logging_nan_inf_filter` off (set by the
    stage) a NaN stays in that sum, so checking it at every log, evaluation and save boundary sees every step's
    loss without a host sync per step. The gradient norm of the step is checked at the same moments; a NaN norm
    in between makes the following losses NaN. With `loss_spike`, a logged loss that far above the median of the
    last `spike_window` logged losses stops the run too. Returns a dict that holds "divergence" once it fired.
    """
    import torch

    state: dict = {}
    logged: list[float] = []
    original = trainer._maybe_log_save_evaluate

    def guarded(tr_loss, grad_norm, *args, **kwargs):
        control = trainer.control
        if control.should_log or control.should_save or control.should_evaluate or control.should_training_stop:
            norm = grad_norm.item() if isinstance(grad_norm, torch.Tensor) else grad_norm
            loss_sum = tr_loss.detach().float().sum().item()
            values = {"loss": loss_sum, "grad_norm": norm}
            what = non_finite(values)
            steps = trainer.state.global_step - trainer._globalstep_last_logged
            if what is None and control.should_log and steps > 0:
                loss = loss_sum / steps  # this process's mean since the last log, as the Trainer logs it
                if is_spike(loss, logged[-spike_window:], loss_spike):
                    what = f"loss {loss:.4g} is over {loss_spike:g} times the median of the last logged losses"
                logged.append(loss)
            flag = torch.tensor([int(what is not None)], device=tr_loss.device)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)  # every rank stops together
            if flag.item():
                state["divergence"] = Divergence(trainer.state.global_step, what or "non-finite on another process")
                control.should_log = control.should_save = control.should_evaluate = False
                control.should_training_stop = control.should_epoch_stop = True
                return None
        return original(tr_loss, grad_norm, *args, **kwargs)

    trainer._maybe_log_save_evaluate = guarded
    return state
