"""Evaluation metrics against values worked out by hand."""

import math

import numpy as np
import pytest

from rlhf_cli.evaluation.metrics import (
    accuracy_when_shorter_chosen,
    calibration_by_gap,
    distinct_n,
    diversity_metrics,
    eos_rate,
    finite_or_none,
    implicit_reward_metrics,
    implicit_rewards,
    length_bias,
    mean_length,
    mean_margin,
    pairwise_accuracy,
    pearson,
    perplexity,
    repetition_rate,
    reward_model_metrics,
    sampled_kl,
    summarize,
    wilson_interval,
    win_rate,
)

# Three preference pairs: right (2 > 1), wrong (0 < 1), right (3 > -1).
CHOSEN = [2.0, 0.0, 3.0]
REJECTED = [1.0, 1.0, -1.0]


def test_pairwise_accuracy_and_margin():
    assert pairwise_accuracy(CHOSEN, REJECTED) == pytest.approx(2 / 3)
    assert mean_margin(CHOSEN, REJECTED) == pytest.approx((1 - 1 + 4) / 3)
    # a tie is half a win: (1 + 0.5) / 2
    assert pairwise_accuracy([1.0, 5.0], [0.0, 5.0]) == pytest.approx(0.75)
    assert pairwise_accuracy(np.array(CHOSEN), np.array(REJECTED)) == pytest.approx(2 / 3)


def test_mismatched_or_empty_inputs_are_errors():
    with pytest.raises(ValueError, match="paired"):
        pairwise_accuracy([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="empty"):
        mean_margin([], [])


def test_calibration_buckets_split_pairs_by_gap():
    chosen = [2.0, 0.0, 3.0, 1.0, 4.0, 2.0]
    rejected = [1.0, 1.0, -1.0, 1.5, 1.0, 0.0]
    # gaps and verdicts per pair: 1 right, 1 wrong, 4 right, 0.5 wrong, 3 right, 2 right.
    # Sorted by gap (stable): 0.5 wrong | 1 right, 1 wrong | 2 right | 3 right, 4 right -> three groups of two:
    #   [0.5 wrong, 1 right] [1 wrong, 2 right] [3 right, 4 right]
    buckets = calibration_by_gap(chosen, rejected, buckets=3)
    assert buckets == [
        {"low": 0.5, "high": 1.0, "count": 2, "ties": 0, "accuracy": 0.5},
        {"low": 1.0, "high": 2.0, "count": 2, "ties": 0, "accuracy": 0.5},
        {"low": 3.0, "high": 4.0, "count": 2, "ties": 0, "accuracy": 1.0},
    ]


def test_calibration_with_fewer_pairs_than_buckets():
    buckets = calibration_by_gap([1.0, 2.0], [0.0, 0.0], buckets=4)
    assert [b["count"] for b in buckets] == [1, 1]
    assert sum(b["count"] for b in calibration_by_gap(CHOSEN, REJECTED)) == 3


def test_length_bias_and_accuracy_when_shorter_chosen():
    chosen_scores, rejected_scores = [2.0, 0.0, 3.0, 1.0], [1.0, 1.0, -1.0, 1.0]
    chosen_lengths, rejected_lengths = [10, 5, 20, 7], [5, 10, 20, 3]
    # pair 0: longer = chosen (2 > 1): prefers longer. pair 1: longer = rejected (1 > 0): prefers longer.
    # pair 2: equal lengths, excluded. pair 3: scores tie, excluded (ties are counted on their own).  -> 2 / 2
    assert length_bias(chosen_scores, rejected_scores, chosen_lengths, rejected_lengths) == pytest.approx(1.0)
    # only pair 1 has the shorter response chosen, and the model got it wrong
    assert accuracy_when_shorter_chosen(chosen_scores, rejected_scores, chosen_lengths, rejected_lengths) == 0.0


def test_length_metrics_are_none_without_qualifying_pairs():
    assert length_bias([1.0], [0.0], [4], [4]) is None
    assert accuracy_when_shorter_chosen([1.0], [0.0], [9], [4]) is None


def test_reward_model_metrics_bundles_the_section():
    section = reward_model_metrics(CHOSEN, REJECTED, [3, 1, 2], [1, 3, 2], buckets=2)
    assert section["num_pairs"] == 3
    assert section["accuracy"] == pytest.approx(2 / 3)
    assert (section["ties"], section["tie_rate"], section["accuracy_ties_as_half"]) == (0, 0.0, pytest.approx(2 / 3))
    assert section["length_bias"] == pytest.approx(1.0)  # pair 0: longer chosen wins; pair 1: longer rejected wins
    assert section["accuracy_shorter_chosen"] == 0.0
    assert sum(b["count"] for b in section["calibration"]) == 3


def test_wilson_interval_for_8_of_10():
    # By hand, z = 1.959964, z^2 = 3.841459, n = 10, p = 0.8:
    #   centre    = (0.8 + 0.192073) / 1.384146 = 0.716740
    #   halfwidth = (1.959964 / 1.384146) * sqrt(0.016 + 0.0096036) = 1.416007 * 0.160011 = 0.226577
    #   -> [0.490163, 0.943317]
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.490163, abs=1e-5)
    assert high == pytest.approx(0.943317, abs=1e-5)


def test_wilson_interval_stays_inside_unit_interval_at_the_extremes():
    low, high = wilson_interval(0, 5)
    assert low == 0.0 and 0.0 < high < 1.0
    low, high = wilson_interval(5, 5)
    assert 0.0 < low < 1.0 and high == 1.0
    with pytest.raises(ValueError):
        wilson_interval(3, 0)


def test_win_rate_counts_ties_half_and_carries_the_interval():
    result = win_rate([3, 2, 1, 5], [1, 2, 2, 4])  # win, tie, loss, win
    assert (result["wins"], result["ties"], result["losses"], result["n"]) == (2, 1, 1, 4)
    assert result["win_rate"] == pytest.approx(2.5 / 4)
    assert (result["ci_low"], result["ci_high"]) == pytest.approx(wilson_interval(2.5, 4))
    assert result["ci_low"] < result["win_rate"] < result["ci_high"]
    assert result["confidence"] == 0.95


def test_summarize_uses_population_std():
    stats = summarize([1.0, 2.0, 3.0, 4.0])
    assert stats == {"mean": 2.5, "std": pytest.approx(math.sqrt(1.25)), "min": 1.0, "max": 4.0, "count": 4}


def test_sampled_kl_and_its_standard_error():
    # per-sequence summed log-probs; differences d = 1, 2, 3 -> mean 2, sample std 1, stderr 1 / sqrt(3)
    result = sampled_kl([-4.0, -3.0, -2.0], [-5.0, -5.0, -5.0])
    assert result["kl"] == pytest.approx(2.0)
    assert result["stderr"] == pytest.approx(1 / math.sqrt(3))
    assert result["count"] == 3
    assert sampled_kl([-1.0], [-1.5]) == {"kl": 0.5, "stderr": None, "count": 1}


def test_distinct_n_pools_ngrams_over_responses():
    responses = [[1, 2, 3], [1, 2, 4]]
    # bigrams: (1,2) (2,3) (1,2) (2,4) -> 3 unique of 4
    assert distinct_n(responses, 2) == pytest.approx(3 / 4)
    # unigrams: 1 2 3 1 2 4 -> 4 unique of 6
    assert distinct_n(responses, 1) == pytest.approx(4 / 6)
    assert distinct_n([["a"], ["b"]], 2) == 0.0  # no response is two tokens long


def test_repetition_rate_counts_responses_with_a_repeated_ngram():
    looping = ["the", "cat", "sat", "the", "cat", "sat"]  # "the cat sat" twice
    varied = ["a", "b", "c", "d", "a", "b"]  # "a b" repeats, but no 3-gram does
    short = ["x", "x"]  # shorter than 3
    assert repetition_rate([looping, varied, short], n=3) == pytest.approx(1 / 3)
    assert repetition_rate([looping, varied, short], n=2) == pytest.approx(2 / 3)


def test_eos_rate_and_mean_length():
    responses = [[5, 6, 0], [5, 6, 7, 8], [0]]
    assert eos_rate(responses, eos_token_id=0) == pytest.approx(2 / 3)
    assert mean_length(responses) == pytest.approx(8 / 3)
    diversity = diversity_metrics(responses, eos_token_id=0)
    assert diversity["eos_rate"] == pytest.approx(2 / 3)
    assert diversity["distinct_1"] == pytest.approx(5 / 8)  # tokens 5 6 0 5 6 7 8 0 -> 5 unique
    assert diversity_metrics(responses)["eos_rate"] is None


def test_perplexity():
    assert perplexity(total_nll=20 * math.log(4.0), token_count=20) == pytest.approx(4.0)
    assert perplexity(0.0, 7) == 1.0
    with pytest.raises(ValueError):
        perplexity(1.0, 0)


def test_pearson():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # x = -1, 0, 1 against y = 1, -2, 1: sum of products 0 -> r = 0
    assert pearson([1, 2, 3], [1, -2, 1]) == pytest.approx(0.0)
    # deviations (-1, 0, 1) and (-1, -1, 2): r = 3 / sqrt(2 * 6)
    assert pearson([1, 2, 3], [0, 0, 3]) == pytest.approx(3 / math.sqrt(12))
    assert pearson([0.1, 0.1, 0.1], [1, 2, 3]) == 0.0  # constant side
    assert pearson([1.0], [2.0]) == 0.0


def test_finite_or_none():
    assert finite_or_none(3) == 3.0 and finite_or_none(np.float32(0.5)) == 0.5
    assert finite_or_none(float("nan")) is None and finite_or_none(True) is None and finite_or_none("1") is None


def test_ties_are_counted_on_their_own_and_left_out_of_the_accuracy():
    from rlhf_cli.evaluation.metrics import TIE_TOLERANCE, pair_outcomes, ties

    # pair 0 right, pair 1 wrong, pair 2 an exact tie, pair 3 a tie within the tolerance (float32 noise on a score
    # of 4: 2e-6 apart, within 1e-6 * 4), pair 4 right, pair 5 right by 1e-3 (no tie).
    chosen = [2.0, 0.0, 5.0, 4.000002, 3.0, 1.001]
    rejected = [1.0, 1.0, 5.0, 4.0, -1.0, 1.0]
    assert ties(chosen, rejected).tolist() == [False, False, True, True, False, False]
    outcome = pair_outcomes(chosen, rejected)
    # by hand: 6 pairs, 2 ties, 4 decided of which 3 right -> accuracy 3/4; tie rate 2/6; ties as half (3 + 1) / 6
    assert outcome == {"accuracy": 0.75, "pairs_decided": 4, "wins": 3, "losses": 1, "ties": 2,
                       "tie_rate": pytest.approx(2 / 6), "accuracy_ties_as_half": pytest.approx(4 / 6),
                       "tie_tolerance": TIE_TOLERANCE}  # fmt: skip
    # the older figure with exact ties only: pair 3 counts as a win -> (4 + 0.5) / 6
    assert pairwise_accuracy(chosen, rejected) == pytest.approx(4.5 / 6)

    section = reward_model_metrics(chosen, rejected, [5, 9, 4, 4, 6, 2], [5, 3, 8, 4, 2, 9], buckets=2)
    assert (section["accuracy"], section["ties"], section["num_pairs"]) == (0.75, 2, 6)
    # gaps sorted: 0 (tie), 2e-6 (tie), 1e-3 right | 1 right, 1 wrong, 4 right
    assert [(b["count"], b["ties"], b["accuracy"]) for b in section["calibration"]] == [(3, 2, 1.0), (3, 0, 2 / 3)]
    # untied pairs of unequal length: 1 (longer = chosen, loses), 4 (longer = chosen, wins), 5 (longer = rejected,
    # loses by a hair); pairs 2 and 3 are ties, pair 0 has equal lengths: the longer one wins only in 4 -> 1 / 3
    assert section["length_bias"] == pytest.approx(1 / 3)
    # untied pairs with the shorter response chosen: pair 5 (2 < 9), right -> 1.0
    assert section["accuracy_shorter_chosen"] == 1.0


def test_every_pair_tied_leaves_the_accuracy_undefined():
    from rlhf_cli.evaluation.metrics import pair_outcomes

    outcome = pair_outcomes([1.0, 2.0], [1.0, 2.0])
    assert outcome["accuracy"] is None and outcome["ties"] == 2 and outcome["accuracy_ties_as_half"] == 0.5
    assert length_bias([1.0], [1.0], [5], [3]) is None
    buckets = calibration_by_gap([1.0, 2.0], [1.0, 2.0], buckets=1)
    assert buckets == [{"low": 0.0, "high": 0.0, "count": 2, "ties": 2, "accuracy": None}]


# Four pairs, summed log-probs of (chosen, rejected) under the policy and the reference, and their log-ratios:
#   pair 1: chosen -10 vs -12 -> d_c = +2;   rejected -20 vs -15 -> d_r = -5    win
#   pair 2: chosen  -8 vs  -6 -> d_c = -2;   rejected  -9 vs -10 -> d_r = +1    loss
#   pair 3: chosen  -5 vs  -4 -> d_c = -1;   rejected  -7 vs  -6 -> d_r = -1    tie
#   pair 4: chosen  -3 vs  -4 -> d_c = +1;   rejected -30 vs  -4 -> d_r = -26   win
POLICY_CHOSEN, REFERENCE_CHOSEN = [-10.0, -8.0, -5.0, -3.0], [-12.0, -6.0, -4.0, -4.0]
POLICY_REJECTED, REFERENCE_REJECTED = [-20.0, -9.0, -7.0, -30.0], [-15.0, -10.0, -6.0, -4.0]


def test_implicit_rewards_are_beta_times_the_log_ratio():
    assert implicit_rewards([-1.0, -3.0], [-2.0, -2.0], 0.1).tolist() == pytest.approx([0.1, -0.1])
    assert implicit_rewards(POLICY_CHOSEN, REFERENCE_CHOSEN, 0.5).tolist() == pytest.approx([1.0, -1.0, -0.5, 0.5])
    with pytest.raises(ValueError, match="beta"):
        implicit_rewards([-1.0], [-2.0], 0.0)
    with pytest.raises(ValueError, match="paired"):
        implicit_rewards([-1.0, -2.0], [-2.0], 0.1)


def test_implicit_reward_metrics_by_hand():
    section = implicit_reward_metrics(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, 0.5)
    # rewards with beta 0.5: chosen 1, -1, -0.5, 0.5; rejected -2.5, 0.5, -0.5, -13; margins 3.5, -1.5, 0, 13.5
    assert (section["wins"], section["ties"], section["losses"], section["num_pairs"]) == (2, 1, 1, 4)
    assert section["accuracy"] == pytest.approx((2 + 0.5) / 4)  # a tie counts as half
    assert section["accuracy_strict"] == pytest.approx(2 / 4)  # TRL's rewards/accuracies: a tie counts as wrong
    assert section["mean_margin"] == pytest.approx((3.5 - 1.5 + 0 + 13.5) / 4)
    assert section["chosen_reward"] == pytest.approx((1 - 1 - 0.5 + 0.5) / 4)
    assert section["rejected_reward"] == pytest.approx((-2.5 + 0.5 - 0.5 - 13) / 4)
    assert section["logps"] == {
        "policy": {"chosen": pytest.approx(-6.5), "rejected": pytest.approx(-16.5)},
        "reference": {"chosen": pytest.approx(-6.5), "rejected": pytest.approx(-8.75)},
        "change": {"chosen": pytest.approx(0.0), "rejected": pytest.approx(-7.75)},
    }
    # the chosen responses are as likely as under the reference (change 0): no displacement
    assert section["likelihood_displacement"] is False
    assert section["beta"] == 0.5


def test_implicit_accuracy_does_not_depend_on_beta_but_the_margin_does():
    small = implicit_reward_metrics(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, 0.5)
    large = implicit_reward_metrics(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, 2.0)
    for key in ("accuracy", "accuracy_strict", "wins", "ties", "losses", "logps", "likelihood_displacement"):
        assert small[key] == large[key], key
    assert large["mean_margin"] == pytest.approx(4 * small["mean_margin"])
    assert large["rejected_reward"] == pytest.approx(4 * small["rejected_reward"])


def test_a_falling_chosen_log_probability_is_likelihood_displacement():
    # pair 1's chosen response 0.4 nats less likely: mean chosen change -0.1 < 0, while accuracy stays the same
    lowered = [POLICY_CHOSEN[0] - 0.4] + POLICY_CHOSEN[1:]
    section = implicit_reward_metrics(lowered, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, 0.1)
    assert section["logps"]["change"]["chosen"] == pytest.approx(-0.1)
    assert section["likelihood_displacement"] is True
    assert section["accuracy"] == pytest.approx(0.625) and section["mean_margin"] > 0


def test_implicit_reward_metrics_reject_unpaired_inputs():
    with pytest.raises(ValueError, match="paired"):
        implicit_reward_metrics([-1.0, -2.0], [-1.0], [-1.0, -2.0], [-1.0], 0.1)
    with pytest.raises(ValueError, match="beta"):
        implicit_reward_metrics([-1.0], [-1.0], [-1.0], [-1.0], -0.1)
