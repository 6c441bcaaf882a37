"""`rlhf kto`: the policy from unpaired thumbs-up / thumbs-down rows, with no pairs, no reward model and no RL loop.

KTO (Ethayarajh et al. 2024) scores a completion y of prompt x by its implicit reward
    r(x, y) = log(pi(y|x) / pi_ref(y|x))
against a reference point z0 = max(0, KL(pi || pi_ref)), estimated per batch from mismatched (x, y') pairs, and
minimises, with lambda_D / lambda_U the desirable / undesirable weights (TRL's desirable_weight / undesirable_weight):
    desirable y:    lambda_D * (1 - sigmoid(beta * (r(x, y) - z0)))
    undesirable y:  lambda_U * (1 - sigmoid(beta * (z0 - r(x, y))))
The data is `prompt` + `completion` + a boolean `label`, or preference pairs, each read as a desirable and an
undesirable row (rlhf_cli.data). When training: sets neither weight, they are chosen from the training rows so that
the two classes weigh the same (`class_weights`). As for dpo, 5% of the rows are held out when the recipe names no
evaluation data, so the summary reports the implicit rewards of rows the policy did not train on.
"""

from __future__ import annotations

import math

from rlhf_cli.errors import UserError
from rlhf_cli.stages.common import Stage, TrainerInputs
from rlhf_cli.stages.dpo import PRETOKENIZED, reference_model

WEIGHT_KEYS = ("desirable_weight", "undesirable_weight")
# Eq. 8 of the KTO paper: lambda_D * n_D / (lambda_U * n_U) in [1, 4/3].
RATIO_RANGE = (1.0, 4 / 3)


def class_weights(desirable: int, undesirable: int) -> tuple[float, float]:
    """(lambda_D, lambda_U) for n_D desirable and n_U undesirable rows: the minority class is weighted up so that
        lambda_D * n_D / (lambda_U * n_U) = 1,
    the low end of the KTO paper's recommended [1, 4/3] (Eq. 8); the majority keeps 1.0, balanced data 1.0 / 1.0.
    The weight is rounded to 4 decimals in the direction that keeps the ratio at or above 1 (up for lambda_D, down
    for lambda_U): 3 desirable, 7 undesirable -> (2.3334, 1.0); 7 desirable, 3 undesirable -> (1.0, 2.3333)."""
    if desirable < 1 or undesirable < 1:
        raise ValueError("class weights need at least one row of each label")
    if desirable < undesirable:
        return math.ceil(round(undesirable / desirable * 1e4, 6)) / 1e4, 1.0
    return 1.0, math.floor(round(desirable / undesirable * 1e4, 6)) / 1e4


def balance_ratio(desirable: int, undesirable: int, weights: tuple[float, float]) -> float:
    """lambda_D * n_D / (lambda_U * n_U), the quantity Eq. 8 of the KTO paper keeps in [1, 4/3]."""
    return weights[0] * desirable / (weights[1] * undesirable)


def label_balance(recipe, train) -> tuple[dict, str | None]:
    """`data_defaults` of kto: the class weights from the training rows as kept (after the hold-out and
    data.on_too_long), unless training: sets either weight; and the note that says the counts and the weights."""
    labels = train["label"]
    desirable = sum(1 for label in labels if label)
    undesirable = len(labels) - desirable
    if not desirable or not undesirable:
        only = "desirable (true)" if desirable else "undesirable (false)"
        raise UserError(f"data.train: the {len(labels)} rows left to train on (after the hold-out and "
                        f"data.on_too_long) are all labelled {only}; KTO needs at least one row of each label. Add "
                        "rows with the other label, or hold out fewer rows (data.eval_split).")  # fmt: skip
    counts = f"{desirable} desirable and {undesirable} undesirable training rows"
    given = {key: recipe.training[key] for key in WEIGHT_KEYS if key in recipe.training}
    if given:
        weights = (given.get("desirable_weight", 1.0), given.get("undesirable_weight", 1.0))
        ratio = balance_ratio(desirable, undesirable, weights)
        return {}, (f"{counts}; class weights as training: sets them (desirable_weight {weights[0]:g}, "
                    f"undesirable_weight {weights[1]:g}): lambda_D*n_D / (lambda_U*n_U) = {ratio:.3g} (the KTO "
                    "paper recommends 1 to 4/3).")  # fmt: skip
    weights = class_weights(desirable, undesirable)
    chosen = dict(zip(WEIGHT_KEYS, weights))
    if weights == (1.0, 1.0):
        return chosen, f"{counts}: balanced, so desirable_weight and undesirable_weight stay 1.0."
    minority = WEIGHT_KEYS[0] if weights[0] > 1 else WEIGHT_KEYS[1]
    return chosen, (f"{counts}, so {minority} = {max(weights):g} (the other 1.0): lambda_D*n_D / (lambda_U*n_U) = "
                    f"{balance_ratio(desirable, undesirable, weights):.4g}, as the KTO paper recommends (1 to 4/3); "
                    "set either weight in training: to choose your own.")  # fmt: skip


def kto_reference(inputs: TrainerInputs) -> dict:
    """KTO's frozen reference: kto.ref_model, else the policy's starting weights (as dpo's `reference_model`)."""
    return reference_model(inputs, section="kto")


KTO = Stage(
    name="kto",
    title="KTO",
    data_kind="unpaired",
    model_kind="causal_lm",
    config_class="KTOConfig",
    trainer_class=f"{PRETOKENIZED}:FittedKTOTrainer",
    default_eval_split=0.05,
    sized_cadence=True,
    trainer_kwargs=kto_reference,
    data_defaults=label_balance,
)
