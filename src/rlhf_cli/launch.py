"""From `distributed:` to an accelerate config, a DeepSpeed JSON and the exact `accelerate launch` command.

`strategy: none` trains in this process. Any other strategy writes both files into the run directory and
re-executes the stage as `python -m rlhf_cli.worker` under `accelerate launch`; accelerate (and DeepSpeed) is
the distributed engine, multi-node included.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rlhf_cli.recipe import DistributedSpec, Recipe
from rlhf_cli.trl_fields import config_default

ACCELERATE_CONFIG = "accelerate_config.yaml"
DEEPSPEED_CONFIG = "deepspeed.json"
RESOLVED_RECIPE = "recipe.yaml"
WORKER_INPUT_ERROR = "worker-input-error.txt"  # written by a worker that stopped on a bad input


@dataclass
class Hardware:
    """What the launcher needs to know about this machine."""

    gpus: int = 0
    bf16_supported: bool = False

    @classmethod
    def detect(cls) -> Hardware:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return cls(gpus=gpus, bf16_supported=gpus > 0 and torch.cuda.is_bf16_supported())


@dataclass
class LaunchPlan:
    distributed: bool
    num_processes: int
    command: list[str]
    accelerate_config: dict | None = None
    deepspeed_config: dict | None = None
    precision: dict = field(default_factory=dict)  # use_cpu / bf16 / fp16 for the TRL config

    def command_line(self) -> str:
        return shlex.join(self.command)

    def write(self, run_dir: Path) -> None:
        """Write the accelerate config and DeepSpeed JSON (distributed runs only)."""
        if self.deepspeed_config is not None:
            (run_dir / DEEPSPEED_CONFIG).write_text(json.dumps(self.deepspeed_config, indent=2) + "\n")
        if self.accelerate_config is not None:
            (run_dir / ACCELERATE_CONFIG).write_text(yaml.safe_dump(self.accelerate_config, sort_keys=False))


def precision_settings(training: dict, hardware: Hardware) -> dict:
    """use_cpu/bf16 for the TRL config: CPU machines train in float32 (TRL defaults to bf16)."""
    if hardware.gpus == 0:
        return {"use_cpu": True, "bf16": False, "fp16": False}
    if training.get("fp16"):
        return {"bf16": False, "fp16": True}
    return {"bf16": training.get("bf16", hardware.bf16_supported)}


def deepspeed_config(recipe: Recipe, config_class: str, num_processes: int, precision: dict) -> dict:
    """DeepSpeed JSON for zero2/zero3 with every batch field resolved from the recipe (no `auto`)."""
    dist = recipe.distributed
    training = recipe.training

    def setting(key):
        return training.get(key, config_default(config_class, key))

    accumulation = setting("gradient_accumulation_steps")
    if config_class == "PPOConfig":  # ours: an optimizer step per PPO minibatch, split into micro-batches
        micro_batch = setting("mini_batch_size") // accumulation
    else:
        micro_batch = setting("per_device_train_batch_size")
    zero: dict = {"stage": 3 if dist.strategy == "zero3" else 2, "overlap_comm": True, "contiguous_gradients": True}
    if dist.strategy == "zero3":
        # Full weights gathered at save time, so the run directory holds an ordinary checkpoint.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if dist.offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": not precision.get("use_cpu", False)}
    if dist.offload == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": not precision.get("use_cpu", False)}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * num_processes,
        "gradient_clipping": setting("max_grad_norm"),
        "bf16": {"enabled": bool(precision.get("bf16"))},
        "fp16": {"enabled": bool(precision.get("fp16"))},
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # TRL/accelerate log; keep DeepSpeed quiet
    }


def accelerate_config(dist: DistributedSpec, num_processes: int, run_dir: Path, hardware: Hardware) -> dict:
    """The `accelerate launch --config_file` contents."""
    on_cpu = hardware.gpus == 0
    config: dict = {"compute_environment": "LOCAL_MACHINE", "num_processes": num_processes}
    if dist.strategy == "ddp":
        config["distributed_type"] = "MULTI_CPU" if on_cpu else "MULTI_GPU"
    else:
        config["distributed_type"] = "DEEPSPEED"
        config["deepspeed_config"] = {
            "deepspeed_config_file": str(run_dir / DEEPSPEED_CONFIG),
            "zero3_init_flag": dist.strategy == "zero3",
        }
    config.update(num_machines=dist.num_machines, machine_rank=dist.machine_rank, use_cpu=on_cpu)
    if dist.num_machines > 1:
        config.update(main_process_ip=dist.main_process_ip, same_network=True, rdzv_backend="static")
    if dist.main_process_port is not None:
        config["main_process_port"] = dist.main_process_port
    return config


def plan_launch(
    recipe: Recipe,
    stage: str,
    config_class: str,
    run_dir: Path,
    hardware: Hardware,
    *,
    resume: bool = False,
    cli_argv: list[str] | None = None,
) -> LaunchPlan:
    """Decide how the stage runs. `cli_argv` is the user's own command, shown for in-process runs."""
    dist = recipe.distributed
    precision = precision_settings(recipe.training, hardware)
    if dist.strategy == "none":
        return LaunchPlan(False, 1, cli_argv or ["rlhf", stage], precision=precision)
    num_processes = dist.num_processes or max(hardware.gpus, 1) * dist.num_machines
    run_dir = run_dir.resolve()
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(run_dir / ACCELERATE_CONFIG),
        "-m", "rlhf_cli.worker", stage, str(run_dir / RESOLVED_RECIPE), "--run-dir", str(run_dir),
    ]  # fmt: skip
    if resume:
        command.append("--resume")
    ds = deepspeed_config(recipe, config_class, num_processes, precision) if dist.strategy != "ddp" else None
    return LaunchPlan(
        True,
        num_processes,
        command,
        accelerate_config=accelerate_config(dist, num_processes, run_dir, hardware),
        deepspeed_config=ds,
        precision=precision,
    )
