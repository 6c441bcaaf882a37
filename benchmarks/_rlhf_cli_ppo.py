"""Benchmark driver for rlhf-cli's own PPO: run `rlhf ppo` in this process on the benchmark's saved models.

Usage (normally started by ppo_throughput.py, in the project's environment):
    python benchmarks/_rlhf_cli_ppo.py SPEC.json RESULT.json [--profile STATS.txt]

Per-step seconds come from RUN_DIR/metrics.jsonl: `total` from consecutive `time` stamps, the phases from
`time_generate` / `time_forward` / `time_train`, which the trainer writes. For an older trainer without them, the
driver times the phases itself by wrapping PPOTrainer.step, PPOTrainer.rollout and the first log-prob forward pass
of the rollout (approximate; `phase_source` in the result says which was used).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from _bench_common import Clock, peak_memory, read_spec, versions, write_result


def write_recipe(spec: dict, path: Path, run_dir: Path) -> None:
    import yaml

    recipe = {
        "stage": "ppo",
        "model": {"name_or_path": spec["policy_dir"]},
        "data": {"train": {"path": spec["prompts_file"]}, "max_length": spec["prompt_length"]},
        "ppo": {"reward": {"model": spec["reward_dir"]}},  # critic starts from it, reference = copy of the policy
        "training": {
            "steps": spec["total_steps"],
            "rollout_batch_size": spec["batch"],
            "mini_batch_size": spec["mini_batch"],
            "ppo_epochs": spec["ppo_epochs"],
            "learning_rate": spec["learning_rate"],
            "response_length": spec["response_length"],
            "temperature": spec["temperature"],
            "top_p": 1.0,
            "kl_coef": spec["kl_coef"],
            "missing_eos_penalty": spec["missing_eos_penalty"],
            "logging_steps": 1,
            "sample_every": 0,
            "save_steps": 10**9,  # no checkpoint inside the timed loop (the final save happens after it)
        },
        "output_dir": str(run_dir),
        "seed": spec["seed"],
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")


class PhaseTimer:
    """Times each PPOTrainer.step: generate = rollout start -> first log-prob forward of the rollout; forward = that
    -> rollout end; train = rollout end -> step end (GAE and the ppo_epochs updates)."""

    def __init__(self, clock: Clock):
        self.clock, self.steps, self.trainer = clock, [], None
        self._in_rollout, self._first_forward, self._rollout = False, None, (0.0, 0.0)

    def install(self) -> None:
        import rlhf_cli.ppo.trainer as module

        timer, cls = self, module.PPOTrainer
        step, rollout, logprobs = cls.step, cls.rollout, getattr(module, "policy_logprobs", None)

        def timed_logprobs(*args, **kwargs):
            if timer._in_rollout and timer._first_forward is None:
                timer._first_forward = timer.clock()
            return logprobs(*args, **kwargs)

        def timed_rollout(self, *args, **kwargs):
            start = timer.clock()
            timer._in_rollout, timer._first_forward = True, None
            try:
                return rollout(self, *args, **kwargs)
            finally:
                timer._in_rollout = False
                timer._rollout = (start, timer.clock())

        def timed_step(self, *args, **kwargs):
            timer.trainer = self
            start = timer.clock()
            result = step(self, *args, **kwargs)
            end = timer.clock()
            r_start, r_end = timer._rollout
            first = timer._first_forward or r_end
            timer.steps.append({"generate": first - r_start, "forward": r_end - first, "train": end - r_end,
                                "step_call": end - start, "started": start})  # fmt: skip
            return result

        cls.rollout, cls.step = timed_rollout, timed_step
        if logprobs is not None:
            module.policy_logprobs = timed_logprobs


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("spec")
    parser.add_argument("result")
    parser.add_argument("--profile", help="write cProfile statistics of the whole training run to this file")
    args = parser.parse_args()
    spec = read_spec(args.spec)

    work = Path(spec["work_dir"])
    run_dir = work / "run-rlhf-cli"
    recipe_path = work / "ppo-rlhf-cli.yaml"
    write_recipe(spec, recipe_path, run_dir)

    import torch

    from rlhf_cli.recipe import load_recipe
    from rlhf_cli.stages.ppo import run_ppo

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timer = PhaseTimer(Clock(device))
    timer.install()

    started = time.time()
    recipe = load_recipe(recipe_path, "ppo")
    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        code = profiler.runcall(run_ppo, recipe, output_dir=str(run_dir), overwrite=True)
        with open(args.profile, "w", encoding="utf-8") as handle:
            pstats.Stats(profiler, stream=handle).sort_stats("cumulative").print_stats(60)
            pstats.Stats(profiler, stream=handle).sort_stats("tottime").print_stats(40)
    else:
        code = run_ppo(recipe, output_dir=str(run_dir), overwrite=True)
    if code:
        print(f"rlhf-cli PPO exited with {code}", file=sys.stderr)
        return code
    memory = peak_memory(device)

    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if len(history) != len(timer.steps):
        print(f"metrics.jsonl has {len(history)} records for {len(timer.steps)} steps", file=sys.stderr)
        return 1
    phase_keys = ("time_generate", "time_forward", "time_train")
    from_metrics = all(all(key in record for key in phase_keys) for record in history)
    records = []
    for index, (record, measured) in enumerate(zip(history, timer.steps)):
        if index == 0:
            total = None  # no earlier stamp: the warmup step's total is not needed
        else:
            total = record["time"] - history[index - 1]["time"]
        if from_metrics:
            phases = {"generate": record["time_generate"], "forward": record["time_forward"],
                      "train": record["time_train"]}  # fmt: skip
        else:
            phases = {key: measured[key] for key in ("generate", "forward", "train")}
        records.append({"step": record["step"], "total": total, **phases, "step_call": measured["step_call"]})

    trainer = timer.trainer
    write_result(args.result, {
        "impl": "rlhf-cli",
        "device": str(trainer.accelerator.device) if trainer else device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else None,
        "precision": trainer.accelerator.mixed_precision if trainer else None,
        "torch_threads": torch.get_num_threads(),
        "phase_source": "metrics.jsonl time_* keys" if from_metrics
        else "driver instrumentation (metrics.jsonl has no time_* keys)",
        "total_source": "metrics.jsonl `time` differences (ms resolution)",
        "records": records,
        "wall_seconds_incl_loading": round(time.time() - started, 2),
        "versions": versions(),
        "pid": os.getpid(),
        **memory,
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
