"""The divergence guard's pure parts, against hand-computed values."""

import json
import math

import pytest

from rlhf_cli.guard import Divergence, divergence_message, is_spike, non_finite
from rlhf_cli.rundir import dumps, finite_json


def test_non_finite_names_the_first_bad_value():
    assert non_finite({"loss": 0.5, "grad_norm": 1.0}) is None
    assert non_finite({"loss": float("nan"), "grad_norm": float("inf")}) == "loss nan"
    assert non_finite({"loss": 0.5, "grad_norm": float("-inf")}) == "grad_norm -inf"
    assert non_finite({"loss": None, "grad_norm": 2}) is None  # not logged this step


def test_spike_rule_compares_with_the_median_of_the_window():
    assert not is_spike(100.0, [1.0, 2.0], 10.0)  # too little history
    assert is_spike(31.0, [1.0, 3.0, 100.0], 10.0)  # median 3 -> bound 30
    assert not is_spike(30.0, [1.0, 3.0, 100.0], 10.0)
    assert is_spike(25.1, [1.0, 2.0, 3.0, 4.0], 10.0)  # median 2.5 -> bound 25
    assert not is_spike(1e9, [1.0, 2.0, 3.0], None)  # off
    assert not is_spike(5.0, [-1.0, -2.0, -3.0], 2.0)  # no positive median to compare with


def test_json_never_holds_a_bare_nan():
    record = {"loss": float("nan"), "grad_norm": float("inf"), "nested": [1.5, float("-inf")], "ok": 2}
    assert finite_json(record) == {"loss": None, "grad_norm": None, "nested": [1.5, None], "ok": 2}
    assert json.loads(dumps(record), parse_constant=pytest.fail)["loss"] is None
    assert math.isnan(float("nan"))


def test_the_message_names_the_step_and_what_to_resume_from(tmp_path):
    kept = tmp_path / "checkpoint-20"
    message = divergence_message(Divergence(23, "loss nan"), kept)
    assert "step 23: loss nan" in message and str(kept) in message and "--resume" in message
    assert "No checkpoint" in divergence_message(Divergence(1, "grad_norm inf"), None)
