"""Benchmark driver for the anchor: TRL 1.12's `trl.experimental.ppo.PPOTrainer` on the benchmark's saved models.

Usage (normally started by ppo_throughput.py with the anchor virtual environment's python):
    benchmarks/.venv-trl112/bin/python benchmarks/_trl112_ppo.py SPEC.json RESULT.json

How our settings map onto TRL's (read from trl 1.12.0's experimental/ppo/ppo_trainer.py):
- rollouts per step = per_device_train_batch_size * gradient_accumulation_steps (* processes). We use
  per_device_train_batch_size = batch and gradient_accumulation_steps = 1, so that
- num_mini_batches = batch / mini_batch gives minibatches of mini_batch rows, each ONE micro-batch and ONE optimizer
  step (TRL steps its optimizer only every gradient_accumulation_steps micro-batches, so accumulation > 1 would
  change the number of updates), num_ppo_epochs passes over the rollout: the same updates as ours.
- local_rollout_forward_batch_size = batch: generation and the no-grad forwards run in one chunk, as ours.
- total_episodes = batch * steps: one dataloader batch per PPO step, exactly `steps` steps.
- stop_token = "eos" with the same missing_eos_penalty; response_length, temperature, kl_coef as ours.
- gradient_checkpointing = False (TRL's config default is True; ours does not checkpoint, and PPOTrainer never
  enables it anyway), no sample generations, no checkpoints, report_to none.
- mixed precision the same as ours (bf16 autocast on a bf16 GPU, float32 on CPU): PPOTrainer builds its own
  Accelerator() without a mixed_precision argument, so it is set through ACCELERATE_MIXED_PRECISION.

Timing: total seconds per step are exact (consecutive on_step_end callbacks: every instruction of the loop is in
one step). The phase split is best effort, taken by wrapping module functions the loop calls by name:
generate = batch_generation(); forward = end of generation -> first training forward (TRL's old log-probs come
from the generation scores, so this is the reference, value and reward forwards plus TRL's bookkeeping);
train = first training forward -> last optimizer.step() of the step.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from _bench_common import Clock, peak_memory, read_spec, versions, write_result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("spec")
    parser.add_argument("result")
    parser.add_argument("--profile", help="write cProfile statistics of trainer.train() to this file")
    args = parser.parse_args()
    spec = read_spec(args.spec)
    os.environ["ACCELERATE_MIXED_PRECISION"] = spec["precision"]

    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_module

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    clock = Clock(device)
    started = time.time()

    tokenizer = AutoTokenizer.from_pretrained(spec["policy_dir"], padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(spec["policy_dir"])
    reward = AutoModelForSequenceClassification.from_pretrained(spec["reward_dir"], num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(spec["reward_dir"], num_labels=1)  # critic init = RM
    for model in (reward, value):
        model.config.pad_token_id = tokenizer.pad_token_id

    import json

    with open(spec["prompts_file"], encoding="utf-8") as handle:
        prompts = [json.loads(line)["prompt"] for line in handle if line.strip()]
    rows = [{"input_ids": tokenizer(p, add_special_tokens=False)["input_ids"][-spec["prompt_length"]:]}
            for p in prompts]  # fmt: skip
    dataset = Dataset.from_list(rows)

    batch, mini_batch, steps = spec["batch"], spec["mini_batch"], spec["total_steps"]
    config = PPOConfig(
        output_dir=os.path.join(spec["work_dir"], "run-trl112"),
        report_to="none",
        seed=spec["seed"],
        use_cpu=device == "cpu",
        bf16=spec["precision"] == "bf16",
        gradient_checkpointing=False,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_mini_batches=batch // mini_batch,
        num_ppo_epochs=spec["ppo_epochs"],
        local_rollout_forward_batch_size=batch,
        total_episodes=batch * steps,
        response_length=spec["response_length"],
        temperature=spec["temperature"],
        stop_token="eos",
        missing_eos_penalty=spec["missing_eos_penalty"],
        kl_coef=spec["kl_coef"],
        learning_rate=spec["learning_rate"],
        num_sample_generations=0,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )

    # ---- instrumentation
    state = {"gen": None, "first_train_forward": None, "last_optimizer_step": None}
    records, marks = [], []

    original_generation = ppo_module.batch_generation

    def timed_generation(*args, **kwargs):
        start = clock()
        result = original_generation(*args, **kwargs)
        state["gen"] = (start, clock())
        return result

    original_forward = ppo_module.forward

    def timed_forward(model, *args, **kwargs):
        is_training = isinstance(getattr(model, "module", model), ppo_module.PolicyAndValueWrapper)
        if is_training and state["first_train_forward"] is None:
            state["first_train_forward"] = clock()
        return original_forward(model, *args, **kwargs)

    ppo_module.batch_generation = timed_generation
    ppo_module.forward = timed_forward

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state_, control, **kwargs):
            marks.append(clock())

        def on_step_end(self, args, state_, control, **kwargs):
            now = clock()
            gen_start, gen_end = state["gen"]
            first, last = state["first_train_forward"], state["last_optimizer_step"]
            records.append({"step": len(records) + 1, "total": now - marks[-1], "generate": gen_end - gen_start,
                            "forward": first - gen_end, "train": last - first})  # fmt: skip
            marks.append(now)
            state.update(gen=None, first_train_forward=None, last_optimizer_step=None)

    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=None,  # a deep copy of the policy, as ours
        reward_model=reward,
        value_model=value,
        train_dataset=dataset,
        eval_dataset=dataset,  # never sampled (num_sample_generations=0); avoids a DataLoader over None
        callbacks=[StepClock()],
    )
    optimizer = trainer.optimizer
    original_step = optimizer.step

    def timed_optimizer_step(*args, **kwargs):
        result = original_step(*args, **kwargs)
        state["last_optimizer_step"] = clock()
        return result

    optimizer.step = timed_optimizer_step  # train() calls self.optimizer.step(): the instance attribute wins
    loaded = time.time()

    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.runcall(trainer.train)
        with open(args.profile, "w", encoding="utf-8") as handle:
            pstats.Stats(profiler, stream=handle).sort_stats("cumulative").print_stats(60)
            pstats.Stats(profiler, stream=handle).sort_stats("tottime").print_stats(40)
    else:
        trainer.train()
    memory = peak_memory(device)
    if len(records) != steps:
        print(f"expected {steps} step records, got {len(records)}", file=sys.stderr)
        return 1

    write_result(args.result, {
        "impl": "trl-1.12",
        "device": str(trainer.accelerator.device),
        "device_name": torch.cuda.get_device_name() if device == "cuda" else None,
        "precision": trainer.accelerator.mixed_precision,
        "torch_threads": torch.get_num_threads(),
        "phase_source": "driver instrumentation (batch_generation / forward / optimizer.step wrappers); best effort",
        "total_source": "consecutive on_step_end callbacks (exact)",
        "records": records,
        "wall_seconds_incl_loading": round(time.time() - started, 2),
        "load_seconds": round(loaded - started, 2),
        "trl_settings": {
            "per_device_train_batch_size": config.per_device_train_batch_size,
            "gradient_accumulation_steps": config.gradient_accumulation_steps,
            "num_mini_batches": config.num_mini_batches,
            "local_mini_batch_size": config.local_mini_batch_size,
            "num_ppo_epochs": config.num_ppo_epochs,
            "num_total_batches": config.num_total_batches,
            "optim": str(getattr(config.optim, "value", config.optim)),
        },
        "trl_file": trl.__file__,
        "versions": versions(),
        "pid": os.getpid(),
        **memory,
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
