"""How well a local judge model agrees with people: the constitution judge of `rlhf label` on human-labelled HH pairs.

Loads a judge (default: the real SmolLM2-135M-Instruct GGUF in ../shared) and the shared Anthropic HH-RLHF
harmless-base pairs (../shared/data/hh-rlhf-harmless/pairs.jsonl.gz), asks the judge about a seeded sample of pairs in
both orders (rlhf_cli.labelling.judge: A/B probabilities from one forward pass per order, under a constitution), and
prints one JSON line:

    agreement (consistent)   share of the pairs whose two orders agree where the judge picks the human `chosen`
    agreement (debiased)     share of all judged pairs with P(chosen better) = (p1 + 1 - p2) / 2 > 1/2 (ties count 1/2)
    agreement, one order     the same from a single order (chosen shown first / shown second): what position bias does
    position-bias rate       share of pairs whose two orders picked the same position (the verdict followed the slot)
    coverage                 consistent pairs / judged pairs: what `inconsistent: drop` keeps

    python benchmarks/judge_agreement.py                              # SmolLM2-135M-Instruct, 200 pairs
    python benchmarks/judge_agreement.py --pairs 20 --batch-size 4    # a quick look
    python benchmarks/judge_agreement.py --model /models/Qwen2.5-7B-Instruct --pairs 500   # a larger local judge
    python benchmarks/judge_agreement.py --model DIR --gguf-file NAME.gguf             # a GGUF in DIR

Progress and a readable summary go to stderr; stdout carries only the JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SMOLLM = SHARED / "models" / "smollm2-135m-instruct"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HH_PAIRS = SHARED / "data" / "hh-rlhf-harmless" / "pairs.jsonl.gz"


def log(message: str) -> None:
    print(f"[judge_agreement] {message}", file=sys.stderr, flush=True)


def wilson(successes: float, total: int, z: float = 1.96) -> tuple[float, float] | None:
    """95% Wilson score interval of a proportion."""
    if total == 0:
        return None
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return round(centre - half, 4), round(centre + half, 4)


def stderr_progress_bar():
    """generate.progress_bar's columns, drawn on stderr: stdout carries only the JSON line."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[blue]{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True))  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(SMOLLM), help="judge: a local model directory or builtin:tiny-gpt2")
    parser.add_argument("--gguf-file", default=None, help=f"a .gguf in --model (default for SmolLM2: {SMOLLM_GGUF})")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--pairs", type=int, default=200, help="human-labelled pairs to judge (seeded sample)")
    parser.add_argument("--data", default=str(HH_PAIRS), help="preference pairs with human chosen/rejected")
    parser.add_argument("--constitution", default=None, help="principles file (default: the shipped one)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=1024, help="longer judge prompts are skipped (counted)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="also append the JSON line to this file")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    gguf_file = args.gguf_file or (SMOLLM_GGUF if Path(args.model) == SMOLLM else None)
    if not Path(args.data).is_file():
        log(f"{args.data} is absent (../shared holds the HH pairs); nothing measured")
        return 2
    if not args.model.startswith("builtin:") and not Path(args.model).exists():
        log(f"{args.model} is absent; nothing measured")
        return 2

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from rlhf_cli.data import load_data
    from rlhf_cli.labelling.judge import ModelJudge, judge_items, load_constitution, load_judge_model
    from rlhf_cli.labelling.records import Item
    from rlhf_cli.recipe import DataSource, ModelSpec
    from rlhf_cli.stages.common import quiet_hf_progress_bars

    quiet_hf_progress_bars()
    principles = load_constitution(args.constitution)
    rows = load_data(DataSource(path=args.data), "preference", what="pairs")
    chosen_rows = sorted(random.Random(args.seed).sample(range(len(rows)), min(args.pairs, len(rows))))
    items = []
    for index in chosen_rows:
        row = rows[index]
        text = lambda value: value if isinstance(value, str) else value[-1]["content"]  # noqa: E731
        items.append(Item(str(index), row["prompt"], (text(row["chosen"]), text(row["rejected"])), "hh"))
    # Similar lengths in one batch: less left padding (the two orders of a pair are always adjacent).
    items.sort(key=lambda item: len(json.dumps(item.prompt)) + sum(len(c) for c in item.candidates))

    spec = ModelSpec(name_or_path=args.model, gguf_file=gguf_file, dtype=args.dtype)
    started = time.perf_counter()
    model, tokenizer = load_judge_model(spec, args.seed, what="judge")
    load_s = time.perf_counter() - started
    log(f"loaded {args.model} ({gguf_file or 'no gguf'}) in {load_s:.0f} s on {model.device}; "
        f"{len(items)} pairs, both orders, batches of {args.batch_size}")  # fmt: skip
    judge = ModelJudge(model, tokenizer, principles, name=args.model, max_length=args.max_length)
    started = time.perf_counter()
    with stderr_progress_bar() as progress:
        labels, stats = judge_items(items, judge, inconsistent="drop", batch_size=args.batch_size,
                                    annotator=args.model, progress=progress)  # fmt: skip
    judge_s = time.perf_counter() - started

    judged = [label for label in labels if "p_first" in label.details]  # candidate 0 is the human's chosen
    consistent = [label for label in judged if label.details["consistent"]]
    agree = sum(label.outcome == "a" for label in consistent)
    debiased = sum(1.0 if label.details["p_a"] > 0.5 else 0.5 if label.details["p_a"] == 0.5 else 0.0
                   for label in judged)  # fmt: skip
    chosen_first = sum(label.details["p_first"][0] > 0.5 for label in judged)
    chosen_second = sum(label.details["p_first"][1] < 0.5 for label in judged)
    ratio = lambda part, whole: round(part / whole, 4) if whole else None  # noqa: E731
    report = stats.report()
    result = {
        "benchmark": "judge_agreement",
        "judge": args.model,
        "gguf_file": gguf_file,
        "parameters": sum(p.numel() for p in model.parameters()),
        "data": args.data,
        "pairs asked": len(items),
        "pairs judged": len(judged),
        "pairs skipped (too long)": stats.unread,
        "consistent": len(consistent),
        "coverage (consistent / judged)": ratio(len(consistent), len(judged)),
        "agreement with human chosen (consistent)": ratio(agree, len(consistent)),
        "agreement 95% CI (consistent)": wilson(agree, len(consistent)),
        "agreement (debiased, all judged)": ratio(debiased, len(judged)),
        "agreement 95% CI (debiased)": wilson(debiased, len(judged)),
        "agreement, one order, chosen shown first": ratio(chosen_first, len(judged)),
        "agreement, one order, chosen shown second": ratio(chosen_second, len(judged)),
        "position-bias rate": report["position-bias rate"],
        "favoured position": report["favoured position"],
        "first-position preference rate": report["first-position preference rate"],
        "mean confidence (consistent)": report["mean confidence (consistent)"],
        "mean answer-token mass p(A)+p(B)": report["mean answer-token mass p(A)+p(B)"],
        "constitution": args.constitution or "default (src/rlhf_cli/labelling/constitution.md)",
        "principles": len(principles),
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "seed": args.seed,
        "load_s": round(load_s, 1),
        "judge_s": round(judge_s, 1),
        "questions_per_s": round(2 * len(judged) / judge_s, 3) if judge_s else None,
        "device": str(model.device),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    for key in ("agreement with human chosen (consistent)", "agreement (debiased, all judged)",
                "agreement, one order, chosen shown first", "agreement, one order, chosen shown second",
                "position-bias rate", "favoured position", "coverage (consistent / judged)"):  # fmt: skip
        log(f"{key:<45} {result[key]}")
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
