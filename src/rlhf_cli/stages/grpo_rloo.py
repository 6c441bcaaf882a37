"""`rlhf ppo` with `ppo.algorithm: grpo | rloo`: critic-free policy optimisation by TRL's own trainers.

The recipe keeps its shape (policy in `model:`, prompts in `data.train`, reward in `ppo.reward`); only `training:`
changes meaning, to the keys of TRL's GRPOConfig / RLOOConfig. Both sample a group of completions per prompt and use
the group as the baseline instead of a critic:
    GRPO: A_i = (r_i - mean_j r_j) / std_j r_j          RLOO: A_i = r_i - mean_{j != i} r_j
"""

from __future__ import annotations

from rlhf_cli.errors import UserError
from rlhf_cli.recipe import Recipe
from rlhf_cli.stages.common import Stage, TrainerInputs


def reward_functions(inputs: TrainerInputs) -> dict:
    """The recipe's reward in the form TRL takes: a reward-model path, or the rule wrapped to TRL's signature."""
    from rlhf_cli.rewards import load_rule_reward

    reward = inputs.recipe.ppo.reward
    if reward.model:
        return {"reward_funcs": reward.model}
    rule = load_rule_reward(reward.function)

    def rule_reward(prompts, completions, **_):
        # TRL passes chat completions as message lists; the project's rules take the completion text.
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return rule(prompts, texts)

    rule_reward.__name__ = reward.function.rpartition(":")[2]  # TRL logs each reward under its function's name
    return {"reward_funcs": rule_reward}


def generation_keys(recipe: Recipe) -> dict:
    """The recipe's `generation:` as TRL's own config keys: GRPO and RLOO sample with TRL's generation (its vLLM
    integration included). compiled -> cache_implementation: static (transformers compiles its decoding step on a
    GPU); vllm -> use_vllm in colocate mode; hf and auto -> TRL's default. A `training:` key that says otherwise
    is a contradiction, refused."""
    spec = recipe.generation
    if spec is None or spec.backend in ("auto", "hf"):
        return {}
    if spec.backend == "compiled":
        keys = {"cache_implementation": "static"}
    else:
        keys = {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": spec.gpu_memory_utilization,
                "vllm_enable_sleep_mode": spec.sleep}  # fmt: skip
    clashes = [key for key, value in keys.items() if key in recipe.training and recipe.training[key] != value]
    if clashes:
        raise UserError(f"training.{clashes[0]}: {recipe.training[clashes[0]]!r} contradicts generation.backend: "
                        f"{spec.backend} (which sets it to {keys[clashes[0]]!r}); remove one of them.")  # fmt: skip
    return keys


def _online_stage(name: str, title: str, config_class: str, trainer_class: str) -> Stage:
    return Stage(
        name=name,
        title=title,
        data_kind="prompt",
        model_kind="causal_lm",
        config_class=config_class,
        trainer_class=trainer_class,
        recipe_stage="ppo",
        length_key=None,  # TRL's online configs bound completions (max_completion_length), not whole sequences
        trainer_kwargs=reward_functions,
        section_config=generation_keys,
    )


GRPO = _online_stage("grpo", "GRPO", "GRPOConfig", "GRPOTrainer")
RLOO = _online_stage("rloo", "RLOO", "RLOOConfig", "RLOOTrainer")
