"""PPO throughput: rlhf-cli's own PPO against TRL 1.12's PPOTrainer on identical models, data and settings.

    python benchmarks/ppo_throughput.py [--configs tiny,gpt2-124m] [--steps N] [--skip-trl] [--out FILE]

Prints one JSON line per (implementation, config), then one ratio line per config. See benchmarks/README.md.

Flow: build the models once per config (random-init GPT-2 policy and GPT2ForSequenceClassification reward model,
saved with their tokenizer, and a prompts file whose prompts are all exactly `prompt_length` tokens), then run
each implementation in its own process on those files: benchmarks/_rlhf_cli_ppo.py with this interpreter, and
benchmarks/_trl112_ppo.py with the python of a separate virtual environment holding trl==1.12.0 (created on first
use, then reused). Each driver writes per-step seconds and its peak memory; this script averages the steps after
the warmup step.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _bench_common import emit, keep_stdout_for_results, load_benchmark_tokenizer  # noqa: E402

ANCHOR = "trl-1.12"
ANCHOR_TRL = "trl==1.12.0"
DEFAULT_VENV = HERE / ".venv-trl112"
WARMUP_STEPS = 1

# Common PPO settings; the configs below override per model size.
COMMON = {
    "batch": 8,  # rollouts (prompts) per PPO step
    "mini_batch": 8,  # rows per optimizer step
    "ppo_epochs": 4,
    "response_length": 16,  # max new tokens; random-init models practically never stop early (see README)
    "prompt_length": 16,  # every prompt is exactly this many tokens: no padding differences between impls
    "temperature": 0.7,
    "kl_coef": 0.05,
    "missing_eos_penalty": 1.0,
    "learning_rate": 1e-5,
    "seed": 42,
    "num_prompts": 64,
}
CONFIGS = {
    # Our builtin:tiny-gpt2 shape: 2 layers x 64 wide, 2 heads, its 1024-token BPE (needs no shared files).
    "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 512, "tokenizer": "builtin-1024", "steps": 20},
    # GPT-2 124M shape (12 x 768, 12 heads, 50k vocab), random weights, the real GPT-2 BPE when ../shared has it.
    "gpt2-124m": {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024, "tokenizer": "gpt2", "steps": 3},
}


def log(message: str) -> None:
    print(f"[ppo_throughput] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ models and data


def make_prompts(tokenizer, count: int, length: int, seed: int) -> list[str]:
    """`count` plain-text prompts of exactly `length` tokens each: sequences of single-token words."""
    rng = random.Random(seed)
    candidates = sorted(token[1:] for token in tokenizer.get_vocab()
                        if token.startswith("\u0120") and token[1:].isascii() and token[1:].isalpha()
                        and len(token) > 2)  # fmt: skip
    rng.shuffle(candidates)
    words = [w for w in candidates[:4000] if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    if len(words) < 20:
        raise RuntimeError(f"the tokenizer has too few single-token words ({len(words)}) to build prompts")
    prompts = []
    for _ in range(count * 100):
        text = "".join(" " + w for w in rng.choices(words, k=length))
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) == length:
            prompts.append(text)
            if len(prompts) == count:
                return prompts
    raise RuntimeError(f"could not build {count} prompts of exactly {length} tokens")


def build_assets(name: str, settings: dict, target: Path) -> dict:
    """Save policy, reward model (both with the tokenizer) and prompts under `target`; return their paths."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    tokenizer, tokenizer_text, vocab = load_benchmark_tokenizer(settings["tokenizer"], log)
    shape = {key: settings[key] for key in ("n_layer", "n_embd", "n_head", "n_positions")}
    ids = {"bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    policy_dir, reward_dir = target / "policy", target / "reward"

    torch.manual_seed(settings["seed"])
    policy = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, **shape, **ids))
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    policy.generation_config.eos_token_id = tokenizer.eos_token_id
    policy.save_pretrained(policy_dir)
    tokenizer.save_pretrained(policy_dir)
    parameters = sum(p.numel() for p in policy.parameters())
    del policy

    torch.manual_seed(settings["seed"] + 1)
    reward = GPT2ForSequenceClassification(GPT2Config(vocab_size=vocab, num_labels=1, **shape, **ids))
    reward.save_pretrained(reward_dir)
    tokenizer.save_pretrained(reward_dir)
    del reward

    prompts_file = target / "prompts.jsonl"
    with prompts_file.open("w", encoding="utf-8") as handle:
        for prompt in make_prompts(tokenizer, settings["num_prompts"], settings["prompt_length"], settings["seed"]):
            handle.write(json.dumps({"prompt": prompt}) + "\n")
    return {
        "policy_dir": str(policy_dir),
        "reward_dir": str(reward_dir),
        "prompts_file": str(prompts_file),
        "model": {
            "type": "GPT-2 (random init)",
            **shape,
            "vocab_size": vocab,
            "policy_parameters": parameters,
            "tokenizer": tokenizer_text,
        },
    }


def precision_like_ours() -> str:
    """rlhf ppo trains in bf16 autocast on a GPU that supports it and in float32 otherwise (launch.Hardware)."""
    import torch

    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


# ------------------------------------------------------------------ the anchor's virtual environment


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def main_torch() -> tuple[str, bool]:
    import torch

    return torch.__version__.split("+")[0], torch.version.cuda is not None


def ensure_anchor_venv(venv: Path, mode: str, wheels: str | None, pins: list[str], rebuild: bool) -> tuple[Path, dict]:
    """Create (once) the virtual environment that holds trl==1.12.0; return its python and how it was built.

    isolated: its own torch (pinned to this environment's torch version, which the local index serves as the CPU
              build), trl==1.12.0 and whatever transformers/accelerate/datasets pip resolves for it.
    overlay:  only trl==1.12.0 (no dependencies) in the venv, with a .pth file appending this environment's
              site-packages, so torch (CUDA build included), transformers, accelerate and datasets come from here,
              while the venv's trl 1.12 shadows this environment's trl. For GPU machines without network.
    auto:     overlay when this environment's torch is a CUDA build, isolated otherwise.
    """
    torch_version, has_cuda = main_torch()
    if mode == "auto":
        mode = "overlay" if has_cuda else "isolated"
    wanted = {"mode": mode, "trl": ANCHOR_TRL, "pins": pins, "torch": torch_version,
              "main_site": sysconfig.get_paths()["purelib"] if mode == "overlay" else None}  # fmt: skip
    marker, owned = venv / ".bench-ready.json", venv / ".bench-owned"
    python = venv_python(venv)
    if not rebuild and marker.is_file() and python.exists():
        built = json.loads(marker.read_text())
        if built.get("wanted") == wanted:
            return python, built
        log(f"{venv} was built with other settings ({built.get('wanted')}); rebuilding")
    if venv.exists():
        # Only ever delete what this script created (never, say, a mistyped --venv pointing at a real environment).
        ours = owned.is_file() or marker.is_file()
        if not ours or venv.resolve() == Path(sys.prefix).resolve():
            raise RuntimeError(f"{venv} exists but was not created by this script; remove it or pass another --venv")
        shutil.rmtree(venv)

    log(f"creating the anchor environment {venv} ({mode}); this takes a few minutes once")
    quiet = {"stdout": sys.stderr}  # keep stdout for the JSON lines
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, **quiet)
    owned.write_text("created by benchmarks/ppo_throughput.py; safe to delete\n")
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
    if wheels:
        pip += ["--no-index", "--find-links", str(Path(wheels).resolve())]
    if mode == "overlay":
        where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
        site = Path(subprocess.check_output([str(python), "-c", where], text=True).strip())
        paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
        (site / "_bench_main_env.pth").write_text("".join(p + "\n" for p in sorted(paths)))
        subprocess.run([*pip, "--no-deps", ANCHOR_TRL, *pins], check=True, **quiet)
    else:
        # Pin torch: an unpinned torch would pull a multi-GB CUDA build from the index.
        subprocess.run([*pip, f"torch=={torch_version}", ANCHOR_TRL, *pins], check=True, **quiet)
    check = subprocess.run([str(python), "-c", "import trl, trl.experimental.ppo as p; print(trl.__version__)"],
                           check=False, capture_output=True, text=True)  # fmt: skip
    if check.returncode != 0 or check.stdout.strip() != ANCHOR_TRL.split("==")[1]:
        raise RuntimeError(f"the anchor environment cannot import trl.experimental.ppo 1.12.0:\n{check.stderr[-3000:]}")
    freeze = subprocess.check_output([str(python), "-m", "pip", "list", "--format=json"], text=True)
    built = {"wanted": wanted, "packages": {p["name"].lower(): p["version"] for p in json.loads(freeze)}}
    marker.write_text(json.dumps(built, indent=1))
    return python, built


# ------------------------------------------------------------------ running and summarising


def driver_env(threads: int | None) -> dict:
    env = dict(os.environ)
    if threads:  # torch sizes its intra-op pool from OMP_NUM_THREADS
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               TOKENIZERS_PARALLELISM="false", WANDB_DISABLED="true", PYTHONUNBUFFERED="1")  # fmt: skip
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    return env


def run_driver(python: Path | str, script: str, spec_file: Path, result_file: Path, log_file: Path,
               timeout: int, threads: int | None) -> dict:  # fmt: skip
    command = [str(python), str(HERE / script), str(spec_file), str(result_file)]
    load_before = os.getloadavg()[0]
    with log_file.open("w", encoding="utf-8") as out:
        try:
            code = subprocess.run(command, check=False, stdout=out, stderr=subprocess.STDOUT, cwd=spec_file.parent,
                                  env=driver_env(threads), timeout=timeout).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            code = "timeout"
    if code != 0 or not result_file.is_file():
        tail = log_file.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{script} failed ({code}); log {log_file}:\n{tail}")
    result = json.loads(result_file.read_text())
    result["loadavg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    if max(result["loadavg_1m"]) > (os.cpu_count() or 1):
        log(f"load average {result['loadavg_1m']} exceeds the {os.cpu_count()} CPUs: other work is competing, "
            "timings are unreliable (on a shared CPU, --threads 1 --repeats 3 suffers least)")
    return result


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def seconds_per_step(result: dict) -> dict:
    measured = result["records"][WARMUP_STEPS:]
    return {key: mean([r[key] for r in measured]) for key in ("generate", "forward", "train", "total")}


def summarise(result: dict, config: str, spec: dict, model: dict, extra: dict) -> dict:
    measured = result["records"][WARMUP_STEPS:]
    per_step = seconds_per_step(result)
    total = per_step["total"]
    device = result["device"] + (f" ({result['device_name']})" if result.get("device_name") else "")
    return {
        "impl": result["impl"],
        "config": config,
        "device": device,
        "samples_per_s": round(spec["batch"] / total, 3),
        "tokens_per_s": round(spec["batch"] * spec["response_length"] / total, 1),
        "seconds_per_step": {key: round(value, 4) for key, value in per_step.items()},
        "peak_memory_mb": result["peak_memory_mb"],
        "steps": len(measured),
        "batch": spec["batch"],
        "response_length": spec["response_length"],
        "ppo_epochs": spec["ppo_epochs"],
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "warmup_steps": WARMUP_STEPS,
        "mini_batch": spec["mini_batch"],
        "prompt_length": spec["prompt_length"],
        "precision": result["precision"],
        "torch_threads": result["torch_threads"],
        "peak_memory_kind": result["peak_memory_kind"],
        "host_peak_rss_mb": result["host_peak_rss_mb"],
        "phase_source": result["phase_source"],
        "loadavg_1m": result["loadavg_1m"],
        "model": model,
        "versions": result["versions"],
        **extra,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="tiny", help=f"comma-separated, from {', '.join(CONFIGS)}")
    parser.add_argument("--steps", type=int, help="measured PPO steps (plus one warmup step); default per config")
    parser.add_argument("--skip-trl", action="store_true", help="only run rlhf-cli (no anchor environment)")
    parser.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="the anchor's virtual environment")
    parser.add_argument("--anchor-mode", choices=("auto", "isolated", "overlay"), default="auto",
                        help="how the anchor environment gets torch & co (see README)")  # fmt: skip
    parser.add_argument("--wheels", help="install the anchor's packages from this folder only (no index)")
    parser.add_argument("--anchor-pin", action="append", default=[], metavar="REQ",
                        help="extra requirement for the anchor environment, e.g. transformers==5.3.0")  # fmt: skip
    parser.add_argument("--rebuild-venv", action="store_true")
    parser.add_argument("--work-dir", type=Path, help="where models and runs go (default: a temp dir, removed)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run each implementation this many times, alternating, and keep its fastest run")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for torch in both drivers (OMP_NUM_THREADS); default: torch's own choice")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per driver run")
    args = parser.parse_args(argv)

    configs = [name.strip() for name in args.configs.split(",") if name.strip()]
    unknown = [name for name in configs if name not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    keep_stdout_for_results()
    failed = False
    anchor_python, anchor_env = None, None
    if not args.skip_trl:
        try:
            anchor_python, anchor_env = ensure_anchor_venv(args.venv, args.anchor_mode, args.wheels, args.anchor_pin,
                                                           args.rebuild_venv)  # fmt: skip
        except (RuntimeError, subprocess.CalledProcessError) as exc:
            failed = True
            log(f"TRL 1.12 anchor unavailable, running rlhf-cli only: {exc}")
            emit({"impl": ANCHOR, "error": f"anchor environment: {str(exc).splitlines()[0]}"}, args.out)

    work_root = args.work_dir or Path(tempfile.mkdtemp(prefix="ppo-throughput-"))
    work_root.mkdir(parents=True, exist_ok=True)
    precision = precision_like_ours()
    try:
        for config in configs:
            settings = {**COMMON, **CONFIGS[config]}
            steps = args.steps if args.steps is not None else settings["steps"]
            target = work_root / config
            if target.exists():
                shutil.rmtree(target)
            target.mkdir(parents=True)
            log(f"{config}: building models in {target}")
            assets = build_assets(config, settings, target)
            spec = {key: settings[key] for key in COMMON if key != "num_prompts"}
            spec.update(config=config, work_dir=str(target), total_steps=steps + WARMUP_STEPS, precision=precision,
                        **{key: assets[key] for key in ("policy_dir", "reward_dir", "prompts_file")})  # fmt: skip
            spec_file = target / "spec.json"
            spec_file.write_text(json.dumps(spec, indent=1))

            lines = {}
            runs = [("rlhf-cli", sys.executable, "_rlhf_cli_ppo.py", {})]
            if anchor_python:
                runs.append((ANCHOR, anchor_python, "_trl112_ppo.py", {"anchor_env": anchor_env["wanted"]["mode"]}))
            results = {impl: [] for impl, *_ in runs}
            broken = set()
            for repeat in range(args.repeats):  # alternate the implementations so drifting load hits both
                for impl, python, script, _ in runs:
                    if impl in broken:
                        continue
                    log(f"{config}: running {impl} for {steps}+{WARMUP_STEPS} steps (run {repeat + 1}/{args.repeats})")
                    try:
                        results[impl].append(run_driver(python, script, spec_file,
                                                        target / f"result-{impl}-{repeat}.json",
                                                        target / f"log-{impl}-{repeat}.txt", args.timeout,
                                                        args.threads))  # fmt: skip
                    except RuntimeError as exc:
                        failed = True
                        broken.add(impl)
                        log(str(exc))
                        emit({"impl": impl, "config": config, "error": str(exc).splitlines()[0]}, args.out)
            for impl, _, _, extra in runs:
                if impl in broken or not results[impl]:
                    continue
                totals = [seconds_per_step(result)["total"] for result in results[impl]]
                best = results[impl][totals.index(min(totals))]
                each = [round(total, 4) for total in totals]
                extra = {**extra, "repeats": args.repeats, "total_seconds_per_step_each_run": each}
                if best.get("trl_settings"):
                    extra["trl_settings"] = best["trl_settings"]
                lines[impl] = summarise(best, config, spec, assets["model"], extra)
                emit(lines[impl], args.out)
            if "rlhf-cli" in lines and ANCHOR in lines:
                ours, theirs = lines["rlhf-cli"], lines[ANCHOR]
                emit({
                    "ratio": f"rlhf-cli / {ANCHOR}",
                    "config": config,
                    "samples_per_s": round(ours["samples_per_s"] / theirs["samples_per_s"], 3),
                    "peak_memory": round(ours["peak_memory_mb"] / theirs["peak_memory_mb"], 3),
                }, args.out)  # fmt: skip
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
