"""`rlhf label`: sample K responses per prompt (or read candidates), have them compared, write preference data.

    prompts -> K candidates from `model:` (or a candidates file) -> a labeller -> PairLabels -> rows

The labellers (`rlhf_cli.labelling`): a person at the terminal (`human`: every answer fsync'd as it is given, so
the same command resumes where a session stopped; several annotators split the work, sharing an overlap for
agreement), a local judge model under a constitution (`judge`: A/B probabilities, both orders), one or several
reward models (`reward_model`), a rule (`rule`). The output goes straight into `rlhf train-rm`, `rlhf dpo`
(`preferences.jsonl`: prompt/chosen/rejected) or `rlhf kto` (`kto.jsonl`: prompt/completion/label), with a
report: counts, ties, skips, agreement, position bias and how often the longer response won.

`label.mode: revise` is Constitutional AI's supervised phase instead: sample a response, critique it against a
principle, revise it; `revisions.jsonl` holds prompt/completion SFT rows with the original and the critique.

The run directory is the session: run the same command again and it continues (candidates are sampled once and
kept in `candidates.jsonl`); a different recipe on the same directory is refused unless `--append`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rlhf_cli.errors import UserError
from rlhf_cli.launch import RESOLVED_RECIPE
from rlhf_cli.recipe import Recipe, RewardSpec, recipe_to_yaml
from rlhf_cli.rundir import RunDirectory, dumps, print_summary, write_summary
from rlhf_cli.stages.common import quiet_hf_progress_bars, resolve_run_dir

CANDIDATES_FILE = "candidates.jsonl"
ANSWERS_FILE = "answers.jsonl"  # a person's answers, one event per line (labelling/store.py)
LABELS_FILE = "labels.jsonl"  # a machine labeller's PairLabels
PREFERENCES_FILE = "preferences.jsonl"
KTO_FILE = "kto.jsonl"
REVISIONS_FILE = "revisions.jsonl"
REPORT_JSON, REPORT_MD = "label_report.json", "label_report.md"


def label_fingerprint(recipe: Recipe) -> str:
    """What makes two runs one labelling session: the data files' content, the policy, the sampling, the labeller
    and the output shape (not the output directory, not the annotator)."""
    from rlhf_cli.labelling.store import fingerprint
    from rlhf_cli.pipeline import _file_digest

    spec = recipe.label
    settings = spec.model_dump(mode="json")
    files = [_file_digest(source.path) for source in (spec.prompts, spec.candidates) if source and source.path]
    model = recipe.model.name_or_path if recipe.model else None
    return fingerprint(settings, files, model, recipe.seed)


def _items_done(path: Path) -> bool:
    return (path / CANDIDATES_FILE).is_file()


def run_label(recipe: Recipe, *, output_dir: str | None = None, overwrite: bool = False, dry_run: bool = False,
              annotator: str | None = None, append: bool = False, report_only: bool = False, stdin=None) -> int:  # fmt: skip
    spec = recipe.label
    run_dir = resolve_run_dir(recipe, output_dir)
    recipe = recipe.model_copy(update={"output_dir": str(run_dir)})
    human = spec.mode == "label" and spec.labeller.type == "human"
    if dry_run:
        _show_plan(recipe, run_dir)
        return 0
    if report_only:
        return _report_only(recipe, run_dir)
    if human and not annotator:
        raise UserError("A human labelling session records who answers: pass --annotator NAME.")
    fingerprint = label_fingerprint(recipe)
    continuing = not overwrite and _items_done(run_dir)
    if continuing:
        _check_same_session(run_dir, fingerprint, append)
    with RunDirectory(run_dir, overwrite=overwrite, resume=continuing, resumable=False,
                      keep=_items_done) as run:  # fmt: skip
        started = time.time()
        quiet_hf_progress_bars()
        if spec.mode == "revise":
            return run.finish(_revise(recipe, run, started))
        judge = _load_judge(recipe) if spec.labeller.type == "judge" else None  # checked before any sampling
        items, loaded = _load_or_sample_items(recipe, continuing)
        if human:
            _write_candidates(run, recipe, items, fingerprint, continuing)
            labels, details, quit_early = _human(recipe, run_dir, items, annotator, fingerprint, append, stdin)
        else:
            labels, details = _judge(recipe, items, judge) if judge else _scores(recipe, items, loaded)
            _write_candidates(run, recipe, items, fingerprint, continuing)
            quit_early = False
            with (run_dir / LABELS_FILE).open("w", encoding="utf-8") as handle:
                handle.writelines(dumps(label.to_dict()) + "\n" for label in labels)
        summary = write_outputs(recipe, run_dir, items, labels, details, time.time() - started)
        print_summary("Label: " + ("paused (the same command continues)" if quit_early else "done"), summary)
    return 0


# ---------------------------------------------------------------- candidates


def _check_same_session(run_dir: Path, fingerprint: str, append: bool) -> None:
    header = _read_jsonl(run_dir / CANDIDATES_FILE)[:1]
    if header and header[0].get("fingerprint") != fingerprint and not append:
        raise UserError(f"{run_dir} holds a labelling session of a different recipe (other prompts, candidates, "
                        "sampling or labeller). Choose another --output-dir, --overwrite it, or pass --append to add "
                        "this recipe's labels to it.")  # fmt: skip


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _load_or_sample_items(recipe: Recipe, continuing: bool):
    """The items (prompt + K candidates): sampled, or read from label.candidates, or (a session that continues)
    read back from candidates.jsonl, so every annotator sees the same candidates; also what sampling loaded
    (policy tokenizer, responses) for the scorers."""
    from rlhf_cli.labelling.records import Item

    if continuing:
        rows = _read_jsonl(Path(recipe.output_dir) / CANDIDATES_FILE)[1:]
        items = [Item(row["item_id"], row["prompt"], tuple(row["candidates"]), row.get("source", "")) for row in rows]
        return items, {}
    if recipe.label.candidates is not None:
        return _read_candidates(recipe), {}
    return _sample_items(recipe)


def _write_candidates(run: RunDirectory, recipe: Recipe, items, fingerprint: str, continuing: bool) -> None:
    """The run directory's first files, once every input has been checked: the recipe and the candidates."""
    if continuing:
        return
    run.create()
    (run.path / RESOLVED_RECIPE).write_text(recipe_to_yaml(recipe), encoding="utf-8")
    with (run.path / CANDIDATES_FILE).open("w", encoding="utf-8") as handle:
        handle.write(dumps({"fingerprint": fingerprint, "items": len(items)}) + "\n")
        for item in items:
            handle.write(dumps({"item_id": item.item_id, "prompt": item.prompt, "candidates": list(item.candidates),
                                "source": item.source}) + "\n")  # fmt: skip


def _read_candidates(recipe: Recipe):
    """Items from a file of prompts with a list of responses each (`responses`: strings, or mappings with `text`)."""
    from rlhf_cli.data import load_data_with_report
    from rlhf_cli.labelling.records import Item

    spec = recipe.label
    dataset, _ = load_data_with_report(spec.candidates, "candidates", what="label.candidates")
    items = []
    for row_number, row in enumerate(dataset, 1):
        candidates = tuple(row["responses"])
        if len(candidates) < 2:
            raise UserError(f"label.candidates, row {row_number}: {len(candidates)} response(s); labelling compares "
                            "at least two per prompt.")  # fmt: skip
        items.append(Item(f"r{row_number}", row["prompt"], candidates, "file"))
    if not items:
        raise UserError("label.candidates holds no rows.")
    return items


def _sample_items(recipe: Recipe):
    """K candidates per prompt from the policy, the K samples of a prompt side by side in one batch."""
    from rlhf_cli.data import load_data
    from rlhf_cli.labelling.records import Item
    from rlhf_cli.ppo.trainer import encode_prompts
    from rlhf_cli.inference import choose_prompts, load_causal_lm, progress_bar, prompt_budget, sample

    spec = recipe.label
    dataset = load_data(spec.prompts, "prompt", what="label.prompts")
    if len(dataset) == 0:
        raise UserError("label.prompts holds no prompts.")
    conversational = isinstance(dataset[0]["prompt"], list)
    model, tokenizer = load_causal_lm(recipe.model, recipe.seed, "model", conversational=conversational)
    chosen = choose_prompts(len(dataset), spec.num_prompts, recipe.seed)
    prompts = [dataset[i]["prompt"] for i in chosen]
    repeated = [prompt for prompt in prompts for _ in range(spec.num_responses)]
    queries = encode_prompts({"prompt": repeated}, tokenizer, prompt_budget(model, spec))
    with progress_bar() as progress:
        responses = sample(model, tokenizer, queries, spec, recipe.seed, progress, "sampling candidates",
                           recipe.generation)
    k = spec.num_responses
    items = [Item(f"p{index}", prompt, tuple(responses.texts[n * k:(n + 1) * k]), recipe.model.name_or_path)
             for n, (index, prompt) in enumerate(zip(chosen, prompts))]  # fmt: skip
    return items, {"tokenizer": tokenizer, "conversational": conversational, "responses": responses}


# ---------------------------------------------------------------- labellers


def _human(recipe: Recipe, run_dir: Path, items, annotator: str, fingerprint: str, append: bool, stdin):
    """A terminal session (or one answer per stdin line): answers appended to answers.jsonl as they are given."""
    import random

    from rlhf_cli.labelling.human import run_session
    from rlhf_cli.labelling.store import AnswerStore

    labeller = recipe.label.labeller
    guidelines = Path(labeller.guidelines).read_text(encoding="utf-8") if labeller.guidelines else None
    shuffled = [item.item_id for item in items]
    random.Random(recipe.seed).shuffle(shuffled)
    overlap = set(shuffled[: round(labeller.overlap * len(items))])
    with AnswerStore.open(run_dir / ANSWERS_FILE, fingerprint, append=append,
                          meta={"labeller": "human", "mode": labeller.mode}) as store:  # fmt: skip
        result = run_session(items, store, annotator=annotator, mode=labeller.mode, rank_policy=recipe.label.pairs,
                             guidelines=guidelines, stdin=stdin, overlap_items=overlap,
                             shuffle_seed=recipe.seed)  # fmt: skip
        labels = store.state.labels
        notes = list(store.state.notes)
    details = {"human": {"annotator": annotator, "answered now": result.answered, "skipped now": result.skipped,
                         "undone now": result.undone, "questions open": result.remaining,
                         "questions for this annotator": result.total, "overlap items": len(overlap),
                         "notes": notes}}  # fmt: skip
    return labels, details, result.quit_early


def _scores(recipe: Recipe, items, loaded: dict):
    """Reward-model or rule labels: every candidate scored, each item's candidates ranked, pairs as label.pairs."""
    labeller = recipe.label.labeller
    from rlhf_cli.labelling.scorers import label_by_scores, load_scorers
    from rlhf_cli.inference import progress_bar

    if labeller.type == "reward_model":
        specs = [RewardSpec(model=path) for path in labeller.models]
        what = "label.labeller.models"
    else:
        specs, what = [RewardSpec(function=labeller.function)], "label.labeller"
    conversational = loaded.get("conversational", isinstance(items[0].prompt, list))
    scorers = load_scorers(specs, what, recipe.model, loaded.get("tokenizer"), conversational=conversational)
    with progress_bar() as progress:
        labels, report = label_by_scores(items, scorers, combine=labeller.combine, pairs=recipe.label.pairs,
                                         min_margin=labeller.min_margin, responses=loaded.get("responses"),
                                         max_prompt_length=recipe.label.max_prompt_length,
                                         batch_size=recipe.label.batch_size, progress=progress)  # fmt: skip
    return labels, {labeller.type: report}


def _load_judge(recipe: Recipe):
    """The judge model under the constitution, every check (principles, chat template, A/B tokens) passed."""
    from rlhf_cli.labelling.judge import ModelJudge, load_constitution, load_judge_model
    from rlhf_cli.inference import companion_spec

    labeller = recipe.label.labeller
    principles = load_constitution(labeller.constitution)
    spec = companion_spec(recipe.model, labeller.model).model_copy(update={"gguf_file": labeller.gguf_file})
    model, tokenizer = load_judge_model(spec, recipe.seed)
    return ModelJudge(model, tokenizer, principles, name=labeller.model)


def _judge(recipe: Recipe, items, judge):
    """Every pair of every item judged in both orders; with pairs: best_vs_worst, the pair of the Copeland best
    and worst candidate is kept (the judge's own verdict on it)."""
    from rlhf_cli.labelling.judge import judge_items
    from rlhf_cli.labelling.records import copeland_ranks, ranking_pairs
    from rlhf_cli.inference import progress_bar

    labeller = recipe.label.labeller
    principles = judge.principles
    with progress_bar() as progress:
        labels, stats = judge_items(items, judge, inconsistent=labeller.inconsistent,
                                    batch_size=recipe.label.batch_size, annotator=labeller.model,
                                    progress=progress)  # fmt: skip
    if recipe.label.pairs == "best_vs_worst":
        kept = []
        for item in items:
            own = [label for label in labels if label.item_id == item.item_id]
            best_worst = ranking_pairs(copeland_ranks(len(item.candidates), own), "best_vs_worst")
            wanted = {tuple(sorted(pair)) for pair in best_worst}
            kept += [label for label in own if (min(label.a, label.b), max(label.a, label.b)) in wanted]
        labels = kept
    return labels, {"judge": {**stats.report(), "principles": len(principles),
                              "constitution": labeller.constitution or "default"}}  # fmt: skip


# ---------------------------------------------------------------- outputs


def write_outputs(recipe: Recipe, run_dir: Path, items, labels, details: dict, seconds: float) -> dict:
    """preferences.jsonl (or kto.jsonl) from the labels so far, the label report (json + md) and summary.json."""
    from collections import Counter

    from rlhf_cli.labelling.agreement import agreement_report, describe
    from rlhf_cli.labelling.records import kto_rows, longer_won_rate, pair_rows

    spec = recipe.label
    by_id = {item.item_id: item for item in items}
    rows, left_out = pair_rows(by_id, labels)
    out_file = PREFERENCES_FILE
    kto_left_out = Counter()
    if spec.format == "kto":
        rows, kto_left_out = kto_rows(by_id, rows)
        out_file = KTO_FILE
    with (run_dir / out_file).open("w", encoding="utf-8") as handle:
        handle.writelines(dumps(row) + "\n" for row in rows)
    outcomes = Counter(label.outcome for label in labels)
    report = {
        "labeller": spec.labeller.type,
        "items": len(items),
        "candidates per item": max(len(item.candidates) for item in items),
        "labels": len(labels),
        "outcomes": dict(outcomes),
        "rows written": len(rows),
        "rows file": out_file,
        "left out": {**left_out, **kto_left_out},
        "longer response won (share of decided pairs)": longer_won_rate(by_id, labels),
        **details,
    }
    annotators = {label.annotator for label in labels if label.annotator}
    if spec.labeller.type == "human" and len(annotators) >= 2:
        report["agreement"] = agreement_report(labels)
    (run_dir / REPORT_JSON).write_text(dumps(report) + "\n", encoding="utf-8")
    lines = [f"# Label report: {spec.labeller.type}", ""]
    lines += [f"- {key}: {value}" for key, value in report.items() if not isinstance(value, dict)]
    for key, value in report.items():
        if isinstance(value, dict) and key != "agreement":
            lines += ["", f"## {key}", ""] + [f"- {name}: {item}" for name, item in value.items()]
    if "agreement" in report:
        lines += ["", "## agreement", ""] + [f"- {line}" for line in describe(report["agreement"])]
    (run_dir / REPORT_MD).write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = {"stage": "label", "labeller": spec.labeller.type, "items": len(items), "labels": len(labels),
               "ties": outcomes.get("tie", 0), "skips": outcomes.get("skip", 0),
               f"rows in {out_file}": len(rows), "wall time (s)": round(seconds, 1), "output": str(run_dir)}  # fmt: skip
    longer = report["longer response won (share of decided pairs)"]
    if longer is not None:
        summary["longer response won"] = round(longer, 3)
    if "judge" in details:
        summary["position-bias rate"] = details["judge"].get("position_bias_rate")
    if "agreement" in report:
        summary["raw agreement"] = (report["agreement"].get("raw_agreement") or {}).get("value")
    write_summary(run_dir, summary)
    return summary


def _report_only(recipe: Recipe, run_dir: Path) -> int:
    """`rlhf label --report`: rebuild the rows and the report (agreement included) from the answers so far."""
    from rlhf_cli.labelling.records import Item, PairLabel
    from rlhf_cli.labelling.store import load

    if not _items_done(run_dir):
        raise UserError(f"{run_dir} holds no labelling session (no {CANDIDATES_FILE}); run `rlhf label` first.")
    rows = _read_jsonl(run_dir / CANDIDATES_FILE)[1:]
    items = [Item(row["item_id"], row["prompt"], tuple(row["candidates"]), row.get("source", "")) for row in rows]
    if (run_dir / ANSWERS_FILE).is_file():
        labels = load(run_dir / ANSWERS_FILE).labels
    else:
        labels = [PairLabel(**row) for row in _read_jsonl(run_dir / LABELS_FILE)]
    with RunDirectory(run_dir, overwrite=False, resume=True, resumable=False, keep=_items_done):
        summary = write_outputs(recipe, run_dir, items, labels, {}, 0.0)
    print_summary("Label report", summary)
    return 0


def _revise(recipe: Recipe, run: RunDirectory, started: float) -> int:
    """Constitutional AI's supervised phase: one response per prompt, critiqued and revised (labelling.judge)."""
    from rlhf_cli.data import load_data
    from rlhf_cli.labelling.judge import critique_and_revise, load_constitution, require_chat_template
    from rlhf_cli.inference import choose_prompts, companion_spec, load_causal_lm, progress_bar, prompt_budget, sample
    from rlhf_cli.ppo.trainer import encode_prompts

    spec = recipe.label
    labeller = spec.labeller
    principles = load_constitution(labeller.constitution if labeller else None)
    dataset = load_data(spec.prompts, "prompt", what="label.prompts")
    if len(dataset) == 0:
        raise UserError("label.prompts holds no prompts.")
    conversational = isinstance(dataset[0]["prompt"], list)
    model, tokenizer = load_causal_lm(recipe.model, recipe.seed, "model", conversational=conversational)
    critic, critic_tokenizer = model, tokenizer
    if labeller is not None and labeller.model:
        critic_spec = companion_spec(recipe.model, labeller.model).model_copy(update={"gguf_file": labeller.gguf_file})
        critic, critic_tokenizer = load_causal_lm(critic_spec, recipe.seed, "label.labeller.model",
                                                  conversational=True)  # fmt: skip
    require_chat_template(critic_tokenizer, labeller.model if labeller and labeller.model else "the policy",
                          "the critique")  # fmt: skip
    chosen = choose_prompts(len(dataset), spec.num_prompts, recipe.seed)
    prompts = [dataset[i]["prompt"] for i in chosen]
    queries = encode_prompts({"prompt": prompts}, tokenizer, prompt_budget(model, spec))
    run.create()
    (run.path / RESOLVED_RECIPE).write_text(recipe_to_yaml(recipe), encoding="utf-8")
    with progress_bar() as progress:
        responses = sample(model, tokenizer, queries, spec, recipe.seed, progress, "sampling responses",
                           recipe.generation)
        rows, report = critique_and_revise(critic, critic_tokenizer, prompts, responses.texts, principles, spec,
                                           recipe.seed, name=labeller.model if labeller and labeller.model
                                           else recipe.model.name_or_path, progress=progress)  # fmt: skip
    with (run.path / REVISIONS_FILE).open("w", encoding="utf-8") as handle:
        handle.writelines(dumps(row) + "\n" for row in rows)
    (run.path / REPORT_JSON).write_text(dumps({"mode": "revise", **report}) + "\n", encoding="utf-8")
    summary = {"stage": "label", "mode": "revise", "prompts": len(prompts), f"rows in {REVISIONS_FILE}": len(rows),
               "principles": len(principles), "wall time (s)": round(time.time() - started, 1),
               "output": str(run.path)}  # fmt: skip
    write_summary(run.path, summary)
    print_summary("Label (revise): done", summary)
    return 0


def _show_plan(recipe: Recipe, run_dir: Path) -> None:
    from rlhf_cli.console import show_plan
    from rlhf_cli.generation import planned_line
    from rlhf_cli.inference import sampling_line

    spec = recipe.label
    source = spec.prompts or spec.candidates
    labeller = spec.labeller
    plan = {
        "mode": spec.mode,
        "policy": recipe.model.name_or_path if recipe.model else "none (candidates file)",
        "prompts" if spec.prompts else "candidates": source.path or source.name,
        "candidates per prompt": spec.num_responses if spec.prompts else "as in the file",
        "sampling": sampling_line(spec) if spec.prompts else "none",
        "decoding": planned_line(recipe.generation) if spec.prompts else "none",
        "labeller": "none (critique and revise)" if labeller is None else labeller.type,
        "pairs": spec.pairs,
        "writes": f"{run_dir}/{{{CANDIDATES_FILE}, "
                  f"{REVISIONS_FILE if spec.mode == 'revise' else (KTO_FILE if spec.format == 'kto' else PREFERENCES_FILE)}"
                  f", {REPORT_JSON}, {REPORT_MD}}}",
    }  # fmt: skip
    show_plan("Label — plan", plan)
