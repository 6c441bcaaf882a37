"""`rlhf ppo`: critic PPO against a reward model (or a rule), KL-anchored to the reference policy.

The loop itself lives in `rlhf_cli.ppo.trainer`; this module checks inputs and the run directory, as every stage.
"""

from __future__ import annotations

from rich.markup import escape

from rlhf_cli.console import make_console
from rlhf_cli.errors import UserError
from rlhf_cli.launch import Hardware, plan_launch
from rlhf_cli.preflight import check_hardware
from rlhf_cli.recipe import Recipe
from rlhf_cli.rundir import RunDirectory
from rlhf_cli.stages.common import (
    disk_errors_explained,
    launch_distributed,
    quiet_hf_progress_bars,
    resolve_run_dir,
    run_stage,
    show_launch,
    write_resolved_recipe,
)


def run_ppo(recipe: Recipe, *, output_dir=None, overwrite=False, resume=False, dry_run=False, cli_argv=None) -> int:
    from dataclasses import asdict

    from rlhf_cli.ppo.config import PPOConfig

    if recipe.ppo.algorithm != "ppo":  # critic-free: TRL's GRPOTrainer / RLOOTrainer run the stage
        from rlhf_cli.stages import STAGES

        return run_stage(STAGES[recipe.ppo.algorithm], recipe, output_dir=output_dir, overwrite=overwrite,
                         resume=resume, dry_run=dry_run, cli_argv=cli_argv)  # fmt: skip
    run_dir = resolve_run_dir(recipe, output_dir)
    recipe = recipe.model_copy(update={"output_dir": str(run_dir)})
    if recipe.model.lora is not None and recipe.distributed.strategy == "zero3":
        raise UserError(
            "PPO in LoRA mode does not run under zero3 yet (its adapters share one frozen base, which ZeRO-3 would "
            "shard); use distributed.strategy ddp or zero2, where the base is small next to four full models."
        )
    try:
        config = PPOConfig(**recipe.training)
    except ValueError as exc:
        raise UserError(f"Recipe training section: {exc}.") from None
    hardware = Hardware.detect()
    note = check_hardware(recipe, hardware, planning=dry_run)
    if note:
        make_console(stderr=True).print(f"[yellow]Note:[/] {escape(note)}", highlight=False)
    plan = plan_launch(recipe, "ppo", "PPOConfig", run_dir, hardware, resume=resume, cli_argv=cli_argv)
    if dry_run:
        import yaml
        from rlhf_cli.generation import planned_line

        console = make_console()
        console.print("[bold]PPO[/] — rlhf_cli.ppo.PPOConfig:")
        console.print(yaml.safe_dump(asdict(config), sort_keys=False), markup=False)
        console.print(yaml.safe_dump({"ppo": recipe.ppo.model_dump()}, sort_keys=False), markup=False)
        console.print(f"Decoding: {planned_line(recipe.generation)}", markup=False)
        show_launch(plan)
        return 0
    with RunDirectory(run_dir, overwrite=overwrite, resume=resume) as run:
        return run.finish(_run_checked_ppo(recipe, plan, run, resume=resume))


def _run_checked_ppo(recipe: Recipe, plan, run: RunDirectory, *, resume: bool) -> int:
    quiet_hf_progress_bars()
    prompts = load_ppo_prompts(recipe)
    if recipe.data.on_too_long != "truncate":  # error (or drop leaving nothing) stops here, before any model loads
        from rlhf_cli.lengths import check_prompts

        check_prompts(recipe, prompts)
    if plan.distributed:
        from rlhf_cli.models import load_tokenizer, resolve_model_path
        from rlhf_cli.ppo.trainer import check_companion_tokenizers
        from rlhf_cli.rewards import load_rule_reward

        # What can be checked without loading weights is checked here, before any process starts.
        if recipe.ppo.reward.function:
            load_rule_reward(recipe.ppo.reward.function)
        tokenizer = load_tokenizer(recipe.model, resolve_model_path(recipe.model, recipe.seed),
                                   conversational=isinstance(prompts[0]["prompt"], list))  # fmt: skip
        check_companion_tokenizers(tokenizer, recipe)
        return launch_distributed(recipe, plan, run)

    from rlhf_cli.ppo.trainer import PPOTrainer

    trainer = PPOTrainer(recipe, run.path, prompts, precision=plan.precision)
    # Every input is good: from here on the run directory is written.
    write_resolved_recipe(run, recipe)
    with disk_errors_explained(run.path):
        return trainer.train(resume=resume)


def load_ppo_prompts(recipe: Recipe):
    from rlhf_cli.data import load_data

    return load_data(recipe.data.train, "prompt", what="data.train")


def run_ppo_worker(recipe: Recipe, run_dir, plan, *, resume: bool) -> int:
    """One process of a distributed PPO run (under `accelerate launch`); the parent checked everything."""
    from rlhf_cli.ppo.trainer import PPOTrainer

    quiet_hf_progress_bars()
    trainer = PPOTrainer(recipe, run_dir, load_ppo_prompts(recipe), precision=plan.precision)
    with disk_errors_explained(run_dir):
        return trainer.train(resume=resume)
