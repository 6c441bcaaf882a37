"""Ctrl-C and SIGTERM at any moment: one line and exit code 130, never a traceback or a run that carries on.

`install(early=True)` runs first thing in the `rlhf` process: a signal while it imports and parses its arguments
exits at once with 130 (nothing is written by then). `install()` runs when the command begins. Both signals then
raise KeyboardInterrupt in the main thread
(SIGTERM would otherwise kill the process with 143 and no word), and the last one is remembered: a library that
swallows the KeyboardInterrupt during start-up cannot make the run carry on, because training checks
`requested()` before its first step, and the CLI reports any failure after a signal as the interruption it was.
Once training runs, the stages install their own handlers (checkpoint at the end of the step, then stop).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as shells report a Ctrl-C
_received: list[int] = []


_raised_at: list[float] = []
# A second signal this soon after the first (a double tap, or the launcher's SIGTERM after a Ctrl-C) is only noted:
# raising again would cut short the clean-up the first one started (removing a half-made run directory).
SETTLE_SECONDS = 3.0


def _handler(signum, frame):
    _received.append(signum)
    if _raised_at and time.monotonic() - _raised_at[-1] < SETTLE_SECONDS:
        return
    _raised_at.append(time.monotonic())
    raise KeyboardInterrupt


def _exit_at_once(signum, frame):
    """Before a command has begun, nothing is written yet: stop without unwinding half-imported modules."""
    sys.stderr.write("Error: Interrupted before the command started; nothing was written.\n")
    sys.stderr.flush()
    os._exit(INTERRUPTED_EXIT_CODE)


def install(*, early: bool = False) -> None:
    """`early`: the process is still importing and parsing its arguments (exit at once); otherwise a command is
    running (raise KeyboardInterrupt, so it can leave its run directory in order)."""
    reset()
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers (e.g. a test runner thread)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _exit_at_once if early else _handler)


def ignore_from_now() -> None:
    """The command is exiting because of a signal: a repeat of it must not kill the process half way through its
    exit (Python restores the default handlers while it shuts down)."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


def requested() -> bool:
    """A Ctrl-C or SIGTERM arrived since the command started."""
    return bool(_received)


def last_signal() -> int | None:
    return _received[-1] if _received else None


def note(signum: int) -> None:
    """Record a signal caught by another handler (the training loop's)."""
    _received.append(signum)


def reset() -> None:
    _received.clear()
    _raised_at.clear()
