"""DPO overhead: `rlhf dpo` against a bare TRL script doing the same DPO run, in one benchmark run.

    python benchmarks/dpo_overhead.py [--config small] [--repeats 3] [--threads 1] [--out FILE] [--quick]

Claim under test: `rlhf dpo` costs nothing on top of TRL. Both sides train `trl.DPOTrainer` on the same saved model
(a random-init GPT-2 with the builtin tokenizer and chat template) and the same preference file
(recipes/tiny/data/preference.jsonl), with the same steps, batch, learning rate, schedule, max_length, beta, loss,
seed and precision (float32 on CPU), no evaluation and no checkpoint during training, dropout disabled (TRL's
default), and both save the final model. The bare side (benchmarks/_trl_dpo.py) lets TRL tokenize the pairs and
build its reference model; `rlhf dpo` (the installed CLI, on a generated recipe) fits the pairs to max_length
itself and hands TRL a frozen copy of the policy. Each run is its own process; the implementations alternate
(rlhf, trl, trl, rlhf, ...) so that drifting load on a shared machine hits both.

Measured per run:
  training phase  the trainer's own `train_runtime` (transformers: from just before the first step to the end of
                  the last step; for rlhf read from the run's metrics.jsonl, whose summary.json "train samples/s"
                  is the same measurement) and train samples/s; and the process's CPU seconds during the
                  `Trainer.train()` call (benchmarks/_clock/sitecustomize.py, loaded by both processes);
  whole process   wall-clock from starting the process to its exit (imports, data, model, training, saving), and
                  its CPU seconds (user + system, from wait4());
  peak RSS        the process's ru_maxrss, from wait4().
CPU seconds leave out the time a process waits for a core while other work runs (not the slowdown from sharing
caches and cores): on a busy machine they vary less than wall seconds, which swing by tens of percent there.
Output: one JSON line per implementation (its fastest run, every run's figures listed), then one ratio line
rlhf-cli / trl. The two runs must log the same losses (identical training); a difference is reported in the ratio
line and makes the script exit 1. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA_FILE = REPO / "recipes" / "tiny" / "data" / "preference.jsonl"
GOAL = 1.05  # training phase: rlhf-cli may take at most 5% longer than TRL alone
LOSS_TOLERANCE = 1e-4  # relative: identical training logs identical losses up to float noise

COMMON = {
    "beta": 0.1,
    "loss_type": "sigmoid",
    "learning_rate": 5e-5,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0,
    "seed": 42,
    "max_length": 64,  # every pair of the file fits (longest: 31 tokens with the builtin template), so no side cuts
}
CONFIGS = {
    # the builtin:tiny-gpt2 shape: per-step Python overhead weighs most here. 64 steps (two epochs) make a training
    # phase of a few seconds; in one of about a second (16 steps) the 2-core development machine's run-to-run noise
    # swamped everything
    "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 2, "batch": 8, "steps": 64, "logging_steps": 8},
    # a little larger, for steadier timings: 903k parameters, 16 pairs per step, two epochs of the 256 pairs
    "small": {"n_layer": 4, "n_embd": 128, "n_head": 4, "batch": 16, "steps": 32, "logging_steps": 4},
}
QUICK = {"config": "tiny", "steps": 4, "repeats": 1}
IMPLS = ("rlhf-cli", "trl")


def log(message: str) -> None:
    print(f"[dpo_overhead] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ model, recipe, spec


def build_model(settings: dict, target: Path) -> dict:
    """A random-init GPT-2 with the builtin BPE (and its chat template), saved with its tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhf_cli.models import build_builtin_tokenizer

    tokenizer = build_builtin_tokenizer(1024)
    shape = {key: settings[key] for key in ("n_layer", "n_embd", "n_head")}
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=max(128, settings["max_length"]), **shape,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(settings["seed"])
    model = GPT2LMHeadModel(config)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return {"type": "GPT-2 (random init)", **shape, "vocab_size": len(tokenizer),
            "parameters": sum(p.numel() for p in model.parameters()),
            "tokenizer": f"builtin BPE ({len(tokenizer)} tokens) with the builtin chat template"}  # fmt: skip


def precision_like_rlhf() -> dict:
    """use_cpu / bf16 / fp16 as rlhf-cli's launch plan sets them on this machine (float32 on CPU, TRL's bf16 default
    turned off; bf16 on a GPU that supports it), for the bare side's DPOConfig."""
    from rlhf_cli.launch import Hardware, precision_settings

    return precision_settings({}, Hardware.detect())


def trl_config(settings: dict, precision: dict) -> dict:
    """DPOConfig keyword arguments (besides output_dir) for the bare side, mirroring `rlhf_recipe`."""
    return {
        "per_device_train_batch_size": settings["batch"],
        "max_steps": settings["steps"],
        "learning_rate": settings["learning_rate"],
        "lr_scheduler_type": settings["lr_scheduler_type"],
        "warmup_steps": settings["warmup_steps"],
        "beta": settings["beta"],
        "loss_type": settings["loss_type"],
        "max_length": settings["max_length"],
        "logging_steps": settings["logging_steps"],
        "seed": settings["seed"],
        "save_strategy": "no",
        "eval_strategy": "no",
        "activation_checkpointing": False,  # TRL's own default is True; the rlhf recipe sets it false too
        "report_to": "none",
        **precision,
    }


def rlhf_recipe(settings: dict, model_dir: Path, data_file: Path) -> dict:
    return {
        "stage": "dpo",
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": {"path": str(data_file)}, "max_length": settings["max_length"],
                 "eval_split": 0},  # no held-out pairs (the stage holds 5% out by default): the same rows as TRL
        "dpo": {"algorithm": "dpo"},
        "training": {
            "beta": settings["beta"],
            "loss_type": settings["loss_type"],
            "max_steps": settings["steps"],
            "per_device_train_batch_size": settings["batch"],
            "learning_rate": settings["learning_rate"],
            "lr_scheduler_type": settings["lr_scheduler_type"],
            "warmup_steps": settings["warmup_steps"],
            "logging_steps": settings["logging_steps"],
            "save_strategy": "no",
            "activation_checkpointing": False,
        },
        "seed": settings["seed"],
    }  # fmt: skip


# ------------------------------------------------------------------ running


def driver_env(threads: int | None) -> dict:
    env = dict(os.environ)
    if threads:  # torch sizes its intra-op pool from OMP_NUM_THREADS
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               TOKENIZERS_PARALLELISM="false", WANDB_DISABLED="true", PYTHONUNBUFFERED="1")  # fmt: skip
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    return env


def rlhf_command() -> list[str]:
    """The installed `rlhf` entry point next to this interpreter (what a user runs), else `python -m`."""
    script = Path(sys.executable).parent / "rlhf"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "rlhf_cli.cli"]


def timed_process(command: list[str], log_file: Path, env: dict, timeout: int, cwd: Path) -> dict:
    """Run `command`; its wall seconds (start to exit), peak RSS (wait4's ru_maxrss) and exit code."""
    with log_file.open("w", encoding="utf-8") as out:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        timer = threading.Timer(timeout, process.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    scale = 2**20 if sys.platform == "darwin" else 2**10  # bytes on macOS, KiB on Linux
    return {"code": process.returncode, "process_wall_s": round(wall, 3),
            "process_cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
            "peak_rss_mb": round(usage.ru_maxrss / scale, 1)}  # fmt: skip


def run_env(env: dict, work: Path, name: str) -> dict:
    """The environment of one run: an empty `datasets` cache of its own (with a shared one, TRL's later runs would
    load its tokenized pairs from the cache instead of tokenizing them: every run here starts as a first run), and
    the training-phase CPU clock (_clock/sitecustomize.py) writing to clock-NAME.json."""
    path = [str(HERE / "_clock"), *filter(None, [env.get("PYTHONPATH")])]
    return {**env, "HF_DATASETS_CACHE": str(work / "datasets-cache" / name), "PYTHONPATH": os.pathsep.join(path),
            "DPO_BENCH_CLOCK_FILE": str(work / f"clock-{name}.json")}  # fmt: skip


def read_clock(work: Path, name: str) -> dict:
    clock = work / f"clock-{name}.json"
    if not clock.is_file():
        raise RuntimeError(f"{clock} was not written: the training-phase clock (benchmarks/_clock) did not load")
    return json.loads(clock.read_text())


def run_rlhf(work: Path, index: int, env: dict, timeout: int) -> dict:
    env = run_env(env, work, f"rlhf-cli-{index}")
    run_dir = work / f"rlhf-run-{index}"
    command = [*rlhf_command(), "dpo", str(work / "recipe.yaml"), "-o", str(run_dir)]
    outcome = timed_process(command, work / f"log-rlhf-cli-{index}.txt", env, timeout, work)
    if outcome["code"] != 0:
        raise RuntimeError(f"rlhf dpo exited {outcome['code']}; log {work / f'log-rlhf-cli-{index}.txt'}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    final = next(record for record in reversed(records) if "train_runtime" in record)
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = {key: value for key, value in final.items() if key.startswith("train_")}
    if summary.get("train samples/s") != metrics["train_samples_per_second"]:  # the same measurement, twice
        raise RuntimeError(f"summary.json train samples/s {summary.get('train samples/s')} differs from "
                           f"metrics.jsonl {metrics['train_samples_per_second']}")  # fmt: skip
    return {**outcome, **read_clock(work, f"rlhf-cli-{index}"), "train_metrics": metrics,
            "global_step": summary["steps"], "losses": {str(r["step"]): r["loss"] for r in records if "loss" in r},
            "rows_kept": summary.get("rows kept"), "rows_truncated": summary.get("rows truncated"),
            "stage_wall_s": summary.get("wall time (s)")}  # fmt: skip


def run_trl(work: Path, index: int, env: dict, timeout: int) -> dict:
    env = run_env(env, work, f"trl-{index}")
    result_file = work / f"result-trl-{index}.json"
    spec = json.loads((work / "spec.json").read_text())
    spec["trl_output_dir"] = str(work / f"trl-run-{index}")
    spec_file = work / f"spec-{index}.json"
    spec_file.write_text(json.dumps(spec, indent=1))
    command = [sys.executable, str(HERE / "_trl_dpo.py"), str(spec_file), str(result_file)]
    outcome = timed_process(command, work / f"log-trl-{index}.txt", env, timeout, work)
    if outcome["code"] != 0 or not result_file.is_file():
        raise RuntimeError(f"_trl_dpo.py exited {outcome['code']}; log {work / f'log-trl-{index}.txt'}")
    return {**outcome, **read_clock(work, f"trl-{index}"), **json.loads(result_file.read_text())}


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(), "gpu": gpu}


# ------------------------------------------------------------------ summarising


def loss_difference(one: dict, other: dict) -> float | None:
    """Largest relative difference of the losses both runs logged at the same steps (None: no common step)."""
    common = sorted(set(one) & set(other), key=int)
    if not common:
        return None
    return max(abs(one[s] - other[s]) / max(abs(other[s]), 1e-12) for s in common)


def summarise(impl: str, runs: list[dict], config: str, settings: dict, model: dict, tokens_per_pair: float,
              extra: dict) -> dict:  # fmt: skip
    runtimes = [run["train_metrics"]["train_runtime"] for run in runs]
    best = runs[runtimes.index(min(runtimes))]
    samples = best["train_metrics"]["train_samples_per_second"]
    return {
        "impl": impl,
        "config": config,
        "device": extra.pop("device"),
        "precision": extra.pop("precision"),
        "model": model,
        "batch": settings["batch"],
        "max_length": settings["max_length"],
        "seq_length_mean": round(tokens_per_pair / 2, 2),  # tokens per sequence (prompt + one response)
        "steps": best["global_step"],
        "samples_per_s": samples,  # preference pairs per second of the training phase (the trainer's own figure)
        "tokens_per_s": round(samples * tokens_per_pair, 1),
        "train_runtime_s": best["train_metrics"]["train_runtime"],
        "process_wall_s": min(run["process_wall_s"] for run in runs),
        "train_cpu_s": min(run["train_call_cpu_s"] for run in runs),
        "process_cpu_s": min(run["process_cpu_s"] for run in runs),
        "peak_rss_mb": min(run["peak_rss_mb"] for run in runs),
        "train_runtime_s_each_run": runtimes,
        "process_wall_s_each_run": [run["process_wall_s"] for run in runs],
        "train_cpu_s_each_run": [run["train_call_cpu_s"] for run in runs],
        "train_call_wall_s_each_run": [run["train_call_wall_s"] for run in runs],
        "process_cpu_s_each_run": [run["process_cpu_s"] for run in runs],
        "peak_rss_mb_each_run": [run["peak_rss_mb"] for run in runs],
        "loadavg_1m_each_run": [run["loadavg_1m"] for run in runs],
        "repeats": len(runs),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        **extra,
    }


def ratio_line(lines: dict, runs: dict, config: str) -> dict:
    ours, theirs = lines["rlhf-cli"], lines["trl"]
    pairs = [(a["train_metrics"]["train_runtime"] / b["train_metrics"]["train_runtime"],
              a["process_wall_s"] / b["process_wall_s"], a["train_call_cpu_s"] / b["train_call_cpu_s"],
              a["process_cpu_s"] / b["process_cpu_s"]) for a, b in zip(runs["rlhf-cli"], runs["trl"])]  # fmt: skip
    train = round(ours["train_runtime_s"] / theirs["train_runtime_s"], 3)
    diffs = [loss_difference(a["losses"], b["losses"]) for a, b in zip(runs["rlhf-cli"], runs["trl"])]
    return {
        "ratio": "rlhf-cli / trl",
        "config": config,
        "train_runtime": train,  # fastest against fastest; below 1: rlhf-cli's training phase is faster
        "process_wall": round(ours["process_wall_s"] / theirs["process_wall_s"], 3),
        "train_cpu": round(ours["train_cpu_s"] / theirs["train_cpu_s"], 3),  # CPU seconds: steadier on a busy CPU
        "process_cpu": round(ours["process_cpu_s"] / theirs["process_cpu_s"], 3),
        "peak_rss": round(ours["peak_rss_mb"] / theirs["peak_rss_mb"], 3),
        "train_runtime_each_pair": [round(p[0], 3) for p in pairs],
        "process_wall_each_pair": [round(p[1], 3) for p in pairs],
        "train_cpu_each_pair": [round(p[2], 3) for p in pairs],
        "process_cpu_each_pair": [round(p[3], 3) for p in pairs],
        "train_runtime_median_pair": round(statistics.median(p[0] for p in pairs), 3),
        "goal_train_runtime_max": GOAL,
        "meets_goal": train <= GOAL,
        "same_steps": ours["steps"] == theirs["steps"],
        "loss_max_rel_diff": max((d for d in diffs if d is not None), default=None),
    }


# ------------------------------------------------------------------ main


RESULTS = sys.stdout


def keep_stdout_for_results() -> None:
    """JSON lines only on stdout; anything else that writes to file descriptor 1 goes to stderr."""
    global RESULTS
    sys.stdout.flush()
    RESULTS = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)


def emit(line: dict, out_file: Path | None) -> None:
    text = json.dumps(line)
    print(text, file=RESULTS, flush=True)
    if out_file:
        with out_file.open("a", encoding="utf-8") as handle:
            handle.write(text + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=list(CONFIGS), default="small")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default per config)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per implementation, alternating")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads in both processes (OMP_NUM_THREADS); 0: torch's own choice")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run of the wiring: config {QUICK['config']}, {QUICK['steps']} steps, "
                        f"{QUICK['repeats']} repeat, both processes side by side (--parallel); its timings compare "
                        "nothing")  # fmt: skip
    parser.add_argument("--parallel", action="store_true",
                        help="start both implementations' processes at once (they compete for the CPU: for smoke "
                        "runs only)")  # fmt: skip
    parser.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    parser.add_argument("--work-dir", type=Path, help="keep model, recipe, runs and logs here (default: temp, removed)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per process")
    args = parser.parse_args(argv)
    if args.quick:
        args.config, args.repeats = QUICK["config"], QUICK["repeats"]
        args.steps = args.steps or QUICK["steps"]
        args.parallel = True
    if args.repeats < 1 or (args.steps is not None and args.steps < 1):
        parser.error("--repeats and --steps must be at least 1")

    keep_stdout_for_results()
    settings = {**COMMON, **CONFIGS[args.config]}
    if args.steps:
        settings["steps"] = args.steps
    # at least two logged losses to compare between the sides
    settings["logging_steps"] = max(1, min(settings["logging_steps"], settings["steps"] // 2))
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="dpo-overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    failed = False
    try:
        import yaml

        log(f"{args.config}: building the model in {work}")
        model = build_model(settings, work / "model")
        (work / "recipe.yaml").write_text(yaml.safe_dump(rlhf_recipe(settings, work / "model", DATA_FILE),
                                                         sort_keys=False))  # fmt: skip
        spec = {"model_dir": str(work / "model"), "data_file": str(DATA_FILE),
                "trl_config": trl_config(settings, precision_like_rlhf())}  # fmt: skip
        (work / "spec.json").write_text(json.dumps(spec, indent=1))

        env = driver_env(args.threads)
        runners = {"rlhf-cli": run_rlhf, "trl": run_trl}
        runs: dict[str, list[dict]] = {impl: [] for impl in IMPLS}

        def one_run(impl: str, repeat: int) -> dict:
            log(f"{args.config}: {impl}, run {repeat + 1}/{args.repeats}, {settings['steps']} steps")
            load_before = os.getloadavg()[0]
            outcome = runners[impl](work, repeat, env, args.timeout)
            outcome["loadavg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
            if max(outcome["loadavg_1m"]) > (os.cpu_count() or 1):
                log(f"load average {outcome['loadavg_1m']} exceeds the {os.cpu_count()} CPUs: other work is "
                    "competing, timings are unreliable")  # fmt: skip
            return outcome

        for repeat in range(args.repeats):
            order = IMPLS if repeat % 2 == 0 else IMPLS[::-1]  # ABBA: neither always goes first
            try:
                if args.parallel:
                    with ThreadPoolExecutor(len(order)) as pool:
                        futures = {impl: pool.submit(one_run, impl, repeat) for impl in order}
                    outcomes = {impl: future.result() for impl, future in futures.items()}
                else:
                    outcomes = {impl: one_run(impl, repeat) for impl in order}
            except (RuntimeError, OSError, KeyError, StopIteration, ValueError) as exc:
                emit({"config": args.config, "error": str(exc)}, args.out)
                return 1
            for impl in IMPLS:
                runs[impl].append(outcomes[impl])

        trl_run = runs["trl"][0]
        tokens_per_pair = trl_run["train_tokens"] / trl_run["train_rows"]
        torch_threads = trl_run["torch_threads"]
        lines = {}
        for impl in IMPLS:
            extra = {"device": trl_run["device"], "precision": trl_run["precision"], "torch_threads": torch_threads,
                     "side_by_side": args.parallel, "versions": trl_run["versions"]}  # fmt: skip
            if impl == "rlhf-cli":
                extra.update(rows_kept=runs[impl][0]["rows_kept"], rows_truncated=runs[impl][0]["rows_truncated"],
                             stage_wall_s_each_run=[run["stage_wall_s"] for run in runs[impl]])  # fmt: skip
            else:
                extra.update(rows_kept=trl_run["train_rows"], dtype=trl_run["dtype"])
            lines[impl] = summarise(impl, runs[impl], args.config, settings, model, tokens_per_pair, extra)
            emit(lines[impl], args.out)
        ratio = ratio_line(lines, runs, args.config)
        emit(ratio, args.out)
        if not ratio["same_steps"] or ratio["loss_max_rel_diff"] is None or ratio["loss_max_rel_diff"] > LOSS_TOLERANCE:
            log(f"the two sides did not train identically (steps {lines['rlhf-cli']['steps']} vs "
                f"{lines['trl']['steps']}, largest relative loss difference {ratio['loss_max_rel_diff']})")
            failed = True
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
