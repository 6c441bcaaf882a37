"""Checks of a recipe against this machine and its installed packages, before anything slow starts.

The schema (recipe.py) knows what a recipe may say; these checks know what this machine can do with it: trackers
and attention kernels that are installed, the gguf reader, the reward function's import, PPO's batch arithmetic,
how many processes the machine can run, bf16 support, and an output path that is a file. `rlhf recipe validate`,
`--dry-run` and every run call them, so a run never fails ten seconds (or ten minutes) in on something knowable.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from rlhf_cli.errors import UserError
from rlhf_cli.recipe import Recipe

# report_to value -> the package it needs
TRACKER_PACKAGES = {
    "tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow",
    "comet_ml": "comet_ml", "clearml": "clearml", "dagshub": "dagshub", "dvclive": "dvclive",
    "neptune": "neptune", "swanlab": "swanlab", "azure_ml": "azureml", "codecarbon": "codecarbon",
    "flyte": "flytekit", "kubeflow": "kubeflow",
}  # fmt: skip
# attn_implementation -> the package it needs (None: built into torch/transformers)
ATTENTION_PACKAGES = {"eager": None, "sdpa": None, "flex_attention": None, "flash_attention_2": "flash_attn",
                      "flash_attention_3": "flash_attn_interface"}  # fmt: skip


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def check_recipe(recipe: Recipe, stage: str, source: str) -> None:
    """Every check that needs no model and no data; raises UserError with the key named."""
    problems = [
        *_trackers(recipe.report_to),
        *_models(recipe),
        *_training(recipe, stage),
        *_output(recipe),
        *_extras(recipe),
        *_reward_ensembles(recipe),
    ]
    if problems:
        plural = "s" if len(problems) > 1 else ""
        raise UserError(f"Recipe {source} has {len(problems)} problem{plural}: " + " ".join(problems))


def _trackers(report_to) -> list[str]:
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    problems = []
    for name in names:
        if name in ("none", "all"):
            continue
        if name not in TRACKER_PACKAGES:
            problems.append(f"report_to: {name!r} is not a tracker transformers knows; use none or one of "
                            f"{', '.join(TRACKER_PACKAGES)}.")  # fmt: skip
        elif not installed(TRACKER_PACKAGES[name]):
            problems.append(f"report_to: {name!r} needs the {TRACKER_PACKAGES[name]} package, which is not "
                            f"installed (pip install {TRACKER_PACKAGES[name]}), or set report_to: none.")  # fmt: skip
    return problems


def _models(recipe: Recipe) -> list[str]:
    problems = []
    model = recipe.model
    if model is None:
        return problems
    if model.gguf_file and not installed("gguf"):
        problems.append(f"model.gguf_file: reading {model.gguf_file} needs the gguf package: "
                        'pip install "rlhf-cli[gguf]".')  # fmt: skip
    attention = model.attn_implementation
    if attention is not None:
        if attention in ATTENTION_PACKAGES:
            package = ATTENTION_PACKAGES[attention]
            if package and not installed(package):
                problems.append(f"model.attn_implementation: {attention} needs the {package} package (and a GPU), "
                                "which is not installed; use sdpa, or install it.")  # fmt: skip
        elif "/" not in attention:  # "org/kernel" names a hub kernel, which transformers fetches itself
            problems.append(f"model.attn_implementation: {attention!r} is not one of "
                            f"{', '.join(ATTENTION_PACKAGES)}.")  # fmt: skip
    return problems


def _training(recipe: Recipe, stage: str) -> list[str]:
    problems = []
    training = recipe.training
    strategy = training.get("eval_strategy", "no")
    has_eval = recipe.data is not None and (recipe.data.eval is not None or recipe.data.eval_split)
    if recipe.data is not None and recipe.data.eval is None and recipe.data.eval_split is None:
        from rlhf_cli.stages import STAGES

        has_eval = bool(getattr(STAGES.get(stage), "default_eval_split", None))  # train-rm holds part out itself
    if stage in ("sft", "rm", "dpo", "kto") and strategy not in ("no", None) and not has_eval:
        problems.append(f"training.eval_strategy is {strategy!r} but there is no evaluation data: add data.eval "
                        "(or data.eval_split), or remove eval_strategy.")  # fmt: skip
    if stage in ("dpo", "kto"):
        problems += _preference_losses(recipe, stage)
    if stage == "kto":
        problems += _kto_batches(recipe)
    if stage == "ppo" and recipe.ppo is not None:
        if recipe.ppo.algorithm == "ppo":
            from rlhf_cli.ppo.config import PPOConfig

            try:
                PPOConfig(**training)
            except (TypeError, ValueError) as exc:
                problems.append(f"training: {str(exc).rstrip('.')}.")
        from rlhf_cli.rewards import load_rule_reward

        for what, spec in (("ppo.reward", recipe.ppo.reward), ("ppo.judge", recipe.ppo.judge)):
            if spec is not None and spec.function:
                try:
                    load_rule_reward(spec.function, f"{what}.function")
                except UserError as exc:
                    problems.append(str(exc))
    return problems


def _reward_ensembles(recipe: Recipe) -> list[str]:
    """A reward that combines several reward models: combine only with several, and only where the stage can
    score with several (this project's PPO, generate; not TRL's GRPO/RLOO, which take one reward model)."""
    from rlhf_cli.rewards import reward_model_paths

    rewards = []
    if recipe.ppo is not None:
        rewards += [("ppo.reward", recipe.ppo.reward), ("ppo.judge", recipe.ppo.judge)]
    if recipe.generate is not None:
        rewards.append(("generate.reward", recipe.generate.reward))
    problems = []
    for what, spec in rewards:
        if spec is None or spec.function:
            continue
        try:
            several = len(reward_model_paths(spec, what)) > 1
        except UserError as exc:
            problems.append(str(exc))
            continue
        if several and what == "ppo.reward" and recipe.ppo.algorithm != "ppo":
            problems.append(f"ppo.reward: {recipe.ppo.algorithm} (TRL's trainer) takes one reward model, not an "
                            "ensemble; use algorithm: ppo, or one reward model.")  # fmt: skip
        if several and what == "ppo.judge":
            problems.append("ppo.judge: the judge is one reward model (or a rule), not an ensemble.")
    return problems


def _preference_losses(recipe: Recipe, stage: str) -> list[str]:
    """loss_type and loss_weights of dpo / kto, which TRL itself checks only at the first training step."""
    from rlhf_cli.recipe import training_config_class
    from rlhf_cli.trl_fields import loss_types

    training, config_class = recipe.training, training_config_class(recipe, stage)
    algorithm = recipe.dpo.algorithm if stage == "dpo" and recipe.dpo is not None else stage
    if algorithm == "simpo":
        given = training.get("loss_type", "simpo")
        return [] if given == "simpo" else [f"training.loss_type: algorithm simpo is CPOTrainer's simpo loss; "
                                            f"remove loss_type (it is {given!r})."]  # fmt: skip
    if "loss_type" not in training or algorithm == "orpo":
        return []
    given = training["loss_type"]
    listed = given if isinstance(given, list) else [given]
    known = loss_types(config_class)
    problems = []
    if stage == "kto" and isinstance(given, list):
        problems.append("training.loss_type: KTO takes one loss type, not a list.")
    if known:
        unknown = [str(value) for value in listed if value not in known]
        if unknown:
            problems.append(f"training.loss_type: {', '.join(map(repr, unknown))} is not a loss type of the "
                            f"installed TRL's {config_class.removesuffix('Config')} trainer; known: "
                            f"{', '.join(known)}.")  # fmt: skip
    if not listed:
        problems.append("training.loss_type: give at least one loss type.")
    weights = training.get("loss_weights")
    if weights is not None and stage == "dpo" and len(weights) != len(listed):
        problems.append(f"training.loss_weights: {len(weights)} weight{'s' if len(weights) != 1 else ''} for "
                        f"{len(listed)} loss type{'s' if len(listed) != 1 else ''} ({', '.join(map(str, listed))}); "
                        "give one weight per loss_type, in the same order.")  # fmt: skip
    return problems


def _kto_batches(recipe: Recipe) -> list[str]:
    """KTO's KL reference point is estimated within each batch from every prompt paired with another row's
    completion, which needs a second row in the batch and the rows in their fixed order; TRL refuses otherwise, but
    only once the model is loaded. apo_zero_unpaired has no KL term and needs neither."""
    from rlhf_cli.trl_fields import config_default

    training = recipe.training
    if training.get("loss_type", "kto") == "apo_zero_unpaired":
        return []
    problems = []
    batch = training.get("per_device_train_batch_size")
    batch = config_default("KTOConfig", "per_device_train_batch_size") if batch is None else batch
    if isinstance(batch, int) and batch <= 1:
        problems.append(f"training.per_device_train_batch_size is {batch}, but KTO estimates its KL reference point "
                        "from the other rows of each batch (each prompt with another row's completion), so it needs "
                        "at least 2 rows per device batch; use 2 or more (gradient_accumulation_steps does not "
                        "count: the estimate is per batch), or loss_type: apo_zero_unpaired, which has no KL "
                        "term.")  # fmt: skip
    sampling = training.get("train_sampling_strategy", "sequential")
    if sampling != "sequential":
        problems.append(f"training.train_sampling_strategy is {sampling!r}, but KTO pairs each row with its "
                        "neighbour's completion for its KL estimate, which holds only in the rows' fixed order; "
                        "remove it (KTO's default is sequential).")  # fmt: skip
    return problems


def _extras(recipe: Recipe) -> list[str]:
    from rlhf_cli.generation import vllm_problem

    problems = []
    strategy = recipe.distributed.strategy
    if strategy in ("zero2", "zero3") and not installed("deepspeed"):
        problems.append(f"distributed.strategy: {strategy} runs on DeepSpeed, which is not installed: "
                        'pip install "rlhf-cli[deepspeed]" (or use strategy ddp).')  # fmt: skip
    vllm = vllm_problem(recipe.generation)
    if vllm:
        problems.append(vllm)
    return problems


def _output(recipe: Recipe) -> list[str]:
    if recipe.output_dir and Path(recipe.output_dir).expanduser().is_file():
        return [f"output_dir: {recipe.output_dir} is a file; the run directory must be a directory."]
    return []


def hardware_problems(recipe: Recipe, hardware) -> list[str]:
    """Processes and precision against this machine (`hardware`: launch.Hardware), one sentence each."""
    problems = []
    dist = recipe.distributed
    per_machine = -(-(dist.num_processes or 1) // dist.num_machines)
    if dist.strategy != "none" and dist.num_processes:
        cpus = os.cpu_count() or 1
        if hardware.gpus and per_machine > hardware.gpus:
            problems.append(
                f"distributed.num_processes: {dist.num_processes} over {dist.num_machines} machine(s) is "
                f"{per_machine} per machine, but this machine has {hardware.gpus} GPU(s) visible; use at most "
                f"{hardware.gpus * dist.num_machines} (one process per GPU), or check CUDA_VISIBLE_DEVICES."
            )
        elif not hardware.gpus and per_machine > cpus:
            problems.append(
                f"distributed.num_processes: {dist.num_processes} processes over {dist.num_machines} machine(s) "
                f"need {per_machine} on this machine, which has no GPU and {cpus} CPU cores; use at most {cpus}."
            )
    if hardware.gpus and wants_half_precision(recipe) == "bf16" and not hardware.bf16_supported:
        problems.append(
            "bf16 was asked for (training.bf16 or model.dtype: bfloat16), but this GPU does not support bfloat16; "
            "use training.fp16: true and model.dtype: float16, or float32."
        )
    return problems


def wants_half_precision(recipe: Recipe) -> str | None:
    """"bf16" / "fp16" when the recipe asks for half precision (a GPU recipe), else None."""
    dtype = recipe.model.dtype if recipe.model is not None else "auto"
    if recipe.training.get("bf16") is True or dtype == "bfloat16":
        return "bf16"
    if recipe.training.get("fp16") is True or dtype == "float16":
        return "fp16"
    return None


def check_hardware(recipe: Recipe, hardware, *, planning: bool = False) -> str | None:
    """Raise a UserError when this machine cannot run the recipe, in the parent process before accelerate starts
    workers that would fail one by one. When only planning (recipe validate, --dry-run) a GPU recipe on a machine
    without a GPU is not refused, since it is likely meant for another machine: the problem comes back as a note."""
    problems = hardware_problems(recipe, hardware)
    if not problems:
        return None
    if planning and not hardware.gpus and wants_half_precision(recipe):
        return ("not checked against this machine, which has no GPU: " + " ".join(problems)).replace("..", ".")
    plural = "s" if len(problems) > 1 else ""
    raise UserError(f"This machine cannot run the recipe as it is ({len(problems)} problem{plural}): "
                    + " ".join(problems))  # fmt: skip
