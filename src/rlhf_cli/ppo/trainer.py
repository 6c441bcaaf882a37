"""The PPO loop: rollout -> score -> KL-shaped rewards -> GAE -> K epochs of clipped updates. Reads top to bottom.

Four models: the policy and the critic train (each with its own AdamW); the reference policy and the reward model are
frozen. Reference log-probs, values and scores are computed once per rollout, never per PPO epoch.
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rlhf_cli.errors import UserError
from rlhf_cli.ppo.config import PPOConfig
from rlhf_cli.ppo.losses import (
    adaptive_kl_beta,
    explained_variance,
    gae,
    kl_per_token,
    masked_mean,
    per_token_rewards,
    policy_loss,
    value_loss,
    whiten,
)
from rlhf_cli.ppo.rollout import Batch, critic_values, policy_logprobs, response_mask_from, reward_scores
from rlhf_cli.recipe import Recipe
from rlhf_cli.rundir import METRICS_FILE, interrupt_callback, last_checkpoint


@dataclass
class PPOState:
    """What a checkpoint needs beyond weights, optimizers and RNGs (saved through accelerate)."""

    step: int = 0
    beta: float = 0.0
    score_count: int = 0
    score_mean: float = 0.0
    score_m2: float = 0.0  # Welford running sum of squared deviations

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def update_scores(self, scores: torch.Tensor) -> None:
        for value in scores.tolist():
            self.score_count += 1
            delta = value - self.score_mean
            self.score_mean += delta / self.score_count
            self.score_m2 += delta * (value - self.score_mean)

    @property
    def score_std(self) -> float:
        return math.sqrt(self.score_m2 / max(self.score_count - 1, 1)) if self.score_count > 1 else 1.0


def load_rule_reward(spec: str):
    module_name, _, function_name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"ppo.reward.function {spec!r} cannot be imported: {exc}") from None
    if not callable(function):
        raise UserError(f"ppo.reward.function {spec!r} is not callable.")
    return function


def check_same_vocabulary(tokenizer, other_path: str, what: str) -> None:
    """Policy, reference, critic and reward model read the same token ids, so their tokenizers must agree."""
    from transformers import AutoTokenizer

    try:
        other = AutoTokenizer.from_pretrained(other_path)
    except (OSError, ValueError):
        return  # no tokenizer saved there: nothing to compare
    if other.get_vocab() != tokenizer.get_vocab():
        raise UserError(
            f"{what} ({other_path}) uses a different tokenizer from the policy ({len(other)} vs {len(tokenizer)} "
            "tokens or different ids); PPO needs every model to read the same token ids."
        )
    if other.eos_token != tokenizer.eos_token:
        raise UserError(f"{what} ({other_path}) has EOS {other.eos_token!r}, the policy {tokenizer.eos_token!r}.")


def encode_prompts(dataset, tokenizer, max_length: int) -> list[list[int]]:
    """Token ids of every prompt (chat template with the generation prompt for message lists), left-truncated."""
    encoded = []
    for prompt in dataset["prompt"]:
        if isinstance(prompt, list):
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        else:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        encoded.append(list(ids)[-max_length:])
    return encoded


def left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, width - len(sequence):] = torch.tensor(sequence, dtype=torch.long)
        mask[row, width - len(sequence):] = 1
    return ids.to(device), mask.to(device)


def prompt_indices(step: int, per_process: int, num_processes: int, process_index: int, total: int, seed: int):
    """Which prompts this process rolls out at `step`: a fresh seeded permutation per pass over the data, so the
    prompt stream is a pure function of the step (what makes --resume exact)."""
    global_batch = per_process * num_processes
    start = step * global_batch + process_index * per_process
    indices = []
    for position in range(start, start + per_process):
        epoch, offset = divmod(position, total)
        permutation = torch.randperm(total, generator=torch.Generator().manual_seed(seed + epoch))
        indices.append(int(permutation[offset]))
    return indices


class PPOTrainer:
    def __init__(self, recipe: Recipe, run_dir: Path, prompts, *, precision: dict):
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
        from trl.trainer.utils import disable_dropout_in_model

        from rlhf_cli.models import load_model, load_tokenizer, resolve_model_path

        self.recipe, self.run_dir = recipe, run_dir
        self.config = config = PPOConfig(**recipe.training)
        self.accelerator = Accelerator(cpu=precision.get("use_cpu", False),
                                       mixed_precision="bf16" if precision.get("bf16") else "no")  # fmt: skip
        set_seed(recipe.seed)

        spec, ppo = recipe.model, recipe.ppo
        self.rule = load_rule_reward(ppo.reward.function) if ppo.reward.function else None  # fail before loading
        policy_path = resolve_model_path(spec, recipe.seed)
        self.tokenizer = load_tokenizer(spec, policy_path, conversational=isinstance(prompts[0]["prompt"], list))
        others = {}  # path -> recipe key; a path named twice is checked once
        for what, path in (("ppo.ref_model", ppo.ref_model), ("ppo.value_model", ppo.value_model),
                           ("ppo.reward.model", ppo.reward.model)):  # fmt: skip
            if path:
                others[path] = what
        for path, what in others.items():
            check_same_vocabulary(self.tokenizer, path, what)

        self.policy = load_model(spec, policy_path, "causal_lm", self.tokenizer)
        # Frozen copies come from memory when they start from the same weights: no model is read twice.
        self.ref = (copy.deepcopy(self.policy) if not ppo.ref_model
                    else AutoModelForCausalLM.from_pretrained(ppo.ref_model))  # fmt: skip
        self.reward_model = None
        if ppo.reward.model:
            self.reward_model = AutoModelForSequenceClassification.from_pretrained(ppo.reward.model, num_labels=1)
        value_path = ppo.value_model or ppo.reward.model
        if value_path and value_path == ppo.reward.model:
            self.critic = copy.deepcopy(self.reward_model)
        else:
            self.critic = AutoModelForSequenceClassification.from_pretrained(value_path or policy_path, num_labels=1)
        self.critic.config.pad_token_id = self.tokenizer.pad_token_id
        for model in (self.policy, self.ref, self.critic, self.reward_model):
            if model is not None:
                disable_dropout_in_model(model)  # PPO's ratio compares two forward passes: they must agree
        for frozen in (self.ref, self.reward_model):
            if frozen is not None:
                frozen.requires_grad_(False).eval()

        policy_opt = torch.optim.AdamW(self.policy.parameters(), lr=config.learning_rate, eps=1e-5)
        critic_opt = torch.optim.AdamW(self.critic.parameters(), eps=1e-5,
                                       lr=config.critic_learning_rate or config.learning_rate)  # fmt: skip
        acc = self.accelerator
        self.policy, self.policy_opt, self.critic, self.critic_opt = acc.prepare(
            self.policy, policy_opt, self.critic, critic_opt
        )
        self.ref = self.ref.to(acc.device)
        if self.reward_model is not None:
            self.reward_model = self.reward_model.to(acc.device)
        self.state = PPOState(beta=config.kl_coef)
        acc.register_for_checkpointing(self.state)

        self.prompt_texts = prompts["prompt"]
        self.prompt_ids = encode_prompts(prompts, self.tokenizer, recipe.data.max_length)
        self.generator = torch.Generator(device="cpu").manual_seed(recipe.seed + acc.process_index)

    # ------------------------------------------------------------ one PPO iteration

    @torch.no_grad()
    def rollout(self, indices: list[int]) -> tuple[Batch, dict[str, torch.Tensor]]:
        """Sample responses, then score them and compute old log-probs, reference log-probs and values once."""
        from trl.models.utils import unwrap_model_for_generation

        cfg, tok, acc = self.config, self.tokenizer, self.accelerator
        query_ids, query_mask = left_pad([self.prompt_ids[i] for i in indices], tok.pad_token_id, acc.device)
        with unwrap_model_for_generation(self.policy, acc) as unwrapped:  # ZeRO-3: gather once, not per token
            output = unwrapped.generate(
                input_ids=query_ids, attention_mask=query_mask, max_new_tokens=cfg.response_length,
                do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            )  # fmt: skip
        response_ids = output[:, query_ids.shape[1]:]
        response_mask = response_mask_from(response_ids, tok.eos_token_id)
        response_ids = response_ids.masked_fill(response_mask == 0, tok.pad_token_id)
        batch = Batch(query_ids, query_mask, response_ids, response_mask)

        logprobs = policy_logprobs(self.policy, batch, cfg.temperature)
        ref_logprobs = policy_logprobs(self.ref, batch, cfg.temperature)
        values = critic_values(self.critic, batch)
        if self.reward_model is not None:
            scores = reward_scores(self.reward_model, batch).float()
        else:
            completions = tok.batch_decode(response_ids, skip_special_tokens=True)
            prompts = [self.prompt_texts[i] for i in indices]
            scores = torch.tensor(self.rule(prompts, completions), dtype=torch.float, device=acc.device)
        has_eos = (response_ids == tok.eos_token_id).any(1)
        return batch, {"logprobs": logprobs, "ref_logprobs": ref_logprobs, "values": values, "scores": scores,
                       "has_eos": has_eos}  # fmt: skip

    def step(self, indices: list[int]) -> tuple[dict[str, float], Batch, torch.Tensor]:
        cfg, acc, state = self.config, self.accelerator, self.state
        batch, roll = self.rollout(indices)
        mask = batch.response_mask.float()

        # score: the reward model's (or rule's) verdict, with a penalty for never finishing, optionally normalised
        raw_scores = roll["scores"]
        scores = raw_scores.clone()
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * (~roll["has_eos"]).float()
        if cfg.normalize_rewards:
            state.update_scores(acc.gather(scores).cpu())
            scores = scores / state.score_std
        if cfg.reward_clip is not None:
            scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)

        # per-token reward: r_t = -beta * KL_t + [t = last] * score, then GAE
        kl = kl_per_token(roll["logprobs"], roll["ref_logprobs"], cfg.kl_estimator) * mask
        rewards, non_score = per_token_rewards(scores, kl, state.beta, batch.last_index)
        rewards = rewards * mask
        advantages, returns = gae(rewards, roll["values"], mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask)

        # K epochs of minibatch updates on this rollout
        stats: dict[str, list[float]] = {key: [] for key in
                                         ("policy_loss", "value_loss", "clipfrac", "vf_clipfrac", "approx_kl",
                                          "entropy", "ratio")}  # fmt: skip
        rows = batch.query_ids.shape[0]
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(rows, generator=self.generator)
            for start in range(0, rows, cfg.mini_batch_size):
                index = order[start : start + cfg.mini_batch_size].to(acc.device)
                mini, mini_mask = batch.select(index), mask[index]

                new_logprobs, entropy = policy_logprobs(self.policy, mini, cfg.temperature, with_entropy=True)
                pg_loss, pg_stats = policy_loss(new_logprobs, roll["logprobs"][index], advantages[index],
                                                mini_mask, cfg.cliprange)  # fmt: skip
                mean_entropy = masked_mean(entropy, mini_mask)
                acc.backward(pg_loss - cfg.entropy_coef * mean_entropy)
                acc.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
                self.policy_opt.step()
                self.policy_opt.zero_grad()

                new_values = critic_values(self.critic, mini)
                vf_loss, vf_stats = value_loss(new_values, roll["values"][index], returns[index], mini_mask,
                                               cfg.cliprange_value)  # fmt: skip
                acc.backward(cfg.vf_coef * vf_loss)
                acc.clip_grad_norm_(self.critic.parameters(), cfg.max_grad_norm)
                self.critic_opt.step()
                self.critic_opt.zero_grad()

                for key, value in (("policy_loss", pg_loss), ("value_loss", vf_loss), ("entropy", mean_entropy),
                                   *pg_stats.items(), *vf_stats.items()):  # fmt: skip
                    stats[key].append(value.item())
            if cfg.early_stop_kl is not None and sum(stats["approx_kl"]) / len(stats["approx_kl"]) > cfg.early_stop_kl:
                break

        # KL controller (Ziegler et al. 2019): nudge beta toward the target KL per response
        kl_per_response = acc.gather(kl.sum(1)).mean().item()
        if cfg.target_kl is not None:
            state.beta = adaptive_kl_beta(state.beta, kl_per_response, cfg.target_kl, cfg.kl_horizon,
                                          rows * acc.num_processes)  # fmt: skip

        def mean(tensor):
            return acc.gather(tensor.float()).mean().item()

        metrics = {
            "score": mean(raw_scores),
            "kl": kl_per_response,
            "non_score_reward": mean(non_score.sum(1)),
            "total_reward": mean(rewards.sum(1)),
            "beta": state.beta,
            "response_length": mean(batch.response_mask.sum(1)),
            "eos_rate": mean(roll["has_eos"]),
            "explained_variance": explained_variance(roll["values"], returns, mask).item(),
            **{key: sum(values) / len(values) for key, values in stats.items() if values},
        }
        return metrics, batch, raw_scores

    # ------------------------------------------------------------ the loop

    def train(self, *, resume: bool) -> int:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        cfg, acc, state = self.config, self.accelerator, self.state
        if resume:
            acc.load_state(str(last_checkpoint(self.run_dir)))
        interrupt = interrupt_callback()
        console = Console()
        main = acc.is_main_process
        started = time.time()
        progress = Progress(TextColumn("[blue]PPO"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            TextColumn("{task.description}"), console=console, disable=not main)  # fmt: skip
        with interrupt.installed(), progress:
            task = progress.add_task("", total=cfg.steps, completed=state.step)
            while state.step < cfg.steps:
                indices = prompt_indices(state.step, cfg.rollout_batch_size, acc.num_processes, acc.process_index,
                                         len(self.prompt_ids), self.recipe.seed)  # fmt: skip
                metrics, batch, scores = self.step(indices)
                state.step += 1
                if main and state.step % cfg.logging_steps == 0:
                    record = {"step": state.step, "time": round(time.time(), 3), **metrics}
                    with (self.run_dir / METRICS_FILE).open("a", encoding="utf-8") as handle:
                        handle.write(json.dumps(record) + "\n")
                if main and cfg.sample_every and state.step % cfg.sample_every == 0:
                    self.log_samples(batch, scores, progress.console)
                progress.update(task, completed=state.step,
                                description=f"score {metrics['score']:+.3f}  kl {metrics['kl']:.3f}")  # fmt: skip
                stop = self._stop_requested(interrupt)
                if stop or state.step % cfg.save_steps == 0:
                    acc.save_state(str(self.run_dir / f"checkpoint-{state.step}"))
                if stop:
                    if main:
                        console.print(f"Interrupted: checkpoint saved in {self.run_dir / f'checkpoint-{state.step}'}."
                                      " Continue with the same command and --resume.")  # fmt: skip
                    return 130
        self.save_final(time.time() - started)
        return 0

    def _stop_requested(self, interrupt) -> bool:
        flag = torch.tensor([int(interrupt.requested)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item())

    def log_samples(self, batch: Batch, scores: torch.Tensor, console) -> None:
        from rich.table import Table

        tok = self.tokenizer
        rows = []
        for i in range(min(self.config.num_samples, batch.query_ids.shape[0])):
            rows.append({
                "step": self.state.step,
                "prompt": tok.decode(batch.query_ids[i][batch.query_mask[i].bool()], skip_special_tokens=False),
                "response": tok.decode(batch.response_ids[i][batch.response_mask[i].bool()], skip_special_tokens=True),
                "score": round(scores[i].item(), 4),
            })  # fmt: skip
        with (self.run_dir / "samples.jsonl").open("a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        table = Table("prompt", "response", "score", title=f"Samples at step {self.state.step}", title_justify="left")
        for row in rows:
            table.add_row(row["prompt"][-80:], row["response"][:120], f"{row['score']:+.3f}")
        console.print(table)

    def save_final(self, seconds: float) -> None:
        from rlhf_cli.rundir import print_summary, write_summary

        acc = self.accelerator
        acc.wait_for_everyone()
        acc.unwrap_model(self.policy).save_pretrained(self.run_dir, is_main_process=acc.is_main_process,
                                                      state_dict=acc.get_state_dict(self.policy))  # fmt: skip
        acc.unwrap_model(self.critic).save_pretrained(self.run_dir / "critic", is_main_process=acc.is_main_process,
                                                      state_dict=acc.get_state_dict(self.critic))  # fmt: skip
        if acc.is_main_process:
            self.tokenizer.save_pretrained(self.run_dir)
            history = [json.loads(line) for line in (self.run_dir / METRICS_FILE).read_text().splitlines()]
            window = max(1, len(history) // 5)
            summary = {
                "stage": "ppo",
                "policy": self.recipe.model.name_or_path,
                "steps": self.state.step,
                "score (first steps)": sum(r["score"] for r in history[:window]) / window,
                "score (last steps)": sum(r["score"] for r in history[-window:]) / window,
                "kl (last steps)": sum(r["kl"] for r in history[-window:]) / window,
                "beta": self.state.beta,
                "wall time (s)": round(seconds, 1),
                "output": str(self.run_dir),
            }
            write_summary(self.run_dir, summary)
            print_summary("PPO: done", summary)
