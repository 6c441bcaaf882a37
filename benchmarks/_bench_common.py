"""Helpers shared by the PPO throughput drivers.

Each driver runs in its own interpreter (ours in the project's environment, the TRL 1.12 anchor in its own
virtual environment), so this module imports only the standard library at module level and torch lazily.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from importlib import metadata

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
