"""`rlhf train-rm`: a Bradley-Terry reward model with TRL's RewardTrainer.

The model is a sequence classifier with one output, read at the last real token. The loss on a preference pair is
    L = -log sigmoid(r(x, y_chosen) - r(x, y_rejected))
so that exp(r) behaves like a Bradley-Terry strength.
"""

from rlhf_cli.stages.common import Stage

REWARD = Stage(
    name="rm",
    title="Reward model",
    data_kind="preference",
    model_kind="reward",
    config_class="RewardConfig",
    trainer_class="RewardTrainer",
)
