"""`rlhf eval`: measure a policy against a reference and a reward model on preference pairs; write the report.

Each part runs when the recipe's `eval:` section gives its data:

    preferences     reward model on held-out pairs: accuracy, margin, calibration, length bias
    prompts         policy (and reference) sampled with the same seeds, then scored by the reward model (and the
                    judge): mean/std score, win rate with a Wilson interval, KL(policy || reference), lengths, EOS
                    rate, distinct-1/2, repetition
    demonstrations  perplexity of the policy (and reference) on held-out SFT data
    ppo_run         training curves and proxy-score-vs-KL from a PPO run's metrics.jsonl

The numbers come from `rlhf_cli.evaluation.metrics`, the files from `evaluation.report` and `evaluation.plots`;
this module loads the models, samples, scores and assembles. Every input (data, models, tokenizers, the PPO run) is
checked before the output directory is touched.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from rlhf_cli.errors import UserError
from rlhf_cli.launch import RESOLVED_RECIPE
from rlhf_cli.lengths import common_prefix
from rlhf_cli.recipe import EvalSpec, Recipe, RewardSpec, recipe_to_yaml
from rlhf_cli.rundir import METRICS_FILE, RunDirectory
from rlhf_cli.stages.common import quiet_hf_progress_bars, resolve_run_dir
from rlhf_cli.stages.generate import (
    Responses,
    Scorer,
    choose_prompts,
    chunks,
    companion_spec,
    load_causal_lm,
    load_scorer,
    positions_limit,
    progress_bar,
    prompt_budget,
    sample,
    sampling_line,
    score,
    sequence_logprobs,
    show_plan,
)

SAMPLES_FILE = "samples.jsonl"
PAIR_SCORES_FILE = "pair_scores.jsonl"


@dataclass
class EvalInputs:
    """Everything `rlhf eval` reads, loaded and checked."""

    prompts: list | None = None  # the prompts (as in the data) the policy answers
    pairs: object = None  # preference dataset: prompt?/chosen/rejected
    demonstrations: object = None  # SFT dataset
    ppo_records: list[dict] | None = None
    policy: object = None
    tokenizer: object = None  # the policy's, shared by the reference
    reference: object = None
    reward: Scorer | None = None
    judge: Scorer | None = None
    pair_scores: list[dict] | None = None  # set by `evaluate`: one row per preference pair, for pair_scores.jsonl


def run_eval(recipe: Recipe, *, output_dir: str | None = None, overwrite: bool = False, dry_run: bool = False) -> int:
    run_dir = resolve_run_dir(recipe, output_dir)
    recipe = recipe.model_copy(update={"output_dir": str(run_dir)})
    if dry_run:
        _show_plan(recipe, run_dir)
        return 0
    with RunDirectory(run_dir, overwrite=overwrite, resumable=False) as run:
        started = time.time()
        inputs = load_inputs(recipe)

        # Every input is good: from here on the run directory is written.
        run.create()
        (run_dir / RESOLVED_RECIPE).write_text(recipe_to_yaml(recipe), encoding="utf-8")
        results, rows = evaluate(inputs, recipe)
        results["meta"]["wall time (s)"] = round(time.time() - started, 1)
        write_outputs(run_dir, results, rows, inputs, recipe.eval)
        _print_headline(results, run_dir)
        return 0


# ---------------------------------------------------------------- inputs


def load_inputs(recipe: Recipe) -> EvalInputs:
    """Data first (cheap, and most mistakes are there), then the PPO run, then the models."""
    from rlhf_cli.data import load_data

    spec = recipe.eval
    quiet_hf_progress_bars()
    inputs = EvalInputs()
    if spec.prompts is not None:
        dataset = load_data(spec.prompts, "prompt", what="eval.prompts")
        inputs.prompts = [dataset[i]["prompt"] for i in choose_prompts(len(dataset), spec.num_prompts, recipe.seed)]
    if spec.preferences is not None:
        inputs.pairs = load_data(spec.preferences, "preference", what="eval.preferences")
    if spec.demonstrations is not None:
        inputs.demonstrations = load_data(spec.demonstrations, "sft", what="eval.demonstrations")
    if spec.ppo_run is not None:
        inputs.ppo_records = read_ppo_records(spec.ppo_run)

    conversational = any(_is_conversational(x) for x in (inputs.prompts, inputs.pairs, inputs.demonstrations))
    if spec.judge is not None and spec.judge.function:  # an import error is quicker to find than a model to load
        load_scorer(spec.judge, "eval.judge", None, None, conversational=conversational)
    if recipe.model is not None:
        inputs.policy, inputs.tokenizer = load_causal_lm(recipe.model, recipe.seed, "model",
                                                         conversational=conversational)  # fmt: skip
    if spec.reference is not None:
        check_reference_tokenizer(inputs.tokenizer, spec.reference, recipe)
        inputs.reference, _ = load_causal_lm(companion_spec(recipe.model, spec.reference), recipe.seed,
                                             "eval.reference", conversational=conversational,
                                             tokenizer=inputs.tokenizer)  # fmt: skip
    # A reward model reads pairs cut at its training max_length (rendering.json) unless eval.max_length is set.
    explicit_length = spec.max_length if "max_length" in spec.model_fields_set else None
    if spec.reward_model is not None:
        inputs.reward = load_scorer(RewardSpec(model=spec.reward_model), "eval", recipe.model, inputs.tokenizer,
                                    conversational=conversational, model_key="eval.reward_model",
                                    max_length=explicit_length, assumed_max_length=spec.max_length)  # fmt: skip
    if spec.judge is not None:
        inputs.judge = load_scorer(spec.judge, "eval.judge", recipe.model, inputs.tokenizer,
                                   conversational=conversational, max_length=explicit_length,
                                   assumed_max_length=spec.max_length)  # fmt: skip
    _style_notes(inputs)
    return inputs


def _style_notes(inputs: EvalInputs) -> None:
    """One note per data source a reward model reads in another style than it was trained on."""
    from rlhf_cli.rendering import print_note

    for scorer, sources in ((inputs.reward, (("eval.preferences", inputs.pairs), ("eval.prompts", inputs.prompts))),
                            (inputs.judge, (("eval.prompts", inputs.prompts),))):  # fmt: skip
        if scorer is None or scorer.reader is None:
            continue
        for what, data in sources:
            note = scorer.reader.note(_is_conversational(data), what) if data is not None else None
            if note:
                print_note(note)


def _is_conversational(data) -> bool:
    if data is None:
        return False
    first = data[0]
    if isinstance(first, dict):  # a dataset row
        return any(isinstance(value, list) for value in first.values())
    return isinstance(first, list)  # a prompt


def check_reference_tokenizer(policy_tokenizer, reference: str, recipe: Recipe) -> None:
    """KL(policy || reference) compares both models' probabilities of the same token ids, and both answer the same
    tokenized prompts: their tokenizers must agree."""
    from rlhf_cli.models import load_tokenizer, tokenizer_mismatch

    try:
        other = load_tokenizer(companion_spec(recipe.model, reference), reference, conversational=False)
    except UserError:
        return  # no tokenizer saved with the reference: it is loaded against the policy's
    mismatch = tokenizer_mismatch(policy_tokenizer, other)
    if mismatch:
        raise UserError(
            f"eval.reference ({reference}) uses a different tokenizer from the policy: {mismatch}. The KL estimate "
            "and the shared prompts need both models to read the same token ids. Compare a policy with the model "
            "it was trained from."
        )


def read_ppo_records(run_dir: str) -> list[dict]:
    """The logged training steps of a `rlhf ppo` run. GRPO/RLOO runs log `reward` where PPO logs `score`."""
    path = Path(run_dir) / METRICS_FILE
    if not Path(run_dir).is_dir():
        raise UserError(f"eval.ppo_run: {run_dir} is not a directory; give the run directory of `rlhf ppo`.")
    if not path.is_file():
        raise UserError(f"eval.ppo_run: {run_dir} holds no {METRICS_FILE}; give the run directory of `rlhf ppo`.")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"eval.ppo_run: {path}, line {number} is not JSON ({exc.msg}).") from None
        if isinstance(record, dict) and "score" not in record and "reward" in record:
            record = {**record, "score": record["reward"]}
        if isinstance(record, dict) and "score" in record:
            records.append(record)
    if not records:
        raise UserError(f"eval.ppo_run: {path} has no training steps with a `score` (PPO) or `reward` (GRPO, "
                        "RLOO); give the run directory of `rlhf ppo`.")  # fmt: skip
    return records


# ---------------------------------------------------------------- evaluation


def evaluate(inputs: EvalInputs, recipe: Recipe) -> tuple[dict, list[dict]]:
    """(results for evaluation.report, one row per evaluated prompt for samples.jsonl)."""
    from rlhf_cli.evaluation.metrics import reward_model_metrics

    spec = recipe.eval
    results: dict = {"meta": _meta(inputs, recipe)}
    rows: list[dict] = []
    with progress_bar() as progress:
        if inputs.pairs is not None:
            scored = score_pairs(inputs.reward, inputs.pairs, spec, progress)
            reader = inputs.reward.reader
            results["meta"]["preference pairs truncated"] = _cut_line(sum(scored.cut), len(inputs.pairs),
                                                                      reader.max_length)  # fmt: skip
            results["reward_model"] = reward_model_metrics(scored.chosen, scored.rejected, scored.chosen_lengths,
                                                           scored.rejected_lengths,
                                                           spec.calibration_buckets)  # fmt: skip
            inputs.pair_scores = scored.rows()
        if inputs.prompts is not None:
            sections, rows = evaluate_policy(inputs, spec, recipe.seed, progress)
            results.update(sections)
        if inputs.demonstrations is not None:
            results["perplexity"], cut = perplexities(inputs, spec, progress)
            results["meta"]["demonstrations truncated"] = _cut_line(cut, len(inputs.demonstrations))
    return results, rows


def _cut_line(cut: int, rows: int, max_length: int | None = None) -> str:
    limit = "eval.max_length" if max_length is None else f"{max_length} tokens"
    return f"{cut} of {rows}, longer than {limit}: scored on the prompt's end + the response's start"


def _meta(inputs: EvalInputs, recipe: Recipe) -> dict:
    spec = recipe.eval
    meta = {}
    if recipe.model is not None:
        meta["policy"] = recipe.model.name_or_path
    for key, value in (("reference", spec.reference), ("reward model", spec.reward_model),
                       ("judge", inputs.judge.name if inputs.judge else None)):  # fmt: skip
        if value:
            meta[key] = value
    for key, scorer in (("reward model", inputs.reward), ("judge", inputs.judge)):
        if scorer is not None and scorer.reader is not None:
            rendering = scorer.reader.rendering
            source = "from its rendering.json" if rendering.recorded else "assumed: no rendering.json"
            meta[f"{key} rendering"] = f"{rendering.describe(cut=False)} ({source})"
    if inputs.prompts is not None:
        meta["prompts"] = _source_name(spec.prompts)
        meta["prompts evaluated"] = len(inputs.prompts)
        meta["sampling"] = sampling_line(spec)
        meta["seed"] = recipe.seed
    if inputs.pairs is not None:
        meta["preference pairs"] = _source_name(spec.preferences)
    if inputs.demonstrations is not None:
        meta["demonstrations"] = _source_name(spec.demonstrations)
    if inputs.ppo_records is not None:
        records = inputs.ppo_records
        meta["ppo run"] = spec.ppo_run
        meta["ppo steps logged"] = len(records)
        meta["ppo score, first to last step"] = f"{records[0]['score']:.3f} to {records[-1]['score']:.3f}"
    import torch

    meta["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    return meta


def _source_name(source) -> str:
    return source.path or source.name


def evaluate_policy(inputs: EvalInputs, spec: EvalSpec, seed: int, progress) -> tuple[dict, list[dict]]:
    """Sample the policy and the reference on the same prompts with the same seeds, score both, estimate the KL."""
    from rlhf_cli.evaluation.metrics import diversity_metrics, pearson, sampled_kl, summarize, win_rate
    from rlhf_cli.ppo.trainer import encode_prompts

    tokenizer, prompts = inputs.tokenizer, inputs.prompts
    budget = prompt_budget(inputs.policy, spec)
    if inputs.reference is not None:
        budget = min(budget, prompt_budget(inputs.reference, spec))
    queries = encode_prompts({"prompt": prompts}, tokenizer, budget)
    models = {"policy": inputs.policy}
    if inputs.reference is not None:
        models["reference"] = inputs.reference
    responses: dict[str, Responses] = {}
    for label, model in models.items():
        responses[label] = sample(model, tokenizer, queries, spec, seed, progress, f"{label}: sampling")

    def scores_of(scorer: Scorer | None, role: str) -> dict[str, list[float]]:
        if scorer is None:
            return {}
        return {label: score(scorer, prompts, answers, max_prompt_length=spec.max_prompt_length,
                             batch_size=spec.batch_size, progress=progress, label=f"{label}: {role}")
                for label, answers in responses.items()}  # fmt: skip

    proxy, judged = scores_of(inputs.reward, "reward model"), scores_of(inputs.judge, "judge")

    def scores_and_wins(scores: dict[str, list[float]]) -> dict:
        section = {f"{label}_score": summarize(values) for label, values in scores.items()}
        if len(scores) == 2:
            section["win_rate"] = win_rate(scores["policy"], scores["reference"])
        return section

    sections: dict = {}
    policy_section = scores_and_wins(proxy)
    kl_terms = None
    if inputs.reference is not None:
        policy_answers = responses["policy"]
        pad = tokenizer.pad_token_id
        policy_lp = sequence_logprobs(inputs.policy, policy_answers.queries, policy_answers.tokens, pad,
                                      spec.batch_size, progress, "KL: policy log-probs")  # fmt: skip
        reference_lp = sequence_logprobs(inputs.reference, policy_answers.queries, policy_answers.tokens, pad,
                                         spec.batch_size, progress, "KL: reference log-probs")  # fmt: skip
        policy_section["kl"] = sampled_kl(policy_lp, reference_lp)
        kl_terms = [p - r for p, r in zip(policy_lp, reference_lp)]
    if policy_section:
        sections["policy"] = policy_section
    sections["diversity"] = {label: diversity_metrics(answers.tokens, tokenizer.eos_token_id)
                             for label, answers in responses.items()}  # fmt: skip
    if judged:
        judge_section = {"name": inputs.judge.name, **scores_and_wins(judged)}
        if proxy:
            flat = [(p, j) for label in proxy for p, j in zip(proxy[label], judged[label])]
            judge_section["proxy_correlation"] = pearson([p for p, _ in flat], [j for _, j in flat])
        sections["judge"] = judge_section

    rows = []
    for i, prompt in enumerate(prompts):
        row = {"prompt": prompt}
        for label, answers in responses.items():
            row[f"{label}_response"] = answers.texts[i]
            row[f"{label}_tokens"] = len(answers.tokens[i])
            row[f"{label}_finished"] = answers.finished[i]
            if proxy:
                row[f"{label}_score"] = proxy[label][i]
            if judged:
                row[f"{label}_judge_score"] = judged[label][i]
        if kl_terms is not None:
            row["log_ratio"] = kl_terms[i]
        rows.append(row)
    return sections, rows


# ---------------------------------------------------------------- reward model on pairs


def chat_ids(tokenizer, messages: list, *, generation_prompt: bool = False) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                              return_dict=False))  # fmt: skip


def pair_ids(tokenizer, row: dict) -> tuple[list[int], list[int], int]:
    """(chosen ids, rejected ids, length of their shared prompt) as the reward model was trained to read them:
    prompt + response through the chat template, or as text with EOS appended (as TRL's RewardTrainer does)."""
    from rlhf_cli.lengths import encode_pair

    encoded = encode_pair(tokenizer, row)
    return encoded.sequences[0], encoded.sequences[1], encoded.boundary


def split_for_scoring(ids: list[int], prompt_length: int, max_length: int) -> tuple[list[int], list[int]]:
    """(query, response) of a sequence longer than `max_length` cut as training cuts it (rlhf_cli.lengths): the
    prompt's end and the response's start; each part at least one token."""
    from rlhf_cli.lengths import scoring_split

    return scoring_split([ids], prompt_length, max_length)[0]


@dataclass
class PairScores:
    """The reward model's scores of preference pairs, in data order, with the responses' lengths in tokens (uncut)
    and whether each pair was cut to the reward model's max_length."""

    chosen: list[float]
    rejected: list[float]
    chosen_lengths: list[int]
    rejected_lengths: list[int]
    cut: list[bool]

    def rows(self) -> list[dict]:
        """One row per pair for pair_scores.jsonl (`pair` counts from 1, in the order of the data)."""
        from rlhf_cli.evaluation.metrics import ties

        tied = ties(self.chosen, self.rejected).tolist()
        return [{"pair": i + 1, "chosen_score": c, "rejected_score": r, "margin": c - r, "tie": t,
                 "chosen_tokens": cl, "rejected_tokens": rl, "cut": cut}
                for i, (c, r, t, cl, rl, cut) in enumerate(zip(self.chosen, self.rejected, tied, self.chosen_lengths,
                                                                self.rejected_lengths, self.cut))]  # fmt: skip


def score_pairs(reward: Scorer, pairs, spec: EvalSpec, progress) -> PairScores:
    """Reward-model scores of every chosen and rejected response, the responses' lengths in tokens, and which pairs
    were longer than the reward model's max_length.

    Each pair is rendered as the reward model was trained (`reward.reader`: its rendering.json, or the rendering
    assumed for a model without one), through `lengths.encode_pair`, cut with training's windows (the prompt's end,
    each response's start, one prompt cut for both) and scored by the classifier's own forward, as TRL's
    RewardTrainer scores: the score of the last token that is not the pad token."""
    reader = reward.reader
    task = progress.add_task("reward model: pairs", total=len(pairs))
    out = PairScores([], [], [], [], [])
    for rows in chunks(len(pairs), spec.batch_size):
        sequences = []
        for i in rows:
            encoded = reader.encode_pair(pairs[i])
            chosen, rejected = encoded.sequences
            out.chosen_lengths.append(len(chosen) - encoded.boundary)
            out.rejected_lengths.append(len(rejected) - encoded.boundary)
            out.cut.append(encoded.length > reader.max_length)
            sequences += reader.cut(encoded)  # chosen, rejected
        values = reader.score_sequences(reward.model, sequences, reward.model.device, batch_size=len(sequences))
        out.chosen.extend(values[0::2])
        out.rejected.extend(values[1::2])
        progress.advance(task, len(rows))
    return out


# ---------------------------------------------------------------- perplexity


def demonstration_ids(tokenizer, row: dict) -> tuple[list[int], int]:
    """(token ids, length of the part not scored) of one SFT row: the completion is scored given its prompt; a
    conversation's last assistant turn given the turns before it; a text row as a whole."""
    if "text" in row:
        return tokenizer(row["text"] + (tokenizer.eos_token or ""))["input_ids"], 1
    if "messages" in row:
        messages = row["messages"]
        if len(messages) > 1 and messages[-1]["role"] == "assistant":
            prompt, completion = messages[:-1], messages[-1:]
        else:
            return chat_ids(tokenizer, messages), 1
    else:
        prompt, completion = row["prompt"], row["completion"]
    if isinstance(completion, list):
        ids = chat_ids(tokenizer, prompt + completion)
        return ids, common_prefix(chat_ids(tokenizer, prompt, generation_prompt=True), ids)
    ids = tokenizer(prompt + completion + (tokenizer.eos_token or ""))["input_ids"]
    return ids, common_prefix(tokenizer(prompt)["input_ids"], ids)


def perplexities(inputs: EvalInputs, spec: EvalSpec, progress) -> tuple[dict[str, float], int]:
    """PPL = exp(total NLL / tokens) of every model on the demonstrations' scored tokens (temperature 1), and how
    many demonstrations were longer than max_length (cut as SFT data is: the prompt's end, the completion's start)."""
    from rlhf_cli.evaluation.metrics import perplexity

    tokenizer = inputs.tokenizer
    models = {"policy": inputs.policy}
    if inputs.reference is not None:
        models["reference"] = inputs.reference
    limit = min(positions_limit(model) or spec.max_length for model in models.values())
    queries, answers = [], []
    max_length, truncated = min(spec.max_length, limit), 0
    for row in inputs.demonstrations:
        ids, prompt_length = demonstration_ids(tokenizer, row)
        if len(ids) < 2:
            continue
        truncated += len(ids) > max_length
        query, answer = split_for_scoring(ids, prompt_length, max_length)
        queries.append(query)
        answers.append(answer)
    if not answers:
        raise UserError(f"eval.demonstrations ({_source_name(spec.demonstrations)}) has no row of two or more tokens.")
    tokens = sum(len(answer) for answer in answers)
    result = {}
    for label, model in models.items():
        sums = sequence_logprobs(model, queries, answers, tokenizer.pad_token_id, spec.batch_size, progress,
                                 f"{label}: perplexity")  # fmt: skip
        result[label] = perplexity(-sum(sums), tokens)
    return result, truncated


# ---------------------------------------------------------------- outputs


def _display_prompt(prompt) -> str:
    if isinstance(prompt, list):
        return "\n".join(f"{message['role']}: {message['content']}" for message in prompt)
    return str(prompt)


def write_outputs(run_dir: Path, results: dict, rows: list[dict], inputs: EvalInputs, spec: EvalSpec) -> None:
    """PNG plots, eval.json + report.md (which links the plots), samples.jsonl, pair_scores.jsonl."""
    from rlhf_cli.evaluation import plots
    from rlhf_cli.evaluation.report import write_report

    if rows and "policy_score" in rows[0]:
        policy = [row["policy_score"] for row in rows]
        reference = [row["reference_score"] for row in rows] if "reference_score" in rows[0] else None
        plots.reward_distribution(policy, reference, run_dir / "reward_distribution.png")
        plots.reward_vs_length(policy, [row["policy_tokens"] for row in rows], run_dir / "reward_vs_length.png",
                               reference_scores=reference,
                               reference_lengths=[row["reference_tokens"] for row in rows] if reference else None)
    if inputs.ppo_records is not None:
        plots.training_curves(inputs.ppo_records, run_dir / "training_curves.png")
        plots.overoptimisation(inputs.ppo_records, run_dir / "overoptimisation.png")

    samples = []
    for row in rows[: spec.num_samples_in_report]:
        sample_row = {"prompt": _display_prompt(row["prompt"]), "policy_response": row["policy_response"],
                      "policy_score": row.get("policy_score")}  # fmt: skip
        if "reference_response" in row:
            sample_row.update(reference_response=row["reference_response"], reference_score=row.get("reference_score"))
        samples.append(sample_row)
    write_report(run_dir, results, samples)
    for name, records in ((SAMPLES_FILE, rows), (PAIR_SCORES_FILE, inputs.pair_scores)):
        if records:
            with (run_dir / name).open("w", encoding="utf-8") as handle:
                for row in records:
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _print_headline(results: dict, run_dir: Path) -> None:
    from rlhf_cli.rundir import print_summary

    headline: dict[str, str] = {}
    policy = results.get("policy", {})
    if "win_rate" in policy:
        win = policy["win_rate"]
        headline["win rate (policy vs reference)"] = (f"{win['win_rate']:.3f}  (95% CI {win['ci_low']:.3f} to "
                                                      f"{win['ci_high']:.3f}, n = {win['n']})")  # fmt: skip
    if "kl" in policy:
        kl = policy["kl"]
        stderr = f" ± {kl['stderr']:.3f}" if kl.get("stderr") is not None else ""
        headline["KL(policy || reference)"] = f"{kl['kl']:.3f}{stderr} per response"
    for label in ("policy", "reference"):
        if f"{label}_score" in policy:
            stats = policy[f"{label}_score"]
            headline[f"{label} score"] = f"{stats['mean']:.3f} ± {stats['std']:.3f} (std)"
    for label, stats in results.get("diversity", {}).items():
        headline[f"{label} length"] = (f"{stats['mean_length']:.1f} tokens, EOS rate {stats['eos_rate']:.2f}, "
                                       f"distinct-2 {stats['distinct_2']:.2f}")  # fmt: skip
    judge = results.get("judge", {})
    if "win_rate" in judge:
        headline["judge win rate"] = f"{judge['win_rate']['win_rate']:.3f}"
    if "proxy_correlation" in judge:
        headline["proxy vs judge (Pearson r)"] = f"{judge['proxy_correlation']:.3f}"
    rm = results.get("reward_model")
    if rm:
        bias = "n/a" if rm["length_bias"] is None else f"{rm['length_bias']:.3f}"
        accuracy = "n/a" if rm["accuracy"] is None else f"{rm['accuracy']:.3f}"
        headline["reward model on pairs"] = (f"accuracy {accuracy} (ties left out), ties {rm['ties']} "
                                             f"({rm['tie_rate']:.1%}), margin {rm['mean_margin']:.3f}, "
                                             f"length bias {bias} ({rm['num_pairs']} pairs)")  # fmt: skip
    for label, value in results.get("perplexity", {}).items():
        headline[f"{label} perplexity"] = f"{value:.3f}"
    headline["report"] = str(run_dir / "report.md")
    print_summary("Evaluation: done", headline)


def _show_plan(recipe: Recipe, run_dir: Path) -> None:
    spec = recipe.eval
    plan: dict[str, object] = {}
    if recipe.model is not None:
        plan["policy"] = recipe.model.name_or_path
    plan["reference"] = spec.reference or "none (no win rate, no KL)"
    plan["reward model"] = spec.reward_model or "none"
    if spec.judge is not None:
        plan["judge"] = spec.judge.model or spec.judge.function
    if spec.prompts is not None:
        plan["prompts"] = f"{_source_name(spec.prompts)} ({spec.num_prompts or 'all'} prompts)"
        plan["sampling"] = sampling_line(spec)
    if spec.preferences is not None:
        plan["preference pairs"] = _source_name(spec.preferences)
    if spec.demonstrations is not None:
        plan["demonstrations"] = _source_name(spec.demonstrations)
    if spec.ppo_run is not None:
        plan["ppo run"] = spec.ppo_run
    plan["writes"] = f"{run_dir}/{{{RESOLVED_RECIPE}, eval.json, report.md, *.png, {SAMPLES_FILE}, {PAIR_SCORES_FILE}}}"
    show_plan("Evaluation — plan", plan)
