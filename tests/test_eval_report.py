"""The evaluation report (eval.json + report.md) and its PNG figures."""

import json

import numpy as np
import pytest

from rlhf_cli.evaluation import plots
from rlhf_cli.evaluation.metrics import diversity_metrics, reward_model_metrics, sampled_kl, summarize, win_rate
from rlhf_cli.evaluation.report import EVAL_JSON, REPORT_MD, render_markdown, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

POLICY_SCORES = [1.5, 0.2, 2.0, 1.1]
REFERENCE_SCORES = [1.0, 0.2, 0.5, 1.4]


def full_results() -> dict:
    return {
        "meta": {"policy": "runs/ppo", "reference": "runs/sft", "reward_model": "runs/rm", "prompts": 4},
        "reward_model": reward_model_metrics([2.0, 0.0, 3.0], [1.0, 1.0, -1.0], [3, 1, 2], [1, 3, 2]),
        "policy": {
            "win_rate": win_rate(POLICY_SCORES, REFERENCE_SCORES),
            "policy_score": summarize(POLICY_SCORES),
            "reference_score": summarize(REFERENCE_SCORES),
            "kl": sampled_kl([-4.0, -3.0, -2.0], [-5.0, -5.0, -5.0]),
        },
        "diversity": {
            "policy": diversity_metrics([[1, 2, 3, 0], [1, 2, 4]], eos_token_id=0),
            "reference": diversity_metrics([[5, 6, 0], [7, 8, 0]], eos_token_id=0),
        },
        "perplexity": {"policy": 12.5, "reference": 11.25},
        "judge": {"name": "big-judge", "win_rate": win_rate([3, 1], [2, 2])},
    }


SAMPLES = [
    {"prompt": "Say hi | politely", "policy_response": "Hello!\nHow are you?", "policy_score": 1.5,
     "reference_response": "hi", "reference_score": 1.0},
    {"prompt": "Count", "policy_response": "1 2 3", "policy_score": 0.2, "reference_response": "one",
     "reference_score": 0.2},
]  # fmt: skip


def test_eval_json_round_trips_and_report_has_every_section(tmp_path):
    results = full_results()
    write_report(tmp_path, results, SAMPLES)
    assert json.loads((tmp_path / EVAL_JSON).read_text()) == results

    report = (tmp_path / REPORT_MD).read_text()
    for heading in ["# Evaluation report", "## Reward model", "### Calibration", "## Policy vs reference",
                    "## Diversity", "## Perplexity", "## Judge: big-judge", "## Samples"]:  # fmt: skip
        assert heading in report
    # pairs, accuracy (ties left out), ties (rate), margin, length bias, shorter-chosen, accuracy with ties as half
    assert "| 3 | 0.667 | 0 (0.000) | 1.333 | 1.000 | 0.000 | 0.667 |" in report
    assert "Win rate: **0.625** (95% Wilson interval" in report  # 2 wins, 1 tie, 1 loss: 2.5 / 4
    assert "KL(policy ‖ reference) per response: **2.000** ± 0.577" in report
    assert "| policy | 12.500 |" in report
    # a pipe or line break inside a response must not break the table
    assert "| 1 | Say hi \\| politely | Hello!<br>How are you? | 1.500 | hi | 1.000 |" in report
    assert "## Figures" not in report  # no PNG written yet


def test_reward_model_only_report_has_no_policy_sections(tmp_path):
    results = {"reward_model": reward_model_metrics([1.0, 2.0], [0.0, 3.0], [5, 5], [5, 5])}
    write_report(tmp_path, results, [])
    report = (tmp_path / REPORT_MD).read_text()
    assert "## Reward model" in report
    assert "## Policy vs reference" not in report and "## Samples" not in report and "## Judge" not in report
    assert "| 2 | 0.500 | 0 (0.000) | 0.000 | n/a | n/a | 0.500 |" in report  # equal lengths: no length metrics
    assert json.loads((tmp_path / EVAL_JSON).read_text())["reward_model"]["length_bias"] is None


def test_numpy_values_and_non_finite_floats_become_plain_json(tmp_path):
    write_report(tmp_path, {"perplexity": {"policy": np.float32(2.5), "broken": float("inf")},
                            "meta": {"prompts": np.int64(3)}}, [])  # fmt: skip
    loaded = json.loads((tmp_path / EVAL_JSON).read_text())
    assert loaded == {"perplexity": {"policy": 2.5, "broken": None}, "meta": {"prompts": 3}}
    assert "| broken | n/a |" in (tmp_path / REPORT_MD).read_text()


def test_samples_without_reference_have_policy_columns_only():
    report = render_markdown({}, [{"prompt": "p", "policy_response": "r", "policy_score": 0.5}])
    assert "| # | prompt | policy response | policy score |" in report
    assert "reference" not in report


def ppo_records(with_judge: bool) -> list[dict]:
    records = []
    for step in range(1, 21):
        record = {"step": step, "score": 0.1 * step, "kl": 0.05 * step**1.5, "entropy": 2.0}
        if with_judge:
            record["judge_score"] = 0.5 + 0.1 * step - 0.006 * step**2  # peaks, then falls: overoptimisation
        records.append(record)
    return records


def assert_png(path, min_width: int) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    from PIL import Image

    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= min_width and image.size[1] >= 300


def test_plots_write_valid_pngs_and_the_report_links_them(tmp_path):
    rng = np.random.default_rng(0)
    policy, reference = rng.normal(1.0, 0.5, 50), rng.normal(0.5, 0.5, 50)
    lengths = rng.integers(5, 40, 50)

    written = [
        plots.reward_distribution(policy, reference, tmp_path / "reward_distribution.png"),
        plots.reward_vs_length(
            policy,
            lengths,
            tmp_path / "reward_vs_length.png",
            "policy",
            reference_scores=reference,
            reference_lengths=lengths + 3,
        ),
        plots.training_curves(ppo_records(with_judge=True), tmp_path / "training_curves.png"),
        plots.overoptimisation(ppo_records(with_judge=True), tmp_path / "overoptimisation.png"),
    ]
    for path in written:
        assert_png(path, min_width=500)  # 6 x 4 inches at 100 dpi and wider

    # with a judge there is a third panel of training curves (overoptimisation draws it on the same axes)
    plots.training_curves(ppo_records(with_judge=False), tmp_path / "plain" / "training_curves.png")
    plots.overoptimisation(ppo_records(with_judge=False), tmp_path / "plain" / "overoptimisation.png")
    from PIL import Image

    def width(path):
        with Image.open(path) as image:
            return image.size[0]

    assert width(tmp_path / "training_curves.png") > width(tmp_path / "plain" / "training_curves.png")

    write_report(tmp_path, full_results(), SAMPLES)
    report = (tmp_path / REPORT_MD).read_text()
    assert "## Figures" in report
    for path in written:
        assert f"]({path.name})" in report


def test_plots_reject_mismatched_inputs(tmp_path):
    with pytest.raises(ValueError, match="3 scores but 2 lengths"):
        plots.reward_vs_length([1.0, 2.0, 3.0], [4, 5], tmp_path / "x.png", "policy")


def test_importing_the_evaluation_package_loads_neither_torch_nor_matplotlib():
    import subprocess
    import sys

    code = ("import sys; import rlhf_cli.evaluation.metrics, rlhf_cli.evaluation.alarms, "
            "rlhf_cli.evaluation.report, rlhf_cli.evaluation.plots; "
            "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))")  # fmt: skip
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"
