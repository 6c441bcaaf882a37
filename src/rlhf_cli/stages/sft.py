"""`rlhf sft`: supervised fine-tuning on demonstrations with TRL's SFTTrainer (cross-entropy on the completion)."""

from rlhf_cli.stages.common import Stage

SFT = Stage(
    name="sft",
    title="Supervised fine-tuning",
    data_kind="sft",
    model_kind="causal_lm",
    config_class="SFTConfig",
    trainer_class="SFTTrainer",
)
