"""Helpers shared by the benchmark scripts and the PPO throughput drivers.

Each driver runs in its own interpreter (ours in the project's environment, the TRL 1.12 anchor in its own
virtual environment), so this module imports only the standard library at module level and torch lazily.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from importlib import metadata
from pathlib import Path

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
GPT2_TOKENIZER = SHARED / "models" / "gpt2-tokenizer"
PACKAGES = ("torch", "transformers", "accelerate", "datasets", "tokenizers", "trl")


def versions() -> dict[str, str]:
    found = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


class Clock:
    """perf_counter timestamps; on CUDA each one first waits for the queued kernels, so phase boundaries are real."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __call__(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()


def host_peak_rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def peak_memory(device: str) -> dict:
    """The comparable peak: allocated CUDA memory on a GPU, the process's peak RSS on CPU (host RSS always too)."""
    result = {"host_peak_rss_mb": host_peak_rss_mb()}
    if device.startswith("cuda"):
        import torch

        result["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result["peak_memory_kind"] = "torch.cuda.max_memory_allocated"
    else:
        result["peak_memory_mb"] = result["host_peak_rss_mb"]
        result["peak_memory_kind"] = "ru_maxrss (whole process: interpreter, libraries, models, activations)"
    return result


def write_result(path: str, result: dict) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1)


def read_spec(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def load_benchmark_tokenizer(kind: str, log=lambda message: print(message, file=sys.stderr, flush=True)):
    """(tokenizer, description, minimum model vocab) for `kind` "gpt2" or "builtin-1024". Every tokenizer gets a
    pad token distinct from EOS. "gpt2" is the real GPT-2 BPE from ../shared plus <|pad|>; without ../shared, the
    builtin BPE with a model vocab of 50257 (GPT-2's embedding shape)."""
    if kind == "gpt2" and (GPT2_TOKENIZER / "vocab.json").is_file():
        from transformers import GPT2Tokenizer

        # vocab=/merges= (not vocab_file=/merges_file=, which transformers 5 silently ignores)
        tokenizer = GPT2Tokenizer(vocab=str(GPT2_TOKENIZER / "vocab.json"), merges=str(GPT2_TOKENIZER / "merges.txt"))
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
        return tokenizer, f"GPT-2 BPE from {GPT2_TOKENIZER} + <|pad|> ({len(tokenizer)} tokens)", len(tokenizer)
    from rlhf_cli.models import build_builtin_tokenizer

    tokenizer = build_builtin_tokenizer(1024)
    if kind == "gpt2":  # no shared files: keep GPT-2's embedding/LM-head shape with the small tokenizer
        log(f"{GPT2_TOKENIZER} not found: gpt2-124m uses the builtin tokenizer with a 50257-row embedding")
        return tokenizer, f"builtin BPE ({len(tokenizer)} tokens), model vocab padded to 50257", 50257
    return tokenizer, f"builtin BPE ({len(tokenizer)} tokens)", len(tokenizer)


_RESULTS = None  # set by keep_stdout_for_results(): a private handle on the real stdout


def keep_stdout_for_results() -> None:
    """Point file descriptor 1 at stderr for everything else (libraries that print, e.g. DeepSpeed's accelerator
    notice on import, and child processes), keeping a private handle on the real stdout for the JSON lines."""
    global _RESULTS
    sys.stdout.flush()
    _RESULTS = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)


def emit(line: dict, out_file: Path | None) -> None:
    """Print one JSON line on the results stream (the real stdout; sys.stdout until keep_stdout_for_results()),
    and append it to `out_file` when given."""
    text = json.dumps(line)
    print(text, file=_RESULTS or sys.stdout, flush=True)
    if out_file:
        with Path(out_file).open("a", encoding="utf-8") as handle:
            handle.write(text + "\n")
