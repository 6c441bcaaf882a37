"""Reward-hacking alarms: each fires on a stream built to trigger it, once, and a healthy stream stays quiet."""

import math

import pytest

from rlhf_cli.evaluation.alarms import Alarm, AlarmConfig, AlarmMonitor, least_squares_slope

STEPS = 40


def healthy(step: int) -> dict:
    """A run going well: score and judge rise together, length wobbles independently, KL/entropy/repetition flat."""
    return {
        "step": step,
        "score": 0.5 + 0.02 * step + 0.05 * math.sin(step),
        "judge_score": 0.3 + 0.01 * step + 0.03 * math.cos(step),
        "response_length": 20 + 3 * math.sin(2.3 * step + 1),
        "kl": 1.0 + 0.1 * math.sin(0.7 * step),
        "entropy": 2.0 + 0.05 * math.cos(step),
        "repetition_rate": 0.05 + 0.01 * math.sin(step),
    }


def stream(change, steps: int = STEPS) -> list[dict]:
    """The healthy stream with `change(step, record)` applied to every record."""
    records = []
    for step in range(1, steps + 1):
        record = healthy(step)
        change(step, record)
        records.append(record)
    return records


def feed(records, config=None, target_kl=None) -> tuple[AlarmMonitor, list[Alarm]]:
    monitor = AlarmMonitor(config or AlarmConfig(), target_kl=target_kl)
    fired = [alarm for record in records for alarm in monitor.update(record)]
    return monitor, fired


def names(alarms) -> list[str]:
    return [alarm.name for alarm in alarms]


def test_healthy_stream_raises_nothing():
    monitor, fired = feed(stream(lambda step, r: None), target_kl=1.0)
    assert fired == []
    assert not monitor.should_stop


def test_length_hacking_fires_once():
    def pad_answers(step, record):
        if step > 15:  # from here the reward model pays for length and the policy pads
            record["response_length"] = 20 + 4 * (step - 15)
            record["score"] = 0.05 * record["response_length"] + 0.01 * math.sin(step)

    _, fired = feed(stream(pad_answers))
    assert names(fired) == ["length_correlation"]  # once, though the correlation stays high to step 40
    # three padded records already outweigh the healthy wobble in a 10-record window: r = 0.89 > 0.8 at step 18
    assert fired[0].step == 18
    assert "Pearson r(score, response_length) = 0.89" in fired[0].message


def test_kl_alarm_fires_once_per_excursion_and_rearms_after_clearing():
    def drift(step, record):
        if 12 <= step <= 20 or step >= 30:
            record["kl"] = 4.0 + 0.1 * step  # above 3 x target_kl = 3.0

    _, fired = feed(stream(drift), target_kl=1.0)
    assert names(fired) == ["kl", "kl"]  # once for steps 12-20, once again from 30: not once per step
    assert [alarm.step for alarm in fired] == [12, 30]
    assert "KL(policy || reference) = 5.200 exceeds 3 x target_kl 1 = 3.000" in fired[0].message


def test_kl_alarm_needs_a_target():
    def drift(step, record):
        record["kl"] = 50.0

    _, fired = feed(stream(drift), target_kl=None)
    assert "kl" not in names(fired)


def test_entropy_collapse_fires_once():
    def collapse(step, record):
        if step > 12:
            record["entropy"] = 0.05  # first-window mean is ~2.0, so 0.2 x that is ~0.4

    _, fired = feed(stream(collapse))
    assert names(fired) == ["entropy_collapse"]
    # At step 20 the window (steps 11-20) holds 2 healthy records (~2.0) and 8 collapsed ones:
    # (4.0 + 8 x 0.05) / 10 = 0.44, still above 0.4; at step 21, (2.0 + 9 x 0.05) / 10 = 0.245 is below.
    assert fired[0].step == 21
    assert "entropy collapsed" in fired[0].message


def test_repetition_jump_fires_once():
    def loop(step, record):
        if step > 20:
            record["repetition_rate"] = 0.6

    _, fired = feed(stream(loop))
    assert names(fired) == ["repetition_jump"]
    # First-window mean ~0.05, so the window mean must pass ~0.25. With 3 of 10 records at 0.6 it is
    # (3 x 0.6 + 7 x 0.05) / 10 = 0.215; with 4 it is (4 x 0.6 + 6 x 0.05) / 10 = 0.27: step 24.
    assert fired[0].step == 24


def test_judge_divergence_fires_when_proxy_rises_and_judge_falls():
    def overoptimise(step, record):
        if step > 20:
            record["score"] = 0.9 + 0.1 * (step - 20)
            record["judge_score"] = 0.5 - 0.05 * (step - 20)

    _, fired = feed(stream(overoptimise))
    assert names(fired) == ["judge_divergence"]
    assert "proxy and judge diverge" in fired[0].message


def test_records_without_optional_keys_only_silence_their_checks():
    def no_judge_no_repetition(step, record):
        del record["judge_score"], record["repetition_rate"]
        if step > 12:
            record["entropy"] = 0.05

    _, fired = feed(stream(no_judge_no_repetition))
    assert names(fired) == ["entropy_collapse"]


def test_modes():
    def collapse(step, record):
        if step > 12:
            record["entropy"] = 0.05

    records = stream(collapse)
    warn, fired = feed(records, AlarmConfig(mode="warn"))
    assert fired and not warn.should_stop
    stop, fired = feed(records, AlarmConfig(mode="stop"))
    assert fired and stop.should_stop
    off, fired = feed(records, AlarmConfig(mode="off"))
    assert fired == [] and not off.should_stop


def test_a_threshold_of_none_disables_that_alarm():
    def collapse(step, record):
        if step > 12:
            record["entropy"] = 0.05

    _, fired = feed(stream(collapse), AlarmConfig(entropy_collapse=None))
    assert fired == []


def test_config_is_validated_and_documented():
    with pytest.raises(ValueError, match="mode"):
        AlarmConfig(mode="loud")
    with pytest.raises(ValueError, match="window"):
        AlarmConfig(window=2)
    with pytest.raises(ValueError, match="kl_multiple"):
        AlarmConfig(kl_multiple=-1.0)
    assert set(AlarmConfig.help()) == {"mode", "window", "length_correlation", "kl_multiple", "entropy_collapse",
                                       "repetition_jump", "judge_divergence"}  # fmt: skip


def test_least_squares_slope():
    assert least_squares_slope([1, 2, 3], [1, 3, 5]) == pytest.approx(2.0)
    # x deviations -1 0 1, y = 0 0 3 -> slope = 3 / 2
    assert least_squares_slope([1, 2, 3], [0, 0, 3]) == pytest.approx(1.5)
    assert least_squares_slope([2, 2, 2], [0, 1, 2]) == 0.0
