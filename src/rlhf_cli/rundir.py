"""The run directory: one writer, never a folder the tool did not make, the resolved recipe, metrics.jsonl,
Ctrl-C checkpoints, summary.

Layout of a finished run:
    .rlhf-run            marker: this tool created the directory (only such a directory is replaced by --overwrite)
    .rlhf-lock           locked by the process writing the run (pid inside); the OS releases it when it ends
    recipe.yaml          the fully resolved recipe (defaults included)
    metrics.jsonl        one JSON object per logging step
    summary.json         final numbers (also printed as a table)
    checkpoint-N/        trainer checkpoints (--resume continues from the newest complete one)
    config.json, model.safetensors, tokenizer files ...   the final model, loadable with from_pretrained
    accelerate_config.yaml, deepspeed.json               distributed runs only
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from contextlib import contextmanager
from collections.abc import Callable
from pathlib import Path

from rlhf_cli.errors import UserError

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
MARKER_FILE = ".rlhf-run"  # written into every run directory this tool creates: only those may be replaced
LOCK_FILE = ".rlhf-lock"  # flock-ed by the one process writing the run; holds that process's pid
CHECKPOINT_COMPLETE = ".complete"  # written into a checkpoint once all its files are on disk
_BOOKKEEPING = {MARKER_FILE, LOCK_FILE}


# ---------------------------------------------------------------- checkpoints


def _checkpoint_step(path: Path) -> int | None:
    suffix = path.name.removeprefix("checkpoint-")
    return int(suffix) if path.name.startswith("checkpoint-") and suffix.isdigit() and path.is_dir() else None


_WEIGHTS = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*", "adapter_model*", "global_step*")


def checkpoint_is_complete(path: Path) -> bool:
    """Saved to the end (our marker, or for Trainer checkpoints written before it existed the trainer state, saved
    last) and still holding its weights."""
    finished = (path / CHECKPOINT_COMPLETE).is_file() or (path / "trainer_state.json").is_file()
    return finished and any(next(path.glob(pattern), None) is not None for pattern in _WEIGHTS)


def last_checkpoint(run_dir: Path, *, warn: bool = False) -> Path | None:
    """The newest complete checkpoint-N; newer incomplete ones (a save cut short by a full disk or a kill) are
    skipped, with a warning when `warn`."""
    checkpoints = sorted((p for p in run_dir.glob("checkpoint-*") if _checkpoint_step(p) is not None),
                         key=_checkpoint_step, reverse=True)  # fmt: skip
    for checkpoint in checkpoints:
        if checkpoint_is_complete(checkpoint):
            return checkpoint
        if warn:
            _warn(f"{checkpoint.name} is incomplete (its save was cut short); it is skipped.")
    return None


def mark_checkpoint_complete(path: Path) -> None:
    (path / CHECKPOINT_COMPLETE).write_text("", encoding="utf-8")


def _warn(message: str) -> None:
    from rlhf_cli.console import make_console
    from rich.markup import escape

    make_console(stderr=True, soft_wrap=True).print(f"[yellow]Warning:[/] {escape(message)}", highlight=False)


# ---------------------------------------------------------------- the run directory: marker, lock, overwrite


def _user_entries(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.iterdir() if p.name not in _BOOKKEEPING] if run_dir.is_dir() else []


def check_run_dir(run_dir: Path, *, overwrite: bool, resume: bool = False, resumable: bool = True,
                  keep: Callable[[Path], bool] | None = None) -> None:  # fmt: skip
    """Refuse what would lose work: a directory this tool did not create, a previous run without --overwrite,
    --resume without a checkpoint (or, with `keep`, without the work `keep` recognises, e.g. a labelling
    session's candidates). Writes nothing. `resumable=False` for commands without checkpoints (eval, generate):
    the hint then leaves out --resume."""
    if overwrite and resume:
        raise UserError("--overwrite and --resume contradict each other: choose one.")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"Output directory {run_dir} exists and is a file; choose another --output-dir.")
    _check_writable_location(run_dir)
    existing = _user_entries(run_dir)
    if existing and not (run_dir / MARKER_FILE).is_file():
        shown = ", ".join(sorted(p.name for p in existing)[:5]) + (", ..." if len(existing) > 5 else "")
        raise UserError(
            f"Output directory {run_dir} is not empty ({shown}) and was not created by rlhf (it has no "
            f"{MARKER_FILE} marker), so it is never written into or replaced, with or without --overwrite. Choose a "
            f"new --output-dir. (If it is a run of an older rlhf-cli, `touch {run_dir / MARKER_FILE}` adopts it.)"
        )
    if resume and keep is not None:
        if not keep(run_dir):
            raise UserError(f"{run_dir} holds nothing to continue.")
    elif resume:
        if last_checkpoint(run_dir) is None:
            raise UserError(f"--resume: {run_dir} holds no checkpoint to resume from (no complete checkpoint-* folder).")
    elif existing and not overwrite:
        resume_hint = " --resume to continue its last checkpoint," if resumable else ""
        raise UserError(
            f"Output directory {run_dir} holds a previous run. Pass --overwrite to replace it (it is kept until "
            f"the new run succeeds),{resume_hint} or choose another --output-dir."
        )


def _check_writable_location(run_dir: Path) -> None:
    """The nearest existing folder on the way to run_dir must be a folder this process may write into."""
    import os

    ancestor = run_dir
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"Cannot create the output directory {run_dir}: {ancestor} is a file, not a folder.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"Cannot create the output directory {run_dir}: {ancestor} is not writable by this user.")


def _lock(run_dir: Path):
    """An exclusive flock on run_dir/.rlhf-lock, or a UserError naming the process that holds it. The OS releases
    it when the process ends, however it ends."""
    import fcntl
    import os

    try:
        handle = open(run_dir / LOCK_FILE, "a+", encoding="utf-8")
    except OSError as exc:
        raise UserError(f"Cannot write into the output directory {run_dir}: {exc.strerror or exc}.") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(
            f"Output directory {run_dir} is in use by a running rlhf command (pid {holder}); one process writes a "
            "run directory at a time. Wait for it to finish, stop it, or choose another --output-dir."
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


@contextmanager
def locked_directory(path: Path):
    """Create `path` if needed and hold its lock for the block: one `rlhf pipeline` per pipeline directory (each
    stage's own run directory is locked again by the stage)."""
    _check_writable_location(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"Cannot create the output directory {path}: {exc.strerror or exc}.") from None
    handle = _lock(path)
    try:
        yield path
    finally:
        handle.close()


class RunDirectory:
    """The one writer of a run directory, from the checks to the end of the run.

        with RunDirectory(path, overwrite=..., resume=...) as run:   # checks, locks an existing directory
            ...load and check every input...
            run.create()                                             # first write: marker, lock, old run aside
            run.finish(train(...))                                   # the exit code decides what is kept

    --overwrite moves the previous run aside and deletes it only when the new run succeeds; if the new one fails
    with nothing worth keeping (no checkpoint), it is removed and the previous run restored. A directory created
    here that ends with nothing worth keeping is removed, so a failed or interrupted start leaves nothing behind.
    """

    def __init__(self, path: Path, *, overwrite: bool, resume: bool = False, resumable: bool = True,
                 keep: Callable[[Path], bool] | None = None):  # fmt: skip
        """`keep`: what makes an unfinished run worth keeping (default: a complete checkpoint)."""
        self.path, self.overwrite, self.resume, self.resumable = path, overwrite, resume, resumable
        self.keep = keep or (lambda path: last_checkpoint(path) is not None)
        self._keep_given = keep is not None
        self.created = False  # this run made the directory (a new one or a replacement)
        self.aside: Path | None = None  # where the replaced run waits until this one succeeds
        self.code: int | None = None
        self._locks: list = []

    def __enter__(self) -> RunDirectory:
        check_run_dir(self.path, overwrite=self.overwrite, resume=self.resume, resumable=self.resumable,
                      keep=self.keep if self._keep_given else None)  # fmt: skip
        if self.path.is_dir() and (self.path / MARKER_FILE).is_file():
            self._locks.append(_lock(self.path))  # held from the checks on: nobody starts or replaces it meanwhile
        return self

    def create(self) -> None:
        """Make the directory ready for writing (once). Before this nothing is written."""
        if self.created or (self.resume and self._locks):
            return
        path = self.path
        try:
            if self.overwrite and _user_entries(path):
                self.aside = path.with_name(f"{path.name}.replaced-{_timestamp()}")
                path.rename(self.aside)
            existed = path.is_dir()
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._restore_aside()
            raise UserError(f"Cannot create the output directory {path}: {exc.strerror or exc}.") from None
        self.created = True
        if self.aside is not None or not self._locks:  # a new directory: its own lock (the old one went aside)
            self._locks.append(_lock(path))
        if existed and _user_entries(path) and not self.aside:  # another run got here between the check and now
            self.created = False
            raise UserError(f"Output directory {path} was filled by another run while this one was starting.")
        self._write_marker()

    def _write_marker(self) -> None:
        import datetime
        import sys
        from importlib.metadata import PackageNotFoundError, version

        try:
            tool_version = version("rlhf-cli")
        except PackageNotFoundError:
            tool_version = "unknown"
        marker = {"tool": "rlhf-cli", "version": tool_version, "command": _without_secrets(sys.argv),
                  "created": datetime.datetime.now().isoformat(timespec="seconds")}  # fmt: skip
        (self.path / MARKER_FILE).write_text(json.dumps(marker) + "\n", encoding="utf-8")

    def finish(self, code: int) -> int:
        self.code = code
        return code

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            code = self.code if self.code is not None else 0
        else:
            code = 130 if issubclass(exc_type, KeyboardInterrupt) else 2 if issubclass(exc_type, UserError) else 1
        try:
            self._settle(code)
        finally:
            for handle in self._locks:
                handle.close()

    def _settle(self, code: int) -> None:
        if not self.created:
            return
        if code == 0:
            if self.aside is not None:
                shutil.rmtree(self.aside, ignore_errors=True)
            return
        if self.keep(self.path):  # resumable work: keep it, and keep the old run too
            if self.aside is not None:
                _warn(f"The run this one was to replace is kept in {self.aside}, since this run did not finish; "
                      "delete it yourself once you no longer need it.")  # fmt: skip
            return
        shutil.rmtree(self.path, ignore_errors=True)  # nothing worth keeping: leave no half-made run behind
        self._restore_aside()

    def _restore_aside(self) -> None:
        if self.aside is not None and self.aside.exists() and not self.path.exists():
            self.aside.rename(self.path)
            _warn(f"The previous run in {self.path} was restored, since the new run did not finish.")
            self.aside = None


def _without_secrets(argv: list[str]) -> list[str]:
    """The command line as recorded in the marker, with any token-like --set value hidden."""
    from rlhf_cli.recipe import is_secret_key

    return [f"{item.partition('=')[0]}=<hidden>" if is_secret_key(item.partition("=")[0].rsplit(".", 1)[-1])
            and "=" in item else item for item in argv]  # fmt: skip


def _timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


# ---------------------------------------------------------------- JSON without NaN


def finite_json(value):
    """`value` with every NaN or infinity replaced by None: JSON has no NaN, and a bare NaN breaks its readers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(item) for item in value]
    return value


def dumps(value, **kwargs) -> str:
    """json.dumps that writes non-finite numbers as null (and fails loudly rather than writing bare NaN)."""
    return json.dumps(finite_json(value), allow_nan=False, **kwargs)


def write_summary(run_dir: Path, summary: dict) -> None:
    (run_dir / SUMMARY_FILE).write_text(dumps(summary, indent=2, default=str) + "\n")


def print_summary(title: str, summary: dict) -> None:
    from rlhf_cli.console import make_console
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold cyan")
    table.add_column()
    for key, value in summary.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console = make_console()
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
                handle.write(dumps(record, default=float) + "\n")

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
            from rlhf_cli import interrupts

            interrupts.note(signum)
            # Under `accelerate launch` a Ctrl-C reaches a worker twice: SIGINT from the terminal, then SIGTERM
            # from the launcher. Only a second SIGINT (the user insisting) stops without saving.
            if signum == signal.SIGINT:
                self.ctrl_c_count += 1
                if self.ctrl_c_count > 1:
                    raise KeyboardInterrupt
            self.requested = True

        @contextmanager
        def installed(self):
            from rlhf_cli import interrupts

            if interrupts.requested():  # a signal during start-up that a library swallowed: do not start training
                raise KeyboardInterrupt
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


def checkpoint_marker_callback():
    """A TrainerCallback marking each saved checkpoint complete (resume skips one without the mark)."""
    from transformers import TrainerCallback

    class MarkComplete(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and checkpoint.is_dir():
                mark_checkpoint_complete(checkpoint)

    return MarkComplete()
