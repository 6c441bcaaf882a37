"""One module per pipeline stage."""

from rlhf_cli.stages.dpo import DPO, ORPO, SIMPO
from rlhf_cli.stages.grpo_rloo import GRPO, RLOO
from rlhf_cli.stages.kto import KTO
from rlhf_cli.stages.reward import REWARD
from rlhf_cli.stages.sft import SFT

STAGES = {stage.name: stage for stage in (SFT, REWARD, GRPO, RLOO, DPO, ORPO, SIMPO, KTO)}


def stage_for(recipe, name: str):
    """The Stage that runs a recipe validated for `name` (dpo's algorithm picks one of its trainers)."""
    if name == "dpo":
        from rlhf_cli.stages.dpo import stage_for as dpo_stage

        return dpo_stage(recipe)
    return STAGES[name]
