"""`rlhf generate`: sample completions of `model:` for a prompt file into generations.jsonl.

Sampling and scoring come from `rlhf_cli.inference`, which `rlhf eval` and `rlhf label` share. Like every stage, the
command checks all its inputs before it writes anything.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rlhf_cli.console import show_plan
from rlhf_cli.generation import planned_line
from rlhf_cli.inference import (
    choose_prompts,
    completion_field,
    load_causal_lm,
    load_scorer,
    progress_bar,
    prompt_budget,
    sample,
    sampling_line,
    score,
)
from rlhf_cli.launch import RESOLVED_RECIPE
from rlhf_cli.recipe import Recipe, recipe_to_yaml
from rlhf_cli.rundir import RunDirectory, print_summary, write_summary
from rlhf_cli.stages.common import quiet_hf_progress_bars, resolve_run_dir

GENERATIONS_FILE = "generations.jsonl"


# ---------------------------------------------------------------- the command


def run_generate(recipe: Recipe, *, output_dir: str | None = None, overwrite: bool = False,
                 dry_run: bool = False) -> int:  # fmt: skip
    spec = recipe.generate
    run_dir = resolve_run_dir(recipe, output_dir)
    recipe = recipe.model_copy(update={"output_dir": str(run_dir)})
    if dry_run:
        _show_plan(recipe, run_dir)
        return 0
    with RunDirectory(run_dir, overwrite=overwrite, resumable=False) as run:
        started = time.time()

        from rlhf_cli.data import load_data
        from rlhf_cli.ppo.trainer import encode_prompts

        quiet_hf_progress_bars()
        dataset = load_data(spec.prompts, "prompt", what="generate.prompts")
        conversational = isinstance(dataset[0]["prompt"], list)
        model, tokenizer = load_causal_lm(recipe.model, recipe.seed, "model", conversational=conversational)
        scorer = None
        if spec.reward is not None:
            scorer = load_scorer(spec.reward, "generate.reward", recipe.model, tokenizer, conversational=conversational)
            style_note = scorer.reader.note(conversational, "generate.prompts") if scorer.reader else None
            if style_note:
                from rlhf_cli.rendering import print_note

                print_note(style_note)
        chosen = choose_prompts(len(dataset), spec.num_prompts, recipe.seed)
        prompts = [dataset[i]["prompt"] for i in chosen for _ in range(spec.num_samples)]
        queries = encode_prompts({"prompt": prompts}, tokenizer, prompt_budget(model, spec))

        # Every input is good: from here on the run directory is written.
        run.create()
        (run_dir / RESOLVED_RECIPE).write_text(recipe_to_yaml(recipe), encoding="utf-8")
        with progress_bar() as progress:
            responses = sample(model, tokenizer, queries, spec, recipe.seed, progress, "sampling", recipe.generation)
            scores = None
            if scorer is not None:
                scores = score(scorer, prompts, responses, max_prompt_length=spec.max_prompt_length,
                               batch_size=spec.batch_size, progress=progress, label="scoring")  # fmt: skip
        with (run_dir / GENERATIONS_FILE).open("w", encoding="utf-8") as handle:
            for row, prompt in enumerate(prompts):
                record = {"prompt": prompt, "completion": completion_field(prompt, responses.texts[row]),
                          "sample": row % spec.num_samples, "num_tokens": len(responses.tokens[row]),
                          "finished": responses.finished[row]}  # fmt: skip
                if scores is not None:
                    record["score"] = scores[row]
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")

        lengths = [len(tokens) for tokens in responses.tokens]
        summary = {
            "stage": "generate",
            "model": recipe.model.name_or_path,
            "prompts": len(chosen),
            "completions": len(prompts),
            "mean length (tokens)": sum(lengths) / len(lengths),
            "EOS rate": sum(responses.finished) / len(prompts),
            "decoding": responses.decoding,
        }
        if scores is not None:
            summary["mean score"] = sum(scores) / len(scores)
        summary.update({"wall time (s)": round(time.time() - started, 1), "output": str(run_dir / GENERATIONS_FILE)})
        write_summary(run_dir, summary)
        print_summary("Generate: done", summary)
    return 0


def _show_plan(recipe: Recipe, run_dir: Path) -> None:
    spec = recipe.generate
    plan = {
        "model": recipe.model.name_or_path,
        "prompts": spec.prompts.path or spec.prompts.name,
        "prompts answered": spec.num_prompts or "all",
        "completions per prompt": spec.num_samples,
        "sampling": sampling_line(spec),
        "decoding": planned_line(recipe.generation),
        "reward": spec.reward.describe() if spec.reward else "none",
        "writes": f"{run_dir}/{{{RESOLVED_RECIPE}, {GENERATIONS_FILE}, summary.json}}",
    }
    show_plan("Generate — plan", plan)
