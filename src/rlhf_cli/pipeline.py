"""`rlhf pipeline`: SFT, then a policy stage (PPO against a reward model, DPO or KTO), then eval, from one recipe,
each stage's output wired into the next.

A pipeline recipe holds shared defaults (model, distributed, seed, report_to) and a section per stage under
`stages:`; each section is an ordinary stage recipe minus what the pipeline wires in. The sections present choose
the route (ROUTES):

    ppo       sft -> rm -> ppo -> eval      (rm may be left out when PPO's reward is a rule function)
    dpo       sft -> dpo -> eval            (an rm stage may be added: it scores the eval)
    kto       sft -> kto -> eval            (likewise)
    ppo+dpo   sft -> rm -> ppo + dpo -> eval, one eval comparing both policies

and the wiring (a key set in a stage's section wins over it):

    sft   model: the shared model                            -> OUT/sft
    rm    model: OUT/sft (the SFT policy initialises the RM)    -> OUT/rm
    ppo   model: OUT/sft, ppo.reward.model: OUT/rm (critic init and reference follow) -> OUT/ppo
    dpo   model: OUT/sft (also its default reference)         -> OUT/dpo
    kto   model: OUT/sft (also its default reference)         -> OUT/kto
    eval  model: OUT/<policy stage>, eval.reference: OUT/sft, eval.reward_model: OUT/rm (when there is an rm
          stage), eval.ppo_run: OUT/ppo (when there is a ppo stage); ppo+dpo: model OUT/ppo named ppo, and
          eval.compare: {dpo: OUT/dpo}                          -> OUT/eval

Every stage recipe is validated and every hand-off checked before anything trains. `OUT/pipeline.json` records
each stage's content hash (its resolved recipe, its data files and the hashes of the stages whose outputs it
reads); a stage whose hash is unchanged and that finished is skipped, a changed one re-runs with everything
downstream, and an interrupted one resumes from its checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_cli.errors import UserError
from rlhf_cli.recipe import (COMMANDS, SAMPLING_STAGES, DataSource, Recipe, apply_overrides, read_recipe_file,
                             recipe_to_yaml, validate_recipe)  # fmt: skip

STAGE_ORDER = ("sft", "rm", "ppo", "dpo", "kto", "eval")  # the order stages run in, whichever route
POLICY_STAGES = ("ppo", "dpo", "kto")  # the stages that turn the SFT policy into the aligned one
SHARED_KEYS = ("model", "distributed", "seed", "report_to", "generation")  # generation: the sampling stages only
STATE_FILE = "pipeline.json"
ROUTES = {  # route name (its policy stages joined by +): the stages it runs; eval is optional in each
    "ppo": "sft -> rm -> ppo -> eval (rm may be left out when stages.ppo.ppo.reward.function is a rule reward)",
    "dpo": "sft -> dpo -> eval",
    "kto": "sft -> kto -> eval",
    "ppo+dpo": "sft -> rm -> ppo + dpo -> eval (one eval comparing both policies)",
}
ROUTES_TEXT = ("The routes: " + "; ".join(ROUTES.values()) + ". An rm stage may join the dpo and kto routes to "
               "score their eval; eval is optional and always last.")  # fmt: skip


@dataclass
class PipelineStage:
    name: str  # sft, rm, ...; in a pipeline with rounds, round-K.rm etc. for the stages of round K
    recipe: Recipe
    run_dir: Path
    hash: str = ""
    status: str = ""  # what this invocation did: ran, resumed, skipped
    seconds: float = 0.0
    summary: dict = field(default_factory=dict)
    kind: str = ""  # the stage it runs (sft, label, rm, ppo, dpo, kto, eval); the name when empty
    round: int = 0  # its round (0: not in a round)
    after: list[str] = field(default_factory=list)  # stages it reads besides its models (accumulated data)
    base_data: list = field(default_factory=list)  # label stage of a round: the seed preference data (DataSources)
    made_data: str = ""  # a data file the pipeline writes (not hashed: its maker's hash stands for it)

    def __post_init__(self):
        self.kind = self.kind or self.name


# ---------------------------------------------------------------- the route


def detect_route(present, *, rule_reward: bool = False, source: str = "Pipeline recipe") -> str:
    """The route the stage sections `present` make ("ppo", "dpo", "kto" or "ppo+dpo"), or one UserError naming
    what is wrong and listing the routes. `rule_reward`: the ppo section's reward is a rule function (no rm
    needed)."""
    present = set(present)
    policies = [name for name in POLICY_STAGES if name in present]
    problem = ""
    if "sft" not in present:
        problem = "there is no sft stage, and every route starts from the SFT policy"
    elif not policies:
        problem = "no stage trains the policy after SFT (ppo, dpo or kto)"
    elif "kto" in policies and len(policies) > 1:
        problem = (f"kto and {' and '.join(name for name in policies if name != 'kto')} would each train a policy "
                   "from SFT; keep one (only ppo + dpo are compared in one pipeline)")  # fmt: skip
    elif "ppo" in policies and "rm" not in present and not rule_reward:
        problem = ("ppo has no reward model to train against: add an rm stage, or give PPO a rule reward "
                   "(stages.ppo.ppo.reward.function)")  # fmt: skip
    if problem:
        given = ", ".join(name for name in STAGE_ORDER if name in present) or "none"
        raise UserError(f"{source}: its stages ({given}) make no pipeline route: {problem}. {ROUTES_TEXT}")
    return "+".join(policies)


def route_line(stages: list[PipelineStage]) -> str:
    """The stages as they hand over, e.g. 'sft -> rm -> ppo + dpo -> eval', or with rounds
    'sft -> 2 rounds of (label -> rm -> ppo -> eval)'."""
    rounds = max((stage.round for stage in stages), default=0)
    if rounds:
        kinds = [stage.kind for stage in stages if stage.round == 1]
        return f"sft -> {rounds} round{'s' if rounds > 1 else ''} of ({' -> '.join(kinds)})"
    names = [stage.name for stage in stages]
    steps = [name for name in ("sft", "rm") if name in names]
    policies = [name for name in POLICY_STAGES if name in names]
    if policies:
        steps.append(" + ".join(policies))
    return " -> ".join(steps + (["eval"] if "eval" in names else []))


# ---------------------------------------------------------------- building the stage recipes


def _deep_merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def placeholder(stage: str) -> str:
    """Stands for a stage's output while recipes are validated (it does not exist yet; validation would refuse a
    missing path); `link_outputs` replaces it with the real directory afterwards."""
    return f"rlhf-pipeline-output-of-{stage}"


def stage_dir(out: Path, name: str) -> Path:
    """Where a stage writes: OUT/sft, OUT/rm, ...; round K's stages (round-K.rm) under OUT/round-K/rm."""
    round_name, _, kind = name.rpartition(".")
    return out / round_name / kind if round_name else out / name


def link_outputs(recipe: Recipe, out: Path) -> None:
    prefix = placeholder("")

    def real(value):
        if isinstance(value, str) and value.startswith(prefix):
            return str(stage_dir(out, value[len(prefix):]))
        return value

    recipe.model.name_or_path = real(recipe.model.name_or_path)
    if recipe.ppo is not None:
        recipe.ppo.reward.model = real(recipe.ppo.reward.model)
        recipe.ppo.ref_model = real(recipe.ppo.ref_model)
        recipe.ppo.value_model = real(recipe.ppo.value_model)
    for section in (recipe.dpo, recipe.kto):
        if section is not None:
            section.ref_model = real(section.ref_model)
    evaluation = getattr(recipe, "eval", None)
    if evaluation is not None:
        evaluation.reference = real(evaluation.reference)
        evaluation.reward_model = real(evaluation.reward_model)
        compare = getattr(evaluation, "compare", None)
        if compare:
            for label, path in compare.items():
                compare[label] = real(path)


def wired_stage_raw(name: str, section: dict, shared: dict, out: Path, present=("sft", "rm", "ppo", "eval")) -> dict:
    """One stage's raw recipe: wiring and shared defaults first, the stage's own section on top. `present`: the
    pipeline's stages (the eval's wiring depends on the route); by default the sft -> rm -> ppo -> eval route."""
    outputs = {stage: placeholder(stage) for stage in STAGE_ORDER}
    base: dict = {key: shared[key] for key in ("distributed", "seed", "report_to") if key in shared}
    if "generation" in shared and name in SAMPLING_STAGES:
        base["generation"] = copy.deepcopy(shared["generation"])
    if name == "sft":
        base["model"] = copy.deepcopy(shared.get("model", {}))
    elif name in ("rm", "dpo", "kto"):  # dpo/kto: the SFT policy is also their default reference
        base["model"] = {"name_or_path": outputs["sft"]}
    elif name == "ppo":
        base["model"] = {"name_or_path": outputs["sft"]}
        reward = section.get("ppo", {}).get("reward", {})
        if "function" not in reward:  # a rule reward replaces the reward model
            base["ppo"] = {"reward": {"model": outputs["rm"]}}
    elif name == "eval":
        policies = [stage for stage in POLICY_STAGES if stage in present] or ["ppo"]
        base["model"] = {"name_or_path": outputs[policies[0]]}
        base["eval"] = {"reference": outputs["sft"]}  # ppo_run: after validation
        if "rm" in present:
            base["eval"]["reward_model"] = outputs["rm"]
        if len(policies) > 1:  # ppo+dpo: one report, both policies on the same prompts
            base["eval"]["name"] = policies[0]
            base["eval"]["compare"] = {stage: outputs[stage] for stage in policies[1:]}
    raw = _deep_merge(base, section)
    raw["stage"] = name
    raw["output_dir"] = str(out / name)
    if name != "sft" and "model" in section and section["model"] is None:  # `model:` left empty: the wired one
        raw["model"] = base["model"]
    return raw


def load_pipeline(path: str | Path, overrides: list[str] | None = None, output_dir: str | None = None):
    """Read a pipeline recipe and return (pipeline directory, stages in order), every stage recipe validated."""
    path = Path(path)
    raw = apply_overrides(read_recipe_file(path), overrides or [])
    if "stages" not in raw:
        single = f" It is a recipe for `{COMMANDS[raw['stage']]}`." if raw.get("stage") in COMMANDS else ""
        raise UserError(f"Pipeline recipe {path} needs a `stages:` mapping with a section per stage of its route."
                        f"{single} {ROUTES_TEXT}")  # fmt: skip
    unknown = sorted(set(raw) - {*SHARED_KEYS, "stages", "output_dir", "rounds"})
    if unknown:
        raise UserError(
            f"Pipeline recipe {path}: unknown top-level key(s) {', '.join(unknown)}; allowed: "
            f"{', '.join([*SHARED_KEYS, 'stages', 'output_dir', 'rounds'])} (stage settings go under stages.<stage>)."
        )
    sections = raw.get("stages")
    if not isinstance(sections, dict) or not sections:
        raise UserError(f"Pipeline recipe {path} needs a `stages:` mapping with a section per stage of its route. "
                        f"{ROUTES_TEXT}")  # fmt: skip
    rounds = round_settings(raw.get("rounds"), sections, path)
    bad = sorted(set(sections) - set(STAGE_ORDER) - ({"label"} if rounds else set()))
    if bad:
        raise UserError(f"Pipeline recipe {path}: unknown stage(s) {', '.join(bad)}; stages are {', '.join(STAGE_ORDER)}.")
    for name in sections:
        if sections[name] is not None and not isinstance(sections[name], dict):
            raise UserError(f"Pipeline recipe {path}: stages.{name} must be a mapping of recipe keys.")
    reward = ((sections.get("ppo") or {}).get("ppo") or {}).get("reward")
    route = detect_route(set(sections) - {"label"}, rule_reward=isinstance(reward, dict) and "function" in reward,
                         source=f"Pipeline recipe {path}")  # fmt: skip
    chosen = output_dir or raw.get("output_dir")
    if not chosen:
        raise UserError("No output directory: set `output_dir` in the pipeline recipe or pass --output-dir.")
    out = Path(chosen).expanduser().resolve()
    base_dir = path.resolve().parent
    if rounds:
        stages = round_stages(raw, sections, route, rounds, out, path, base_dir)
        check_lora_handoffs(stages, out)
        return out, stages
    stages = []
    for name in STAGE_ORDER:
        if name not in sections:
            continue
        section = sections[name] or {}
        for key in ("stage", "output_dir"):
            if key in section:
                raise UserError(f"Pipeline recipe {path}: stages.{name}.{key} is set by the pipeline; remove it.")
        stage_raw = wired_stage_raw(name, section, raw, out, present=tuple(sections))
        try:
            recipe = validate_recipe(stage_raw, name, source=f"{path} (stages.{name})", base_dir=base_dir)
        except UserError as exc:
            raise UserError(f"Stage {name}: {exc}") from None
        link_outputs(recipe, out)
        if name == "eval" and recipe.eval.ppo_run is None and "ppo" in sections:
            recipe.eval.ppo_run = str(out / "ppo")  # validation wants it to exist; it will, once ppo has run
        stages.append(PipelineStage(name, recipe, out / name))
    check_lora_handoffs(stages, out)
    return out, stages


# ---------------------------------------------------------------- rounds

ROUND_KINDS = ("label", "rm", "ppo", "dpo", "eval")  # the stages of one round, in run order
ROUND_DEFAULTS = {"reference": "sft", "reward_model": "retrain"}
ROUND_CHOICES = {"reference": ("sft", "previous"), "reward_model": ("retrain", "continue")}
DATA_DIR = "data"  # OUT/round-K/data/preferences.jsonl: the preference rows of rounds 0..K, written by round-K.label


def round_settings(value, sections: dict, path) -> dict | None:
    """`rounds:` as {count, reference, reward_model}: an integer N (the defaults) or that mapping; None without
    rounds. Refuses rounds without a stages.label section and a label section without rounds."""
    if value is None:
        if "label" in sections:
            raise UserError(f"Pipeline recipe {path}: stages.label labels each round's samples; it needs `rounds: N` "
                            "(N >= 1) at the top level. See docs/pipeline.md, Rounds.")  # fmt: skip
        return None
    settings = dict(ROUND_DEFAULTS)
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"count", *ROUND_DEFAULTS})
        if unknown:
            raise UserError(f"Pipeline recipe {path}: unknown key(s) rounds.{', rounds.'.join(unknown)}; allowed: "
                            f"count, {', '.join(ROUND_DEFAULTS)}.")  # fmt: skip
        settings.update({key: value[key] for key in ROUND_DEFAULTS if key in value})
        value = value.get("count")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"Pipeline recipe {path}: rounds must be a whole number >= 1 (or a mapping with count:), "
                        f"not {value!r}.")  # fmt: skip
    for key, choices in ROUND_CHOICES.items():
        if settings[key] not in choices:
            raise UserError(f"Pipeline recipe {path}: rounds.{key} is {settings[key]!r}; choose "
                            f"{' or '.join(choices)}.")  # fmt: skip
    if "label" not in sections:
        raise UserError(f"Pipeline recipe {path}: rounds: {value} needs a labeller: add a stages.label section (an "
                        "`rlhf label` recipe minus model and output_dir, which each round wires) with label.prompts "
                        "and label.labeller (human, judge, reward_model or rule).")  # fmt: skip
    return {"count": value, **settings}


def round_name(k: int, kind: str) -> str:
    return f"round-{k}.{kind}"


def data_file(out: Path, k: int) -> Path:
    from rlhf_cli.stages.label import PREFERENCES_FILE

    return out / f"round-{k}" / DATA_DIR / PREFERENCES_FILE


def round_stages(raw: dict, sections: dict, route: str, rounds: dict, out: Path, path, base_dir: Path):
    """sft, then per round K: label (the previous round's policy, SFT for round 1, answers label.prompts; the pairs
    join the accumulated data), rm (retrained on it from SFT, or continued from the previous round's RM), the policy
    stage (from the previous round's policy, KL/DPO reference SFT or the previous policy), eval."""
    if route not in ("ppo", "dpo") or (route == "ppo" and "rm" not in sections):
        why = "PPO with a rule reward and no rm stage" if route == "ppo" else f"the {route} route"
        raise UserError(f"Pipeline recipe {path}: rounds add labelled pairs to the preference data, so a round needs a "
                        f"stage that learns from pairs: sft -> rm -> ppo (-> eval) or sft -> (rm ->) dpo (-> eval), "
                        f"not {why}.")  # fmt: skip
    for name, section in sections.items():
        for key in ("stage", "output_dir"):
            if key in (section or {}):
                raise UserError(f"Pipeline recipe {path}: stages.{name}.{key} is set by the pipeline; remove it.")
    shared = {key: raw[key] for key in ("distributed", "seed", "report_to") if key in raw}

    def build(name: str, kind: str, base: dict) -> Recipe:
        section = sections.get(kind) or {}
        stage_raw = _deep_merge({**copy.deepcopy(shared), **base}, section)
        if "generation" in raw and kind in SAMPLING_STAGES:
            own = section.get("generation")
            stage_raw["generation"] = (_deep_merge(copy.deepcopy(raw["generation"]), own)
                                       if isinstance(raw["generation"], dict) and isinstance(own, dict)
                                       else copy.deepcopy(own if own is not None else raw["generation"]))  # fmt: skip
        stage_raw.update({"stage": kind, "output_dir": str(stage_dir(out, name))})
        if "model" in section and section["model"] is None:
            stage_raw["model"] = base["model"]
        try:
            recipe = validate_recipe(stage_raw, kind, source=f"{path} (stages.{kind}, {name})", base_dir=base_dir)
        except UserError as exc:
            raise UserError(f"Stage {name}: {exc}") from None
        link_outputs(recipe, out)
        return recipe

    stages = [PipelineStage("sft", build("sft", "sft", {"model": copy.deepcopy(raw.get("model", {}))}), out / "sft")]
    seeds: list = []  # the seed preference data: the rm and dpo sections' data.train
    for k in range(1, rounds["count"] + 1):
        previous = "sft" if k == 1 else round_name(k - 1, route)
        reference = placeholder("sft" if rounds["reference"] == "sft" else previous)
        data = data_file(out, k)

        def add(kind: str, recipe: Recipe, **extra) -> None:
            stages.append(PipelineStage(round_name(k, kind), recipe, stage_dir(out, round_name(k, kind)), kind=kind,
                                        round=k, **extra))  # fmt: skip

        label = build(round_name(k, "label"), "label", {"model": {"name_or_path": placeholder(previous)}})
        check_round_label(label, path)
        label.seed += k - 1  # each round draws its own prompts from the pool
        add("label", label, after=[round_name(k - 1, "label")] if k > 1 else [], made_data=str(data))
        for kind in ("rm", "dpo"):
            if kind not in sections:
                continue
            start = "sft" if kind == "rm" and (k == 1 or rounds["reward_model"] == "retrain") else \
                round_name(k - 1, "rm") if kind == "rm" else previous  # fmt: skip
            base: dict = {"model": {"name_or_path": placeholder(start)}}
            if kind == "dpo" and ((sections["dpo"] or {}).get("dpo") or {}).get("algorithm", "dpo") == "dpo":
                base["dpo"] = {"ref_model": reference}
            recipe = build(round_name(k, kind), kind, base)
            if k == 1 and recipe.data.train not in seeds:
                seeds.append(recipe.data.train)
            recipe.data.train = DataSource(path=str(data))  # checked above as given; trains on the accumulated rows
            add(kind, recipe, after=[round_name(k, "label")], made_data=str(data))
            if kind == "rm" and route == "ppo":
                base = {"model": {"name_or_path": placeholder(previous)}, "ppo": {"ref_model": reference}}
                if "function" not in (((sections["ppo"] or {}).get("ppo") or {}).get("reward") or {}):
                    base["ppo"]["reward"] = {"model": placeholder(round_name(k, "rm"))}
                add("ppo", build(round_name(k, "ppo"), "ppo", base))
        if "eval" in sections:
            base = {"model": {"name_or_path": placeholder(round_name(k, route))},
                    "eval": {"reference": placeholder("sft")}}  # fmt: skip
            if "rm" in sections:
                base["eval"]["reward_model"] = placeholder(round_name(k, "rm"))
            recipe = build(round_name(k, "eval"), "eval", base)
            if route == "ppo" and recipe.eval.ppo_run is None:
                recipe.eval.ppo_run = str(stage_dir(out, round_name(k, "ppo")))
            add("eval", recipe)
    for stage in stages:
        if stage.kind == "label" and stage.round == 1:
            stage.base_data = seeds
    return stages


def check_round_label(recipe: Recipe, path) -> None:
    spec = recipe.label
    problem = ""
    if spec.mode != "label":
        problem = "label.mode revise writes SFT rows, not preference pairs; a round needs label.mode: label"
    elif spec.candidates is not None or spec.prompts is None:
        problem = ("a round samples its candidates from the round's policy: give label.prompts (the prompt pool), "
                   "not label.candidates")  # fmt: skip
    elif spec.format == "kto":
        problem = "label.format kto writes unpaired rows; the rounds accumulate preference pairs (format: pairs)"
    if problem:
        raise UserError(f"Pipeline recipe {path}: stages.label: {problem}.")


def tag_rounds(rows: list[dict], new: list[dict], k: int) -> list[dict]:
    """The accumulated preference rows: `rows` (already tagged) then the new pairs as prompt/chosen/rejected tagged
    round K. Refuses pairs whose shape (conversation or text) differs from the rows before them."""
    tagged = [{"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"], "round": k}
              for row in new]  # fmt: skip
    if rows and tagged and isinstance(rows[0]["prompt"], list) != isinstance(tagged[0]["prompt"], list):
        shapes = ("conversations" if isinstance(rows[0]["prompt"], list) else "text", "conversations"
                  if isinstance(tagged[0]["prompt"], list) else "text")  # fmt: skip
        raise UserError(f"Round {k}: the preference data holds {shapes[0]} but the labelled pairs are {shapes[1]}; "
                        "give label.prompts in the same shape as the rm/dpo stage's data.train.")  # fmt: skip
    return rows + tagged


def round_counts(rows: list[dict]) -> dict[str, int]:
    from collections import Counter

    counts = Counter(row.get("round") for row in rows)
    return {str(k): counts[k] for k in sorted(counts)}


def accumulate_preferences(stage: PipelineStage, out: Path) -> dict:
    """Write OUT/round-K/data/preferences.jsonl after round K's labelling: round 1 starts from the seed data (the
    rm/dpo sections' data.train, tagged round 0), round K from round K-1's file; the new pairs are tagged K."""
    from rlhf_cli.stages.label import PREFERENCES_FILE, _read_jsonl

    if stage.round == 1:
        from rlhf_cli.data import load_data

        rows = []
        for source in stage.base_data:
            dataset = load_data(source, "preference", what="the seed preference data (data.train)")
            rows += [{"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"], "round": 0}
                     for row in dataset]  # fmt: skip
    else:
        rows = _read_jsonl(data_file(out, stage.round - 1))
    rows = tag_rounds(rows, _read_jsonl(stage.run_dir / PREFERENCES_FILE), stage.round)
    target = Path(stage.made_data)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    partial.replace(target)
    summary = {"rows": len(rows), "rows per round": round_counts(rows)}
    (target.parent / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def labels_open(stage: PipelineStage) -> int:
    """A human label stage's questions still unanswered (0 for the machine labellers)."""
    path = stage.run_dir / "label_report.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    return int((report.get("human") or {}).get("questions open") or 0)


def check_human_labellers(stages: list[PipelineStage], annotator: str | None, stdin) -> None:
    """A human labeller pauses the pipeline at its label stage: it needs a person at a terminal and a name."""
    human = [stage.name for stage in stages if stage.kind == "label" and stage.recipe.label.labeller.type == "human"]
    if not human:
        return
    if not stdin.isatty():
        raise UserError(f"Stage {human[0]}: the labeller is human, but stdin is not a terminal, so nobody can answer "
                        "inside this pipeline. Run `rlhf pipeline` at a terminal (it pauses at each label stage and "
                        "the same command continues), or use a judge, reward_model or rule labeller.")  # fmt: skip
    if not annotator:
        raise UserError(f"Stage {human[0]}: a human labelling session records who answers: pass --annotator NAME.")


def resolve_stage_name(value: str, names: list[str]) -> str | None:
    """A --from/--only value as a stage name: the name itself, or round-K for round K's first stage."""
    if value in names:
        return value
    return next((name for name in names if name.startswith(value + ".")), None) if value.startswith("round-") else None


# ---------------------------------------------------------------- hand-off checks


def check_lora_handoffs(stages: list[PipelineStage], out: Path) -> None:
    """A stage whose output a later stage loads as a model must leave full weights, not only an adapter."""
    for stage in stages:
        lora = stage.recipe.model.lora
        feeds = [other.name for other in stages if stage.name in upstream(other, out)]
        if lora is not None and not lora.merge and feeds and stage.kind != "eval":
            raise UserError(
                f"Stage {stage.name}: model.lora.merge is false, so {stage.run_dir} will hold only a LoRA adapter, "
                f"but {', '.join(feeds)} load(s) it as a full model. Set stages.{stage.kind}.model.lora.merge: true."
            )


def check_tokenizer_handoffs(stages: list[PipelineStage]) -> None:
    """Every model a stage reads that already exists (a link overridden by a path) must read the same token ids,
    with the same special tokens and chat template, as the pipeline's own starting tokenizer."""
    first = stages[0].recipe
    base = None  # loaded only when some stage reads a model that already exists
    produced = {str(stage.run_dir) for stage in stages}
    for stage in stages:
        links = [(key, path) for key, path in model_links(stage.recipe).items() if key != "eval.ppo_run"]
        for key, path in links:
            if not path or path in produced or path == first.model.name_or_path or not Path(path).is_dir():
                continue  # produced by an earlier stage from the same start, or the start itself
            from transformers import AutoTokenizer

            from rlhf_cli.models import TOKENIZER_FACTS, load_tokenizer, resolve_model_path, tokenizer_mismatch

            if base is None:
                base = load_tokenizer(first.model, resolve_model_path(first.model, first.seed), conversational=True)
            try:
                other = AutoTokenizer.from_pretrained(path)
            except (OSError, ValueError) as exc:
                raise UserError(f"Stage {stage.name}: {key} ({path}) has no loadable tokenizer: {exc}") from None
            mismatch = tokenizer_mismatch(base, other, TOKENIZER_FACTS)
            if mismatch:
                raise UserError(
                    f"Stage {stage.name}: {key} ({path}) does not match the pipeline's tokenizer: {mismatch}. "
                    "Every stage must read the same token ids with the same special tokens."
                )


def check_ppo_settings(stages: list[PipelineStage]) -> None:
    """PPOConfig's own checks (which run only when PPO starts) now, and prompts plus responses within the
    policy's positions."""
    ppo = next((stage for stage in stages if stage.kind == "ppo"), None)
    if ppo is None or ppo.recipe.ppo.algorithm != "ppo":
        return
    from rlhf_cli.ppo.config import PPOConfig

    try:
        config = PPOConfig(**ppo.recipe.training)
    except ValueError as exc:
        raise UserError(f"Stage ppo: recipe training section: {exc}.") from None
    first = stages[0].recipe
    if not first.model.is_builtin:
        return  # a hub or local model's limit is checked by the stage itself
    longest = ppo.recipe.data.max_length + config.response_length
    positions = first.model.builtin.n_positions
    if longest > positions:
        raise UserError(
            f"Stage ppo: data.max_length + training.response_length = {longest} exceeds the model's {positions} "
            "positions; shorten one of them."
        )


def check_stages(stages: list[PipelineStage]) -> None:
    """The checks across stages that need more than the recipes' schema: PPO's settings and the tokenizers of the
    models the stages read."""
    check_ppo_settings(stages)
    check_tokenizer_handoffs(stages)


def validate_pipeline(path, overrides=None, output_dir=None) -> tuple[Path, list[PipelineStage]]:
    """Every stage recipe built, validated and its hand-offs checked, as `rlhf pipeline` does before it runs
    anything (also `rlhf recipe validate` and `rlhf recipe show` of a pipeline recipe)."""
    out, stages = load_pipeline(path, overrides, output_dir)
    check_stages(stages)
    return out, stages


def model_links(recipe: Recipe) -> dict[str, str | None]:
    """{recipe key: path} of every model (and PPO run) a stage recipe reads; eval.compare.NAME for each compared
    policy."""
    links = {"model.name_or_path": recipe.model.name_or_path if recipe.model else None}
    if recipe.ppo is not None:
        links.update({"ppo.reward.model": recipe.ppo.reward.model, "ppo.value_model": recipe.ppo.value_model,
                      "ppo.ref_model": recipe.ppo.ref_model})  # fmt: skip
    for name in ("dpo", "kto"):
        section = getattr(recipe, name, None)
        if section is not None:
            links[f"{name}.ref_model"] = section.ref_model
    evaluation = getattr(recipe, "eval", None)
    if evaluation is not None:
        links.update({"eval.reference": evaluation.reference, "eval.reward_model": evaluation.reward_model,
                      "eval.ppo_run": evaluation.ppo_run})  # fmt: skip
        compare = getattr(evaluation, "compare", None) or {}
        links.update({f"eval.compare.{label}": path for label, path in compare.items()})
    return links


def reads_from(stage: PipelineStage, out: Path) -> dict[str, str]:
    """{recipe key: stage} for each model path of `stage` that is the output of a stage of the pipeline in `out`."""
    produced = {str(out / name): name for name in STAGE_ORDER}
    found = {}
    for key, value in model_links(stage.recipe).items():
        if value in produced:
            found[key] = produced[value]
        elif value and Path(value).parent.parent == out and Path(value).parent.name.startswith("round-"):
            found[key] = round_name(int(Path(value).parent.name[len("round-"):]), Path(value).name)  # OUT/round-K/rm
    return found


def run_order(name: str) -> tuple[int, int]:
    """Sorts stage names in run order: sft, rm, ... then round-1.label, round-1.rm, ..., round-2.label, ..."""
    prefix, _, kind = name.rpartition(".")
    if not prefix:
        return 0, STAGE_ORDER.index(name)
    return int(prefix[len("round-"):]), ROUND_KINDS.index(kind)


def upstream(stage: PipelineStage, out: Path) -> list[str]:
    """The stages whose outputs `stage` reads, in run order: its hash includes theirs, it re-runs when they do, and
    --only needs them finished. Read from the wired recipe, so a link overridden by another path drops out (plus
    the accumulated data a round's stages read, `stage.after`)."""
    read = (set(reads_from(stage, out).values()) | set(stage.after)) - {stage.name}
    return sorted(read, key=run_order)


# ---------------------------------------------------------------- hashing and state


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    for file in sorted(Path(path).rglob("*")) if Path(path).is_dir() else [Path(path)]:
        if file.is_file():
            digest.update(file.name.encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def stage_hash(stage: PipelineStage, upstream_hashes: list[str]) -> str:
    """sha256 over the resolved recipe, the content of its local data files and the upstream stages' hashes."""
    digest = hashlib.sha256(recipe_to_yaml(stage.recipe).encode())
    data = stage.recipe.data
    sources = [data.train, data.eval] if data is not None else []
    evaluation = getattr(stage.recipe, "eval", None)
    if evaluation is not None:
        sources += [getattr(evaluation, key, None) for key in ("prompts", "preferences", "demonstrations")]
    label = getattr(stage.recipe, "label", None)
    if label is not None:
        sources += [label.prompts, label.candidates]
    sources += stage.base_data  # a round's first label stage: the seed data it starts the accumulated rows from
    for source in sources:
        path = getattr(source, "path", None)
        if path and path != stage.made_data and Path(path).exists():  # made_data: its maker's hash stands for it
            digest.update(_file_digest(source.path).encode())
    for upstream in upstream_hashes:
        digest.update(upstream.encode())
    return digest.hexdigest()


def stage_hashes(stages: list[PipelineStage], out: Path) -> dict[str, str]:
    """Set and return every stage's hash, in run order: each includes the hashes of the stages it reads from."""
    hashes: dict[str, str] = {}
    for stage in stages:
        stage.hash = stage_hash(stage, [hashes[name] for name in upstream(stage, out) if name in hashes])
        hashes[stage.name] = stage.hash
    return hashes


def read_state(out: Path) -> dict:
    path = out / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_state(out: Path, state: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


def finished(stage: PipelineStage) -> bool:
    marker = "eval.json" if stage.kind == "eval" else "summary.json"
    done = (stage.run_dir / marker).is_file()
    if stage.kind == "label":  # and the accumulated data written, every question answered
        done = done and Path(stage.made_data).is_file() and not labels_open(stage)
    return done


# ---------------------------------------------------------------- running


def run_one(stage: PipelineStage, *, overwrite: bool, resume: bool, dry_run: bool, annotator: str | None = None,
            out: Path | None = None) -> int:  # fmt: skip
    from rlhf_cli.stages import stage_for
    from rlhf_cli.stages.common import run_stage
    from rlhf_cli.stages.ppo import run_ppo

    options = {"output_dir": str(stage.run_dir), "overwrite": overwrite, "dry_run": dry_run}
    if stage.kind == "label":  # resume: the same session continues (a person's answers so far are kept)
        from rlhf_cli.stages.label import run_label

        code = run_label(stage.recipe, annotator=annotator, **options)
        if code == 0 and not dry_run and not labels_open(stage):
            accumulate_preferences(stage, out)
        return code
    if stage.kind == "eval":
        from rlhf_cli.stages.evaluate import run_eval

        return run_eval(stage.recipe, **options)
    if stage.kind == "ppo":
        return run_ppo(stage.recipe, resume=resume, **options)
    return run_stage(stage_for(stage.recipe, stage.kind), stage.recipe, resume=resume, **options)  # dpo: its algorithm


def run_pipeline(path, *, overrides=None, output_dir=None, from_stage=None, only=None, dry_run=False,
                 annotator=None, stdin=None) -> int:  # fmt: skip
    import sys

    from rlhf_cli.console import heading, make_console

    console = make_console()
    out, stages = load_pipeline(path, overrides, output_dir)
    names = [stage.name for stage in stages]
    chosen = {}
    for flag, value in (("--from", from_stage), ("--only", only)):
        chosen[flag] = None if value is None else resolve_stage_name(value, names)
        if value is not None and chosen[flag] is None:
            rounds = " (round-K for a round's first stage)" if any(stage.round for stage in stages) else ""
            raise UserError(f"{flag} {value}: this pipeline's stages are {', '.join(names)}{rounds}.")
    from_stage, only = chosen["--from"], chosen["--only"]
    if not dry_run:
        check_human_labellers(stages, annotator, stdin or sys.stdin)
    check_stages(stages)

    stage_hashes(stages, out)
    heading(console, f"[bold]pipeline[/] {route_line(stages)} -> {out}")
    if dry_run:
        for stage in stages:
            heading(console, f"[bold]stage {stage.name}[/] -> {stage.run_dir}")
            run_one(stage, overwrite=False, resume=False, dry_run=True, out=out)
        return 0

    from rlhf_cli.rundir import locked_directory

    with locked_directory(out):  # a second pipeline on the same directory is refused, naming this one's pid
        return _run_stages(out, stages, from_stage=from_stage, only=only, console=console, annotator=annotator)


def _run_stages(out: Path, stages: list[PipelineStage], *, from_stage, only, console, annotator=None) -> int:
    from rlhf_cli.console import heading

    names = [stage.name for stage in stages]
    state = read_state(out)
    start = names.index(from_stage) if from_stage else 0
    selected = [only] if only else names[start:]
    for stage in stages:
        if stage.name in selected:
            continue
        needed = only is not None and stage.name in upstream(stages[names.index(only)], out)
        before_start = only is None and names.index(stage.name) < start
        if (needed or before_start) and not finished(stage):
            raise UserError(f"Stage {stage.name} has not finished in {stage.run_dir}; run it first (drop --from/--only).")
        stage.status = "kept"
    ran: set[str] = set()  # the stages this invocation (re-)made: every stage reading one of them runs too
    for stage in stages:
        if stage.name not in selected:
            continue
        recorded = state.get(stage.name, {})
        unchanged = recorded.get("hash") == stage.hash
        forced = stage.name in (only, from_stage) or bool(ran & set(upstream(stage, out)))
        if unchanged and recorded.get("status") == "done" and finished(stage) and not forced:
            stage.status = "skipped (unchanged)"
            continue
        from rlhf_cli.rundir import last_checkpoint

        resume = (unchanged and recorded.get("status") == "started" and stage.run_dir.is_dir()
                  and last_checkpoint(stage.run_dir) is not None and stage.kind != "eval")  # fmt: skip
        if stage.kind == "label":  # the labelling session continues where it stopped
            resume = unchanged and recorded.get("status") == "started" and (stage.run_dir / "candidates.jsonl").is_file()
        heading(console, f"[bold]stage {stage.name}[/]" + (" (resuming)" if resume else ""))
        state[stage.name] = {"hash": stage.hash, "status": "started"}
        write_state(out, state)
        started = time.time()
        code = run_one(stage, overwrite=not resume, resume=resume, dry_run=False, annotator=annotator, out=out)
        stage.seconds = time.time() - started
        if code != 0:
            console.print(f"[red]Stage {stage.name} stopped (exit code {code}).[/] Run the same command again to "
                          "continue: finished stages are skipped and this one resumes from its last checkpoint.")  # fmt: skip
            return code
        if stage.kind == "label" and labels_open(stage):
            stage.status = f"paused ({labels_open(stage)} questions open)"
            print_pipeline_summary(out, stages, state, console)
            console.print(f"[bold]Pipeline paused at {stage.name}[/]: the answers so far are saved. Run the same "
                          "command again to continue labelling; the pipeline goes on once every question is "
                          "answered.")  # fmt: skip
            return 0
        state[stage.name] = {"hash": stage.hash, "status": "done", "seconds": round(stage.seconds, 1)}
        write_state(out, state)
        stage.status = "resumed" if resume else "ran"
        ran.add(stage.name)
    print_pipeline_summary(out, stages, state, console)
    return 0


# ---------------------------------------------------------------- the summary


def _number(value) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _win(win: dict) -> str:
    return f"{_number(win.get('win_rate'))} [{_number(win.get('ci_low'))}, {_number(win.get('ci_high'))}]"


def _eval_results(stage: PipelineStage) -> dict | None:
    path = stage.run_dir / "eval.json"
    return json.loads(path.read_text()) if path.is_file() else None


# The figures of a DPO (and orpo/simpo) or KTO stage's summary.json shown in the table: its implicit reward
# beta*log(pi/pi_ref) on held-out data (docs/dpo.md). KTO sees no pairs, so it has margins but no accuracy.
PREFERENCE_FIGURES = {"dpo": ("rewards/accuracies", "rewards/margins", "rewards/chosen"),
                      "kto": ("rewards/margins", "rewards/chosen", "rewards/rejected", "kl")}  # fmt: skip


def _policy_figures(proxy: dict | None, judge: dict | None, kl: dict | None, implicit: dict | None) -> str:
    """One policy's eval numbers: its implicit-reward accuracy on eval.preferences (a DPO/KTO policy against the
    reference), its win rate over the reference under the reward model and the judge, its KL to the reference."""
    parts = []
    if implicit and implicit.get("accuracy") is not None:
        figures = f"implicit-reward accuracy {_number(implicit['accuracy'])} ({implicit.get('num_pairs', '?')} pairs"
        if implicit.get("mean_margin") is not None:
            figures += f", margin {_number(implicit['mean_margin'])}"
        parts.append(figures + (", likelihood displacement)" if implicit.get("likelihood_displacement") else ")"))
    wins = [f"{label} {_win(win)}" for label, win in (("proxy (reward model)", proxy), ("judge", judge)) if win]
    if wins:
        parts.append(f"win-rate vs reference: {', '.join(wins)}")
    if kl:
        parts.append(f"KL {_number(kl.get('kl'))}")
    return "; ".join(parts)


def _eval_policies(results: dict) -> dict[str, dict]:
    """{policy name: {proxy, judge, kl, implicit}}: every policy of eval.compare (`policies`, `model:` first), or
    the one policy of the top-level sections (under the name "")."""
    if results.get("policies"):
        return {name: {"proxy": entry.get("win_rate"), "judge": entry.get("judge_win_rate"), "kl": entry.get("kl"),
                       "implicit": entry.get("implicit_reward")}
                for name, entry in results["policies"].items()}  # fmt: skip
    policy = results.get("policy") or {}
    return {"": {"proxy": policy.get("win_rate"), "judge": (results.get("judge") or {}).get("win_rate"),
                 "kl": policy.get("kl"), "implicit": results.get("implicit_reward")}}  # fmt: skip


def _head_to_head(results: dict) -> str:
    """'ppo over dpo: proxy (reward model) 0.6 [0.5, 0.7], judge 0.45 [0.37, 0.54]': the win rate of every pair
    of compared policies on the same prompts."""
    pairs: dict[tuple[str, str], list[str]] = {}
    for entry in results.get("head_to_head") or []:
        label = {"reward_model": "proxy (reward model)"}.get(entry.get("scorer"), entry.get("scorer"))
        pairs.setdefault((entry.get("a"), entry.get("b")), []).append(f"{label} {_win(entry)}")
    return "; ".join(f"{a} over {b}: {', '.join(wins)}" for (a, b), wins in pairs.items())


def _headline(stage: PipelineStage) -> str:
    """The stage's key numbers from its summary.json / eval.json. For eval: a DPO/KTO policy's implicit-reward
    accuracy on the preference pairs, the policy's win rate over the reference under the reward model (the proxy PPO
    optimised) and, when the eval has a judge, under the judge, side by side (a proxy gain the judge does not share
    is reward hacking), then the KL; with eval.compare, those of each policy, then every pair head to head."""
    if stage.kind == "eval":
        results = _eval_results(stage)
        if results is None:
            return ""
        policies = _eval_policies(results)
        if "" in policies:
            return _policy_figures(**policies[""])
        parts = [f"{name}: {_policy_figures(**figures) or 'no figures'}" for name, figures in policies.items()]
        if results.get("head_to_head"):
            parts.append(f"head to head, {_head_to_head(results)}")
        return " | ".join(parts)
    path = stage.run_dir / "summary.json"
    if not path.is_file():
        return ""
    summary = json.loads(path.read_text())
    if stage.kind == "label":  # the pairs it labelled, and the accumulated rows the round trains on
        line = ", ".join(f"{key} {summary[key]}" for key in ("labels", "ties", "rows in preferences.jsonl")
                         if key in summary)  # fmt: skip
        data = Path(stage.made_data).parent / "summary.json"
        if data.is_file():
            counts = json.loads(data.read_text())
            per_round = ", ".join(f"{k}: {n}" for k, n in counts["rows per round"].items())
            line += f"; accumulated {counts['rows']} pairs (per round {per_round})"
        return line
    if stage.kind in PREFERENCE_FIGURES:  # the implicit reward on held-out pairs/rows, else the last training window
        names = PREFERENCE_FIGURES[stage.kind]
        keys = [f"held-out {name}" for name in names if f"held-out {name}" in summary]
        keys = keys or [f"train {name} (last log window)" for name in names]
    else:
        keys = {"sft": ("train loss (last log window)", "held-out loss"), "rm": ("held-out accuracy",
                "train accuracy (last log window)"),
                "ppo": ("score (first steps)", "score (last steps)", "kl (last steps)",
                        "reward (first steps)", "reward (last steps)")}[stage.kind]  # fmt: skip
    line = ", ".join(f"{key} {_number(summary[key])}" for key in keys if key in summary)
    if any(str(warning).startswith("likelihood displacement") for warning in summary.get("warnings", [])):
        line += "; likelihood displacement: the chosen responses fell below the reference (summary.json)"
    return line


def eval_headline(stage: PipelineStage) -> str:
    """The line after the table: the headline, what judged it, and whether the judge confirms the proxy's gain."""
    results = _eval_results(stage)
    if results is None:
        return ""
    line = _headline(stage)
    judge = results.get("judge") or {}
    policies = _eval_policies(results)
    if judge.get("win_rate") or any(figures["judge"] for figures in policies.values()):
        line += f" (judge: {judge.get('name') or 'eval.judge'}"
        if judge.get("proxy_correlation") is not None:
            line += f"; proxy vs judge Pearson r {_number(judge['proxy_correlation'])}"
        line += ")"
    hacked = []
    for name, figures in policies.items():
        low, judged = (figures["proxy"] or {}).get("ci_low"), (figures["judge"] or {}).get("win_rate")
        if isinstance(low, (int, float)) and low > 0.5 and isinstance(judged, (int, float)) and judged <= 0.5:
            hacked.append(name)
    if hacked == [""]:
        line += (". The proxy win rate is above 0.5 (its whole 95% interval) but the judge's is not: the policy "
                 "learnt what the reward model pays for, not what the judge measures (reward hacking)")  # fmt: skip
    elif hacked:
        who = "that policy" if len(hacked) == 1 else "those policies"
        line += (f". The proxy win rate of {' and '.join(hacked)} is above 0.5 (its whole 95% interval) but the "
                 f"judge's is not: {who} learnt what the reward model pays for, not what the judge measures (reward "
                 "hacking)")  # fmt: skip
    return line


def print_pipeline_summary(out: Path, stages: list[PipelineStage], state: dict, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"Pipeline: {out}", title_justify="left")
    for column in ("stage", "this run", "wall time (s)", "key metrics", "output"):
        table.add_column(column)
    rows = []
    for number, stage in enumerate(stages):
        if number and stage.round != stages[number - 1].round:
            table.add_section()  # one block per round
        seconds = stage.seconds or state.get(stage.name, {}).get("seconds", 0.0)
        headline = _headline(stage)
        table.add_row(stage.name, stage.status, f"{seconds:.1f}", escape(headline), str(stage.run_dir))
        rows.append({"stage": stage.name, "this run": stage.status, "wall time (s)": round(seconds, 1),
                     "key metrics": headline, "output": str(stage.run_dir)})  # fmt: skip
    console.print(table)
    (out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    for evaluation in [stage for stage in stages if stage.kind == "eval"]:  # one per round
        if (evaluation.run_dir / "eval.json").is_file():
            which = f" (round {evaluation.round})" if evaluation.round else ""
            console.print(f"[bold]Eval headline{which}:[/] {escape(eval_headline(evaluation))}. Report: "
                          f"{evaluation.run_dir / 'report.md'}")  # fmt: skip
