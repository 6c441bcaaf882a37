"""Evaluation metrics as pure functions of plain numbers, each with the definition it computes.

Inputs are Python sequences or numpy arrays; outputs are Python floats, ints, None or dicts of them, so every
result can go straight into `eval.json`. The dict-returning functions produce the sections documented in
`rlhf_cli.evaluation.report`.

Notation:
    s_c(i), s_r(i)    reward-model scores of the chosen / rejected response of preference pair i
    l_c(i), l_r(i)    their lengths in tokens
    [condition]       1 when the condition holds, else 0 (Iverson bracket)
    N                 number of pairs / samples
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence

import numpy as np

# Two-sided 95% normal quantile, z = Phi^-1(0.975).
Z_95 = 1.959963984540054


def finite_or_none(value) -> float | None:
    """`value` as a float when it is a finite real number (not a bool), else None: how metric records are read."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _as_array(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=float).reshape(-1)
    if array.size == 0:
        raise ValueError(f"{name} is empty: there is nothing to evaluate.")
    return array


def _paired(first, second, first_name: str, second_name: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_array(first, first_name), _as_array(second, second_name)
    if a.shape != b.shape:
        raise ValueError(f"{first_name} has {a.size} values but {second_name} has {b.size}; they must be paired.")
    return a, b


def _preference_credit(preferred: np.ndarray, other: np.ndarray) -> np.ndarray:
    """1 where `preferred` scores higher, 0.5 on a tie, 0 where it scores lower."""
    return (preferred > other) + 0.5 * (preferred == other)


# ---------------------------------------------------------------- reward model on preference pairs

# Reward-model scores come out of float32 forward passes, and the same tokens scored in two batches (other padding)
# can differ in the last bits. Two scores are a tie when |s_c - s_r| <= TIE_TOLERANCE * max(1, |s_c|, |s_r|):
# exactly equal, or equal up to about ten float32 roundings. The usual tie is a pair whose responses are cut to the
# same tokens (a long prompt, two responses sharing their start), which scores exactly equal.
TIE_TOLERANCE = 1e-6


def ties(chosen_scores, rejected_scores, tolerance: float = TIE_TOLERANCE) -> np.ndarray:
    """Boolean mask of the tied pairs: |s_c(i) - s_r(i)| <= tolerance * max(1, |s_c(i)|, |s_r(i)|)."""
    chosen, rejected = _paired(chosen_scores, rejected_scores, "chosen_scores", "rejected_scores")
    scale = np.maximum(1.0, np.maximum(np.abs(chosen), np.abs(rejected)))
    return np.abs(chosen - rejected) <= tolerance * scale


def _decided_accuracy(chosen: np.ndarray, rejected: np.ndarray, tied: np.ndarray) -> float | None:
    """(1/|D|) sum_{i in D} [s_c(i) > s_r(i)] over the pairs D that are not tied; None when every pair is tied."""
    decided = ~tied
    return float((chosen[decided] > rejected[decided]).mean()) if decided.any() else None


def pairwise_accuracy(chosen_scores, rejected_scores) -> float:
    """acc_half = (1/N) sum_i ( [s_c(i) > s_r(i)] + 0.5 [s_c(i) = s_r(i)] )   (a tie, exact here, as half).

    The older headline figure. The report uses `pair_outcomes`: the accuracy over the pairs that are not tied, the
    ties counted on their own, and this figure as `accuracy_ties_as_half` (ties there within TIE_TOLERANCE)."""
    chosen, rejected = _paired(chosen_scores, rejected_scores, "chosen_scores", "rejected_scores")
    return float(_preference_credit(chosen, rejected).mean())


def pair_outcomes(chosen_scores, rejected_scores, tolerance: float = TIE_TOLERANCE) -> dict:
    """How the reward model decided N preference pairs, ties on their own (a tie: see `ties`):

        wins   = #{i : not tied, s_c(i) > s_r(i)}     losses = #{i : not tied, s_c(i) < s_r(i)}     T = #ties
        accuracy            = wins / (N - T)                  (None when every pair is tied)
        tie_rate            = T / N
        accuracy_ties_as_half = (wins + 0.5 T) / N            (the older figure: a tie as a coin flip)

    Returns {"accuracy", "pairs_decided", "wins", "losses", "ties", "tie_rate", "accuracy_ties_as_half",
    "tie_tolerance"}.
    """
    chosen, rejected = _paired(chosen_scores, rejected_scores, "chosen_scores", "rejected_scores")
    tied = ties(chosen, rejected, tolerance)
    count = int(tied.sum())
    wins = int(((chosen > rejected) & ~tied).sum())
    n = chosen.size
    return {
        "accuracy": _decided_accuracy(chosen, rejected, tied),
        "pairs_decided": n - count,
        "wins": wins,
        "losses": n - count - wins,
        "ties": count,
        "tie_rate": count / n,
        "accuracy_ties_as_half": (wins + 0.5 * count) / n,
        "tie_tolerance": tolerance,
    }


def mean_margin(chosen_scores, rejected_scores) -> float:
    """margin = (1/N) sum_i (s_c(i) - s_r(i)); positive when the reward model agrees with the labels on average."""
    chosen, rejected = _paired(chosen_scores, rejected_scores, "chosen_scores", "rejected_scores")
    return float((chosen - rejected).mean())


def calibration_by_gap(chosen_scores, rejected_scores, buckets: int = 4) -> list[dict]:
    """Accuracy as a function of confidence, with confidence = the absolute score gap g_i = |s_c(i) - s_r(i)|.

    Pairs are sorted by g_i and split into `buckets` equal-count (quantile) groups, as equal in size as possible
    (fewer groups when there are fewer pairs than buckets). Each group reports
        {"low": min g_i, "high": max g_i, "count": pairs, "ties": tied pairs (see `ties`),
         "accuracy": accuracy over the group's pairs that are not tied (None when all are)}.
    Ties have the smallest gaps, so they gather in the first group. A calibrated Bradley-Terry model,
    P(chosen wins) = sigmoid(s_c - s_r), is right more often on wider gaps: accuracy should rise from the first
    bucket to the last.
    """
    if buckets < 1:
        raise ValueError(f"buckets must be at least 1, got {buckets}.")
    chosen, rejected = _paired(chosen_scores, rejected_scores, "chosen_scores", "rejected_scores")
    tied = ties(chosen, rejected)
    gaps = np.abs(chosen - rejected)
    order = np.argsort(gaps, kind="stable")
    groups = [group for group in np.array_split(order, min(buckets, gaps.size)) if group.size]
    return [
        {
            "low": float(gaps[group].min()),
            "high": float(gaps[group].max()),
            "count": int(group.size),
            "ties": int(tied[group].sum()),
            "accuracy": _decided_accuracy(chosen[group], rejected[group], tied[group]),
        }
        for group in groups
    ]


def _length_inputs(chosen_scores, rejected_scores, chosen_lengths, rejected_lengths):
    chosen, rejected = _paired(chosen_scores, rejected_scores, "chosen_scores", "rejected_scores")
    chosen_len, rejected_len = _paired(chosen_lengths, rejected_lengths, "chosen_lengths", "rejected_lengths")
    if chosen_len.shape != chosen.shape:
        raise ValueError(f"{chosen.size} score pairs but {chosen_len.size} length pairs; they must be paired.")
    return chosen, rejected, chosen_len, rejected_len, ties(chosen, rejected)


def length_bias(chosen_scores, rejected_scores, chosen_lengths, rejected_lengths) -> float | None:
    """Fraction of pairs in which the reward model prefers the longer response, over the pairs whose lengths differ
    and whose scores are not tied (see `ties`):

        bias = (1/|D|) sum_{i in D} [s_long(i) > s_short(i)],   D = {i : l_c(i) != l_r(i), pair i not tied}

    0.5 means length does not sway the model; near 1 it rewards verbosity. None when no pair qualifies.
    """
    chosen, rejected, chosen_len, rejected_len, tied = _length_inputs(chosen_scores, rejected_scores, chosen_lengths,
                                                                      rejected_lengths)  # fmt: skip
    differ = (chosen_len != rejected_len) & ~tied
    if not differ.any():
        return None
    chosen_is_longer = chosen_len > rejected_len
    longer_score = np.where(chosen_is_longer, chosen, rejected)[differ]
    shorter_score = np.where(chosen_is_longer, rejected, chosen)[differ]
    return float((longer_score > shorter_score).mean())


def accuracy_when_shorter_chosen(chosen_scores, rejected_scores, chosen_lengths, rejected_lengths) -> float | None:
    """Accuracy over the pairs S = {i : l_c(i) < l_r(i), pair i not tied}, where the labellers chose the shorter
    response: (1/|S|) sum_{i in S} [s_c(i) > s_r(i)].

    A model that merely rewards length scores low here although its overall accuracy looks fine.
    None when there is no such pair.
    """
    chosen, rejected, chosen_len, rejected_len, tied = _length_inputs(chosen_scores, rejected_scores, chosen_lengths,
                                                                      rejected_lengths)  # fmt: skip
    shorter_chosen = (chosen_len < rejected_len) & ~tied
    if not shorter_chosen.any():
        return None
    return float((chosen[shorter_chosen] > rejected[shorter_chosen]).mean())


def reward_model_metrics(chosen_scores, rejected_scores, chosen_lengths, rejected_lengths, buckets: int = 4) -> dict:
    """The `reward_model` section of the report: every reward-model metric above for one set of preference pairs.
    `accuracy` is over the pairs that are not tied; `ties`, `tie_rate` and `accuracy_ties_as_half` sit beside it
    (`pair_outcomes`)."""
    return {
        "num_pairs": len(_as_array(chosen_scores, "chosen_scores")),
        **pair_outcomes(chosen_scores, rejected_scores),
        "mean_margin": mean_margin(chosen_scores, rejected_scores),
        "calibration": calibration_by_gap(chosen_scores, rejected_scores, buckets),
        "length_bias": length_bias(chosen_scores, rejected_scores, chosen_lengths, rejected_lengths),
        "accuracy_shorter_chosen": accuracy_when_shorter_chosen(
            chosen_scores, rejected_scores, chosen_lengths, rejected_lengths
        ),
    }


# ---------------------------------------------------------------- a DPO policy's implicit reward on preference pairs

# TRL's DPOConfig default beta, assumed when neither eval.beta nor the policy's DPO recipe sets one.
DEFAULT_DPO_BETA = 0.1


def implicit_rewards(policy_logps, reference_logps, beta: float) -> np.ndarray:
    """DPO's implicit reward of each response (Rafailov et al. 2023):

        r(x, y) = beta * ( log pi(y|x) - log pi_ref(y|x) )

    where log pi(y|x) = sum_t log pi(y_t | x, y_<t) is summed over the response's tokens (TRL's `rewards/chosen`,
    `rewards/rejected`). Inputs are those per-response sums under the policy and under the reference."""
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}.")
    policy, reference = _paired(policy_logps, reference_logps, "policy_logps", "reference_logps")
    return beta * (policy - reference)


def implicit_reward_metrics(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float,
                            tolerance: float = TIE_TOLERANCE) -> dict:  # fmt: skip
    """How a policy's implicit reward decides N preference pairs, from the summed log-probabilities of each pair's
    chosen (c) and rejected (r) response under the policy (pi) and the reference (ref):

        d_c(i) = log pi(y_c|x) - log pi_ref(y_c|x),     d_r(i) likewise       (log-ratios)
        r_c(i) = beta d_c(i),     r_r(i) = beta d_r(i)                        (`implicit_rewards`)
        tie(i) = |d_c(i) - d_r(i)| <= tolerance * max(1, |d_c(i)|, |d_r(i)|)
        accuracy        = (wins + 0.5 T) / N,   wins = #{i : not tie, r_c(i) > r_r(i)},   T = #ties
        accuracy_strict = wins / N              (TRL's `rewards/accuracies`: a tie counts as wrong)
        mean_margin     = (1/N) sum_i ( r_c(i) - r_r(i) )
        chosen_reward   = (1/N) sum_i r_c(i),    rejected_reward likewise
        logps           mean log pi and log pi_ref of the chosen and the rejected responses, and their change
                        (policy - reference) = mean d: the change of the chosen is chosen_reward / beta
        likelihood_displacement = [ mean d_c < 0 ],  i.e. mean log pi(y_c|x) < mean log pi_ref(y_c|x)

    For beta > 0 the accuracies and ties do not depend on beta (ties are decided on the log-ratios); the margin and
    the rewards scale with it. Likelihood displacement (Razin et al. 2024): the margin can grow while the chosen
    responses become LESS likely than under the reference, both falling and the rejected faster.

    Returns {"num_pairs", "beta", "accuracy", "accuracy_strict", "wins", "ties", "losses", "tie_tolerance",
    "mean_margin", "chosen_reward", "rejected_reward", "logps": {"policy": {"chosen", "rejected"},
    "reference": {"chosen", "rejected"}, "change": {"chosen", "rejected"}}, "likelihood_displacement"}.
    """
    pc, rc = _paired(policy_chosen, reference_chosen, "policy_chosen", "reference_chosen")
    pr, rr = _paired(policy_rejected, reference_rejected, "policy_rejected", "reference_rejected")
    if pc.shape != pr.shape:
        raise ValueError(f"{pc.size} chosen but {pr.size} rejected log-probabilities; they must be paired.")
    chosen_reward, rejected_reward = implicit_rewards(pc, rc, beta), implicit_rewards(pr, rr, beta)
    tied = ties(pc - rc, pr - rr, tolerance)
    wins = int(((chosen_reward > rejected_reward) & ~tied).sum())
    count, n = int(tied.sum()), pc.size
    means = {"policy": {"chosen": float(pc.mean()), "rejected": float(pr.mean())},
             "reference": {"chosen": float(rc.mean()), "rejected": float(rr.mean())}}  # fmt: skip
    means["change"] = {"chosen": float((pc - rc).mean()), "rejected": float((pr - rr).mean())}
    return {
        "num_pairs": n,
        "beta": float(beta),
        "accuracy": (wins + 0.5 * count) / n,
        "accuracy_strict": wins / n,
        "wins": wins,
        "ties": count,
        "losses": n - wins - count,
        "tie_tolerance": tolerance,
        "mean_margin": float((chosen_reward - rejected_reward).mean()),
        "chosen_reward": float(chosen_reward.mean()),
        "rejected_reward": float(rejected_reward.mean()),
        "logps": means,
        "likelihood_displacement": bool(means["change"]["chosen"] < 0),
    }


# ---------------------------------------------------------------- policy against reference


def wilson_interval(successes: float, trials: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion p_hat = successes / n (Wilson 1927):

        centre    = (p_hat + z^2 / (2n)) / (1 + z^2 / n)
        halfwidth = z / (1 + z^2 / n) * sqrt( p_hat (1 - p_hat) / n + z^2 / (4 n^2) )
        interval  = [centre - halfwidth, centre + halfwidth]

    z = 1.96 gives 95%. Unlike the normal (Wald) interval it stays inside [0, 1] and does not collapse to a point
    at p_hat = 0 or 1, which matters for the small sample counts of an evaluation run. `successes` may be
    fractional (ties counted as half a win).
    """
    if trials <= 0:
        raise ValueError(f"trials must be positive, got {trials}.")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must lie in [0, {trials}], got {successes}.")
    p_hat = successes / trials
    z2_over_n = z * z / trials
    centre = (p_hat + z2_over_n / 2) / (1 + z2_over_n)
    halfwidth = z / (1 + z2_over_n) * math.sqrt(p_hat * (1 - p_hat) / trials + z2_over_n / (4 * trials))
    # Clamp rounding noise only: mathematically the interval already lies within [0, 1].
    return max(0.0, centre - halfwidth), min(1.0, centre + halfwidth)


def win_rate(policy_scores, reference_scores) -> dict:
    """Win rate of the policy over the reference on the same prompts, with a 95% Wilson interval:

        win_rate = (wins + 0.5 ties) / N,   wins = #{i : s_pi(i) > s_ref(i)},   ties = #{i : s_pi(i) = s_ref(i)}

    Returns {"win_rate", "wins", "ties", "losses", "n", "ci_low", "ci_high", "confidence"}.
    """
    policy, reference = _paired(policy_scores, reference_scores, "policy_scores", "reference_scores")
    wins, ties = int((policy > reference).sum()), int((policy == reference).sum())
    n = policy.size
    ci_low, ci_high = wilson_interval(wins + 0.5 * ties, n)
    return {
        "win_rate": (wins + 0.5 * ties) / n,
        "wins": wins,
        "ties": ties,
        "losses": n - wins - ties,
        "n": n,
        "ci_low": ci_low,
        "ci_high": ci_high,
        "confidence": 0.95,
    }


def summarize(values) -> dict:
    """{"mean", "std", "min", "max", "count"} of a set of scores; std is the population one, sqrt((1/N) sum (x - mean)^2)."""
    array = _as_array(values, "values")
    return {
        "mean": float(array.mean()),
        "std": float(array.std()),
        "min": float(array.min()),
        "max": float(array.max()),
        "count": int(array.size),
    }


def sampled_kl(policy_logprob_sums, reference_logprob_sums) -> dict:
    """Monte-Carlo KL(pi || pi_ref) per response from responses y_i ~ pi:

        d_i = sum_t ( log pi(y_i,t | x_i, y_i,<t) - log pi_ref(y_i,t | x_i, y_i,<t) )      (summed per sequence)
        KL ~= (1/N) sum_i d_i,     stderr = std(d, ddof=1) / sqrt(N)

    Inputs are the per-sequence sums of token log-probs under each model. The estimate is unbiased but can come
    out negative on few samples; stderr says how far to trust it (None with a single sample).
    """
    policy, reference = _paired(policy_logprob_sums, reference_logprob_sums, "policy_logprob_sums",
                                "reference_logprob_sums")  # fmt: skip
    differences = policy - reference
    stderr = float(differences.std(ddof=1) / math.sqrt(differences.size)) if differences.size > 1 else None
    return {"kl": float(differences.mean()), "stderr": stderr, "count": int(differences.size)}


# ---------------------------------------------------------------- text statistics over token lists


def _ngrams(tokens: Sequence[Hashable], n: int) -> list[tuple]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(responses: Sequence[Sequence[Hashable]], n: int) -> float:
    """distinct-n = |unique n-grams over all responses| / |n-grams over all responses|  (Li et al. 2016).

    Pooled over the whole set, so a policy that gives every prompt the same answer scores low even when each
    answer is varied inside. 0.0 when no response is n tokens long.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}.")
    all_ngrams = [gram for tokens in responses for gram in _ngrams(tokens, n)]
    return len(set(all_ngrams)) / len(all_ngrams) if all_ngrams else 0.0


def repetition_rate(responses: Sequence[Sequence[Hashable]], n: int = 3) -> float:
    """Fraction of responses in which some n-gram occurs at least twice:

        rep_n = (1/N) sum_i [ max_g count_i(g) >= 2 ],   g ranging over the n-grams of response i

    With n = 3, "the cat sat the cat sat" repeats "the cat sat" and counts; a response shorter than n does not.
    Looping degenerate text ("I I I I ...") is a common sign of reward hacking or collapsed sampling.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}.")
    if len(responses) == 0:
        raise ValueError("responses is empty: there is nothing to evaluate.")
    repeats = [any(count >= 2 for count in Counter(_ngrams(tokens, n)).values()) for tokens in responses]
    return sum(repeats) / len(repeats)


def eos_rate(responses: Sequence[Sequence[Hashable]], eos_token_id: Hashable) -> float:
    """Fraction of responses containing the EOS token: (1/N) sum_i [eos in y_i].

    A response without EOS was cut at the generation limit rather than finished by the model.
    """
    if len(responses) == 0:
        raise ValueError("responses is empty: there is nothing to evaluate.")
    return sum(eos_token_id in list(tokens) for tokens in responses) / len(responses)


def mean_length(responses: Sequence[Sequence[Hashable]]) -> float:
    """(1/N) sum_i |y_i|, in tokens."""
    if len(responses) == 0:
        raise ValueError("responses is empty: there is nothing to evaluate.")
    return sum(len(tokens) for tokens in responses) / len(responses)


def diversity_metrics(responses: Sequence[Sequence[Hashable]], eos_token_id: Hashable | None = None) -> dict:
    """One model's entry in the `diversity` section: distinct-1, distinct-2, 3-gram repetition rate, EOS rate
    (None without an `eos_token_id`) and mean length of its responses."""
    return {
        "distinct_1": distinct_n(responses, 1),
        "distinct_2": distinct_n(responses, 2),
        "repetition_rate": repetition_rate(responses, 3),
        "eos_rate": None if eos_token_id is None else eos_rate(responses, eos_token_id),
        "mean_length": mean_length(responses),
    }


# ---------------------------------------------------------------- likelihood and correlation


def perplexity(total_nll: float, token_count: int) -> float:
    """PPL = exp( total_nll / token_count ), total_nll = -sum over all tokens of log p(token | prefix), in nats."""
    if token_count <= 0:
        raise ValueError(f"token_count must be positive, got {token_count}.")
    return math.exp(total_nll / token_count)


def pearson(x, y) -> float:
    """r = sum_i (x_i - mean x)(y_i - mean y) / sqrt( sum_i (x_i - mean x)^2 * sum_i (y_i - mean y)^2 ).

    0.0 when either side is constant (r is undefined there, and "no linear relation" is the safe reading for an
    alarm) or when there are fewer than two points.
    """
    a, b = _paired(x, y, "x", "y")
    # Test constancy on the raw values: deviations from a float mean of equal values can be tiny but non-zero.
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    da, db = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float((da * da).sum()) * float((db * db).sum()))
    # Rounding can push |r| a hair past 1 for perfectly linear data.
    return max(-1.0, min(1.0, float((da * db).sum()) / denominator))


# ---------------------------------------------------------------- over-optimisation curve (Gao et al. 2023)


def curve_point(step: int, proxy_scores, gold_scores, policy_logprob_sums, reference_logprob_sums) -> dict:
    """One point of the over-optimisation curve: the policy at PPO step `step` (0: the reference itself), its N
    responses y_i to the curve's prompts scored by the proxy and the gold reward (the same responses for both):

        kl          = (1/N) sum_i d_i,   d_i = sum_t log pi(y_i,t | .) - log pi_ref(y_i,t | .)   (`sampled_kl`)
        sqrt_kl     = sqrt(max(kl, 0))   (a sampled KL can come out slightly negative; it is then drawn at 0)
        proxy_mean  = (1/N) sum_i proxy(y_i),   gold_mean = (1/N) sum_i gold(y_i)

    Returns {"step", "kl", "kl_stderr", "sqrt_kl", "proxy_mean", "gold_mean", "n"}."""
    proxy, gold = _paired(proxy_scores, gold_scores, "proxy_scores", "gold_scores")
    kl = sampled_kl(policy_logprob_sums, reference_logprob_sums)
    if kl["count"] != proxy.size:
        raise ValueError(f"{proxy.size} scores but {kl['count']} log-probability sums: they must be the same responses")
    return {"step": int(step), "kl": kl["kl"], "kl_stderr": kl["stderr"], "sqrt_kl": math.sqrt(max(kl["kl"], 0.0)),
            "proxy_mean": float(proxy.mean()), "gold_mean": float(gold.mean()), "n": int(proxy.size)}  # fmt: skip


def gold_peak(points: Sequence[dict]) -> dict:
    """Where the gold reward peaks along the curve (points in step order):

        k* = argmax_k gold_mean(k)            (the earliest step on a tie)
        gold_peaks_before_end = gold_mean(last) < gold_mean(k*)

    i.e. the gold score fell after its peak: the over-optimisation of Gao et al. (2023), whose gold reward is an
    inverted U in sqrt(KL). When it is False the gold score was still at its highest at the last point.

    Returns {"gold_peak": {"step", "sqrt_kl", "gold_mean"}, "gold_peaks_before_end": bool,
    "gold_drop_after_peak": gold_mean(k*) - gold_mean(last)}."""
    if not points:
        raise ValueError("the curve has no points")
    best = max(range(len(points)), key=lambda k: (points[k]["gold_mean"], -k))
    peak, last = points[best], points[-1]
    return {"gold_peak": {"step": peak["step"], "sqrt_kl": peak["sqrt_kl"], "gold_mean": peak["gold_mean"]},
            "gold_peaks_before_end": bool(last["gold_mean"] < peak["gold_mean"]),
            "gold_drop_after_peak": float(peak["gold_mean"] - last["gold_mean"])}  # fmt: skip
