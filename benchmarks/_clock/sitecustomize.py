"""The training-phase clock of benchmarks/dpo_overhead.py, loaded at start-up by both of its processes.

dpo_overhead.py puts this folder on PYTHONPATH and names a file in DPO_BENCH_CLOCK_FILE; Python then imports this
module as `sitecustomize` when it starts. It imports nothing heavy: a meta-path hook waits for
`transformers.trainer` to be imported (by TRL, in either process) and then wraps `Trainer.train`, which DPOTrainer
inherits, to record the process's CPU seconds (`time.process_time`, all threads) and wall seconds around the call.
CPU seconds leave out the time the process waits for a core while other work runs, so on a busy machine they vary
less than wall-clock seconds. The same code runs in both processes; it adds two clock
reads and one small file write per train() call.
"""

import os
import sys

_FILE = os.environ.get("DPO_BENCH_CLOCK_FILE")
_TARGET = "transformers.trainer"


def _wrap(trainer_class) -> None:
    import functools
    import json
    import time

    original = trainer_class.train

    @functools.wraps(original)
    def train(self, *args, **kwargs):
        cpu, wall = time.process_time(), time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            record = {"train_call_cpu_s": round(time.process_time() - cpu, 4),
                      "train_call_wall_s": round(time.perf_counter() - wall, 4)}  # fmt: skip
            with open(_FILE, "w", encoding="utf-8") as handle:
                json.dump(record, handle)

    trainer_class.train = train


class _WrapTrainerOnImport:
    """A meta-path finder that only answers for transformers.trainer, delegating the finding to the other finders
    and wrapping Trainer.train once the module has executed."""

    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                break
        else:
            return None
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _wrap(module.Trainer)

        spec.loader.exec_module = exec_module
        return spec


if _FILE:
    sys.meta_path.insert(0, _WrapTrainerOnImport())
