"""PPOConfig: the `training:` keys of a PPO recipe, each with its default and the equation it controls.

Standard library only, so recipes are checked without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


def _help(text: str, default):
    return field(default=default, metadata={"help": text})


@dataclass
class PPOConfig:
    # ---- schedule
    steps: int = _help("PPO iterations; each samples `rollout_batch_size` prompts per process and trains on them.", 100)
    rollout_batch_size: int = _help("Prompts sampled per process per iteration.", 8)
    mini_batch_size: int = _help("Rollouts per optimizer step (per process); must divide rollout_batch_size.", 8)
    ppo_epochs: int = _help("Passes over each rollout batch (K in the PPO paper).", 4)
    learning_rate: float = _help("Adam learning rate of the policy.", 1e-5)
    critic_learning_rate: float | None = _help("Adam learning rate of the critic; default: learning_rate.", None)
    lr_schedule: str = _help("constant, or linear decay to 0 over all optimizer steps of the run.", "constant")
    max_grad_norm: float = _help("Gradient clipping: one global L2 norm over policy and critic gradients.", 1.0)
    gradient_accumulation_steps: int = _help("Micro-batches per minibatch (accumulated into one optimizer step).", 1)
    gradient_checkpointing: bool = _help("Recompute activations in the backward pass: less memory, ~30% slower.", False)
    # ---- sampling
    response_length: int = _help("Maximum new tokens per response.", 32)
    temperature: float = _help("Sampling temperature; log-probs are computed from logits / temperature.", 0.7)
    top_p: float = _help("Nucleus sampling threshold (1.0 = off).", 1.0)
    # ---- reward
    kl_coef: float = _help("beta in r_t = -beta * KL_t + [t = last] * score.", 0.05)
    kl_estimator: str = _help("Per-token KL estimator: k1 = log(pi/pi_ref), k3 = (rho - 1) - log rho.", "k1")
    target_kl: float | None = _help("If set, adapt beta toward this KL per response (Ziegler et al. 2019).", None)
    kl_horizon: int = _help("Time constant (in samples) of the adaptive-KL controller.", 10000)
    missing_eos_penalty: float | None = _help("Subtracted from the score of responses that never emit EOS.", None)
    reward_clip: float | None = _help("Clip reward-model scores to [-c, c] after normalisation.", None)
    normalize_rewards: bool = _help("Divide scores by the running std of all scores seen so far.", False)
    # ---- advantages and losses
    gamma: float = _help("Discount in delta_t = r_t + gamma * V_{t+1} - V_t.", 1.0)
    lam: float = _help("GAE lambda in A_t = delta_t + gamma * lam * A_{t+1}.", 0.95)
    whiten_advantages: bool = _help("Whiten advantages over the rollout batch.", True)
    cliprange: float = _help("epsilon in clip(ratio, 1 - eps, 1 + eps) of the surrogate.", 0.2)
    cliprange_value: float = _help("eps_v in V_old + clip(V - V_old, -eps_v, eps_v).", 0.2)
    vf_coef: float = _help("c_v in loss = L_policy - c_e * entropy + c_v * L_value (one backward pass).", 0.1)
    entropy_coef: float = _help("Weight of the entropy bonus subtracted from the policy loss.", 0.0)
    early_stop_kl: float | None = _help("Stop the epoch loop once mean approx-KL exceeds this.", None)
    # ---- logging and saving
    logging_steps: int = _help("Write metrics every N iterations.", 1)
    sample_every: int = _help("Log a table of prompt / response / score every N iterations (0 = never).", 10)
    num_samples: int = _help("Rows in that table.", 4)
    save_steps: int = _help("Save a resumable checkpoint every N iterations.", 50)
    snapshot_steps: int | None = _help(
        "Save the policy (weights + tokenizer, loadable by any command) to snapshots/step-N every N iterations and "
        "at the end, for `rlhf eval`'s over-optimisation curve (eval.curve); with LoRA the merged policy. "
        "None = off.", None)

    def __post_init__(self):
        if self.rollout_batch_size % self.mini_batch_size:
            raise ValueError("mini_batch_size must divide rollout_batch_size")
        if self.mini_batch_size % self.gradient_accumulation_steps:
            raise ValueError("gradient_accumulation_steps must divide mini_batch_size")
        if self.lr_schedule not in ("constant", "linear"):
            raise ValueError(f"lr_schedule must be 'constant' or 'linear', got {self.lr_schedule!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1.0 = off), got {self.top_p!r}")
        if self.kl_horizon < 1:
            raise ValueError(f"kl_horizon must be at least 1 (samples), got {self.kl_horizon!r}")
        if self.snapshot_steps is not None and self.snapshot_steps < 1:
            raise ValueError(f"snapshot_steps must be at least 1 (or unset), got {self.snapshot_steps!r}")
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {self.kl_estimator!r}")


def ppo_fields() -> dict[str, str]:
    """Field name -> annotation text, in the form `trl_fields.check_training_keys` expects."""
    return {f.name: str(f.type) for f in fields(PPOConfig)}
