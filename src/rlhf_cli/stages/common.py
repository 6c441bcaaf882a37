"""What every TRL-backed stage shares: recipe -> TRL config -> dry-run / accelerate launch / in-process training.

A stage is a few facts (which data, which model head, which TRL trainer); `run_stage` does the rest, in this order:
validate, plan the launch, check the run directory, load and check the data, then load the model and train. Files
are written only after every input has been checked, so a bad input leaves nothing behind.
"""

from __future__ import annotations

import math
import os
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from rich.markup import escape

from rlhf_cli.console import make_console, print_yaml
from rlhf_cli.errors import UserError
from rlhf_cli.guard import DIVERGED_EXIT_CODE, divergence_message, install_trainer_guard
from rlhf_cli.interrupts import INTERRUPTED_EXIT_CODE
from rlhf_cli.launch import DEEPSPEED_CONFIG, RESOLVED_RECIPE, WORKER_INPUT_ERROR, Hardware, LaunchPlan, plan_launch
from rlhf_cli.preflight import check_hardware
from rlhf_cli.recipe import Recipe, recipe_to_yaml
from rlhf_cli.rundir import (
    RunDirectory,
    checkpoint_marker_callback,
    interrupt_callback,
    last_checkpoint,
    metrics_callback,
    print_summary,
    write_summary,
)



@dataclass(frozen=True)
class Default:
    """A `training:` key a stage sets when the recipe does not, and why (shown by `rlhf recipe show --defaults`)."""

    value: Any
    why: str
    lora: Any = None  # the value with model.lora, where it differs


@dataclass(frozen=True)
class TrainerInputs:
    """What a stage's `trainer_kwargs` may build more trainer arguments from (a reference model, a reward)."""

    recipe: Recipe
    model: Any  # the policy as loaded (before TRL wraps it)
    model_path: str
    tokenizer: Any
    config: Any  # the TRL config (its deepspeed plugin says whether ZeRO-3 shards the weights)


@dataclass(frozen=True)
class Stage:
    name: str  # the worker's argument
    title: str
    data_kind: Literal["sft", "preference", "prompt", "unpaired"]
    model_kind: Literal["causal_lm", "reward"]
    config_class: str  # in trl (see TRL_MODULES for those that live elsewhere)
    trainer_class: str  # in trl, or "module:Class" for a subclass of one
    recipe_stage: str = ""  # the recipe's `stage:` (default: name)
    length_key: str | None = "max_length"  # the TRL config key that data.max_length sets
    trainer_kwargs: Callable[[TrainerInputs], dict] | None = None  # more arguments for the TRL trainer
    split_prompt: bool = False  # preference pairs as prompt_ids + response ids (DPO-style trainers)
    # `training:` keys decided from the training rows as kept (KTO's class weights): (keys, the line that says so);
    # keys the recipe sets win.
    data_defaults: Callable[[Recipe, Any], tuple[dict, str | None]] | None = None
    # Lines for the summary's "warnings" from the trainer's log history (DPO: likelihood displacement).
    summary_warnings: Callable[[Recipe, list[dict]], list[str]] | None = None
    # Held out of data.train as evaluation data when the recipe gives none (data.eval / data.eval_split); see
    # `holdout_plan` for the sizes. None: no default hold-out.
    default_eval_split: float | None = None
    # `training:` keys this stage sets where the recipe does not (TRL's own default otherwise).
    training_defaults: dict[str, Default] = field(default_factory=dict, hash=False, compare=False)
    sized_cadence: bool = False  # checkpoint, evaluation and log cadence sized to the run (CADENCE), where not set
    # `training:` keys other recipe sections decide (GRPO/RLOO: the `generation:` backend as TRL's vLLM and cache keys).
    section_config: Callable[[Recipe], dict] | None = None

    @property
    def stage_key(self) -> str:
        return self.recipe_stage or self.name


# Config and trainer classes outside `trl`'s top level.
TRL_MODULES = {"ORPOConfig": "trl.experimental.orpo", "CPOConfig": "trl.experimental.cpo"}


def trl_class(name: str):
    """A TRL class by name (`TRL_MODULES` says where those outside trl's top level live), or "module:Class"."""
    import importlib

    module, _, attribute = name.rpartition(":") if ":" in name else (TRL_MODULES.get(name, "trl"), "", name)
    return getattr(importlib.import_module(module), attribute)


# The cadence of sized stages (sft, rm) where `training:` does not set it: a run of any length saves about
# CHECKPOINTS_PER_RUN checkpoints and keeps SAVE_TOTAL_LIMIT of them, evaluates with every checkpoint (and at the
# end), and logs at least LOGS_PER_RUN times. TRL's defaults (a checkpoint every 500 steps, all kept, no
# evaluation, a log every 10 steps) leave a short run with no log line and a long one with a disk full of
# checkpoints.
CHECKPOINTS_PER_RUN = 4
SAVE_TOTAL_LIMIT = 2
LOGS_PER_RUN = 10
CADENCE = {  # key -> (default in words, why), for `rlhf recipe show --defaults`
    "save_steps": (f"1/{CHECKPOINTS_PER_RUN} of the run's optimizer steps",
                   f"about {CHECKPOINTS_PER_RUN} checkpoints per run whatever its length (rows x epochs / (batch x "
                   "accumulation x processes), or max_steps); TRL's default is every 500 steps"),
    "save_total_limit": (str(SAVE_TOTAL_LIMIT), f"only the newest {SAVE_TOTAL_LIMIT} checkpoints are kept, enough to "
                         "--resume; TRL keeps every one"),
    "eval_strategy": ("steps, when there is evaluation data", "the evaluation data (data.eval, data.eval_split or "
                      "the stage's default hold-out) is evaluated with every checkpoint and at the end; TRL's "
                      "default is never"),
    "eval_steps": ("save_steps", "evaluate when a checkpoint is saved; TRL's default is logging_steps"),
    "logging_steps": (f"10, or 1/{LOGS_PER_RUN} of the run's optimizer steps when fewer",
                      f"a short run logs at least {LOGS_PER_RUN} times; TRL's default is 10"),
}  # fmt: skip


def resolve_run_dir(recipe: Recipe, output_dir: str | None) -> Path:
    chosen = output_dir or recipe.output_dir
    if not chosen:
        raise UserError("No output directory: set `output_dir` in the recipe or pass --output-dir.")
    return Path(chosen).expanduser().resolve()


def trainer_config_kwargs(stage: Stage, recipe: Recipe, run_dir: Path, plan: LaunchPlan,
                          data: StageData | None = None) -> dict:  # fmt: skip
    """Keyword arguments for the TRL config: the recipe's `training:` plus what other sections decide, plus the
    stage's defaults for keys `training:` does not set (`resolved_defaults`; `data` sizes the cadence)."""
    kwargs = dict(recipe.training)
    kwargs.update(
        output_dir=str(run_dir),
        seed=recipe.seed,
        report_to=recipe.report_to,
        disable_tqdm=True,  # rich progress instead
        **plan.precision,
    )
    if stage.length_key:
        kwargs[stage.length_key] = recipe.data.max_length
    if plan.deepspeed_config is not None:
        kwargs["deepspeed"] = str(run_dir / DEEPSPEED_CONFIG)
    if stage.section_config is not None:
        kwargs.update(stage.section_config(recipe))
    kwargs.update(resolved_defaults(stage, recipe, plan, data))
    # Keep a NaN loss in the logged sum (the filter would log the running mean instead) so the guard sees it.
    kwargs.setdefault("logging_nan_inf_filter", False)
    return kwargs


def _table_defaults(stage: Stage, recipe: Recipe) -> dict:
    lora = recipe.model is not None and recipe.model.lora is not None
    return {key: default.lora if lora and default.lora is not None else default.value
            for key, default in stage.training_defaults.items()}  # fmt: skip


def planned_steps(stage: Stage, recipe: Recipe, plan: LaunchPlan, data: StageData | None) -> int | None:
    """Optimizer steps the run will take, as transformers counts them: max_steps, or epochs x ceil(batches /
    accumulation) with ceil(rows / (batch x processes)) batches per epoch (rows: data.train after the loader and
    the hold-out; SFT packing makes fewer). None without `data`."""
    if data is None:
        return None
    from rlhf_cli.trl_fields import config_default

    settings = {**_table_defaults(stage, recipe), **recipe.training}

    def setting(key: str, fallback):
        value = settings[key] if key in settings else config_default(stage.config_class, key)
        return fallback if value is None else value

    max_steps = setting("max_steps", -1)
    if max_steps > 0:
        return int(max_steps)
    batches = math.ceil(len(data.train) / (setting("per_device_train_batch_size", 8) * plan.num_processes))
    per_epoch = max(1, math.ceil(batches / setting("gradient_accumulation_steps", 1)))
    return max(1, math.ceil(setting("num_train_epochs", 3) * per_epoch))


def resolved_defaults(stage: Stage, recipe: Recipe, plan: LaunchPlan, data: StageData | None = None) -> dict:
    """The `training:` keys rlhf-cli sets for this run because the recipe does not: the stage's table
    (`Stage.training_defaults`) and, for sft/rm, the cadence (CADENCE) sized to `planned_steps`. An explicit
    `training:` key always wins. Without `data` (a dry run that cannot read hub data) the step counts are left out."""
    from rlhf_cli.trl_fields import config_default

    training = recipe.training
    out = _table_defaults(stage, recipe)
    has_eval = data.eval is not None if data is not None else recipe.data.eval is not None
    if not stage.sized_cadence:
        if has_eval:
            out["eval_strategy"] = "epoch"  # given eval data, evaluate it (TRL's default is never)
        return {key: value for key, value in out.items() if key not in training}
    out["save_total_limit"] = SAVE_TOTAL_LIMIT
    total = planned_steps(stage, recipe, plan, data)
    if total is not None:
        out["logging_steps"] = max(1, min(config_default(stage.config_class, "logging_steps") or 10,
                                          total // LOGS_PER_RUN))  # fmt: skip
        if training.get("save_strategy", "steps") == "steps":
            out["save_steps"] = max(1, total // CHECKPOINTS_PER_RUN)
    if has_eval:
        if training.get("save_strategy") == "epoch":
            out["eval_strategy"] = "epoch"
        else:
            out["eval_strategy"] = "steps"  # transformers also evaluates after the last step
            save_steps = training.get("save_steps", out.get("save_steps"))
            if save_steps is not None:
                out["eval_steps"] = save_steps
    return {key: value for key, value in out.items() if key not in training}


def stage_default_rows() -> list[tuple[str, str, str]]:
    """(key, default, meaning) rows for `rlhf recipe show --defaults`: what each stage sets where the recipe does
    not, and why."""
    from rlhf_cli.data import HOLDOUT_MAX_ROWS, HOLDOUT_MIN_DATA, HOLDOUT_MIN_ROWS
    from rlhf_cli.stages import STAGES
    from rlhf_cli.trl_fields import config_default

    rows, split_for = [], set()
    for stage in STAGES.values():
        # dpo's orpo / simpo share its recipe stage: one hold-out row, their own training defaults
        label = stage.stage_key if stage.name == stage.stage_key else f"{stage.stage_key}, algorithm {stage.name}"
        if stage.default_eval_split and stage.stage_key not in split_for:
            split_for.add(stage.stage_key)
            rows.append((f"data.eval_split ({stage.stage_key})", f"{stage.default_eval_split:g}",
                         f"Set by rlhf-cli when the recipe has no data.eval and no data.eval_split: "
                         f"{stage.default_eval_split:.0%} of data.train (at least {HOLDOUT_MIN_ROWS}, at most "
                         f"{HOLDOUT_MAX_ROWS} rows; none below {HOLDOUT_MIN_DATA} rows) is held out and evaluated "
                         "for held-out metrics (train-rm and dpo: the held-out accuracy). 0 turns it off."))  # fmt: skip
        for key, default in stage.training_defaults.items():
            shown = _shown(default.value) + (f" (LoRA: {_shown(default.lora)})" if default.lora is not None else "")
            trl = _shown(config_default(stage.config_class, key))
            rows.append((f"training.{key} ({label})", shown,
                         f"Set by rlhf-cli when training: does not set it; TRL's default is {trl}. {default.why}"))
    sized = ", ".join(dict.fromkeys(stage.stage_key for stage in STAGES.values() if stage.sized_cadence))
    for key, (shown, why) in CADENCE.items():
        rows.append((f"training.{key} ({sized})", shown, f"Set by rlhf-cli when training: does not set it: {why}."))
    return rows


def _shown(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def show_dry_run(stage: Stage, plan: LaunchPlan, config_kwargs: dict, recipe: Recipe | None = None,
                 data_lines: list[str] | None = None) -> None:  # fmt: skip
    """The TRL config keys, the defaults rlhf-cli chose among them, the data lines and the launch."""
    from rlhf_cli.console import make_console

    console = make_console()
    console.print(f"[bold]{stage.title}[/] — trl.{stage.config_class} (keys set by the recipe and the CLI):")
    print_yaml(console, yaml.safe_dump(config_kwargs, sort_keys=True))
    if recipe is not None:  # format, columns, counts and lengths of the data (tokenizer only, no weights)
        from rlhf_cli.inspect_data import dry_run_lines

        console.print("[bold]Data:[/]")
        print("\n".join(dry_run_lines(stage.stage_key, recipe) + (data_lines or [])), flush=True)
    show_launch(plan)


def dry_run_data(stage: Stage, recipe: Recipe, plan: LaunchPlan) -> tuple[StageData | None, list[str]]:
    """A dry run's look at the data, for the hold-out and the sized defaults: local data is loaded quietly (hub data
    is not downloaded); returns the data (None when not read) and lines saying what rlhf-cli decided from it."""
    sources = [recipe.data.train, recipe.data.eval]
    data, lines = None, []
    not_yet = [source.path for source in sources if source is not None and source.path and not Path(source.path).exists()]
    if any(source is not None and source.path is None for source in sources):
        lines.append("step counts: hub data is not read in a dry run, so the run sizes save_steps, eval_steps and "
                     "logging_steps from the rows it reads")  # fmt: skip
    elif not_yet:  # a pipeline's earlier stage writes it (a round's accumulated pairs)
        lines.append(f"hold-out and step counts: not checked in this dry run: {not_yet[0]} does not exist yet")
    else:
        try:
            data = load_stage_data(stage, recipe, notes=False)
        except UserError as exc:
            lines.append(f"hold-out and step counts: not checked in this dry run: {exc}")
    if data is not None and data.note:
        lines.append(f"hold-out: {data.note}")
    if data is not None and stage.data_defaults is not None:  # KTO's class weights, as the run will decide them
        try:
            _, decided = stage.data_defaults(recipe, data.train)
        except UserError as exc:
            decided = f"the run will stop: {exc}"
        if decided:
            lines.append(f"from the training rows (before data.on_too_long): {decided}")
    chosen = resolved_defaults(stage, recipe, plan, data)
    if chosen:
        shown = ", ".join(f"{key} {value}" for key, value in chosen.items())
        total = planned_steps(stage, recipe, plan, data)
        steps = f" ({total} optimizer steps over {len(data.train)} training rows)" if total is not None else ""
        lines.append(f"defaults set by rlhf-cli (not in training:){steps}: {shown}; `rlhf recipe show --defaults` "
                     "says why")  # fmt: skip
    return data, lines


def show_launch(plan: LaunchPlan) -> None:
    """The launch part of a dry run: how it would start, with the accelerate and DeepSpeed files."""
    from rlhf_cli.console import make_console

    console = make_console()
    if plan.distributed:
        console.print(f"[bold]Launch:[/] accelerate launch, {plan.num_processes} processes")
        console.print("[bold]accelerate_config.yaml:[/]")
        print_yaml(console, yaml.safe_dump(plan.accelerate_config, sort_keys=False))
        if plan.deepspeed_config is not None:
            console.print("[bold]deepspeed.json:[/]")
            print_yaml(console, yaml.safe_dump(plan.deepspeed_config, sort_keys=False))
    else:
        console.print("[bold]Launch:[/] in this process")
    console.print("[bold]Command:[/]")
    console.print(plan.command_line(), markup=False, highlight=False, soft_wrap=True)
    console.print("[dim]Dry run: nothing was started or written.[/]")


def quiet_hf_progress_bars() -> None:
    """datasets/transformers print a tqdm bar per map and per weight file; the run shows one rich bar instead."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


@dataclass
class StageData:
    """What a TRL-backed stage trains and evaluates on, and what loading it did (for the summary's counts)."""

    train: Any  # datasets.Dataset in TRL's format
    eval: Any | None
    reports: dict[str, Any]  # the loader's DataReport of "train" and (with data.eval) "eval"
    held_out: int = 0  # rows of data.train held out as the evaluation data (data.eval_split or the default)
    loaded: Any | None = None  # with a hold-out: data.train as loaded, before it (whose row numbers errors give)
    eval_from: str | None = None  # where the evaluation data comes from, in words; None: there is none
    note: str | None = None  # the one line said about the hold-out


def holdout_plan(stage: Stage, recipe: Recipe, rows: int) -> tuple[int, str | None, str | None]:
    """(rows of data.train to hold out, where that evaluation data comes from in words, the note line) for a
    recipe without data.eval: data.eval_split when given (0: none), else the stage's default_eval_split
    (`data.default_holdout_size`) unless training.eval_strategy is no. A UserError when the split is impossible."""
    from rlhf_cli.data import HOLDOUT_MAX_ROWS, HOLDOUT_MIN_DATA, HOLDOUT_MIN_ROWS, default_holdout_size
    from rlhf_cli.data import eval_split_size

    split, seed = recipe.data.eval_split, recipe.seed
    if split is not None:
        if split == 0:
            return 0, None, None
        size = eval_split_size(rows, split)
        return (size, f"data.eval_split: {size} of {rows} rows of data.train, seed {seed}",
                f"data.eval_split: {size} of {rows} rows of data.train held out as evaluation data (picked by "
                f"seed {seed}).")  # fmt: skip
    strategy = recipe.training.get("eval_strategy")
    if stage.default_eval_split is None or strategy == "no":
        return 0, None, None
    size = default_holdout_size(rows, stage.default_eval_split)
    if not size:
        if strategy is not None:
            raise UserError(f"training.eval_strategy is {strategy!r}, but there is no evaluation data: data.train has "
                            f"{rows} rows, fewer than the {HOLDOUT_MIN_DATA} the default hold-out needs. Set "
                            "data.eval_split (e.g. 0.2) or data.eval, or remove eval_strategy.")  # fmt: skip
        return (0, None, f"no held-out evaluation: data.train has {rows} rows, fewer than the {HOLDOUT_MIN_DATA} the "
                "default hold-out needs; set data.eval_split or data.eval to evaluate anyway.")  # fmt: skip
    share = f"{stage.default_eval_split:.0%}, at least {HOLDOUT_MIN_ROWS}, at most {HOLDOUT_MAX_ROWS}"
    return (size, f"default hold-out: {size} of {rows} rows of data.train, seed {seed}",
            f"{size} of {rows} rows of data.train held out as evaluation data ({share}; picked by seed {seed}) for "
            "held-out metrics; data.eval_split: 0 trains on every row, data.eval names other evaluation "
            "data.")  # fmt: skip


def load_stage_data(stage: Stage, recipe: Recipe, *, notes: bool = True) -> StageData:
    """Load data.train and data.eval (or hold part of data.train out, `holdout_plan`), printing the loader's
    notices and the hold-out note on stderr unless `notes` is False."""
    from rlhf_cli.data import _print_notices, load_data_with_report, split_dataset

    quiet_hf_progress_bars()
    show = _print_notices if notes else (lambda lines: None)
    spec = recipe.data
    train, report = load_data_with_report(spec.train, stage.data_kind, what="data.train")
    show(report.notices())
    data = StageData(train, None, {"train": report})
    if spec.eval is not None:
        data.eval, data.reports["eval"] = load_data_with_report(spec.eval, stage.data_kind, what="data.eval")
        show(data.reports["eval"].notices())
        data.eval_from = "data.eval"
        return data
    data.held_out, data.eval_from, data.note = holdout_plan(stage, recipe, len(train))
    if data.held_out:
        data.loaded = train
        data.train, data.eval = split_dataset(train, data.held_out, recipe.seed)
    if data.note and os.environ.get("RANK", "0") == "0":
        show([f"Note: {data.note}"])
    return data


def run_stage(
    stage: Stage,
    recipe: Recipe,
    *,
    output_dir: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    dry_run: bool = False,
    cli_argv: list[str] | None = None,
) -> int:
    """Run one stage from a validated recipe; returns the process exit code."""
    run_dir = resolve_run_dir(recipe, output_dir)
    recipe = recipe.model_copy(update={"output_dir": str(run_dir)})  # recipe.yaml records where the run went
    hardware = Hardware.detect()
    note = check_hardware(recipe, hardware, planning=dry_run)
    if note:
        make_console(stderr=True).print(f"[yellow]Note:[/] {escape(note)}", highlight=False)
    plan = plan_launch(recipe, stage.name, stage.config_class, run_dir, hardware, resume=resume,
                       cli_argv=cli_argv)  # fmt: skip
    if plan.precision.get("use_cpu") and (recipe.training.get("bf16") or recipe.training.get("fp16")):
        make_console(stderr=True).print("[yellow]Note:[/] no GPU here, so training runs in float32 (bf16/fp16 ignored).")
    if dry_run:
        data, lines = dry_run_data(stage, recipe, plan)
        show_dry_run(stage, plan, trainer_config_kwargs(stage, recipe, run_dir, plan, data), recipe, lines)
        if recipe.ensemble is not None:
            make_console(stderr=True).print(f"Ensemble: {recipe.ensemble.members} members trained one after another "
                                            f"into {run_dir}/member-k/, seeds {recipe.seed}..."
                                            f"{recipe.seed + recipe.ensemble.members - 1}.", highlight=False)
        return 0
    if recipe.ensemble is not None:  # train-rm with `ensemble:`: K members, one after another (stages/reward.py)
        from rlhf_cli.stages.reward import run_ensemble

        return run_ensemble(stage, recipe, run_dir, plan, overwrite=overwrite, resume=resume)
    with RunDirectory(run_dir, overwrite=overwrite, resume=resume) as run:
        data = load_stage_data(stage, recipe)
        if plan.distributed:
            return run.finish(launch_distributed(recipe, plan, run))
        config_kwargs = trainer_config_kwargs(stage, recipe, run_dir, plan, data)
        return run.finish(train(stage, recipe, run_dir, config_kwargs, data, resume=resume, run=run))


def write_resolved_recipe(run: RunDirectory, recipe: Recipe) -> None:
    """The run directory's first files: the marker (via create) and the recipe as resolved."""
    run.create()
    (run.path / RESOLVED_RECIPE).write_text(recipe_to_yaml(recipe), encoding="utf-8")


def launch_distributed(recipe: Recipe, plan: LaunchPlan, run: RunDirectory) -> int:
    """Write the launch files and run the stage under `accelerate launch`; this process holds the run's lock."""
    import signal

    from rlhf_cli.console import make_console

    # A new run may still hold a builtin model to build: do it once here, not in every process.
    if recipe.model.is_builtin:
        from rlhf_cli.models import resolve_model_path

        resolve_model_path(recipe.model, recipe.seed)
    run_dir = run.path
    write_resolved_recipe(run, recipe)
    plan.write(run_dir)
    make_console(stderr=True).print(f"[bold]Launching[/] {plan.num_processes} process(es): {plan.command_line()}",
                               markup=True, highlight=False, soft_wrap=True)  # fmt: skip
    process = subprocess.Popen(plan.command)
    interrupted = False
    while True:
        try:
            returncode = process.wait()
            break
        except KeyboardInterrupt:
            # A terminal Ctrl-C reached the workers too; a SIGTERM (a scheduler, `kill`) reached only this process:
            # pass it on. Either way wait while they save a checkpoint and exit.
            from rlhf_cli.interrupts import last_signal

            if last_signal() == signal.SIGTERM and not interrupted:
                process.send_signal(signal.SIGTERM)
            interrupted = True
    if interrupted:
        returncode = INTERRUPTED_EXIT_CODE
    marker = run_dir / WORKER_INPUT_ERROR
    if returncode != 0 and marker.is_file():
        marker.unlink()
        returncode = 2  # a bad input, already explained by the worker: the same code as in-process runs
    return returncode


def train(
    stage: Stage,
    recipe: Recipe,
    run_dir: Path,
    config_kwargs: dict,
    data: StageData,
    *,
    resume: bool,
    run: RunDirectory | None,
) -> int:
    """Train in this process; `run` is None in a worker under accelerate (the parent made and holds the directory)."""
    from trl.data_utils import is_conversational

    from rlhf_cli.lengths import fit_stage_data
    from rlhf_cli.models import load_model, load_tokenizer, lora_config, resolve_model_path

    started = time.time()
    train_data, eval_data = data.train, data.eval
    model_path = resolve_model_path(recipe.model, recipe.seed)
    tokenizer = load_tokenizer(recipe.model, model_path, conversational=is_conversational(train_data[0]))
    checks_rows = stage.split_prompt or stage.data_kind == "unpaired"  # rows without a prompt are refused by number
    if data.loaded is not None and (recipe.data.on_too_long == "error" or checks_rows) and stage.length_key:
        # Check data.train whole first, so that the error counts its rows and names the row as loaded.
        fit_stage_data(stage, recipe, tokenizer, data.loaded, None)
    # Long examples are cut, dropped or refused here, tokenized as TRL would: TRL itself then removes nothing.
    train_data, eval_data, length_reports = fit_stage_data(stage, recipe, tokenizer, train_data, eval_data)
    # The TRL config comes before the model: under ZeRO-3 it arms zero.Init so weights load already sharded.
    decided_note = None
    if stage.data_defaults is not None:
        decided, decided_note = stage.data_defaults(recipe, train_data)
        config_kwargs = {**config_kwargs, **{key: value for key, value in decided.items() if key not in recipe.training}}
        if decided_note and os.environ.get("RANK", "0") == "0":
            make_console(stderr=True).print(f"[yellow]Note:[/] {escape(decided_note)}", highlight=False)
    try:
        config = trl_class(stage.config_class)(**config_kwargs)
    except (ValueError, TypeError) as exc:
        raise UserError(f"TRL rejected the training settings: {exc}") from None
    _ = config.world_size  # sets up the process group now, so zero.Init below shards over all ranks
    if config.deepspeed:
        import deepspeed

        deepspeed.init_distributed()  # DeepSpeed's own view of that group, which zero.Init reads its world size from
    model = load_model(recipe.model, model_path, stage.model_kind, tokenizer)
    metrics, interrupt = metrics_callback(run_dir), interrupt_callback()
    extra = stage.trainer_kwargs(TrainerInputs(recipe, model, model_path, tokenizer, config)) if stage.trainer_kwargs else {}
    try:
        trainer = trl_class(stage.trainer_class)(
            model=model,
            args=config,
            train_dataset=train_data,
            eval_dataset=eval_data,
            processing_class=tokenizer,
            peft_config=lora_config(recipe.model, stage.model_kind),
            callbacks=[metrics, interrupt, checkpoint_marker_callback()],
            **extra,
        )
    except ValueError as exc:  # TRL checks combinations of settings when the trainer is built
        raise UserError(f"TRL rejected the training settings: {exc}") from None
    _use_rich_progress(trainer)
    guard = install_trainer_guard(trainer, loss_spike=recipe.divergence.loss_spike,
                                  spike_window=recipe.divergence.spike_window)  # fmt: skip
    rows = stage_row_counts(trainer, data, length_reports)  # checks that the trainer holds every kept row

    # Every input is good: from here on the run directory is written.
    if run is not None:
        write_resolved_recipe(run, recipe)
    checkpoint = str(last_checkpoint(run_dir, warn=trainer.is_world_process_zero())) if resume else None
    with interrupt.installed(), disk_errors_explained(run_dir):
        result = trainer.train(resume_from_checkpoint=checkpoint)

    main_process = trainer.is_world_process_zero()
    if "divergence" in guard:
        if main_process:
            message = divergence_message(guard["divergence"], last_checkpoint(run_dir))
            write_summary(run_dir, {**_summary(stage, recipe, run_dir, trainer, result, rows, time.time() - started,
                                               data), "status": "diverged", "message": message})  # fmt: skip
            _print_error(message)
        return DIVERGED_EXIT_CODE
    if interrupt.requested:
        if main_process:
            saved = last_checkpoint(run_dir)
            print(f"Interrupted: checkpoint saved in {saved}. Continue with the same command and --resume.")
        return INTERRUPTED_EXIT_CODE

    with disk_errors_explained(run_dir):
        save_final_model(trainer, recipe, run_dir)
        if stage.model_kind == "reward" and main_process:  # rendering.json: how pairs became tokens, for its scorers
            from rlhf_cli.rendering import write_rendering

            write_rendering(run_dir, recipe, trainer.processing_class, data.train[0], data.reports["train"].format)
    if main_process:
        summary = _summary(stage, recipe, run_dir, trainer, result, rows, time.time() - started, data)
        if decided_note:
            summary["set from the data"] = decided_note
        warnings = stage.summary_warnings(recipe, trainer.state.log_history) if stage.summary_warnings else []
        if warnings:
            summary["warnings"] = warnings
        write_summary(run_dir, summary)
        print_summary(f"{stage.title}: done", {key: value for key, value in summary.items() if key != "warnings"})
        for line in warnings:
            make_console(stderr=True).print(f"[yellow]Warning:[/] {escape(line)}", highlight=False)
    return 0


def save_final_model(trainer, recipe: Recipe, run_dir: Path) -> None:
    """Model and tokenizer into the run directory; with LoRA the adapter, merged weights when asked."""
    lora = recipe.model.lora
    if lora is not None and lora.merge:
        trainer.save_model(str(run_dir / "adapter"))
        if trainer.is_world_process_zero():
            merged = trainer.model.merge_and_unload()
            merged.save_pretrained(run_dir)
            trainer.processing_class.save_pretrained(run_dir)
        return
    trainer.save_model(str(run_dir))


def stage_row_counts(trainer, data: StageData, length_reports: dict) -> dict[str, int]:
    """The summary's row counts, in the order things happened: rows read from the source, the loader's drops by
    reason, the rows held out for evaluation, then what `data.on_too_long` kept, truncated and dropped; the same
    for data.eval with `eval ` in front. Checks that the trainer holds every kept row (`lengths.row_counts`)."""
    from rlhf_cli.lengths import row_counts

    row_counts(trainer, length_reports, len(data.train))  # raises when TRL lost a row it was handed

    def loader(report, prefix: str = "") -> dict[str, int]:
        dropped = {f"{prefix}dropped by the loader: {reason}": count for reason, count in report.dropped.items()}
        return {f"{prefix}rows read": report.rows_read, **dropped}

    def lengths(report, prefix: str = "") -> dict[str, int]:
        return {f"{prefix}rows kept": report.kept, f"{prefix}rows truncated": report.truncated,
                f"{prefix}rows dropped as too long": report.dropped}  # fmt: skip

    counts = loader(data.reports["train"])
    if data.held_out:
        counts["rows held out for evaluation"] = data.held_out
    counts.update(lengths(length_reports["train"]) if "train" in length_reports
                  else {"rows kept": len(trainer.train_dataset)})  # fmt: skip
    if "eval" in data.reports:
        counts.update(loader(data.reports["eval"], "eval "))
    if "eval" in length_reports:
        counts.update(lengths(length_reports["eval"], "eval "))
    elif data.eval is not None:
        counts["eval rows kept"] = len(data.eval)
    return counts


# Metrics TRL logs for training batches (the summary's "train ... (last log window)") and for the evaluation data
# (with eval_ in front; the summary's "held-out ..."), and their names in the summary.
LOGGED_METRICS = {"loss": "loss", "accuracy": "accuracy", "margin": "margin",
                  "mean_token_accuracy": "mean token accuracy",
                  # DPO and its relatives, KTO (docs/dpo.md says how to read them)
                  "rewards/accuracies": "rewards/accuracies", "rewards/margins": "rewards/margins",
                  "rewards/chosen": "rewards/chosen", "rewards/rejected": "rewards/rejected",
                  "logps/chosen": "logps/chosen", "logps/rejected": "logps/rejected", "kl": "kl"}  # fmt: skip


def _summary(stage, recipe, run_dir, trainer, result, rows, seconds, data: StageData | None = None) -> dict:
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    last = history[-1] if history else {}
    summary = {
        "stage": stage.name,
        "model": recipe.model.name_or_path,
        **rows,  # rows read, the loader's drops, held out, kept, truncated, dropped as too long
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 3),
        "mean train loss": result.training_loss,
    }
    # The training batches of the last logging window only: not a measure of generalisation.
    for key, name in LOGGED_METRICS.items():
        if key in last:
            summary[f"train {name} (last log window)"] = last[key]
    evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    if evals:
        summary["held-out data"] = data.eval_from if data is not None else None
        summary["held-out rows"] = len(trainer.eval_dataset) if trainer.eval_dataset is not None else None
        for key, name in LOGGED_METRICS.items():
            if f"eval_{key}" in evals[-1]:
                summary[f"held-out {name}"] = evals[-1][f"eval_{key}"]
    summary["train samples/s"] = result.metrics.get("train_samples_per_second")
    summary["wall time (s)"] = round(seconds, 1)
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]  # GRPO / RLOO
    if rewards:
        window = max(1, len(rewards) // 5)
        summary["reward (first steps)"] = sum(rewards[:window]) / window
        summary["reward (last steps)"] = sum(rewards[-window:]) / window
    summary["output"] = str(run_dir)
    return {key: value for key, value in summary.items() if value is not None}


def _use_rich_progress(trainer) -> None:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl.trainer.callbacks import RichProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(RichProgressCallback())


def _print_error(message: str) -> None:
    from rlhf_cli.console import make_console
    from rich.markup import escape

    make_console(stderr=True, soft_wrap=True).print(f"[bold red]Error:[/] {escape(message)}", highlight=False)


@contextmanager
def disk_errors_explained(run_dir: Path):
    """A full disk or an unwritable directory while saving becomes one paragraph (exit 2), and the checkpoint it
    cut short is removed, so --resume continues from the last complete one."""
    try:
        yield
    except Exception as exc:
        reason = _storage_problem(exc)
        if reason is None:
            raise
        import shutil

        from rlhf_cli.rundir import checkpoint_is_complete

        for partial in run_dir.glob("checkpoint-*"):
            if partial.is_dir() and not checkpoint_is_complete(partial):
                shutil.rmtree(partial, ignore_errors=True)
        kept = last_checkpoint(run_dir)
        resume = f" --resume continues from {kept.name}, the last complete checkpoint." if kept else ""
        raise UserError(f"Could not write to {run_dir}: {reason}. Free space (or fix the permissions) and run the "
                        f"same command again.{resume}") from None  # fmt: skip


def _storage_problem(exc: BaseException) -> str | None:
    """'no space left on device' and the like, from an OSError or a safetensors error; None for anything else."""
    import errno

    codes = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
             errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "permission denied"}  # fmt: skip
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in codes:
            return codes[seen.errno]
        text = str(seen).lower()
        if type(seen).__name__ == "SafetensorError" or "safetensor" in type(seen).__module__.lower():
            if "no space" in text or "storagefull" in text:
                return "no space left on device"
            if "permission" in text:
                return "permission denied"
        seen = seen.__cause__ or seen.__context__
    return None
