"""What every TRL-backed stage shares: recipe -> TRL config -> dry-run / accelerate launch / in-process training.

A stage is a few facts (which data, which model head, which TRL trainer); `run_stage` does the rest, in this order:
validate, plan the launch, check the run directory, load and check the data, then load the model and train. Files
are written only after every input has been checked, so a bad input leaves nothing behind.
"""

from __future__ import annotations

import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import yaml
from rich.markup import escape

from rlhf_cli.console import make_console, print_yaml
from rlhf_cli.errors import UserError
from rlhf_cli.guard import DIVERGED_EXIT_CODE, divergence_message, install_trainer_guard
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

INTERRUPTED_EXIT_CODE = 130


@dataclass(frozen=True)
class Stage:
    name: str  # the worker's argument
    title: str
    data_kind: Literal["sft", "preference", "prompt"]
    model_kind: Literal["causal_lm", "reward"]
    config_class: str  # in trl
    trainer_class: str  # in trl
    recipe_stage: str = ""  # the recipe's `stage:` (default: name)
    length_key: str | None = "max_length"  # the TRL config key that data.max_length sets
    trainer_kwargs: Callable[[Recipe], dict] | None = None  # more arguments for the TRL trainer

    @property
    def stage_key(self) -> str:
        return self.recipe_stage or self.name


def resolve_run_dir(recipe: Recipe, output_dir: str | None) -> Path:
    chosen = output_dir or recipe.output_dir
    if not chosen:
        raise UserError("No output directory: set `output_dir` in the recipe or pass --output-dir.")
    return Path(chosen).expanduser().resolve()


def trainer_config_kwargs(stage: Stage, recipe: Recipe, run_dir: Path, plan: LaunchPlan) -> dict:
    """Keyword arguments for the TRL config: the recipe's `training:` plus what other sections decide."""
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
    if recipe.data.eval is not None and "eval_strategy" not in kwargs:
        kwargs["eval_strategy"] = "epoch"  # given eval data, evaluate it (TRL's default is never)
    # Keep a NaN loss in the logged sum (the filter would log the running mean instead) so the guard sees it.
    kwargs.setdefault("logging_nan_inf_filter", False)
    return kwargs


def show_dry_run(stage: Stage, plan: LaunchPlan, config_kwargs: dict, recipe: Recipe | None = None) -> None:
    from rlhf_cli.console import make_console

    console = make_console()
    console.print(f"[bold]{stage.title}[/] — trl.{stage.config_class} (keys set by the recipe and the CLI):")
    print_yaml(console, yaml.safe_dump(config_kwargs, sort_keys=True))
    if recipe is not None:  # format, columns, counts and lengths of the data (tokenizer only, no weights)
        from rlhf_cli.inspect_data import dry_run_lines

        console.print("[bold]Data:[/]")
        print("\n".join(dry_run_lines(stage.stage_key, recipe)), flush=True)
    show_launch(plan)


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


def load_stage_data(stage: Stage, recipe: Recipe):
    from rlhf_cli.data import load_data

    quiet_hf_progress_bars()
    train = load_data(recipe.data.train, stage.data_kind, what="data.train")
    evaluation = load_data(recipe.data.eval, stage.data_kind, what="data.eval") if recipe.data.eval else None
    return train, evaluation


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
    config_kwargs = trainer_config_kwargs(stage, recipe, run_dir, plan)
    if plan.precision.get("use_cpu") and (recipe.training.get("bf16") or recipe.training.get("fp16")):
        from rlhf_cli.console import make_console

        make_console(stderr=True).print("[yellow]Note:[/] no GPU here, so training runs in float32 (bf16/fp16 ignored).")
    if dry_run:
        show_dry_run(stage, plan, config_kwargs, recipe)
        return 0
    with RunDirectory(run_dir, overwrite=overwrite, resume=resume) as run:
        train_data, eval_data = load_stage_data(stage, recipe)
        if plan.distributed:
            return run.finish(launch_distributed(recipe, plan, run))
        return run.finish(train(stage, recipe, run_dir, config_kwargs, train_data, eval_data, resume=resume, run=run))


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
    train_data,
    eval_data,
    *,
    resume: bool,
    run: RunDirectory | None,
) -> int:
    """Train in this process; `run` is None in a worker under accelerate (the parent made and holds the directory)."""
    import trl
    from trl.data_utils import is_conversational

    from rlhf_cli.lengths import fit_stage_data, row_counts
    from rlhf_cli.models import load_model, load_tokenizer, lora_config, resolve_model_path

    started = time.time()
    model_path = resolve_model_path(recipe.model, recipe.seed)
    tokenizer = load_tokenizer(recipe.model, model_path, conversational=is_conversational(train_data[0]))
    rows_read = len(train_data)
    # Long examples are cut, dropped or refused here, tokenized as TRL would: TRL itself then removes nothing.
    train_data, eval_data, length_reports = fit_stage_data(stage, recipe, tokenizer, train_data, eval_data)
    # The TRL config comes before the model: under ZeRO-3 it arms zero.Init so weights load already sharded.
    try:
        config = getattr(trl, stage.config_class)(**config_kwargs)
    except (ValueError, TypeError) as exc:
        raise UserError(f"TRL rejected the training settings: {exc}") from None
    _ = config.world_size  # sets up the process group now, so zero.Init below shards over all ranks
    if config.deepspeed:
        import deepspeed

        deepspeed.init_distributed()  # DeepSpeed's own view of that group, which zero.Init reads its world size from
    model = load_model(recipe.model, model_path, stage.model_kind, tokenizer)
    metrics, interrupt = metrics_callback(run_dir), interrupt_callback()
    trainer = getattr(trl, stage.trainer_class)(
        model=model,
        args=config,
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        peft_config=lora_config(recipe.model, stage.model_kind),
        callbacks=[metrics, interrupt, checkpoint_marker_callback()],
        **(stage.trainer_kwargs(recipe) if stage.trainer_kwargs else {}),
    )
    _use_rich_progress(trainer)
    guard = install_trainer_guard(trainer, loss_spike=recipe.divergence.loss_spike,
                                  spike_window=recipe.divergence.spike_window)  # fmt: skip
    rows = row_counts(trainer, length_reports, rows_read)  # checks that the trainer holds every kept row

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
            write_summary(run_dir, {**_summary(stage, recipe, run_dir, trainer, result, rows,
                                               time.time() - started), "status": "diverged", "message": message})  # fmt: skip
            _print_error(message)
        return DIVERGED_EXIT_CODE
    if interrupt.requested:
        if main_process:
            saved = last_checkpoint(run_dir)
            print(f"Interrupted: checkpoint saved in {saved}. Continue with the same command and --resume.")
        return INTERRUPTED_EXIT_CODE

    with disk_errors_explained(run_dir):
        save_final_model(trainer, recipe, run_dir)
    if main_process:
        summary = _summary(stage, recipe, run_dir, trainer, result, rows, time.time() - started)
        write_summary(run_dir, summary)
        print_summary(f"{stage.title}: done", summary)
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


def _summary(stage, recipe, run_dir, trainer, result, rows, seconds) -> dict:
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    summary = {
        "stage": stage.name,
        "model": recipe.model.name_or_path,
        **rows,  # rows read, kept, truncated, dropped (rlhf_cli.lengths)
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 3),
        "final loss": history[-1]["loss"] if history else None,
        "mean train loss": result.training_loss,
        "train samples/s": result.metrics.get("train_samples_per_second"),
        "wall time (s)": round(seconds, 1),
    }
    last = history[-1] if history else {}
    for key in ("accuracy", "margin", "mean_token_accuracy"):
        if key in last:
            summary[f"final {key}"] = last[key]
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]  # GRPO / RLOO
    if rewards:
        window = max(1, len(rewards) // 5)
        summary["reward (first steps)"] = sum(rewards[:window]) / window
        summary["reward (last steps)"] = sum(rewards[-window:]) / window
    evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    if evals:
        summary.update({key: value for key, value in evals[-1].items() if key.startswith("eval_")
                        and key.split("_", 1)[1] in ("loss", "accuracy", "margin", "mean_token_accuracy")})  # fmt: skip
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
