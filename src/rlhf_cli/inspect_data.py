"""`rlhf data inspect RECIPE`: each data source of a recipe as its trainer will see it, without loading any model.

For every source (sft/rm/ppo/dpo/kto: `data.train` and `data.eval`; eval: `eval.preferences`, `eval.demonstrations`,
`eval.prompts`; generate: `generate.prompts`) it prints the format the loader read, the column mapping, the rows
read/kept/dropped by the loader, the token lengths against the stage's limit with what `data.on_too_long` does (or
would do), and rendered examples: the token ids the trainer gets (chat template applied, after the length rule),
decoded. Only tokenizers are loaded. `--dry-run` of sft/train-rm prints the same lines without the examples
(`dry_run_lines`).

Output is plain lines (`print`), so nothing is wrapped or cut when it goes through a pipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from rlhf_cli.errors import UserError
from rlhf_cli.recipe import Recipe


@dataclass
class Source:
    """One data source of a recipe and how its stage reads it."""

    what: str  # the recipe key, e.g. "data.train"
    source: object  # DataSource
    kind: str  # sft | preference | prompt | unpaired
    max_length: int
    limit_key: str  # the recipe key that sets max_length
    on_too_long: str
    tokenizer_of: Callable[[bool], tuple[object, str]]  # conversational -> (tokenizer, where it came from)
    training: dict = field(default_factory=dict)
    note: str | None = None  # set when the length rule does not apply to this stage
    tokenizer_key: str = "policy"  # sources with the same key share one tokenizer
    rendering: object = None  # eval.preferences: the reward model's rlhf_cli.rendering.Rendering (its rendering.json)


STAGE_TRAINERS = {"sft": "TRL SFTTrainer", "rm": "TRL RewardTrainer", "ppo": "rlhf_cli PPOTrainer",
                  "dpo": "TRL DPOTrainer", "kto": "TRL KTOTrainer"}  # fmt: skip
DPO_TRAINERS = {"orpo": "TRL ORPOTrainer (experimental)", "simpo": "TRL CPOTrainer (experimental, simpo loss)"}
STAGE_KINDS = {"sft": "sft", "rm": "preference", "ppo": "prompt", "dpo": "preference", "kto": "unpaired"}


def sources_of(recipe: Recipe, stage: str) -> list[Source]:
    """The data sources `stage` reads from `recipe`, each with its tokenizer and length limit."""
    if stage in STAGE_KINDS:
        kind = STAGE_KINDS[stage]
        spec = recipe.data
        note = None
        if stage == "ppo" and recipe.ppo is not None and recipe.ppo.algorithm != "ppo":
            note = (f"data.max_length does not apply: TRL's {recipe.ppo.algorithm.upper()} trainer reads whole "
                    "prompts and bounds completions only")  # fmt: skip
        out = []
        for what, source in (("data.train", spec.train), ("data.eval", spec.eval)):
            if source is not None:
                out.append(Source(what, source, kind, spec.max_length, "data.max_length", spec.on_too_long,
                                  _policy_tokenizer(recipe), recipe.training, note))  # fmt: skip
        return out
    if stage == "eval":
        spec, out = recipe.eval, []
        if spec.preferences is not None:
            from rlhf_cli.rendering import RENDERING_FILE, read_rendering

            # pairs are cut where the reward model's training cut them, unless eval.max_length is set
            rendering = read_rendering(spec.reward_model)
            limit, limit_key = spec.max_length, "eval.max_length"
            if rendering is not None and "max_length" not in spec.model_fields_set:
                limit, limit_key = rendering.max_length, f"{RENDERING_FILE} max_length"
            out.append(Source("eval.preferences", spec.preferences, "preference", limit, limit_key, "truncate",
                              _companion_tokenizer(recipe, spec.reward_model), tokenizer_key="reward_model",
                              rendering=rendering))  # fmt: skip
        if spec.demonstrations is not None:
            out.append(Source("eval.demonstrations", spec.demonstrations, "sft", spec.max_length, "eval.max_length",
                              "truncate", _policy_tokenizer(recipe)))  # fmt: skip
        if spec.prompts is not None:
            out.append(Source("eval.prompts", spec.prompts, "prompt", spec.max_prompt_length,
                              "eval.max_prompt_length", "truncate", _policy_tokenizer(recipe)))  # fmt: skip
        return out
    if stage == "generate":
        spec = recipe.generate
        return [Source("generate.prompts", spec.prompts, "prompt", spec.max_prompt_length,
                       "generate.max_prompt_length", "truncate", _policy_tokenizer(recipe))]  # fmt: skip
    raise UserError(f"`rlhf data inspect` reads sft, rm, ppo, dpo, kto, eval and generate recipes, not {stage!r}.")


def _policy_tokenizer(recipe: Recipe):
    def load(conversational: bool):
        from rlhf_cli.models import load_tokenizer, resolve_model_path

        if recipe.model is None:
            raise UserError("The recipe names no model (model.name_or_path), whose tokenizer this data needs.")
        path = resolve_model_path(recipe.model, recipe.seed)
        name = recipe.model.tokenizer or recipe.model.name_or_path
        return load_tokenizer(recipe.model, path, conversational=conversational), name

    return load


def _companion_tokenizer(recipe: Recipe, path: str):
    def load(conversational: bool):
        from rlhf_cli.models import load_tokenizer
        from rlhf_cli.inference import companion_spec

        return load_tokenizer(companion_spec(recipe.model, path), path, conversational=conversational), path

    return load


# ---------------------------------------------------------------- one source


def source_lines(item: Source, *, examples: int = 2, tokenizers: dict | None = None) -> list[str]:
    """The lines of one source: loader facts, lengths and the rule, then `examples` rendered rows."""
    from rlhf_cli.data import load_data_with_report
    from rlhf_cli.lengths import encode_dataset, fit_rows, sft_template_for_loss
    from rlhf_cli.stages.common import quiet_hf_progress_bars

    quiet_hf_progress_bars()
    dataset, report = load_data_with_report(item.source, item.kind, what=item.what)
    conversational = any(isinstance(value, list) for value in dataset[0].values())
    cache = tokenizers if tokenizers is not None else {}
    key = (item.tokenizer_key, conversational)
    if key not in cache:
        cache[key] = item.tokenizer_of(conversational)
    tokenizer, tokenizer_name = cache[key]

    how = "detected" if report.detected else "as set in the recipe"
    lines = [f"{item.what}: {report.origin}",
             f"  format         {report.format} ({how}), {item.kind} data, {_style(dataset)}",
             f"  columns        {_mapping(report.columns)}"]  # fmt: skip
    if report.unused_columns:
        lines.append(f"  not used       {', '.join(report.unused_columns)}")
    limited = f" (limit; {report.rows_in_source} in the source)" if report.rows_read < report.rows_in_source else ""
    dropped = ", ".join(f"{count} {reason}" for reason, count in report.dropped.items()) or "none"
    lines.append(f"  rows           {report.rows_read} read{limited}, {report.rows_kept} kept by the loader; "
                 f"dropped: {dropped}")  # fmt: skip
    lines += [f"  note           {note}" for note in report.notes]
    if item.kind == "unpaired":
        desirable = sum(dataset["label"])
        lines.append(f"  labels         {desirable} desirable (true), {len(dataset) - desirable} undesirable (false)")

    template = sft_template_for_loss(tokenizer, item.training) if item.kind == "sft" else None
    reader = _reader(item, tokenizer)
    if reader is not None:  # as `rlhf eval` scores them: the reward model's rendering (rlhf_cli.rendering)
        encodings = [reader.encode_pair(row) for row in dataset]
    else:
        encodings = encode_dataset(dataset, tokenizer, item.kind,
                                   assistant_only_loss=bool(item.training.get("assistant_only_loss")),
                                   chat_template=template)  # fmt: skip
    # A stage the rule does not apply to (note set) gets its rows whole: a limit no row exceeds.
    limit = item.max_length if item.note is None else max(e.length for e in encodings)
    fitted = fit_rows(encodings, max_length=limit, on_too_long=item.on_too_long, what=item.what,
                      limit_key=item.limit_key, check=False)  # fmt: skip
    lengths = fitted.report
    unit = " (a pair: its longer sequence)" if item.kind == "preference" else ""
    shown = ", ".join(f"{name} {value}" for name, value in lengths.percentiles.items())
    lines += [f"  tokenizer      {tokenizer_name}" + (f" ({_template_used(tokenizer, reader)})"
                                                     if conversational or reader is not None else ""),
              f"  token lengths  {shown}{unit}",
              f"  max_length     {item.max_length} ({item.limit_key}); {lengths.fits_95} would keep 95% of rows "
              "whole"]  # fmt: skip
    if item.note is not None:
        lines.append(f"  on_too_long    {item.note}")
    elif item.limit_key.startswith("data."):
        lines.append(f"  on_too_long    {item.on_too_long}: {lengths.action(item.kind, report.format)}")
        lines.append(f"  to the trainer {lengths.kept} rows ({lengths.truncated} truncated, {lengths.dropped} dropped)")
    else:  # eval / generate: no on_too_long, a longer row is always cut
        lines.append(f"  longer rows    {lengths.action(item.kind, report.format)}")
    for number, position in enumerate(_example_positions(fitted, encodings, examples), 1):
        index = fitted.indices[position]
        label = dataset[index]["label"] if item.kind == "unpaired" else None
        lines += [""] + _render(number, index, encodings[index], fitted.encodings[position], tokenizer, item.kind,
                                label)  # fmt: skip
    return lines


def _reader(item: Source, tokenizer):
    """A RewardReader for eval.preferences when the reward model has a rendering.json, else None."""
    if item.rendering is None:
        return None
    from rlhf_cli.rendering import RewardReader

    if item.rendering.conversational and item.rendering.chat_template:
        tokenizer.chat_template = item.rendering.chat_template
    return RewardReader(item.rendering, tokenizer, item.max_length, tokenizer.pad_token_id)


def _template_used(tokenizer, reader) -> str:
    from rlhf_cli.models import describe_chat_template

    if reader is not None:
        return f"as the reward model was trained: {reader.rendering.describe(cut=False)}"
    return f"rendered through {describe_chat_template(tokenizer.chat_template)}"


def _style(dataset) -> str:
    first = dataset[0]
    return "messages (chat template)" if any(isinstance(v, list) for v in first.values()) else "plain text"


def _mapping(columns: dict[str, str]) -> str:
    parts = [name if source == name else f"{name} <- {source}" for name, source in columns.items()]
    return ", ".join(parts) or "(none)"


def _example_positions(fitted, encodings, count: int) -> list[int]:
    """Row 1, then the first row the rule changed (to show the cut), then the next rows."""
    if count <= 0 or not fitted.indices:
        return []
    changed = [p for p, index in enumerate(fitted.indices) if fitted.encodings[p].length < encodings[index].length]
    chosen = [0]
    if changed and changed[0] != 0:
        chosen.append(changed[0])
    position = 1
    while len(chosen) < count and position < len(fitted.indices):
        if position not in chosen:
            chosen.append(position)
        position += 1
    return sorted(chosen[:count])


def _render(number: int, index: int, before, after, tokenizer, kind: str, label: bool | None = None) -> list[str]:
    cut = f", cut from {before.length} to {after.length} tokens" if after.length < before.length else ""
    lines = [f"  example {number}: row {index + 1}{cut}, as the model reads it"]
    names = {"preference": ["chosen", "rejected"], "sft": ["sequence"], "prompt": ["prompt"],
             "unpaired": ["desirable" if label else "undesirable"]}[kind]  # fmt: skip
    for name, ids in zip(names, after.sequences):
        if after.boundary is None or kind == "prompt":
            parts = f"{len(ids)} tokens"
        else:
            response = "completion" if kind == "sft" else "response"
            parts = f"{len(ids)} tokens: prompt {after.boundary} + {response} {len(ids) - after.boundary}"
        lines.append(f"    {name} ({parts}):")
        text = tokenizer.decode(ids, skip_special_tokens=False)
        lines += [f"      {line}" for line in text.splitlines() or [""]]
    return lines


# ---------------------------------------------------------------- entry points


def inspect_recipe(recipe: Recipe, stage: str, *, examples: int = 2) -> list[str]:
    """Every line `rlhf data inspect` prints for `recipe` run as `stage`."""
    trainer = STAGE_TRAINERS.get(stage, f"rlhf {stage}")
    if stage == "ppo" and recipe.ppo is not None and recipe.ppo.algorithm != "ppo":
        trainer = f"TRL {recipe.ppo.algorithm.upper()}Trainer"
    if stage == "dpo" and recipe.dpo is not None:
        trainer = DPO_TRAINERS.get(recipe.dpo.algorithm, trainer)
    lines = [f"{stage} recipe, read as {trainer} reads it (tokenizers only, no model weights)"]
    tokenizers: dict = {}
    for item in sources_of(recipe, stage):
        lines += [""] + source_lines(item, examples=examples, tokenizers=tokenizers)
    return lines


def dry_run_lines(stage: str, recipe: Recipe) -> list[str]:
    """The data lines of a dry run (no examples). Local data only; when the data or the tokenizer cannot be read
    without a download or an earlier stage's output, one line says so and the dry run goes on."""
    from pathlib import Path

    lines = []
    model = recipe.model.name_or_path if recipe.model is not None else ""
    for item in sources_of(recipe, stage):
        if Path(model).is_absolute() and not Path(model).exists():
            lines.append(f"{item.what}: not checked in this dry run: the model {model} (whose tokenizer reads it) "
                         "does not exist yet")  # fmt: skip
            continue
        if item.source.path is None:
            lines.append(f"{item.what}: hub dataset {item.source.name!r}, not read in a dry run "
                         "(`rlhf data inspect` reads it)")  # fmt: skip
            continue
        try:
            lines += source_lines(item, examples=0)
        except UserError as exc:
            lines.append(f"{item.what}: not checked in this dry run: {exc}")
    return lines
