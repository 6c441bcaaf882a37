"""`rlhf sft`: supervised fine-tuning on demonstrations with TRL's SFTTrainer (cross-entropy on the completion).

TRL's SFTConfig defaults (learning rate 2e-5, 3 epochs, batch 8) stay; the checkpoint, evaluation and log cadence
is sized to the run (`sized_cadence`, see `rlhf_cli.stages.common.CADENCE`).
"""

from rlhf_cli.stages.common import Stage

SFT = Stage(
    name="sft",
    title="Supervised fine-tuning",
    data_kind="sft",
    model_kind="causal_lm",
    config_class="SFTConfig",
    trainer_class="SFTTrainer",
    sized_cadence=True,
)
