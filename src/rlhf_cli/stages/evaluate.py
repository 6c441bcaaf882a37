"""`rlhf eval`: measure a policy against a reference and a reward model on preference pairs; write the report.

Each part runs when the recipe's `eval:` section gives its data:

    preferences     reward model on held-out pairs: accuracy, margin, calibration, length bias
    prompts         policy (and reference) sampled with the same seeds, then scored by the reward model (and the
                    judge): mean/std score, win rate with a Wilson interval, KL(policy || reference), lengths, EOS
                    rate, distinct-1/2, repetition
    demonstrations  perplexity of the policy (and reference) on held-out SFT data
    ppo_run         training curves and proxy-score-vs-KL from a PPO run's metrics.jsonl
    preferences + reference
                    a DPO policy's implicit reward beta * log(pi/pi_ref) on held-out pairs: accuracy, margin, the
                    chosen and rejected log-probabilities under policy and reference (likelihood displacement)
    compare         more policies beside `model:`: each answers the same prompts with the same seeds and is scored
                    alike; the report adds every policy's numbers and the win rate of every pair of policies
    curve           the over-optimisation curve: a PPO run's policy snapshots (and the reference as step 0) answer
                    the prompts with the same seeds; proxy and gold score the same responses, against sqrt(KL)

The numbers come from `rlhf_cli.evaluation.metrics`, the files from `evaluation.report` and `evaluation.plots`;
this module loads the models, samples, scores and assembles. Every input (data, models, tokenizers, the PPO run) is
checked before the output directory is touched.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_cli.console import show_plan
from rlhf_cli.errors import UserError
from rlhf_cli.generation import planned_line
from rlhf_cli.inference import (
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
)
from rlhf_cli.launch import RESOLVED_RECIPE
from rlhf_cli.lengths import common_prefix
from rlhf_cli.recipe import EvalSpec, Recipe, RewardSpec, recipe_to_yaml
from rlhf_cli.rundir import METRICS_FILE, RunDirectory
from rlhf_cli.stages.common import quiet_hf_progress_bars, resolve_run_dir

SAMPLES_FILE = "samples.jsonl"
PAIR_SCORES_FILE = "pair_scores.jsonl"
IMPLICIT_REWARDS_FILE = "implicit_rewards.jsonl"
CURVE_SAMPLES_FILE = "curve_samples.jsonl"
REFERENCE = "reference"  # the reference's label; no policy may take it (EvalSpec)


@dataclass
class TrainedAs:
    """What a policy directory's recipe.yaml says about how it was trained (all None when it has none)."""

    stage: str | None = None
    algorithm: str | None = None  # dpo.algorithm of a `rlhf dpo` run: dpo, orpo or simpo
    beta: float | None = None  # training.beta as the recipe set it (None: TRL's default)
    max_length: int | None = None  # data.max_length: the pairs were cut there in training
    reference: str | None = None  # what a DPO run trained against: dpo.ref_model, else its starting model

    @property
    def dpo(self) -> bool:
        return self.stage == "dpo" and self.algorithm == "dpo"

    @property
    def reference_free(self) -> bool:
        return self.stage == "dpo" and self.algorithm in ("orpo", "simpo")


@dataclass
class ImplicitPlan:
    """How a policy's implicit reward is computed on eval.preferences."""

    beta: float
    beta_source: str
    max_length: int  # pairs are cut here (then to the models' positions), as training cut them
    length_source: str


@dataclass
class Policy:
    """One evaluated policy: `model:` (named eval.name) or an eval.compare entry."""

    name: str
    path: str
    what: str  # its recipe key, for messages: model.name_or_path or eval.compare.NAME
    model: object = None
    trained: TrainedAs = field(default_factory=TrainedAs)
    implicit: ImplicitPlan | None = None  # None: no implicit reward for this policy


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
    policies: list[Policy] = field(default_factory=list)  # `model:` first, then eval.compare in recipe order
    pair_scores: list[dict] | None = None  # set by `evaluate`: one row per preference pair, for pair_scores.jsonl
    implicit_rows: list[dict] | None = None  # set by `evaluate`: one row per policy and pair, implicit_rewards.jsonl
    snapshots: list[tuple[int, Path]] | None = None  # eval.curve: (PPO step, snapshot directory) in step order
    gold: Scorer | None = None  # eval.curve.gold
    curve_rows: list[dict] | None = None  # set by `evaluate`: one row per snapshot and prompt, curve_samples.jsonl


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
        _print_warnings(results.get("warnings", []))
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
    if spec.curve is not None:
        inputs.snapshots = list_snapshots(spec.curve.run or spec.ppo_run, spec.curve.every)

    conversational = any(_is_conversational(x) for x in (inputs.prompts, inputs.pairs, inputs.demonstrations))
    if spec.judge is not None and spec.judge.function:  # an import error is quicker to find than a model to load
        load_scorer(spec.judge, "eval.judge", None, None, conversational=conversational)
    if spec.curve is not None and spec.curve.gold.function:
        load_scorer(spec.curve.gold, "eval.curve.gold", None, None, conversational=conversational)
    if recipe.model is not None:  # what each policy is, and whether it has an implicit reward: before any model loads
        inputs.policies = [Policy(spec.name, recipe.model.name_or_path, "model.name_or_path")]
        inputs.policies += [Policy(name, path, f"eval.compare.{name}") for name, path in spec.compare.items()]
        plan_implicit_rewards(inputs.policies, spec)
    if recipe.model is not None:
        inputs.policy, inputs.tokenizer = load_causal_lm(recipe.model, recipe.seed, "model",
                                                         conversational=conversational)  # fmt: skip
        inputs.policies[0].model = inputs.policy
    for policy in inputs.policies[1:]:
        check_reference_tokenizer(inputs.tokenizer, policy.path, recipe, what=policy.what)
        policy.model, _ = load_causal_lm(companion_spec(recipe.model, policy.path), recipe.seed, policy.what,
                                         conversational=conversational, tokenizer=inputs.tokenizer)  # fmt: skip
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
    if spec.curve is not None:
        for step, path in inputs.snapshots:  # tokenizers only: the snapshots load one at a time in `evaluate`
            check_reference_tokenizer(inputs.tokenizer, str(path), recipe, what=f"eval.curve snapshot step-{step}")
        inputs.gold = load_scorer(spec.curve.gold, "eval.curve.gold", recipe.model, inputs.tokenizer,
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


def check_reference_tokenizer(policy_tokenizer, reference: str, recipe: Recipe, *,
                              what: str = "eval.reference") -> None:  # fmt: skip
    """KL(policy || reference) compares both models' probabilities of the same token ids, and both answer the same
    tokenized prompts: their tokenizers must agree. So must a compared policy's (`what`: eval.compare.NAME)."""
    from rlhf_cli.models import load_tokenizer, tokenizer_mismatch

    try:
        other = load_tokenizer(companion_spec(recipe.model, reference), reference, conversational=False)
    except UserError:
        return  # no tokenizer saved with the reference: it is loaded against the policy's
    mismatch = tokenizer_mismatch(policy_tokenizer, other)
    if mismatch:
        raise UserError(
            f"{what} ({reference}) uses a different tokenizer from the policy: {mismatch}. The KL estimate "
            "and the shared prompts need every model to read the same token ids. Compare policies trained from "
            "the same model, against the model they were trained from."
        )


# ---------------------------------------------------------------- what a policy is: its recipe.yaml


def read_trained_as(path: str) -> TrainedAs:
    """The facts of a run directory's resolved recipe.yaml that the implicit reward needs; empty for a hub id, a
    directory without one, or one that cannot be read."""
    import yaml

    file = Path(path) / RESOLVED_RECIPE
    if not file.is_file():
        return TrainedAs()
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeError, yaml.YAMLError):
        return TrainedAs()
    if not isinstance(raw, dict):
        return TrainedAs()

    def section(key: str) -> dict:
        value = raw.get(key)
        return value if isinstance(value, dict) else {}

    stage = raw.get("stage") if isinstance(raw.get("stage"), str) else None
    out = TrainedAs(stage=stage)
    if stage != "dpo":
        return out
    dpo, training, data, model = section("dpo"), section("training"), section("data"), section("model")
    out.algorithm = dpo.get("algorithm") or "dpo"
    beta = training.get("beta")
    if isinstance(beta, (int, float)) and not isinstance(beta, bool) and beta > 0:
        out.beta = float(beta)
    if isinstance(data.get("max_length"), int) and data["max_length"] > 0:
        out.max_length = data["max_length"]
    reference = dpo.get("ref_model") or model.get("name_or_path")
    out.reference = reference if isinstance(reference, str) else None
    return out


def plan_implicit_rewards(policies: list[Policy], spec: EvalSpec) -> None:
    """Which policies get an implicit reward on eval.preferences, with which beta and cut, each decision said.

    It needs eval.preferences and eval.reference. A DPO policy (`rlhf dpo`, algorithm dpo) gets it always; any other
    policy when no reward model scores the pairs (they are there for this) or when eval.beta asks for it; an orpo
    or simpo policy never (reference-free: its loss has no pi_ref). beta: eval.beta, else the DPO recipe's
    training.beta (TRL's 0.1 when unset), else 0.1, assumed, with a note."""
    from rlhf_cli.evaluation.metrics import DEFAULT_DPO_BETA
    from rlhf_cli.rendering import print_note

    if spec.preferences is None or spec.reference is None:
        return
    explicit_length = "max_length" in spec.model_fields_set
    for policy in policies:
        trained = policy.trained = read_trained_as(policy.path)
        where = f"{policy.what} ({policy.path})"
        if trained.reference_free:
            print_note(f"{where} was trained with dpo.algorithm {trained.algorithm}, which is reference-free: it "
                       "has no implicit reward against eval.reference, so eval.preferences are not scored for "
                       "it.")  # fmt: skip
            continue
        if not (trained.dpo or spec.reward_model is None or spec.beta is not None):
            continue  # the reward model scores the pairs; a policy not trained by DPO is not measured on them
        if spec.beta is not None:
            beta, source = spec.beta, "eval.beta"
        elif trained.dpo and trained.beta is not None:
            beta, source = trained.beta, f"training.beta of {Path(policy.path) / RESOLVED_RECIPE}"
        elif trained.dpo:
            beta, source = DEFAULT_DPO_BETA, "TRL's DPOConfig default: its DPO recipe sets no training.beta"
        else:
            beta, source = DEFAULT_DPO_BETA, "assumed: not a `rlhf dpo` run and eval.beta is unset"
            print_note(f"{where} is not a DPO run (no recipe.yaml with `stage: dpo`), so its implicit reward uses "
                       f"beta = {beta:g}, assumed; set eval.beta to choose it. The accuracy does not depend on "
                       "beta, the margin and the rewards scale with it.")  # fmt: skip
        if explicit_length or trained.max_length is None:
            length, length_source = spec.max_length, "eval.max_length"
            if explicit_length and trained.max_length is not None and trained.max_length != spec.max_length:
                print_note(f"{where} was trained on pairs cut to {trained.max_length} tokens (data.max_length of "
                           f"its recipe.yaml); eval.max_length cuts them at {spec.max_length} instead.")  # fmt: skip
        else:
            length, length_source = trained.max_length, "data.max_length of its DPO recipe"
        if trained.dpo and trained.reference and not _same_path(trained.reference, spec.reference):
            print_note(f"{where} was trained by DPO against {trained.reference}; its implicit reward here is "
                       f"measured against eval.reference ({spec.reference}) instead.")  # fmt: skip
        policy.implicit = ImplicitPlan(beta, source, length, length_source)
    if spec.reward_model is None and not any(policy.implicit for policy in policies):
        raise UserError("eval.preferences without eval.reward_model are scored by a policy's implicit reward "
                        "against eval.reference, and no policy here has one (orpo and simpo policies are "
                        "reference-free). Set eval.reward_model, or evaluate a `rlhf dpo` (algorithm dpo) "
                        "policy.")  # fmt: skip


def _same_path(one: str, other: str) -> bool:
    """Whether two model paths name the same thing (directories compared resolved)."""
    first, second = Path(one).expanduser(), Path(other).expanduser()
    if first.exists() and second.exists():
        return first.resolve() == second.resolve()
    return one == other


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


def list_snapshots(run: str, every: int) -> list[tuple[int, Path]]:
    """(step, directory) of every `every`-th policy snapshot a PPO run saved in snapshots/step-N (training.
    snapshot_steps), in step order from the first, the last always included."""
    import re

    from rlhf_cli.ppo.trainer import SNAPSHOTS_DIR

    directory = Path(run) / SNAPSHOTS_DIR
    found = []
    if directory.is_dir():
        for path in directory.iterdir():
            match = re.fullmatch(r"step-(\d+)", path.name)
            if match and path.is_dir() and (path / "config.json").is_file():
                found.append((int(match.group(1)), path))
    if not found:
        raise UserError(f"eval.curve: {run} holds no policy snapshots ({SNAPSHOTS_DIR}/step-N with a config.json). "
                        "Run `rlhf ppo` with training.snapshot_steps set (e.g. --set training.snapshot_steps=5) to "
                        "save the policy every N steps, then evaluate that run directory.")  # fmt: skip
    found.sort()
    chosen = found[::every]
    if chosen[-1] != found[-1]:
        chosen.append(found[-1])
    return chosen


# ---------------------------------------------------------------- evaluation


def evaluate(inputs: EvalInputs, recipe: Recipe) -> tuple[dict, list[dict]]:
    """(results for evaluation.report, one row per evaluated prompt for samples.jsonl).

    The top-level sections describe `model:` against the reference exactly as with one policy; with eval.compare,
    `policies` holds every policy's numbers (`model:` first, under eval.name) and `head_to_head` the win rate of
    every pair of policies on the same prompts."""
    from rlhf_cli.evaluation.metrics import reward_model_metrics

    spec = recipe.eval
    results: dict = {"meta": _meta(inputs, recipe)}
    warnings: list[str] = []
    per_policy: dict[str, dict] = {policy.name: {"path": policy.path} for policy in inputs.policies}
    rows: list[dict] = []
    head_to_head: list[dict] = []
    with progress_bar() as progress:
        if inputs.pairs is not None and inputs.reward is not None:
            scored = score_pairs(inputs.reward, inputs.pairs, spec, progress)
            reader = inputs.reward.reader
            results["meta"]["preference pairs truncated"] = _cut_line(sum(scored.cut), len(inputs.pairs),
                                                                      reader.max_length)  # fmt: skip
            results["reward_model"] = reward_model_metrics(scored.chosen, scored.rejected, scored.chosen_lengths,
                                                           scored.rejected_lengths,
                                                           spec.calibration_buckets)  # fmt: skip
            inputs.pair_scores = scored.rows()
        if inputs.pairs is not None and any(policy.implicit for policy in inputs.policies):
            sections, inputs.implicit_rows = implicit_reward_sections(inputs, spec, progress)
            for name, section in sections.items():
                per_policy[name]["implicit_reward"] = section
                if section["likelihood_displacement"]:
                    warnings.append(displacement_warning(section, name, single=not spec.compare))
            main = inputs.policies[0].name
            if main in sections:
                results["implicit_reward"] = sections[main]
        if inputs.prompts is not None:
            sections, rows, numbers, head_to_head = evaluate_policy(inputs, spec, recipe.seed, progress,
                                                                     recipe.generation)
            results.update(sections)
            for name, entry in numbers.items():
                per_policy[name].update(entry)
        if inputs.snapshots is not None:
            results["overoptimisation"], inputs.curve_rows = overoptimisation_curve(inputs, recipe, progress)
        if inputs.demonstrations is not None:
            values, cut = perplexities(inputs, spec, progress)
            results["perplexity"] = {label: values[name] for label, name in
                                     (("policy", spec.name), (REFERENCE, REFERENCE)) if name in values}  # fmt: skip
            for name in per_policy:
                per_policy[name]["perplexity"] = values[name]
            results["meta"]["demonstrations truncated"] = _cut_line(cut, len(inputs.demonstrations))
    if spec.compare:
        results["policies"] = per_policy
        results["head_to_head"] = head_to_head
    if warnings:
        results["warnings"] = warnings
    return results, rows


def displacement_warning(section: dict, name: str, *, single: bool) -> str:
    """The likelihood-displacement warning for one policy's implicit-reward section."""
    logps = section["logps"]
    who = "the policy" if single else f"policy {name!r}"
    margin = ("the margin is positive only because the rejected ones fell further" if section["mean_margin"] > 0
              else "and the margin is not positive either")  # fmt: skip
    return (f"likelihood displacement: on {section['num_pairs']} held-out pairs the chosen responses are LESS likely "
            f"under {who} than under the reference (mean log-probability {logps['policy']['chosen']:.3f} against "
            f"{logps['reference']['chosen']:.3f}, change {logps['change']['chosen']:+.3f}; rejected "
            f"{logps['change']['rejected']:+.3f}): {margin}. Read the policy's outputs; a larger beta, fewer epochs "
            "or an SFT term (loss_type: [sigmoid, sft]) counter it. See docs/eval.md.")  # fmt: skip


def _cut_line(cut: int, rows: int, max_length: int | None = None) -> str:
    limit = "eval.max_length" if max_length is None else f"{max_length} tokens"
    return f"{cut} of {rows}, longer than {limit}: scored on the prompt's end + the response's start"


def _meta(inputs: EvalInputs, recipe: Recipe) -> dict:
    spec = recipe.eval
    meta = {}
    if recipe.model is not None:
        meta["policy"] = recipe.model.name_or_path
    if spec.compare or spec.name != "policy":
        meta["policies"] = ", ".join(f"{policy.name} ({policy.path})" for policy in inputs.policies)
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
        meta["decoding"] = planned_line(recipe.generation)
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


def evaluate_policy(inputs: EvalInputs, spec: EvalSpec, seed: int, progress,
                    generation=None) -> tuple[dict, list[dict], dict[str, dict], list[dict]]:  # fmt: skip
    """Sample every policy and the reference on the same prompts with the same seeds, score them all, estimate each
    policy's KL to the reference.

    Returns (the top-level sections of `model:` against the reference, one row per prompt for samples.jsonl, each
    policy's entry of `policies` by name, `head_to_head`: the win rate of every pair of policies under each scorer).
    """
    from rlhf_cli.evaluation.metrics import diversity_metrics, pearson, sampled_kl, summarize, win_rate
    from rlhf_cli.ppo.trainer import encode_prompts

    tokenizer, prompts = inputs.tokenizer, inputs.prompts
    models = {policy.name: policy.model for policy in inputs.policies}
    names = list(models)
    main = names[0]
    if inputs.reference is not None:
        models[REFERENCE] = inputs.reference
    budget = min(prompt_budget(model, spec) for model in models.values())
    queries = encode_prompts({"prompt": prompts}, tokenizer, budget)
    responses: dict[str, Responses] = {}
    for label, model in models.items():
        responses[label] = sample(model, tokenizer, queries, spec, seed, progress, f"{label}: sampling", generation)

    def scores_of(scorer: Scorer | None, role: str) -> dict[str, list[float]]:
        if scorer is None:
            return {}
        return {label: score(scorer, prompts, answers, max_prompt_length=spec.max_prompt_length,
                             batch_size=spec.batch_size, progress=progress, label=f"{label}: {role}")
                for label, answers in responses.items()}  # fmt: skip

    proxy, judged = scores_of(inputs.reward, "reward model"), scores_of(inputs.judge, "judge")

    def scores_and_wins(scores: dict[str, list[float]]) -> dict:
        """The section of `model:` (as "policy") against the reference, as with one policy."""
        if not scores:
            return {}
        section = {"policy_score": summarize(scores[main])}
        if REFERENCE in scores:
            section["reference_score"] = summarize(scores[REFERENCE])
            section["win_rate"] = win_rate(scores[main], scores[REFERENCE])
        return section

    log_ratios: dict[str, list[float]] = {}
    kl: dict[str, dict] = {}
    if inputs.reference is not None:
        pad = tokenizer.pad_token_id
        for name in names:
            answers = responses[name]
            policy_lp = sequence_logprobs(models[name], answers.queries, answers.tokens, pad, spec.batch_size,
                                          progress, f"KL: {name} log-probs")  # fmt: skip
            reference_lp = sequence_logprobs(inputs.reference, answers.queries, answers.tokens, pad,
                                             spec.batch_size, progress, f"KL: reference on {name}")  # fmt: skip
            kl[name] = sampled_kl(policy_lp, reference_lp)
            log_ratios[name] = [p - r for p, r in zip(policy_lp, reference_lp)]
    diversity = {label: diversity_metrics(answers.tokens, tokenizer.eos_token_id)
                 for label, answers in responses.items()}  # fmt: skip

    sections: dict = {}
    policy_section = scores_and_wins(proxy)
    if main in kl:
        policy_section["kl"] = kl[main]
    if policy_section:
        sections["policy"] = policy_section
    sections["diversity"] = {("policy" if label == main else label): diversity[label]
                             for label in (main, REFERENCE) if label in diversity}  # fmt: skip
    if judged:
        judge_section = {"name": inputs.judge.name, **scores_and_wins(judged)}
        if proxy:
            flat = [(p, j) for label in (main, REFERENCE) if label in proxy
                    for p, j in zip(proxy[label], judged[label])]  # fmt: skip
            judge_section["proxy_correlation"] = pearson([p for p, _ in flat], [j for _, j in flat])
        sections["judge"] = judge_section

    numbers: dict[str, dict] = {}
    for name in names:
        entry: dict = {"prompts": len(prompts)}
        for key, scores in (("", proxy), ("judge_", judged)):
            if scores:
                entry[f"{key}score"] = summarize(scores[name])
                if REFERENCE in scores:
                    entry[f"{key}win_rate"] = win_rate(scores[name], scores[REFERENCE])
        if name in kl:
            entry["kl"] = kl[name]
        entry["diversity"] = diversity[name]
        numbers[name] = entry
    head_to_head = [{"a": a, "b": b, "scorer": scorer, **win_rate(scores[a], scores[b])}
                    for i, a in enumerate(names) for b in names[i + 1:]
                    for scorer, scores in (("reward_model", proxy), ("judge", judged)) if scores]  # fmt: skip

    rows = []
    for i, prompt in enumerate(prompts):
        row: dict = {"prompt": prompt}
        for label in (main, REFERENCE):
            if label in responses:
                row.update(_sample_fields("policy" if label == main else label, label, i, responses, proxy, judged))
        if main in log_ratios:
            row["log_ratio"] = log_ratios[main][i]
        if len(names) > 1:
            row["compare"] = {}
            for name in names[1:]:
                fields = _sample_fields("", name, i, responses, proxy, judged)
                if name in log_ratios:
                    fields["log_ratio"] = log_ratios[name][i]
                row["compare"][name] = fields
        rows.append(row)
    return sections, rows, numbers, head_to_head


def overoptimisation_curve(inputs: EvalInputs, recipe: Recipe, progress) -> tuple[dict, list[dict]]:
    """The over-optimisation curve (eval.curve): (the `overoptimisation` section, one row per snapshot and prompt
    for curve_samples.jsonl).

    The reference (step 0: the policy PPO started from) and each chosen snapshot, loaded one at a time and freed,
    answer the same prompts with the same seeds (`inference.sample`: common random numbers); the proxy
    (eval.reward_model) and the gold reward (curve.gold) score those same responses; KL(policy || reference) is
    the mean over responses of the summed log-ratio at temperature 1 (`sequence_logprobs`, as for the policy)."""
    import gc

    import torch

    from rlhf_cli.evaluation.metrics import curve_point, gold_peak
    from rlhf_cli.ppo.trainer import encode_prompts

    spec, seed = recipe.eval, recipe.seed
    tokenizer, prompts, reference = inputs.tokenizer, inputs.prompts, inputs.reference
    pad = tokenizer.pad_token_id
    queries = encode_prompts({"prompt": prompts}, tokenizer, prompt_budget(reference, spec))
    conversational = _is_conversational(prompts)
    task = progress.add_task("over-optimisation: snapshots", total=len(inputs.snapshots) + 1)
    points, rows = [], []
    for step, path in [(0, None), *inputs.snapshots]:
        label = f"step {step}" + (" (reference)" if path is None else "")
        if path is None:
            model = reference
        else:
            model, _ = load_causal_lm(companion_spec(recipe.model, str(path)), seed, f"eval.curve snapshot "
                                      f"step-{step}", conversational=conversational, tokenizer=tokenizer)  # fmt: skip
        answers = sample(model, tokenizer, queries, spec, seed, progress, f"{label}: sampling", recipe.generation)
        policy_lp = sequence_logprobs(model, answers.queries, answers.tokens, pad, spec.batch_size, progress,
                                      f"{label}: log-probs")  # fmt: skip
        reference_lp = policy_lp if path is None else sequence_logprobs(
            reference, answers.queries, answers.tokens, pad, spec.batch_size, progress, f"{label}: reference")
        proxy, gold = (score(scorer, prompts, answers, max_prompt_length=spec.max_prompt_length,
                             batch_size=spec.batch_size, progress=progress, label=f"{label}: {role}")
                       for scorer, role in ((inputs.reward, "proxy"), (inputs.gold, "gold")))  # fmt: skip
        points.append(curve_point(step, proxy, gold, policy_lp, reference_lp))
        for i in range(len(prompts)):
            rows.append({"step": step, "prompt": _display_prompt(prompts[i]), "response": answers.texts[i],
                         "tokens": len(answers.tokens[i]), "proxy": proxy[i], "gold": gold[i],
                         "log_ratio": policy_lp[i] - reference_lp[i]})  # fmt: skip
        if path is not None:  # one snapshot in memory at a time
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        progress.advance(task)
    curve = spec.curve
    section = {"run": str(curve.run or spec.ppo_run), "every": curve.every, "proxy": spec.reward_model,
               "gold": inputs.gold.name, "points": points, **gold_peak(points)}  # fmt: skip
    return section, rows


def _sample_fields(prefix: str, label: str, i: int, responses: dict[str, Responses], proxy: dict,
                   judged: dict) -> dict:  # fmt: skip
    """One model's answer to prompt i for samples.jsonl: PREFIX_response, _tokens, _finished, _score, _judge_score
    (without a prefix: response, tokens, ...)."""
    answers, head = responses[label], f"{prefix}_" if prefix else ""
    fields = {f"{head}response": answers.texts[i], f"{head}tokens": len(answers.tokens[i]),
              f"{head}finished": answers.finished[i]}  # fmt: skip
    if proxy:
        fields[f"{head}score"] = proxy[label][i]
    if judged:
        fields[f"{head}judge_score"] = judged[label][i]
    return fields


# ---------------------------------------------------------------- a policy's implicit reward on pairs


@dataclass
class PairTokens:
    """Preference pairs as (query, response) token ids, cut as training cut them; chosen and rejected interleaved
    (pair i is entries 2i and 2i + 1)."""

    queries: list[list[int]]
    responses: list[list[int]]
    cut: list[bool]  # per pair: longer than the limit, so cut

    def scored_lengths(self, pair: int) -> tuple[int, int]:
        """Tokens scored of pair `pair`'s chosen and rejected response (after the cut)."""
        return len(self.responses[2 * pair]), len(self.responses[2 * pair + 1])


def pair_tokens(encodings: list, max_length: int) -> PairTokens:
    """Each pair (`lengths.encode_pair`) cut with training's windows (`lengths.scoring_split`: the prompt's end and
    each response's start, one prompt cut for both) and split into the shared query and each response."""
    from rlhf_cli.lengths import scoring_split

    out = PairTokens([], [], [])
    for encoded in encodings:
        for query, response in scoring_split(encoded.sequences, encoded.boundary, max_length):
            out.queries.append(query)
            out.responses.append(response)
        out.cut.append(encoded.length > max_length)
    return out


def implicit_reward_sections(inputs: EvalInputs, spec: EvalSpec, progress) -> tuple[dict[str, dict], list[dict]]:
    """Every planned policy's implicit reward on the preference pairs: ({name: section}, rows for
    implicit_rewards.jsonl).

    The pairs are tokenized as `rlhf dpo` tokenizes them (`lengths.encode_pair`: the chat template, or text with EOS
    appended), cut at the policy's plan max_length (and within both models' positions), and each response's
    log-probability summed over its tokens under the policy and under the reference, in batches of
    eval.batch_size sequences. The reference is scored once per cut."""
    from rlhf_cli.evaluation.metrics import implicit_reward_metrics, implicit_rewards, ties
    from rlhf_cli.lengths import encode_pair

    tokenizer, reference, pad = inputs.tokenizer, inputs.reference, inputs.tokenizer.pad_token_id
    encodings = [encode_pair(tokenizer, row) for row in inputs.pairs]
    reference_logps: dict[int, list[float]] = {}
    sections: dict[str, dict] = {}
    rows: list[dict] = []
    for policy in inputs.policies:
        plan = policy.implicit
        if plan is None:
            continue
        limits = [limit for limit in (positions_limit(policy.model), positions_limit(reference)) if limit]
        max_length = min([plan.max_length, *limits])
        tokens = pair_tokens(encodings, max_length)
        if max_length not in reference_logps:
            reference_logps[max_length] = sequence_logprobs(reference, tokens.queries, tokens.responses, pad,
                                                            spec.batch_size, progress,
                                                            f"reference: pairs cut at {max_length}")  # fmt: skip
        policy_lp = sequence_logprobs(policy.model, tokens.queries, tokens.responses, pad, spec.batch_size, progress,
                                      f"{policy.name}: pair log-probs")  # fmt: skip
        reference_lp = reference_logps[max_length]
        pc, pr, rc, rr = policy_lp[0::2], policy_lp[1::2], reference_lp[0::2], reference_lp[1::2]
        section = implicit_reward_metrics(pc, pr, rc, rr, plan.beta)
        section["beta_source"] = plan.beta_source
        section["max_length"] = max_length
        section["max_length_source"] = plan.length_source
        section["pairs_cut"] = sum(tokens.cut)
        sections[policy.name] = section

        chosen_reward, rejected_reward = implicit_rewards(pc, rc, plan.beta), implicit_rewards(pr, rr, plan.beta)
        tied = ties([c - r for c, r in zip(pc, rc)], [c - r for c, r in zip(pr, rr)])
        for i in range(len(pc)):
            chosen_tokens, rejected_tokens = tokens.scored_lengths(i)
            rows.append({"policy": policy.name, "pair": i + 1, "chosen_reward": float(chosen_reward[i]),
                         "rejected_reward": float(rejected_reward[i]),
                         "margin": float(chosen_reward[i] - rejected_reward[i]), "tie": bool(tied[i]),
                         "chosen_logp_policy": pc[i], "chosen_logp_reference": rc[i],
                         "rejected_logp_policy": pr[i], "rejected_logp_reference": rr[i],
                         "chosen_tokens_scored": chosen_tokens, "rejected_tokens_scored": rejected_tokens,
                         "cut": tokens.cut[i]})  # fmt: skip
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
    """PPL = exp(total NLL / tokens) of every model (each policy by name, and "reference") on the demonstrations'
    scored tokens (temperature 1), and how many demonstrations were longer than max_length (cut as SFT data is: the
    prompt's end, the completion's start)."""
    from rlhf_cli.evaluation.metrics import perplexity

    tokenizer = inputs.tokenizer
    models = {policy.name: policy.model for policy in inputs.policies}
    if inputs.reference is not None:
        models[REFERENCE] = inputs.reference
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
    """PNG plots, eval.json + report.md (which links the plots), samples.jsonl, pair_scores.jsonl,
    implicit_rewards.jsonl."""
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
    if "overoptimisation" in results:
        plots.overoptimisation_curve(results["overoptimisation"]["points"], results["overoptimisation"],
                                     run_dir / "overoptimisation_curve.png")  # fmt: skip

    samples = []
    for row in rows[: spec.num_samples_in_report]:
        sample_row = {"prompt": _display_prompt(row["prompt"]), "policy_response": row["policy_response"],
                      "policy_score": row.get("policy_score")}  # fmt: skip
        if "reference_response" in row:
            sample_row.update(reference_response=row["reference_response"], reference_score=row.get("reference_score"))
        samples.append(sample_row)
    write_report(run_dir, results, samples)
    for name, records in ((SAMPLES_FILE, rows), (PAIR_SCORES_FILE, inputs.pair_scores),
                          (IMPLICIT_REWARDS_FILE, inputs.implicit_rows), (CURVE_SAMPLES_FILE, inputs.curve_rows)):
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
    implicit = {name: entry["implicit_reward"] for name, entry in results.get("policies", {}).items()
                if "implicit_reward" in entry}  # fmt: skip
    if not implicit and "implicit_reward" in results:
        implicit = {"policy": results["implicit_reward"]}
    for name, section in implicit.items():
        key = "implicit reward on pairs" if "policies" not in results else f"{name}: implicit reward on pairs"
        headline[key] = (f"accuracy {section['accuracy']:.3f} (ties {section['ties']}, as half), margin "
                         f"{section['mean_margin']:.3f}, chosen log-prob {section['logps']['change']['chosen']:+.3f} "
                         f"vs reference (beta {section['beta']:g}, {section['num_pairs']} pairs)")  # fmt: skip
    for entry in results.get("head_to_head", []):
        scorer = "reward model" if entry["scorer"] == "reward_model" else "judge"
        headline[f"{entry['a']} vs {entry['b']} ({scorer})"] = (f"win rate {entry['win_rate']:.3f} (95% CI "
                                                                f"{entry['ci_low']:.3f} to {entry['ci_high']:.3f}, "
                                                                f"n = {entry['n']})")  # fmt: skip
    curve = results.get("overoptimisation")
    if curve:
        peak, last = curve["gold_peak"], curve["points"][-1]
        headline["over-optimisation (gold)"] = (
            f"peaks at step {peak['step']} (sqrt(KL) {peak['sqrt_kl']:.2f}, gold {peak['gold_mean']:.3f}), "
            + (f"falls to {last['gold_mean']:.3f} by step {last['step']}" if curve["gold_peaks_before_end"]
               else "no fall by the last snapshot")
            + f"; proxy {curve['points'][0]['proxy_mean']:.3f} -> {last['proxy_mean']:.3f}")  # fmt: skip
    headline["report"] = str(run_dir / "report.md")
    print_summary("Evaluation: done", headline)


def _print_warnings(warnings: list[str]) -> None:
    from rich.markup import escape

    from rlhf_cli.console import make_console

    for line in warnings:
        make_console(stderr=True, soft_wrap=True).print(f"[yellow]Warning:[/] {escape(line)}", highlight=False)


def _show_plan(recipe: Recipe, run_dir: Path) -> None:
    spec = recipe.eval
    plan: dict[str, object] = {}
    if recipe.model is not None:
        plan["policy"] = recipe.model.name_or_path + (f" (named {spec.name})" if spec.name != "policy" else "")
    for name, path in spec.compare.items():
        plan[f"compared policy {name}"] = path
    plan["reference"] = spec.reference or "none (no win rate, no KL)"
    plan["reward model"] = spec.reward_model or "none"
    if spec.judge is not None:
        plan["judge"] = spec.judge.model or spec.judge.function
    if spec.prompts is not None:
        plan["prompts"] = f"{_source_name(spec.prompts)} ({spec.num_prompts or 'all'} prompts)"
        plan["sampling"] = sampling_line(spec)
        plan["decoding"] = planned_line(recipe.generation)
    if spec.preferences is not None:
        plan["preference pairs"] = _source_name(spec.preferences)
        if spec.reference is not None:
            who = ("every policy but orpo/simpo ones" if spec.reward_model is None or spec.beta is not None
                   else "the policies trained by `rlhf dpo` (algorithm dpo)")  # fmt: skip
            beta = f"beta {spec.beta:g} (eval.beta)" if spec.beta is not None else "beta from each DPO recipe, else 0.1"
            plan["implicit reward"] = f"{who}, against the reference; {beta}"
    if spec.demonstrations is not None:
        plan["demonstrations"] = _source_name(spec.demonstrations)
    if spec.ppo_run is not None:
        plan["ppo run"] = spec.ppo_run
    if spec.curve is not None:
        gold_spec = spec.curve.gold
        gold = gold_spec.model or gold_spec.function or ", ".join(getattr(gold_spec, "models", None) or [])
        every = "every snapshot" if spec.curve.every == 1 else f"every {spec.curve.every}th snapshot (and the last)"
        plan["over-optimisation curve"] = (f"{every} of {spec.curve.run or spec.ppo_run}, and the reference as "
                                           f"step 0; proxy {spec.reward_model}, gold {gold}")  # fmt: skip
    plan["writes"] = (f"{run_dir}/{{{RESOLVED_RECIPE}, eval.json, report.md, *.png, {SAMPLES_FILE}, "
                      f"{PAIR_SCORES_FILE}, {IMPLICIT_REWARDS_FILE}, {CURVE_SAMPLES_FILE}}}")  # fmt: skip
    show_plan("Evaluation — plan", plan)
