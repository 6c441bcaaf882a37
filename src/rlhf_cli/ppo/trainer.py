"""The PPO loop: rollout -> score -> KL-shaped rewards -> GAE -> K epochs of clipped updates. Reads top to bottom.

Four models: the policy and the critic train (each with its own AdamW); the reference policy and the reward model are
frozen. Reference log-probs, values and scores are computed once per rollout, never per PPO epoch.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from rlhf_cli.evaluation.alarms import Alarm, AlarmConfig, AlarmMonitor
from rlhf_cli.generation import Decoder, backend_line, resolve_backend, sampling_options
from rlhf_cli.guard import DIVERGED_EXIT_CODE, Divergence, divergence_message, non_finite
from rlhf_cli.interrupts import INTERRUPTED_EXIT_CODE
from rlhf_cli.models import check_same_vocabulary
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
from rlhf_cli.ppo.rollout import (
    Batch,
    LoraPolicyAndCritic,
    PolicyAndCritic,
    disable_dropout,
    policy_logprobs,
    response_logprobs,
    response_mask_from,
    reward_scores,
)
from rlhf_cli.recipe import Recipe
from rlhf_cli.rewards import combine_scores, ensemble_spread, load_rule_reward, reward_model_paths
from rlhf_cli.rundir import METRICS_FILE, dumps, interrupt_callback, last_checkpoint, mark_checkpoint_complete


SNAPSHOTS_DIR = "snapshots"  # training.snapshot_steps: the policy at step N in snapshots/step-N
ALARM_EXIT_CODE = DIVERGED_EXIT_CODE  # one code, 3, for every alarm: divergence or reward hacking
# A step whose losses, gradient norm, rewards or KL are not finite has poisoned the weights (or the reward model
# gives NaN): the run stops there.
_MUST_BE_FINITE = ("policy_loss", "value_loss", "grad_norm", "score", "kl", "entropy")  # a run stopped on purpose by `ppo.alarms.mode: stop`


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


def check_companion_tokenizers(tokenizer, recipe: Recipe) -> None:
    """The reference, critic and reward model named in the recipe read the policy's token ids (each path once)."""
    ppo = recipe.ppo
    others = {}
    rewards = reward_model_paths(ppo.reward, "ppo.reward")
    named = [("ppo.ref_model", ppo.ref_model), ("ppo.value_model", ppo.value_model)]
    named += [("ppo.reward.model" if len(rewards) == 1 else f"ppo.reward member {k}", path)
              for k, path in enumerate(rewards)]  # fmt: skip
    for what, path in named:
        if path:
            others.setdefault(path, what)
    for path, what in others.items():
        check_same_vocabulary(tokenizer, path, what)


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
        indices.append(_data_pass_order(total, seed, epoch)[offset])
    return indices


@lru_cache(maxsize=2)  # the current pass over the data and the next
def _data_pass_order(total: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def minibatch_order(rows: int, seed: int, step: int, epoch: int) -> torch.Tensor:
    """A seeded shuffle of the rollout's rows for one PPO epoch: a pure function of (seed, step, epoch), so a resumed
    run shuffles exactly as an uninterrupted one."""
    import numpy as np

    entropy = int(np.random.SeedSequence([seed, step, epoch]).generate_state(1)[0])
    return torch.randperm(rows, generator=torch.Generator().manual_seed(entropy))


def repeats_an_ngram(response_ids: torch.Tensor, response_mask: torch.Tensor, n: int = 3) -> torch.Tensor:
    """1.0 for each response in which some n-gram of real tokens occurs twice (its repetition_rate term), else 0."""
    from collections import Counter

    flags = []
    for ids, mask in zip(response_ids.tolist(), response_mask.tolist()):
        tokens = ids[: sum(mask)]
        grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        flags.append(float(any(count >= 2 for count in grams.values())))
    return torch.tensor(flags, device=response_ids.device)


@dataclass
class PhaseTimer:
    """Wall seconds per phase of one step (generate / forward / train), synchronised with the GPU when there is one."""

    device: torch.device
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, phase: str):
        self._sync()
        started = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - started

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class PPOTrainer:
    def __init__(self, recipe: Recipe, run_dir: Path, prompts, *, precision: dict):
        from accelerate import Accelerator
        from accelerate.utils import DistributedType, InitProcessGroupKwargs, set_seed

        self.recipe, self.run_dir = recipe, run_dir
        self.config = config = PPOConfig(**recipe.training)
        # Under `accelerate launch` with DeepSpeed, cpu=True would switch DeepSpeed off; on a CPU-only machine
        # DeepSpeed instead needs the gloo backend named, or accelerate counts one process where there are several.
        with_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        on_cpu = precision.get("use_cpu", False)
        handlers = [InitProcessGroupKwargs(backend="gloo")] if with_deepspeed and on_cpu else []
        self.accelerator = acc = Accelerator(cpu=on_cpu and not with_deepspeed, kwargs_handlers=handlers,
                                             mixed_precision="bf16" if precision.get("bf16") else "no",
                                             gradient_accumulation_steps=config.gradient_accumulation_steps)  # fmt: skip
        set_seed(recipe.seed)
        plugin = acc.state.deepspeed_plugin
        self.zero3 = plugin is not None and plugin.zero_stage == 3

        self.rule = load_rule_reward(recipe.ppo.reward.function) if recipe.ppo.reward.function else None
        judge = recipe.ppo.judge
        self.judge_rule = load_rule_reward(judge.function, "ppo.judge.function") if judge and judge.function else None
        # The reward model, or an ensemble of them (ppo.reward.models, or an ensemble directory): one frozen model each.
        self.reward_paths = reward_model_paths(recipe.ppo.reward, "ppo.reward")
        self.tokenizer, trainable, self.ref, self.reward_models = self._load_models(prompts)
        self.judge_model = None
        if judge and judge.model:  # frozen, never trained on: an independent check of the proxy's gains
            from transformers import AutoModelForSequenceClassification

            check_same_vocabulary(self.tokenizer, judge.model, "ppo.judge.model")
            self.judge_model = AutoModelForSequenceClassification.from_pretrained(judge.model, num_labels=1)
            self.judge_model.requires_grad_(False).eval()
        # How each reward model reads text: its rendering.json (as `rlhf train-rm` trained it), or None (a model
        # without one reads the rollout's token ids at the response's last token, as before).
        self.reward_readers = [self._reward_reader(model, path, "ppo.reward.model" if len(self.reward_paths) == 1
                                                   else f"ppo.reward member {k}", prompts)
                               for k, (model, path) in enumerate(zip(self.reward_models, self.reward_paths))]  # fmt: skip
        self.judge_reader = self._reward_reader(self.judge_model, judge.model if judge else None, "ppo.judge.model",
                                                prompts)  # fmt: skip
        policy_params, critic_params = trainable.parameter_groups()
        optimizer = torch.optim.AdamW(
            [{"params": policy_params, "lr": config.learning_rate},
             {"params": critic_params, "lr": config.critic_learning_rate or config.learning_rate}],
            eps=1e-5,
            fused=True,  # one kernel per parameter group instead of a Python loop over tensors
        )  # fmt: skip
        updates_per_step = config.ppo_epochs * (config.rollout_batch_size // config.mini_batch_size)
        total_updates = max(config.steps * updates_per_step, 1)
        # Stepped by hand once per optimizer step (accelerate would step a prepared scheduler once per process).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda update: 1.0 if config.lr_schedule == "constant" else max(0.0, 1 - update / total_updates)
        )
        self.model, self.optimizer = acc.prepare(trainable, optimizer)
        # Once, and only when wrapped: unwrapping looks up package metadata and imports DeepSpeed on every call.
        self.distributed = acc.distributed_type != DistributedType.NO
        self.unwrapped = acc.unwrap_model(self.model) if self.distributed else self.model
        self.ref = self._prepare_frozen(self.ref)
        self.reward_models = [self._prepare_frozen(model) for model in self.reward_models]
        self.judge_model = self._prepare_frozen(self.judge_model)
        self.state = PPOState(beta=config.kl_coef)
        acc.register_for_checkpointing(self.state)
        acc.register_for_checkpointing(self.scheduler)

        from rlhf_cli.lengths import fit_prompts, warn

        # data.on_too_long: a prompt keeps its last data.max_length tokens, or is dropped, or stops the run.
        prompts, self.prompt_lengths = fit_prompts(prompts, self.tokenizer, max_length=recipe.data.max_length,
                                                   on_too_long=recipe.data.on_too_long)  # fmt: skip
        warn(self.prompt_lengths)
        self.prompt_texts = prompts["prompt"]
        self.prompt_ids = [list(ids) for ids in prompts["input_ids"]]
        self.timer = PhaseTimer(acc.device)  # a fresh one each step
        self.decoder = self._make_decoder()

    def _make_decoder(self) -> Decoder:
        """The rollout's decoding backend (recipe `generation:`); a vLLM engine is made here, once."""
        cfg, tok = self.config, self.tokenizer
        policy = self.unwrapped.policy
        decoder = Decoder(resolve_backend(self.recipe.generation, policy, zero3=self.zero3, what="ppo rollout"),
                          batch_size=cfg.rollout_batch_size)  # fmt: skip
        if decoder.name == "vllm":
            longest = self.recipe.data.max_length + cfg.response_length
            decoder.vllm_engine(policy, self.accelerator, tok, self._sampling_options(), max_model_length=longest)
        return decoder

    def _sampling_options(self) -> dict:
        cfg, tok = self.config, self.tokenizer
        return sampling_options(max_new_tokens=cfg.response_length, temperature=cfg.temperature, top_p=cfg.top_p,
                                pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)  # fmt: skip

    def _load_models(self, prompts):
        """Tokenizer, policy, critic, reference and reward model. Frozen copies come from memory when they start
        from the same weights, so no model is read twice; under ZeRO-3 each is loaded already sharded instead."""
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
        from rlhf_cli.models import load_model, load_tokenizer, resolve_model_path

        spec, ppo, config = self.recipe.model, self.recipe.ppo, self.config
        policy_path = resolve_model_path(spec, self.recipe.seed)
        tokenizer = load_tokenizer(spec, policy_path, conversational=isinstance(prompts[0]["prompt"], list))
        check_companion_tokenizers(tokenizer, self.recipe)

        def copy_or_load(model, load):
            return load() if self.zero3 else copy.deepcopy(model)

        policy = load_model(spec, policy_path, "causal_lm", tokenizer)
        if spec.lora is not None:  # adapters on one base; the reference is that base with adapters off
            from rlhf_cli.models import lora_config

            disable_dropout(policy)
            trainable = LoraPolicyAndCritic(policy, lora_config(spec, "causal_lm"))
            reward_models = [AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
                             for path in self.reward_paths]  # fmt: skip
            for reward_model in reward_models:
                disable_dropout(reward_model)
                reward_model.requires_grad_(False).eval()
            return tokenizer, trainable, None, reward_models
        if ppo.ref_model:
            ref = AutoModelForCausalLM.from_pretrained(ppo.ref_model)
        else:
            ref = copy_or_load(policy, lambda: load_model(spec, policy_path, "causal_lm", tokenizer))
        reward_models = [AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
                         for path in self.reward_paths]  # fmt: skip
        reward_model = reward_models[0] if reward_models else None
        # The critic starts from the reward model; from an ensemble, from member 0.
        value_path = ppo.value_model or (self.reward_paths[0] if self.reward_paths else None)
        if value_path is None:  # no reward model to start from (rule reward): the policy's body, a fresh value head
            critic = load_model(spec, policy_path, "reward", tokenizer)
        elif reward_model is not None and value_path == self.reward_paths[0]:
            critic = copy_or_load(reward_model, lambda: AutoModelForSequenceClassification.from_pretrained(
                value_path, num_labels=1))  # fmt: skip
        else:
            critic = AutoModelForSequenceClassification.from_pretrained(value_path, num_labels=1)
        critic.config.pad_token_id = tokenizer.pad_token_id
        for model in (policy, ref, critic, *reward_models):
            if model is not None:
                disable_dropout(model)  # PPO's ratio compares two forward passes: they must agree
        for frozen in (ref, *reward_models):
            if frozen is not None:
                frozen.requires_grad_(False).eval()
        if config.gradient_checkpointing:
            for model in (policy, critic):
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return tokenizer, PolicyAndCritic(policy, critic), ref, reward_models

    def _reward_reader(self, model, path: str | None, what: str, prompts):
        """A rendering.RewardReader for a reward model saved by `rlhf train-rm` (its rendering.json), else None with
        a note saying how the model is read instead. Built before DeepSpeed wraps the model (it reads its config)."""
        if model is None or not path:
            return None
        from rlhf_cli.rendering import make_reader, print_note, read_rendering, reward_tokenizer

        rendering = read_rendering(path)
        if rendering is None:
            print_note(f"{what} ({path}) has no rendering.json (it was not saved by `rlhf train-rm`), so it is "
                       "assumed to read the rollout as the policy wrote it: the prompt's token ids (chat template "
                       "with the generation prompt) + the sampled response, scored at its last token.")  # fmt: skip
            return None
        reader = make_reader(rendering, reward_tokenizer(path, self.tokenizer), model)
        note = reader.note(isinstance(prompts[0]["prompt"], list), "data.train")
        if note:
            print_note(note)
        return reader

    def _scores(self, model, reader, sub: Batch, rows: list[int]) -> torch.Tensor:
        """Scores of one chunk of the rollout: rendered as the reward model was trained (its reader), or read
        from the rollout's own token ids at each response's last token."""
        if reader is None:
            return reward_scores(model, sub).float()
        # padding after the first EOS is a special token: decoding leaves it out, and the EOS
        responses = self.tokenizer.batch_decode(sub.response_ids, skip_special_tokens=True)
        values = reader.score_responses(model, [self.prompt_texts[i] for i in rows], responses,
                                        self.accelerator.device, batch_size=len(rows))  # fmt: skip
        return torch.tensor(values, dtype=torch.float, device=self.accelerator.device)

    @staticmethod
    def _ensemble_metrics(roll: dict, mean) -> dict[str, float]:
        """An ensemble's members: score/member_k, each member's mean raw score, and score/ensemble_std, the mean
        over responses of the population std of the members' scores (their disagreement)."""
        if "member_scores" not in roll:
            return {}
        members = roll["member_scores"]
        metrics = {f"score/member_{k}": mean(row) for k, row in enumerate(members)}
        spread = ensemble_spread(members.tolist())  # per response: population std over members
        metrics["score/ensemble_std"] = mean(torch.tensor(spread, device=members.device))
        return metrics

    def _prepare_frozen(self, model):
        """Frozen models join the DeepSpeed run as inference engines (sharded under ZeRO-3), else sit on the device."""
        if model is None:
            return None
        if self.accelerator.state.deepspeed_plugin is not None:
            from trl.models.utils import prepare_deepspeed

            return prepare_deepspeed(model, self.accelerator)
        return model.to(self.accelerator.device)

    # ------------------------------------------------------------ one PPO iteration

    @contextmanager
    def _policy_for_generation(self):
        """The bare policy for `generate`. Under ZeRO-3 its parameters are gathered once for the whole generation
        (and the engine's per-module gather hooks lifted), not fetched again for every new token. A vLLM engine
        holds its own copy of the weights: nothing to gather."""
        policy = self.unwrapped.policy
        if self.decoder.name == "vllm":
            yield policy
            return
        checkpointing = policy.is_activation_checkpointing
        if checkpointing:  # it would turn the KV cache off
            policy.gradient_checkpointing_disable()
        try:
            if self.zero3:
                import deepspeed
                from trl.models.utils import add_hooks, remove_hooks

                with deepspeed.zero.GatheredParameters(list(policy.parameters())):
                    remove_hooks(self.model)
                    try:
                        yield policy
                    finally:
                        add_hooks(self.model)
            else:
                yield policy
        finally:
            if checkpointing:
                policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def _chunks(self, rows: int):
        size = self.config.mini_batch_size // self.config.gradient_accumulation_steps
        return [torch.arange(start, min(start + size, rows), device=self.accelerator.device)
                for start in range(0, rows, size)]  # fmt: skip

    @torch.no_grad()
    def rollout(self, indices: list[int]) -> tuple[Batch, dict[str, torch.Tensor]]:
        """Sample responses, then score them and compute old log-probs, reference log-probs and values once."""
        cfg, tok, acc = self.config, self.tokenizer, self.accelerator
        timer = self.timer
        query_ids, query_mask = left_pad([self.prompt_ids[i] for i in indices], tok.pad_token_id, acc.device)
        with timer("generate"), self._policy_for_generation() as policy:
            response_ids = self.decoder.generate(policy, query_ids, query_mask, self._sampling_options())
        response_mask = response_mask_from(response_ids, tok.eos_token_id)
        response_ids = response_ids.masked_fill(response_mask == 0, tok.pad_token_id)
        batch = Batch(query_ids, query_mask, response_ids, response_mask)

        parts: dict[str, list[torch.Tensor]] = {"logprobs": [], "values": [], "ref_logprobs": [], "scores": [],
                                                "judge_scores": [], "member_scores": []}  # fmt: skip
        with timer("forward"):
            for chunk in self._chunks(len(indices)):  # bounded memory: logits are (rows, length, vocab)
                sub = batch.select(chunk)
                rows = [indices[i] for i in chunk.tolist()]
                logits, values = self.model(**sub.inputs())
                parts["logprobs"].append(response_logprobs(logits, sub, cfg.temperature))
                parts["values"].append(sub.response_slice(values))
                if self.ref is not None:
                    parts["ref_logprobs"].append(policy_logprobs(self.ref, sub, cfg.temperature))
                else:  # LoRA mode: the base model without its adapters
                    reference = self.unwrapped.reference_logits(sub.inputs())
                    parts["ref_logprobs"].append(response_logprobs(reference, sub, cfg.temperature))
                if len(self.reward_models) == 1:
                    parts["scores"].append(self._scores(self.reward_models[0], self.reward_readers[0], sub, rows))
                elif self.reward_models:  # an ensemble: (members, rows) scores, combined below
                    parts["member_scores"].append(torch.stack([self._scores(model, reader, sub, rows) for model, reader
                                                               in zip(self.reward_models, self.reward_readers)]))
                if self.judge_model is not None:
                    parts["judge_scores"].append(self._scores(self.judge_model, self.judge_reader, sub, rows))
            member_scores = parts.pop("member_scores")
            rollout = {key: torch.cat(values) for key, values in parts.items() if values}
            if member_scores:
                rollout["member_scores"] = torch.cat(member_scores, dim=1)
                reward = self.recipe.ppo.reward
                combined = combine_scores(rollout["member_scores"].tolist(), reward.combine_how, reward.coef)
                rollout["scores"] = torch.tensor(combined, dtype=torch.float, device=acc.device)
            if self.rule is not None or self.judge_rule is not None:
                completions = tok.batch_decode(response_ids, skip_special_tokens=True)
                prompts = [self.prompt_texts[i] for i in indices]
                for key, rule in (("scores", self.rule), ("judge_scores", self.judge_rule)):
                    if rule is not None:
                        rollout[key] = torch.tensor(rule(prompts, completions), dtype=torch.float, device=acc.device)
        rollout["has_eos"] = (response_ids == tok.eos_token_id).any(1)
        return batch, rollout

    def step(self, indices: list[int]) -> tuple[dict[str, float], Batch, torch.Tensor]:
        cfg, acc, state = self.config, self.accelerator, self.state
        self.timer = PhaseTimer(acc.device)
        batch, roll = self.rollout(indices)
        mask = batch.response_mask.float()

        # score: the reward model's (or rule's) verdict, with a penalty for never finishing, optionally normalised
        raw_scores = roll["scores"]
        scores = raw_scores.clone()
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * (~roll["has_eos"]).float()
        if cfg.normalize_rewards:
            state.update_scores(self.gather(scores).cpu())
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

        # K epochs of minibatch updates on this rollout; each minibatch is one optimizer step
        stats: dict[str, list[torch.Tensor]] = {key: [] for key in
                                         ("policy_loss", "value_loss", "clipfrac", "vf_clipfrac", "approx_kl",
                                          "entropy", "ratio", "grad_norm")}  # fmt: skip
        rows = batch.query_ids.shape[0]
        with self.timer("train"):
            for epoch in range(cfg.ppo_epochs):
                order = minibatch_order(rows, self.recipe.seed, state.step, epoch).to(acc.device)
                for micro in order.split(cfg.mini_batch_size // cfg.gradient_accumulation_steps):
                    self._update(batch.select(micro), mask[micro], roll["logprobs"][micro], roll["values"][micro],
                                 advantages[micro], returns[micro], stats)  # fmt: skip
                if cfg.early_stop_kl is not None and torch.stack(stats["approx_kl"]).mean().item() > cfg.early_stop_kl:
                    break

        # KL controller (Ziegler et al. 2019): nudge beta toward the target KL per response
        kl_per_response = self.gather(kl.sum(1)).mean().item()
        if cfg.target_kl is not None:
            state.beta = adaptive_kl_beta(state.beta, kl_per_response, cfg.target_kl, cfg.kl_horizon,
                                          rows * acc.num_processes)  # fmt: skip

        def mean(tensor):
            return self.gather(tensor.float()).mean().item()

        metrics = {
            "score": mean(raw_scores),
            "kl": kl_per_response,
            "non_score_reward": mean(non_score.sum(1)),
            "total_reward": mean(rewards.sum(1)),
            "beta": state.beta,
            "response_length": mean(batch.response_mask.sum(1)),
            "eos_rate": mean(roll["has_eos"]),
            "repetition_rate": mean(repeats_an_ngram(batch.response_ids, batch.response_mask)),
            **({"judge_score": mean(roll["judge_scores"])} if "judge_scores" in roll else {}),
            **self._ensemble_metrics(roll, mean),
            "explained_variance": explained_variance(roll["values"], returns, mask).item(),
            "learning_rate": self.scheduler.get_last_lr()[0],
            **{key: torch.stack(values).mean().item() for key, values in stats.items() if values},
            **{f"time_{phase}": round(seconds, 4) for phase, seconds in self.timer.seconds.items()},
        }
        return metrics, batch, raw_scores

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate a per-row tensor from every process. (accelerate's gather uses all_gather_into_tensor under
        DeepSpeed, which the CPU backend, gloo, lacks; the list form works on every backend.)"""
        if self.accelerator.num_processes == 1:
            return tensor
        import torch.distributed as dist

        parts = [torch.empty_like(tensor) for _ in range(self.accelerator.num_processes)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def _update(self, mini: Batch, mask, old_logprobs, old_values, advantages, returns, stats) -> None:
        """One micro-batch: loss = L_clip(policy) - c_e * entropy + c_v * L_value(critic), one backward pass;
        the optimizer steps once per minibatch (after `gradient_accumulation_steps` micro-batches)."""
        cfg, acc = self.config, self.accelerator
        with acc.accumulate(self.model):
            logits, values = self.model(**mini.inputs())
            new_logprobs, entropy = response_logprobs(logits, mini, cfg.temperature, with_entropy=True)
            pg_loss, pg_stats = policy_loss(new_logprobs, old_logprobs, advantages, mask, cfg.cliprange)
            vf_loss, vf_stats = value_loss(mini.response_slice(values), old_values, returns, mask, cfg.cliprange_value)
            mean_entropy = masked_mean(entropy, mask)
            acc.backward(pg_loss - cfg.entropy_coef * mean_entropy + cfg.vf_coef * vf_loss)
            if acc.sync_gradients:
                grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                if grad_norm is not None:
                    stats["grad_norm"].append(torch.as_tensor(grad_norm, dtype=torch.float32, device=acc.device))
            self.optimizer.step()
            if acc.sync_gradients:
                self.scheduler.step()
            self.optimizer.zero_grad()
        for key, value in (("policy_loss", pg_loss), ("value_loss", vf_loss), ("entropy", mean_entropy),
                           *pg_stats.items(), *vf_stats.items()):  # fmt: skip
            stats[key].append(value.detach().float())  # kept on the device: one host sync per step, not per update

    # ------------------------------------------------------------ the loop

    def train(self, *, resume: bool) -> int:
        from rlhf_cli.console import make_console
        from rich.markup import escape
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        cfg, acc, state = self.config, self.accelerator, self.state
        if resume:
            acc.load_state(str(last_checkpoint(self.run_dir, warn=acc.is_main_process)))
            self.decoder.sync_weights()  # vllm: the engine was made from the starting weights, not the checkpoint's
        interrupt = interrupt_callback()
        console = make_console()
        main = acc.is_main_process
        # Every process sees the same gathered metrics, so every process reaches the same verdict.
        alarms = AlarmMonitor(AlarmConfig(**self.recipe.ppo.alarms), target_kl=cfg.target_kl)
        stopped_by: list[Alarm] = []
        started = time.time()
        progress = Progress(TextColumn("[blue]PPO"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            TextColumn("{task.description}"), console=console, disable=not main)  # fmt: skip
        with interrupt.installed(), progress:
            task = progress.add_task("", total=cfg.steps, completed=state.step)
            while state.step < cfg.steps:
                indices = prompt_indices(state.step, cfg.rollout_batch_size, acc.num_processes, acc.process_index,
                                         len(self.prompt_ids), self.recipe.seed)  # fmt: skip
                metrics, batch, scores = self.step(indices)
                self.decoder.sync_weights()  # vllm: the engine samples the next rollout from the updated policy
                state.step += 1
                # Metrics are gathered over every process, so every process reaches the same verdict.
                diverged = non_finite({key: metrics.get(key) for key in _MUST_BE_FINITE})
                if main and (state.step % cfg.logging_steps == 0 or diverged):
                    record = {"step": state.step, "time": round(time.time(), 3), **metrics}
                    with (self.run_dir / METRICS_FILE).open("a", encoding="utf-8") as handle:
                        handle.write(dumps(record) + "\n")
                if diverged:  # nothing is saved: the weights were updated by a non-finite loss or gradient
                    if main:
                        message = divergence_message(Divergence(state.step, diverged), last_checkpoint(self.run_dir))
                        progress.stop()
                        make_console(stderr=True, soft_wrap=True).print(f"[bold red]Error:[/] {escape(message)}",
                                                                   highlight=False)  # fmt: skip
                    return DIVERGED_EXIT_CODE
                if main and cfg.sample_every and state.step % cfg.sample_every == 0:
                    self.log_samples(batch, scores, progress.console)
                progress.update(task, completed=state.step,
                                description=f"score {metrics['score']:+.3f}  kl {metrics['kl']:.3f}")  # fmt: skip
                fired = alarms.update({"step": state.step, **metrics}) if alarms.config.mode != "off" else []
                if fired and main:
                    self.report_alarms(fired, progress.console)
                if alarms.should_stop and fired:
                    stopped_by = fired
                stop = self._stop_requested(interrupt)
                checkpoint = self.run_dir / f"checkpoint-{state.step}"
                if stop or stopped_by or state.step % cfg.save_steps == 0:
                    acc.save_state(str(checkpoint))
                    acc.wait_for_everyone()  # every rank's shard is on disk before the checkpoint counts as complete
                    if main:
                        mark_checkpoint_complete(checkpoint)
                if cfg.snapshot_steps and state.step % cfg.snapshot_steps == 0:
                    self.save_snapshot()
                if stopped_by:
                    if main:
                        console.print(f"[red]Stopped by the {', '.join(a.name for a in stopped_by)} alarm[/] "
                                      f"(ppo.alarms.mode: stop); checkpoint saved in {checkpoint}.")  # fmt: skip
                    return ALARM_EXIT_CODE
                if stop:
                    if main:
                        console.print(f"Interrupted: checkpoint saved in {checkpoint}."
                                      " Continue with the same command and --resume.")  # fmt: skip
                    return INTERRUPTED_EXIT_CODE
        if cfg.snapshot_steps and state.step % cfg.snapshot_steps:
            self.save_snapshot()  # the last step, off the interval
        self.save_final(time.time() - started)
        return 0

    def save_snapshot(self) -> Path:
        """The policy as it is now in snapshots/step-N (training.snapshot_steps): weights, config and tokenizer, a
        model directory every command loads, for the over-optimisation curve of `rlhf eval` (eval.curve). Under
        ZeRO-3 the weights are gathered as in `save_final` (every rank takes part, rank 0 writes); with LoRA the
        policy adapter is merged into a copy of the base. Written under a .partial name and renamed when whole."""
        import shutil

        acc = self.accelerator
        directory = self.run_dir / SNAPSHOTS_DIR / f"step-{self.state.step}"
        partial = directory.with_name(directory.name + ".partial")
        both = self.unwrapped
        if isinstance(both, LoraPolicyAndCritic):
            if acc.is_main_process:
                merged = copy.deepcopy(both.body)
                merged.set_adapter("policy")
                merged.merge_and_unload(adapter_names=["policy"]).save_pretrained(partial)
                del merged
        else:
            full_state = acc.get_state_dict(self.model) if self.distributed else self.model.state_dict()
            own = {key[len("policy."):]: value for key, value in (full_state or {}).items()
                   if key.startswith("policy.")}  # fmt: skip
            both.policy.save_pretrained(partial, is_main_process=acc.is_main_process, state_dict=own)
        if acc.is_main_process:
            self.tokenizer.save_pretrained(partial)
            if directory.exists():  # a resumed run passes the same step again
                shutil.rmtree(directory)
            partial.rename(directory)
        acc.wait_for_everyone()
        return directory

    def _save_lora(self, both: LoraPolicyAndCritic) -> None:
        """Adapters in adapter/policy and adapter/critic (value head beside them); with model.lora.merge, the policy
        merged into full weights in the run directory, a model every other command can load."""
        if not self.accelerator.is_main_process:
            return
        both.body.save_pretrained(self.run_dir / "adapter")
        torch.save(both.value_head.state_dict(), self.run_dir / "adapter" / "critic" / "value_head.pt")
        if self.recipe.model.lora.merge:
            both.body.set_adapter("policy")
            both.body.merge_and_unload(adapter_names=["policy"]).save_pretrained(self.run_dir)

    def report_alarms(self, fired: list, console) -> None:
        """Each alarm once in the terminal and as a line of alarms.jsonl in the run directory."""
        with (self.run_dir / "alarms.jsonl").open("a", encoding="utf-8") as handle:
            for alarm in fired:
                handle.write(json.dumps({"step": alarm.step, "alarm": alarm.name, "message": alarm.message}) + "\n")
                console.print(f"[yellow]Reward-hacking alarm[/] ({alarm.name}, step {alarm.step}): {alarm.message}",
                              highlight=False)  # fmt: skip

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
        # every rank takes part; under ZeRO-3 only rank 0 gets the gathered weights
        full_state = acc.get_state_dict(self.model) if self.distributed else self.model.state_dict()
        both = self.unwrapped
        if isinstance(both, LoraPolicyAndCritic):
            self._save_lora(both)
        else:
            for name, model, directory in (("policy", both.policy, self.run_dir),
                                           ("critic", both.critic, self.run_dir / "critic")):  # fmt: skip
                prefix = f"{name}."
                own = {key[len(prefix):]: value for key, value in (full_state or {}).items() if key.startswith(prefix)}
                model.save_pretrained(directory, is_main_process=acc.is_main_process, state_dict=own)
        if acc.is_main_process:
            self.tokenizer.save_pretrained(self.run_dir)
            history = [json.loads(line) for line in (self.run_dir / METRICS_FILE).read_text().splitlines()]
            window = max(1, len(history) // 5)
            summary = {
                "stage": "ppo",
                "policy": self.recipe.model.name_or_path,
                **{f"prompt {key}": value for key, value in self.prompt_lengths.counts().items()},
                "steps": self.state.step,
                "score (first steps)": sum(r["score"] for r in history[:window]) / window,
                "score (last steps)": sum(r["score"] for r in history[-window:]) / window,
                "kl (last steps)": sum(r["kl"] for r in history[-window:]) / window,
                "beta": self.state.beta,
                "decoding": backend_line(self.decoder),
                "wall time (s)": round(seconds, 1),
                "output": str(self.run_dir),
            }
            write_summary(self.run_dir, summary)
            print_summary("PPO: done", summary)
