"""The PPO equations against values worked out by hand."""

import math

import pytest
import torch

from rlhf_cli.ppo.losses import (
    adaptive_kl_beta,
    explained_variance,
    gae,
    kl_per_token,
    masked_mean,
    masked_var,
    per_token_rewards,
    policy_loss,
    value_loss,
    whiten,
)

VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


def close(actual: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_masked_mean_and_var():
    assert masked_mean(VALUES, MASK).item() == pytest.approx(7 / 3)  # (1 + 2 + 4) / 3
    # deviations from 7/3: -4/3, -1/3, 5/3 -> squares sum to 42/9; unbiased divides by 2
    assert masked_var(VALUES, MASK).item() == pytest.approx(7 / 3)
    assert masked_var(VALUES, MASK, unbiased=False).item() == pytest.approx(14 / 9)
    assert masked_mean(VALUES, MASK, dim=1).tolist() == pytest.approx([1.5, 4.0])


def test_whiten_centres_and_scales_masked_entries_only():
    out = whiten(VALUES, MASK)
    assert masked_mean(out, MASK).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(out, MASK).item() == pytest.approx(1.0, abs=1e-5)
    assert out[0, 2].item() == 0.0 and out[1, 1].item() == 0.0
    kept = whiten(VALUES, MASK, shift_mean=False)
    assert masked_mean(kept, MASK).item() == pytest.approx(7 / 3, abs=1e-5)


def test_kl_estimators():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_per_token(logp, ref, "k1").item() == pytest.approx(math.log(2))
    # rho = 0.25 / 0.5 = 0.5: (0.5 - 1) - log 0.5
    assert kl_per_token(logp, ref, "k3").item() == pytest.approx(-0.5 + math.log(2))
    assert kl_per_token(ref, logp, "k3").item() >= 0  # k3 is never negative
    with pytest.raises(ValueError):
        kl_per_token(logp, ref, "k2")


def test_per_token_rewards_put_the_score_on_the_last_real_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    rewards, non_score = per_token_rewards(torch.tensor([1.0, 2.0]), kl, beta=0.5, last_index=torch.tensor([2, 1]))
    close(non_score, [[-0.05, -0.1, -0.15], [-0.2, -0.25, -0.3]])
    close(rewards, [[-0.05, -0.1, 0.85], [-0.2, 1.75, -0.3]])


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 7.0]])
    values = torch.tensor([[0.5, 0.5, 0.5], [0.2, 0.4, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: delta = (-0.05, -0.05, 0.5); A_2 = 0.5, A_1 = -0.05 + 0.72 * 0.5, A_0 = -0.05 + 0.72 * A_1
    a1 = -0.05 + 0.72 * 0.5
    # row 1 ends at t=1 (V_2 is padding): delta_1 = 1 - 0.4, delta_0 = 0.9 * 0.4 - 0.2
    close(advantages, [[-0.05 + 0.72 * a1, a1, 0.5], [0.16 + 0.72 * 0.6, 0.6, 0.0]])
    close(returns, [[-0.05 + 0.72 * a1 + 0.5, a1 + 0.5, 1.0], [0.16 + 0.72 * 0.6 + 0.2, 1.0, 0.0]])


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.5, 0.5]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    close(advantages, [[0.5, 0.5, 0.5]])
    close(returns, [[1.0, 1.0, 1.0]])


def test_policy_loss_clips_by_hand():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.5]]))
    advantages = torch.tensor([[1.0, 1.0, -1.0]])
    loss, stats = policy_loss(new, old, advantages, torch.ones(1, 3), cliprange=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(-0.5, -0.8) = -0.5; token 2: max(1.5, 1.2) = 1.5
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5) / 3)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    expected_kl = 0.5 * (math.log(1.5) ** 2 * 2 + math.log(0.5) ** 2) / 3
    assert stats["approx_kl"].item() == pytest.approx(expected_kl)


def test_policy_loss_gradient_vanishes_when_clipped():
    new = torch.log(torch.tensor([[1.5]])).requires_grad_()
    loss, _ = policy_loss(new, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), cliprange=0.2)
    loss.backward()
    assert new.grad.item() == 0.0


def test_value_loss_by_hand():
    loss, stats = value_loss(torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[2.0]]),
                             torch.ones(1, 1), cliprange_value=0.5)
    # unclipped (1 - 2)^2 = 1; clipped V = 0.5 -> (0.5 - 2)^2 = 2.25; 0.5 * max = 1.125
    assert loss.item() == pytest.approx(1.125)
    assert stats["vf_clipfrac"].item() == 1.0


def test_adaptive_kl_controller():
    assert adaptive_kl_beta(0.1, observed_kl=12.0, target_kl=6.0, horizon=10000, n_steps=256) == pytest.approx(
        0.1 * (1 + 0.2 * 256 / 10000))  # error clipped at +0.2
    assert adaptive_kl_beta(0.1, observed_kl=6.0, target_kl=6.0, horizon=10000, n_steps=256) == pytest.approx(0.1)
    assert adaptive_kl_beta(0.1, observed_kl=5.4, target_kl=6.0, horizon=100, n_steps=10) == pytest.approx(
        0.1 * (1 - 0.1 * 10 / 100))


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.5), returns, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_token_logprobs_and_entropy_by_hand():
    import math

    from rlhf_cli.ppo.rollout import entropy, token_logprobs

    # logits (0, ln 3): probabilities 1/4 and 3/4
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    assert token_logprobs(logits, torch.tensor([[1]])).item() == pytest.approx(math.log(0.75))
    assert token_logprobs(logits, torch.tensor([[0]])).item() == pytest.approx(math.log(0.25))
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert entropy(logits).item() == pytest.approx(expected)
