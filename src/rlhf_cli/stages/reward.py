"""`rlhf train-rm`: a Bradley-Terry reward model with TRL's RewardTrainer.

The model is a sequence classifier with one output, read at the last real token. The loss on a preference pair is
    L = -log sigmoid(r(x, y_chosen) - r(x, y_rejected))
so that exp(r) behaves like a Bradley-Terry strength.

Without evaluation data the stage holds 5% of the pairs out (`default_eval_split`) and reports the accuracy on
them: the training-batch accuracy TRL logs says how well the pairs are memorised, not how well the model ranks
pairs it has not seen.
"""

from rlhf_cli.stages.common import Default, Stage

REWARD = Stage(
    name="rm",
    title="Reward model",
    data_kind="preference",
    model_kind="reward",
    config_class="RewardConfig",
    trainer_class="RewardTrainer",
    default_eval_split=0.05,
    sized_cadence=True,
    training_defaults={
        "num_train_epochs": Default(
            1, "One pass over the pairs: reward models overfit from the second epoch on; InstructGPT (Ouyang et al. "
            "2022) and Llama 2 (Touvron et al. 2023) train theirs for one epoch, as does TRL's reward-modeling example."
        ),
        "learning_rate": Default(
            1e-5, "TRL's reward-modeling example uses 1e-5 for full fine-tuning and 1e-4 with LoRA (RewardConfig's "
            "own default is the LoRA value); Llama 2's reward models used 1e-5 (5e-6 at 70B), InstructGPT's 9e-6.",
            lora=1e-4,
        ),
    },
)
