"""Entry point of each process under `accelerate launch` (not for direct use).

    python -m rlhf_cli.worker STAGE RESOLVED_RECIPE --run-dir DIR [--resume]

The parent `rlhf` command has already validated the recipe, checked the run directory and written the launch files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlhf_cli.errors import UserError
from rlhf_cli.launch import WORKER_INPUT_ERROR


def main(argv: list[str] | None = None) -> int:
    from rlhf_cli.recipe import load_recipe
    from rlhf_cli.stages import STAGES
    from rlhf_cli.stages.common import load_stage_data, plan_launch, train, trainer_config_kwargs
    from rlhf_cli.launch import Hardware

    parser = argparse.ArgumentParser(prog="rlhf_cli.worker")
    parser.add_argument("stage", choices=sorted([*STAGES, "ppo"]))
    parser.add_argument("recipe")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    from rlhf_cli import interrupts

    interrupts.install()  # SIGTERM from the launcher before training: exit 130 like Ctrl-C, not a bare kill
    run_dir = Path(args.run_dir)
    try:
        if args.stage == "ppo":
            from rlhf_cli.stages.ppo import run_ppo_worker

            recipe = load_recipe(args.recipe, "ppo")
            plan = plan_launch(recipe, "ppo", "PPOConfig", run_dir, Hardware.detect(), resume=args.resume)
            return run_ppo_worker(recipe, run_dir, plan, resume=args.resume)
        stage = STAGES[args.stage]
        recipe = load_recipe(args.recipe, stage.stage_key)
        plan = plan_launch(recipe, stage.name, stage.config_class, run_dir, Hardware.detect(), resume=args.resume)
        # The parent loaded the same data (same seed, same hold-out) and printed its notes; the summary's counts
        # and the sized defaults come from this load, as in an in-process run.
        data = load_stage_data(stage, recipe, notes=False)
        return train(stage, recipe, run_dir, trainer_config_kwargs(stage, recipe, run_dir, plan, data), data,
                     resume=args.resume, run=None)  # fmt: skip
    except KeyboardInterrupt:  # a signal before training started (during it, the stage saves and returns 130)
        return interrupts.INTERRUPTED_EXIT_CODE
    except UserError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        # The launcher reports any failure as 1; this marker tells the parent it was a bad input (exit code 2).
        (run_dir / WORKER_INPUT_ERROR).write_text(str(exc), encoding="utf-8")
        return 2


if __name__ == "__main__":
    sys.exit(main())
