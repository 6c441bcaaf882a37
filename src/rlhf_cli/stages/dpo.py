"""`rlhf dpo`: the policy straight from preference pairs, with no reward model and no RL loop.

DPO (Rafailov et al. 2023) trains on the implicit reward r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)), summed over
the response's tokens, with the Bradley-Terry loss of a reward model:
    L = -log sigmoid(r(x, y_chosen) - r(x, y_rejected))
so a pair pushes the policy's log-ratio of the chosen response up and the rejected one down, relative to a frozen
reference (the policy's starting weights by default). `dpo.algorithm` also offers two reference-free relatives:
    orpo   (Hong et al. 2024)   SFT loss on the chosen response + beta * -log sigmoid(log odds ratio)
    simpo  (Meng et al. 2024)   -log sigmoid(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma)
run by TRL's experimental ORPOTrainer and CPOTrainer. docs/dpo.md has every loss, what beta does and how to read
the metrics.

As for train-rm, 5% of the pairs are held out when the recipe names no evaluation data, so the summary reports the
implicit-reward accuracy on pairs the policy did not train on.
"""

from __future__ import annotations

from rlhf_cli.stages.common import Default, Stage, TrainerInputs

PRETOKENIZED = "rlhf_cli.stages.pretokenized"


def reference_model(inputs: TrainerInputs, section: str = "dpo") -> dict:
    """The frozen reference of DPO (and KTO, `section="kto"`): the model named in `<section>.ref_model`, else one
    copy of the policy's starting weights.

    No copy where TRL needs none: with LoRA the reference is the base with the adapter switched off, and with
    precompute_ref_log_probs the starting policy scores the data once before training."""
    import copy

    from rlhf_cli.models import check_same_vocabulary, load_model

    recipe, training = inputs.recipe, inputs.recipe.training
    path = getattr(recipe, section).ref_model
    if path:
        check_same_vocabulary(inputs.tokenizer, path, f"{section}.ref_model")
        spec = recipe.model.model_copy(update={"name_or_path": path, "gguf_file": None, "revision": None,
                                               "lora": None})  # fmt: skip
        return {"ref_model": load_model(spec, path, "causal_lm", inputs.tokenizer)}
    if recipe.model.lora is not None:
        return {}
    if training.get("precompute_ref_log_probs") and not training.get("sync_ref_model"):
        return {}
    if recipe.distributed.strategy == "zero3":  # the policy holds only this rank's shard: load the reference sharded
        return {"ref_model": load_model(recipe.model, inputs.model_path, "causal_lm", inputs.tokenizer)}
    return {"ref_model": copy.deepcopy(inputs.model)}  # the weights are already in memory: no second read


def likelihood_displacement(recipe, log_history: list[dict]) -> list[str]:
    """The warning for a falling chosen log-probability ("likelihood displacement", Razin et al. 2024): DPO can
    widen the margin by pushing BOTH responses down, so the chosen one ends up less likely than under the
    reference. rewards/chosen = beta * log(pi/pi_ref)(y_chosen): below zero on the held-out pairs (or, without
    them, in the last training log) means exactly that."""
    if recipe.dpo.algorithm != "dpo":
        return []  # reference-free: no pi_ref to fall below
    for prefix, where in (("eval_", "held-out"), ("", "training (last log)")):
        entries = [entry for entry in log_history if f"{prefix}rewards/chosen" in entry]
        if entries:
            value = entries[-1][f"{prefix}rewards/chosen"]
            if value is not None and value < 0:
                return [f"likelihood displacement: on {where} pairs the chosen responses are now LESS likely than "
                        f"under the reference (rewards/chosen {value:.4g} < 0); the margin grew because the rejected "
                        "ones fell faster. Watch the policy's outputs; a larger beta, fewer epochs or an SFT term "
                        "(loss_type: [sigmoid, sft]) counter it. See docs/dpo.md."]  # fmt: skip
            return []
    return []


_LEARNING_RATE = Default(
    1e-6, "TRL's DPOConfig default for full weights (Zephyr's DPO used 5e-7): DPO moves far from the reference at "
    "SFT-like rates. LoRA adapters need a larger rate: 5e-6, as TRL's DPO examples with LoRA.",
    lora=5e-6,
)

DPO = Stage(
    name="dpo",
    title="DPO",
    data_kind="preference",
    model_kind="causal_lm",
    config_class="DPOConfig",
    trainer_class=f"{PRETOKENIZED}:FittedDPOTrainer",
    default_eval_split=0.05,
    sized_cadence=True,
    split_prompt=True,
    trainer_kwargs=reference_model,
    summary_warnings=likelihood_displacement,
    training_defaults={"learning_rate": _LEARNING_RATE},
)

ORPO = Stage(
    name="orpo",
    title="ORPO",
    data_kind="preference",
    model_kind="causal_lm",
    config_class="ORPOConfig",
    trainer_class=f"{PRETOKENIZED}:FittedORPOTrainer",
    recipe_stage="dpo",
    default_eval_split=0.05,
    sized_cadence=True,
    split_prompt=True,
    training_defaults={"learning_rate": Default(
        8e-6, "ORPO trains from the base model with an SFT term included; its paper (Hong et al. 2024) uses 8e-6 "
        "(TRL's config default is 1e-6).")},  # fmt: skip
)

SIMPO = Stage(
    name="simpo",
    title="SimPO",
    data_kind="preference",
    model_kind="causal_lm",
    config_class="CPOConfig",
    trainer_class=f"{PRETOKENIZED}:FittedCPOTrainer",
    recipe_stage="dpo",
    default_eval_split=0.05,
    sized_cadence=True,
    split_prompt=True,
    training_defaults={
        "loss_type": Default("simpo", "algorithm simpo is CPOTrainer's simpo loss."),
        "cpo_alpha": Default(0.0, "Pure SimPO has no behaviour-cloning term (CPO's default is 1.0); set cpo_alpha > "
                             "0 for CPO-SimPO."),  # fmt: skip
        "beta": Default(2.0, "The SimPO paper's beta is 2.0-2.5 (TRL's CPOConfig default, 0.1, is DPO's scale)."),
        "learning_rate": Default(5e-7, "The SimPO paper's rates are 3e-7 to 1e-6; 5e-7 as DPO.", lora=5e-6),
    },
)

ALGORITHMS = {"dpo": DPO, "orpo": ORPO, "simpo": SIMPO}


def stage_for(recipe) -> Stage:
    return ALGORITHMS[recipe.dpo.algorithm]
