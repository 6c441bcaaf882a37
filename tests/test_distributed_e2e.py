"""Train-rm under DeepSpeed ZeRO-3 in two CPU processes (gloo), for real: in a file of its own so that the
parallel test run (pytest-xdist, one file per worker) starts this longest test beside the others."""

import json

from conftest import TINY, rlhf


def test_rm_under_deepspeed_zero3_in_two_cpu_processes(tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "zero3"
    rlhf("train-rm", str(TINY / "rm.yaml"), "-o", str(out), "--set", "distributed.strategy=zero3",
         "--set", "distributed.num_processes=2", "--set", "training.num_train_epochs=1")
    ds = json.loads((out / "deepspeed.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3 and ds["train_batch_size"] == 16 * 2
    assert "num_processes: 2" in (out / "accelerate_config.yaml").read_text()
    # 256 pairs - 13 held out = 243 / (16 per process x 2 processes) = 8 optimizer steps: both processes took part.
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8
    # The workers load, hold out and count as an in-process run does.
    assert summary["rows read"] == 256 and summary["rows held out for evaluation"] == 13
    assert summary["rows kept"] == 243 and summary["held-out rows"] == 13 and "held-out accuracy" in summary
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert all(p.numel() > 0 and torch.isfinite(p).all() for p in model.parameters())  # gathered, not shards
