"""`rlhf ppo`: critic PPO against a reward model (or a rule), KL-anchored to the reference policy.

The loop itself lives in `rlhf_cli.ppo.trainer`; this module checks inputs and the run directory, as every stage.
"""

from __future__ import annotations

from rlhf_cli.errors import UserError
from rlhf_cli.launch import RESOLVED_RECIPE, Hardware, plan_launch
from rlhf_cli.recipe import Recipe, recipe_to_yaml
from rlhf_cli.rundir import check_run_dir, prepare_run_dir
from rlhf_cli.stages.common import quiet_hf_progress_bars, resolve_run_dir


def run_ppo(recipe: Recipe, *, output_dir=None, overwrite=False, resume=False, dry_run=False, cli_argv=None) -> int:
    from dataclasses import asdict

    from rlhf_cli.ppo.config import PPOConfig

    run_dir = resolve_run_dir(recipe, output_dir)
    recipe = recipe.model_copy(update={"output_dir": str(run_dir)})
    if recipe.distributed.strategy != "none":
        raise UserError(
            "rlhf ppo runs in one process for now (distributed.strategy: none); multi-process PPO under "
            "accelerate/DeepSpeed is not available yet."
        )
    try:
        config = PPOConfig(**recipe.training)
    except ValueError as exc:
        raise UserError(f"Recipe training section: {exc}.") from None
    plan = plan_launch(recipe, "ppo", "PPOConfig", run_dir, Hardware.detect(), resume=resume, cli_argv=cli_argv)
    if dry_run:
        import yaml
        from rich.console import Console

        console = Console()
        console.print("[bold]PPO[/] — rlhf_cli.ppo.PPOConfig:")
        console.print(yaml.safe_dump(asdict(config), sort_keys=False), markup=False)
        console.print(yaml.safe_dump({"ppo": recipe.ppo.model_dump()}, sort_keys=False), markup=False)
        console.print("[bold]Launch:[/] in this process\n[bold]Command:[/]")
        console.print(plan.command_line(), markup=False, highlight=False, soft_wrap=True)
        console.print("[dim]Dry run: nothing was started or written.[/]")
        return 0
    check_run_dir(run_dir, overwrite=overwrite, resume=resume)

    from rlhf_cli.data import load_data

    quiet_hf_progress_bars()
    prompts = load_data(recipe.data.train, "prompt", what="data.train")

    from rlhf_cli.ppo.trainer import PPOTrainer

    trainer = PPOTrainer(recipe, run_dir, prompts, precision=plan.precision)
    # Every input is good: from here on the run directory is written.
    prepare_run_dir(run_dir, clear=overwrite)
    (run_dir / RESOLVED_RECIPE).write_text(recipe_to_yaml(recipe), encoding="utf-8")
    return trainer.train(resume=resume)
