"""One module per pipeline stage."""

from rlhf_cli.stages.grpo_rloo import GRPO, RLOO
from rlhf_cli.stages.reward import REWARD
from rlhf_cli.stages.sft import SFT

STAGES = {stage.name: stage for stage in (SFT, REWARD, GRPO, RLOO)}
