"""Shared test setup. Tests never reach the Hugging Face hub: offline mode is set before any HF import."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite tests the CPU paths (gloo, float32, 2-process ZeRO-3 on CPU): hide any GPU so it passes unchanged on a
# GPU machine. RLHF_TEST_GPU=1 leaves the GPUs visible.
if not os.environ.get("RLHF_TEST_GPU"):
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
# Output is read as a pipe reads it (rlhf_cli.console: one long line per message); a COLUMNS inherited from a terminal
# or set by pytest-xdist's workers (80) would wrap long paths. A test that wants a width sets it itself.
os.environ.pop("COLUMNS", None)
os.environ.pop("LINES", None)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TINY = REPO / "recipes" / "tiny"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (it holds the real data and model; a standalone clone has none)")
    return SHARED


@pytest.fixture(autouse=True, scope="session")
def _library_loggers_on_the_session_stderr():
    """transformers creates its log handler on first use with the sys.stderr of that moment; inside a CliRunner
    call that stream is closed afterwards, and later in-process runs print 'Logging error' tracebacks. Create the
    handlers once, on the session's stream."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.get_logger("transformers")


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Builtin models are cached per test session, not in the user's home."""
    if "RLHF_CLI_CACHE" not in os.environ:
        os.environ["RLHF_CLI_CACHE"] = str(tmp_path_factory.mktemp("rlhf-cli-cache"))


def assert_clean_failure(args: list[str], *fragments: str, out: Path | None = None) -> str:
    """Run `rlhf ARGS` in-process and check the contract for bad input: exit code 2, one `Error:` paragraph naming
    each fragment, no traceback, and (given `out`) no run directory left behind. Returns the flattened output."""
    from typer.testing import CliRunner

    from rlhf_cli.cli import app

    result = CliRunner().invoke(app, args)
    text = result.output
    assert result.exit_code == 2, text
    assert "Traceback" not in text
    assert "Error:" in text
    flat = " ".join(text.split())
    for fragment in fragments:
        assert fragment in flat, f"{fragment!r} not in: {flat}"
    if out is not None:
        assert not out.exists(), f"{out} was left behind"
    return flat


RLHF = [sys.executable, "-m", "rlhf_cli.cli"]  # the real command in a fresh process, as a user runs it


def rlhf(*args: str, check: bool = True, input: str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `rlhf ARGS` from the repository root; with `check`, a non-zero exit fails the test with both streams."""
    result = subprocess.run([*RLHF, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, input=input)
    if check and result.returncode != 0:
        raise AssertionError(f"rlhf {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def at_a_terminal(command: list[str], answers: list[bytes], timeout_s: float = 300.0,
                  columns: int = 200) -> tuple[int, str]:  # fmt: skip
    """Run `command` on a pseudo-terminal (stdin, stdout and stderr), typing each of `answers` when the labelling
    prompt `answer> ` shows, as a person would; (exit status, what the terminal showed, colours taken out)."""
    import fcntl
    import os
    import pty
    import re
    import select
    import struct
    import termios
    import time

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))  # wide: a table row on one line
    env = {**os.environ, "COLUMNS": str(columns), "NO_COLOR": "1", "TERM": "xterm"}
    process = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, cwd=REPO, env=env)
    os.close(slave)
    screen = b""

    def read(until: bytes | None = None) -> None:
        nonlocal screen
        deadline = time.monotonic() + timeout_s
        while until is None or not screen.rstrip(b" ").endswith(until):
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"no {until!r} on the terminal in {timeout_s} s; it shows: {screen[-1500:]!r}")
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the process ended and closed its side
                chunk = b""
            if not chunk:
                if until is not None:
                    raise AssertionError(f"the process ended before {until!r}; it showed: {screen[-3000:]!r}")
                return
            screen += chunk

    try:
        for answer in answers:
            read(until=b"answer>")
            os.write(master, answer)
        read()
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        os.close(master)
    return code, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.decode("utf-8", "replace"))


# The tiny SFT policy and reward model the end-to-end tests start from (read-only): built once per pytest-xdist
# worker that asks, by the real command on the shipped tiny recipes.
@pytest.fixture(scope="session")
def tiny_sft(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "sft"
    rlhf("sft", str(TINY / "sft.yaml"), "-o", str(out))
    return out


@pytest.fixture(scope="session")
def tiny_rm(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "rm"
    rlhf("train-rm", str(TINY / "rm.yaml"), "-o", str(out))
    return out
