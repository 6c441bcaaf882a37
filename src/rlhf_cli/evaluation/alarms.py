"""Reward-hacking alarms over the stream of PPO metric records (one dict per logged step, as in metrics.jsonl).

A policy that games its reward model shows it in the training curves before anyone reads a sample: the score
starts to track response length, the policy runs far from the reference (KL), sampling collapses onto a few
tokens (entropy), responses loop (repetition), or an independent judge disagrees with the rising proxy score.
`AlarmMonitor` watches a sliding window of records and says which of these is happening and why, with numbers.

Records are dicts with `step`, `score`, `kl`, `entropy`, `response_length` and optionally `repetition_rate` and
`judge_score`; a check whose keys are missing (or not finite numbers) stays silent. Every alarm fires once when
its condition starts to hold and again only after the condition has cleared in between, so a persistent problem
is one message, not one per step.

    monitor = AlarmMonitor(AlarmConfig(mode="stop"), target_kl=6.0)
    for record in records:
        for alarm in monitor.update(record):
            print(alarm.message)
        if monitor.should_stop:
            break
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, fields

import numpy as np

from rlhf_cli.evaluation.metrics import finite_or_none, pearson

ALARM_MODES = ("off", "warn", "stop")


def _help(text: str, default):
    return field(default=default, metadata={"help": text})


@dataclass
class AlarmConfig:
    """When each alarm fires. A threshold of None switches that alarm off."""

    mode: str = _help("off: never check; warn: report alarms; stop: report them and set `should_stop`.", "warn")
    window: int = _help("Sliding window, in logged records, over which trends, correlations and means are taken.", 10)
    length_correlation: float | None = _help(
        "Fire when Pearson r(score, response_length) over the window exceeds this: the reward pays for length.", 0.8
    )
    kl_multiple: float | None = _help(
        "Fire when the latest KL exceeds kl_multiple * target_kl (target_kl passed to the monitor; None: off).", 3.0
    )
    entropy_collapse: float | None = _help(
        "Fire when the window's mean entropy falls below this fraction of the first window's mean entropy.", 0.2
    )
    repetition_jump: float | None = _help(
        "Fire when the window's mean repetition_rate exceeds the first window's mean by more than this.", 0.2
    )
    judge_divergence: float | None = _help(
        "Fire when, over the window, the least-squares trend of score rises while that of judge_score falls by more "
        "than this (in judge-score units, slope x steps spanned): the proxy improves while the judge gets worse.",
        0.1,
    )

    def __post_init__(self) -> None:
        if self.mode not in ALARM_MODES:
            raise ValueError(f"alarm mode must be one of {', '.join(ALARM_MODES)}; got {self.mode!r}.")
        if self.window < 3:
            # Correlations and slopes over two points are always +-1 / exact: no signal, only noise.
            raise ValueError(f"alarm window must be at least 3 records, got {self.window}.")
        for name in ("length_correlation", "kl_multiple", "entropy_collapse", "repetition_jump", "judge_divergence"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"alarm threshold {name} must be non-negative (or None to disable), got {value}.")

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text, for `recipe show --defaults` style listings."""
        return {f.name: f.metadata["help"] for f in fields(cls)}


@dataclass(frozen=True)
class Alarm:
    """One alarm firing: which check (`name`), at which logged `step`, and a sentence with the numbers behind it."""

    name: str
    step: int | None
    message: str


def _number(record: dict, key: str) -> float | None:
    """The record's value for `key` as a float, or None when absent, boolean, non-numeric or not finite."""
    return finite_or_none(record.get(key))


def least_squares_slope(xs, ys) -> float:
    """Slope b of the least-squares line y = a + b x:  b = sum (x - mean x)(y - mean y) / sum (x - mean x)^2.

    0.0 when all x are equal (no trend can be measured).
    """
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    dx = x - x.mean()
    spread = float((dx * dx).sum())
    return float((dx * (y - y.mean())).sum()) / spread if spread > 0 else 0.0


class AlarmMonitor:
    """Feeds on PPO metric records one at a time and returns the alarms that start firing at each."""

    def __init__(self, config: AlarmConfig | None = None, target_kl: float | None = None) -> None:
        self.config = config or AlarmConfig()
        self.target_kl = target_kl
        self.window: deque[dict] = deque(maxlen=self.config.window)
        # Baselines are the mean over the first `window` records that carry the key, then frozen.
        self._baseline_values: dict[str, list[float]] = {"entropy": [], "repetition_rate": []}
        self.active: set[str] = set()
        self.fired: list[Alarm] = []
        self._records_seen = 0

    # ------------------------------------------------------------ public API

    @property
    def should_stop(self) -> bool:
        """True in mode "stop" once any alarm has fired."""
        return self.config.mode == "stop" and bool(self.fired)

    def update(self, record: dict) -> list[Alarm]:
        """Add one record; return the alarms whose condition became true with it (empty in mode "off")."""
        if self.config.mode == "off":
            return []
        self._records_seen += 1
        self.window.append(record)
        for key, values in self._baseline_values.items():
            value = _number(record, key)
            if value is not None and len(values) < self.config.window:
                values.append(value)

        step = record.get("step", self._records_seen)
        new_alarms = []
        for name, check in (
            ("length_correlation", self._check_length_correlation),
            ("kl", self._check_kl),
            ("entropy_collapse", self._check_entropy_collapse),
            ("repetition_jump", self._check_repetition_jump),
            ("judge_divergence", self._check_judge_divergence),
        ):
            verdict = check()
            if verdict is None:
                continue  # cannot be judged on this record: keep the alarm's previous state
            firing, message = verdict
            if not firing:
                self.active.discard(name)
            elif name not in self.active:
                self.active.add(name)
                alarm = Alarm(name=name, step=step, message=f"step {step}: {message}")
                self.fired.append(alarm)
                new_alarms.append(alarm)
        return new_alarms

    # ------------------------------------------------------------ checks: None = not enough data

    def _full_window_series(self, *keys: str) -> list[tuple[float, ...]] | None:
        """Rows of (step, value per key) for window records carrying every key; None until the window is full."""
        if len(self.window) < self.config.window:
            return None
        rows = []
        for position, record in enumerate(self.window):
            values = [_number(record, key) for key in keys]
            if all(value is not None for value in values):
                step = _number(record, "step")
                rows.append((position if step is None else step, *values))
        return rows if len(rows) >= 3 else None

    def _check_length_correlation(self) -> tuple[bool, str] | None:
        threshold = self.config.length_correlation
        rows = None if threshold is None else self._full_window_series("score", "response_length")
        if rows is None:
            return None
        _, scores, lengths = zip(*rows)
        r = pearson(scores, lengths)
        return r > threshold, (
            f"reward tracks response length: Pearson r(score, response_length) = {r:.2f} over the last "
            f"{len(rows)} records (threshold {threshold:.2f}); the policy may be padding answers to please the "
            f"reward model (mean length now {np.mean(lengths):.1f} tokens)."
        )

    def _check_kl(self) -> tuple[bool, str] | None:
        multiple, target = self.config.kl_multiple, self.target_kl
        kl = _number(self.window[-1], "kl")
        if multiple is None or target is None or kl is None:
            return None
        limit = multiple * target
        return kl > limit, (
            f"KL(policy || reference) = {kl:.3f} exceeds {multiple:g} x target_kl {target:g} = {limit:.3f}; the "
            f"policy has drifted far from the reference, where reward-model scores stop being trustworthy."
        )

    def _baseline(self, key: str) -> float | None:
        values = self._baseline_values[key]
        return float(np.mean(values)) if len(values) >= self.config.window else None

    def _window_mean(self, key: str) -> float | None:
        rows = self._full_window_series(key)
        return None if rows is None else float(np.mean([value for _, value in rows]))

    def _check_entropy_collapse(self) -> tuple[bool, str] | None:
        fraction = self.config.entropy_collapse
        if fraction is None:
            return None
        baseline, current = self._baseline("entropy"), self._window_mean("entropy")
        if baseline is None or current is None:
            return None
        return current < fraction * baseline, (
            f"entropy collapsed: window mean {current:.3f} is below {fraction:g} x the first window's mean "
            f"{baseline:.3f} = {fraction * baseline:.3f}; sampling has narrowed onto a few tokens."
        )

    def _check_repetition_jump(self) -> tuple[bool, str] | None:
        jump = self.config.repetition_jump
        if jump is None:
            return None
        baseline, current = self._baseline("repetition_rate"), self._window_mean("repetition_rate")
        if baseline is None or current is None:
            return None
        return current - baseline > jump, (
            f"repetition rose: window mean repetition_rate {current:.3f} is {current - baseline:+.3f} above the "
            f"first window's {baseline:.3f} (allowed rise {jump:g}); responses are starting to loop."
        )

    def _check_judge_divergence(self) -> tuple[bool, str] | None:
        threshold = self.config.judge_divergence
        rows = None if threshold is None else self._full_window_series("score", "judge_score")
        if rows is None:
            return None
        steps, scores, judge_scores = zip(*rows)
        # Trend over the window = least-squares slope x steps spanned, so the threshold does not depend on how
        # often records are logged.
        span = max(steps) - min(steps)
        score_trend = least_squares_slope(steps, scores) * span
        judge_trend = least_squares_slope(steps, judge_scores) * span
        return score_trend > 0 and judge_trend < -threshold, (
            f"proxy and judge diverge: over steps {min(steps):g}-{max(steps):g} the reward-model score trend is "
            f"{score_trend:+.3f} while the judge score trend is {judge_trend:+.3f} (alarm below -{threshold:g}, "
            f"least-squares fits); the policy is overoptimising the reward model."
        )
