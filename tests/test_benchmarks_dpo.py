"""benchmarks/dpo_overhead.py: `--quick` runs both sides and prints well-formed JSON lines (no absolute times)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "dpo_overhead.py"
IMPL_KEYS = {
    "impl", "config", "device", "precision", "model", "batch", "max_length", "seq_length_mean", "steps",
    "samples_per_s", "tokens_per_s", "train_runtime_s", "process_wall_s", "train_cpu_s", "process_cpu_s",
    "peak_rss_mb", "train_runtime_s_each_run", "process_wall_s_each_run", "train_cpu_s_each_run",
    "train_call_wall_s_each_run", "process_cpu_s_each_run", "peak_rss_mb_each_run", "loadavg_1m_each_run",
    "repeats", "date", "machine", "torch_threads", "side_by_side", "versions", "rows_kept",
}  # fmt: skip
RATIO_KEYS = {
    "ratio", "config", "train_runtime", "process_wall", "train_cpu", "process_cpu", "peak_rss",
    "train_runtime_each_pair", "process_wall_each_pair", "train_cpu_each_pair", "process_cpu_each_pair",
    "train_runtime_median_pair", "goal_train_runtime_max", "meets_goal", "same_steps", "loss_max_rel_diff",
}  # fmt: skip


def benchmark_module():
    spec = importlib.util.spec_from_file_location("dpo_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_run_prints_one_line_per_side_and_a_ratio(tmp_path):
    out = tmp_path / "lines.jsonl"
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], capture_output=True,
                            text=True, timeout=600, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]  # stdout holds nothing but the JSON lines
    assert out.read_text().splitlines() == result.stdout.splitlines()
    assert [line.get("impl", line.get("ratio")) for line in lines] == ["rlhf-cli", "trl", "rlhf-cli / trl"]

    ours, theirs, ratio = lines
    for line in (ours, theirs):
        assert IMPL_KEYS <= set(line), IMPL_KEYS - set(line)
        assert line["config"] == "tiny" and line["steps"] == 4 and line["batch"] == 8 and line["repeats"] == 1
        assert line["device"] == "cpu" and line["precision"] == "float32" and line["side_by_side"] is True
        assert line["rows_kept"] == 256  # every pair of recipes/tiny/data/preference.jsonl, none held out
        for key in ("samples_per_s", "tokens_per_s", "train_runtime_s", "process_wall_s", "train_cpu_s",
                    "process_cpu_s", "peak_rss_mb"):
            assert isinstance(line[key], (int, float)) and line[key] > 0, key
        # the training phase lies inside the train() call, which lies inside the process
        assert line["train_runtime_s"] <= line["train_call_wall_s_each_run"][0] < line["process_wall_s"]
        assert line["train_cpu_s"] < line["process_cpu_s"]
        assert line["train_runtime_s_each_run"] == [line["train_runtime_s"]]
        assert line["model"]["n_layer"] == 2 and line["model"]["parameters"] > 0
        assert line["machine"]["cpu_count"] >= 1 and line["versions"]["trl"]
    assert ours["model"] == theirs["model"] and ours["seq_length_mean"] == theirs["seq_length_mean"]
    assert ours["rows_truncated"] == 0
    assert theirs["dtype"] == "torch.float32"

    assert RATIO_KEYS <= set(ratio), RATIO_KEYS - set(ratio)
    assert ratio["train_runtime"] == round(ours["train_runtime_s"] / theirs["train_runtime_s"], 3)
    assert ratio["process_wall"] == round(ours["process_wall_s"] / theirs["process_wall_s"], 3)
    assert ratio["train_cpu"] == round(ours["train_cpu_s"] / theirs["train_cpu_s"], 3)
    assert ratio["meets_goal"] == (ratio["train_runtime"] <= ratio["goal_train_runtime_max"] == 1.05)
    assert ratio["same_steps"] is True
    assert ratio["loss_max_rel_diff"] is not None and ratio["loss_max_rel_diff"] <= 1e-4  # identical training


def test_the_identical_training_check_sees_a_different_loss():
    module = benchmark_module()
    assert module.loss_difference({"4": 0.69, "8": 0.5}, {"4": 0.69, "8": 0.5}) == 0.0
    assert module.loss_difference({"4": 0.69, "8": 0.55}, {"4": 0.69, "8": 0.5}) == pytest.approx(0.1)
    assert module.loss_difference({"4": 0.69}, {"8": 0.69}) is None  # no common step: nothing shows they agree


def test_both_sides_get_the_same_settings():
    module = benchmark_module()
    settings = {**module.COMMON, **module.CONFIGS["small"]}
    trl = module.trl_config(settings, module.precision_like_rlhf())
    recipe = module.rlhf_recipe(settings, REPO / "model", REPO / "pairs.jsonl")
    training = recipe["training"]
    for key in ("beta", "loss_type", "max_steps", "per_device_train_batch_size", "learning_rate", "lr_scheduler_type",
                "warmup_steps", "logging_steps", "save_strategy", "activation_checkpointing"):
        assert training[key] == trl[key], key
    assert recipe["data"]["max_length"] == trl["max_length"] and recipe["seed"] == trl["seed"]
    assert recipe["data"]["eval_split"] == 0 and trl["eval_strategy"] == "no"
    assert trl["use_cpu"] is True and trl["bf16"] is False  # the suite hides GPUs: rlhf-cli's CPU plan, float32
