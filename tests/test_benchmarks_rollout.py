"""benchmarks/rollout_speed.py: the bandwidth-bound estimate, and a run on the tiny model printing sane JSON lines."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "rollout_speed.py"
LINE_KEYS = {
    "backend", "backend_used", "tokens_per_s", "fraction", "ms_per_step", "compile_s", "seconds_per_call",
    "seconds_each_run", "peak_memory_mb", "peak_memory_kind", "host_peak_rss_mb", "date", "model", "device", "dtype",
    "batch", "prompt_length", "new_tokens", "repeats", "warmup", "bandwidth_gbs", "bandwidth_source",
    "bytes_per_step", "parameter_bytes", "kv_bytes_per_step", "avg_context_length", "limit_tokens_per_s",
    "limit_ms_per_step", "stop", "versions",
}  # fmt: skip
# one torch thread: on the shared 2-core machine two threads oversubscribe and a 4-token call takes ~30x longer
SHAPE = ["--batch", "2", "--prompt-length", "8", "--new-tokens", "4", "--repeats", "2", "--threads", "1"]


def benchmark_module():
    spec = importlib.util.spec_from_file_location("rollout_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_gpt2_parameters(vocab: int, width: int = 64, layers: int = 2, positions: int = 1024) -> int:
    """GPT-2 by hand: token + position embeddings (the LM head is tied), per block two LayerNorms, the fused QKV
    projection, the attention output projection and the 4x MLP (weights and biases), and the final LayerNorm."""
    block = 2 * 2 * width + (width * 3 * width + 3 * width) + (width * width + width) \
        + (width * 4 * width + 4 * width) + (4 * width * width + width)  # fmt: skip
    return vocab * width + positions * width + layers * block + 2 * width


def run(module, capsys, argv) -> list[dict]:
    code = module.main(argv)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0, lines
    return lines


def check_measured(line: dict, backend: str) -> None:
    assert LINE_KEYS <= set(line), LINE_KEYS - set(line)
    assert line["backend"] == line["backend_used"] == backend
    assert line["device"] == "cpu" and line["dtype"] == "float32"
    assert (line["batch"], line["prompt_length"], line["new_tokens"], line["repeats"]) == (2, 8, 4, 2)
    assert len(line["seconds_each_run"]) == 2 and line["compile_s"] > 0
    assert line["tokens_per_s"] > 0 and line["ms_per_step"] > 0 and line["peak_memory_mb"] > 0
    assert line["tokens_per_s"] == pytest.approx(2 * 4 / line["seconds_per_call"], rel=2e-3)
    assert line["ms_per_step"] == pytest.approx(line["seconds_per_call"] / 4 * 1000, rel=2e-3)
    assert 0 < line["fraction"] == pytest.approx(line["tokens_per_s"] / line["limit_tokens_per_s"], rel=1e-2)

    model = line["model"]
    assert (model["layers"], model["hidden"], model["kv_heads"], model["head_dim"]) == (2, 64, 2, 32)
    parameters = tiny_gpt2_parameters(model["vocab_size"])
    assert model["parameters"] == parameters
    kv = 2 * 2 * 2 * 32 * (8 + 4 / 2) * 2 * 4  # K and V x layers x kv heads x head dim x avg context x batch x fp32
    assert line["bytes_per_step"] == parameters * 4 + kv
    limit = 2 / (line["bytes_per_step"] / (line["bandwidth_gbs"] * 1e9))
    assert line["limit_tokens_per_s"] == pytest.approx(limit, rel=1e-3)


def test_bandwidth_bound_by_hand():
    module = benchmark_module()
    # a 1B-parameter bf16 model, 16 layers, 8 KV heads of 64, batch 64, 512 prompt + 256 new tokens, 4800 GB/s
    bound = module.bandwidth_bound(parameters=1_000_000_000, layers=16, kv_heads=8, head_dim=64, prompt_length=512,
                                   new_tokens=256, batch=64, elem_size=2, bandwidth_gbs=4800)  # fmt: skip
    assert bound["avg_context_length"] == 640
    assert bound["parameter_bytes"] == 2_000_000_000
    assert bound["kv_bytes_per_step"] == 2 * 16 * 8 * 64 * 640 * 64 * 2 == 1_342_177_280
    assert bound["bytes_per_step"] == 3_342_177_280
    assert bound["limit_ms_per_step"] == pytest.approx(3_342_177_280 / 4.8e12 * 1000)  # 0.696 ms
    assert bound["limit_tokens_per_s"] == pytest.approx(64 * 4.8e12 / 3_342_177_280)  # ~91,918 tokens/s
    # no KV heads to read (batch of one, tiny context) leaves the parameters: tokens/s = bandwidth / model bytes
    one = module.bandwidth_bound(parameters=250_000_000, layers=1, kv_heads=1, head_dim=1, prompt_length=1,
                                 new_tokens=2, batch=1, elem_size=4, bandwidth_gbs=100)  # fmt: skip
    assert one["bytes_per_step"] == 1_000_000_000 + 2 * 2 * 4
    assert one["limit_tokens_per_s"] == pytest.approx(100e9 / 1_000_000_016)


def test_gpu_bandwidth_table_matches_device_names():
    module = benchmark_module()
    assert module.table_bandwidth("NVIDIA H200") == 4800
    assert module.table_bandwidth("NVIDIA H100 80GB HBM3") == 3350
    assert module.table_bandwidth("NVIDIA H100 PCIe") is None
    assert module.table_bandwidth("NVIDIA A100-SXM4-80GB") == 2039
    assert module.table_bandwidth("NVIDIA A100-SXM4-40GB") == 1555
    assert module.table_bandwidth("NVIDIA L4") == 300
    assert module.table_bandwidth("NVIDIA L40S") is None
    assert module.pick_bandwidth("cpu", 123.0) == (123.0, "--bandwidth-gbs")


def test_tiny_hf_on_cpu_prints_sane_lines(capsys, tmp_path):
    import torch

    module = benchmark_module()
    threads = torch.get_num_threads()
    out = tmp_path / "lines.jsonl"
    lines = run(module, capsys, [*SHAPE, "--backends", "hf,vllm", "--out", str(out)])
    assert [json.loads(text) for text in out.read_text().splitlines()] == lines
    hf, vllm = lines
    check_measured(hf, "hf")
    assert hf["torch_threads"] == 1 and torch.get_num_threads() == threads  # restored for the rest of the suite
    assert hf["bandwidth_source"].startswith("measured: tensor copy") and hf["bandwidth_gbs"] > 0
    assert vllm["backend"] == "vllm" and "tokens_per_s" not in vllm
    assert "not installed" in vllm["skipped"] or "CUDA" in vllm["skipped"]


@pytest.mark.slow
@pytest.mark.extended
def test_tiny_compiled_on_cpu(capsys):
    module = benchmark_module()
    (line,) = run(module, capsys, [*SHAPE, "--backends", "compiled", "--bandwidth-gbs", "10"])
    check_measured(line, "compiled")
    assert line["bandwidth_source"] == "--bandwidth-gbs" and line["bandwidth_gbs"] == 10
