"""The mathematics of RLHF-PPO as pure functions, each with the equation it computes.

Notation (per response token t = 0..T-1 of a sampled response, `mask` marks real tokens):
    pi(a_t|s_t)       policy probability, log-probs `logprobs`
    pi_ref(a_t|s_t)   frozen reference (SFT) policy, `ref_logprobs`
    V(s_t)            critic value, `values`
    r_t               per-token reward, `rewards`

References: Ziegler et al. 2019 (KL-penalised reward, adaptive beta), Stiennon et al. 2020, Ouyang et al. 2022
(InstructGPT), Schulman et al. 2017 (clipped surrogate), Schulman 2020 "Approximating KL divergence" (k1/k3),
Huang et al. 2024 "The N+ implementation details of RLHF with PPO".
"""

from __future__ import annotations

from typing import Literal

import torch

KLEstimator = Literal["k1", "k3"]


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """mean(x) = sum_t m_t x_t / sum_t m_t."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """var(x) = sum_t m_t (x_t - mean)^2 / (N - 1)   (N = sum_t m_t; / N when not unbiased)."""
    mean = masked_mean(values, mask)
    squares = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        squares = squares * count / (count - 1).clamp(min=1.0)
    return squares


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """x_hat = (x - mean) / sqrt(var + eps) over masked entries; keeps the mean when `shift_mean` is False.

    Masked-out positions are returned as 0.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples a_t ~ pi.

        k1 = log pi(a_t) - log pi_ref(a_t)                          (unbiased, can be negative)
        k3 = (rho - 1) - log rho,  rho = pi_ref(a_t) / pi(a_t)      (unbiased, always >= 0, lower variance)
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1' or 'k3'")


def per_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, beta: float, last_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The KL-shaped reward of InstructGPT:

        r_t = -beta * KL_t + [t = T_last] * score

    `scores` is one reward-model score per response (B,), `kl` the per-token KL (B, T), `last_index` the position
    of each response's last real token (B,). Returns (rewards, non_score_rewards = -beta * KL_t).
    """
    non_score = -beta * kl
    rewards = non_score.clone()
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_index] += scores.to(rewards.dtype)
    return rewards, non_score


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens (Schulman et al. 2016):

        delta_t = r_t + gamma * V_{t+1} - V_t          (V_T = 0 after the last real token)
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                            (the critic's regression target)

    Positions outside `mask` contribute nothing and get A_t = R_t = 0. Returns (advantages, returns).
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):  # a loop over positions, vectorised over the batch
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
    returns = (advantages + values) * mask
    return advantages, returns


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017), to minimise:

        ratio_t  = exp(log pi(a_t) - log pi_old(a_t))
        pg_loss1 = -A_t * ratio_t
        pg_loss2 = -A_t * clip(ratio_t, 1 - eps, 1 + eps)
        L_pg     = mean_t max(pg_loss1, pg_loss2)

    Also returns clipfrac = mean_t [pg_loss2 > pg_loss1] and approx_kl = mean_t 0.5 * (log ratio_t)^2.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(pg_loss1, pg_loss2), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_loss2 > pg_loss1).to(logprobs.dtype), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss, to minimise:

        V_clipped = V_old + clip(V - V_old, -eps_v, eps_v)
        L_v       = 0.5 * mean_t max((V - R_t)^2, (V_clipped - R_t)^2)

    Also returns vf_clipfrac = mean_t [(V_clipped - R)^2 > (V - R)^2].
    """
    v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    v_loss_unclipped = (values - returns) ** 2
    v_loss_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(v_loss_unclipped, v_loss_clipped), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((v_loss_clipped > v_loss_unclipped).to(values.dtype), mask)}
    return loss, stats


def adaptive_kl_beta(beta: float, observed_kl: float, target_kl: float, horizon: int, n_steps: int) -> float:
    """Ziegler et al. 2019's proportional controller for the KL coefficient:

        e_t    = clip(KL_observed / KL_target - 1, -0.2, 0.2)
        beta' = beta * (1 + e_t * n_steps / horizon)

    `n_steps` is the number of samples (episodes) since the last update, `horizon` the controller's time constant.
    """
    error = min(max(observed_kl / target_kl - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n_steps / horizon)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """EV = 1 - var(R - V) / var(R): 1 is a perfect critic, 0 no better than a constant, < 0 worse."""
    var_returns = masked_var(returns, mask)
    return 1.0 - masked_var(returns - values, mask) / var_returns.clamp(min=1e-8)
