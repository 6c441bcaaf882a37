"""Rollout speed: decode tokens/s of each decoding backend (hf, compiled, vllm) against the bandwidth-bound limit.

    python benchmarks/rollout_speed.py [--model tiny|gpt2-124m|smollm2-135m|1b|PATH] [--batch B] [--prompt-length P]
                                       [--new-tokens N] [--repeats R] [--backends hf,compiled,vllm] [--out FILE]

Prints one JSON line per backend on stdout (progress goes to stderr). See benchmarks/README.md.

Each backend decodes the same batch of B prompts of exactly P random token ids (no padding) for exactly N new
tokens, through rlhf_cli.generation (`resolve_backend`, `Decoder.generate`, `sampling_options`; temperature 0.7,
top-p 1, no top-k, as PPO's rollouts sample). To measure the full length every time, generation is forced never
to stop early: `min_new_tokens = max_new_tokens = N` (transformers then masks the EOS logit until N tokens exist; on
vllm, `ignore_eos`), so every row of every run yields N tokens whatever the random-init model samples.

Timing: the first call is timed apart (`compile_s`: for compiled it holds torch.compile's tracing and compilation
plus one generation; for hf just a cold first generation), then `--warmup` more untimed calls (at least one), then R
timed calls of prefill + decode wall time (`torch.cuda.synchronize()` before each clock reading on a GPU).
decode tokens/s = B * N / mean seconds of a call; ms per decoding step = mean seconds / N * 1000.

The bandwidth-bound limit: one decoding step must read every parameter once and the KV cache of the context so far,

    bytes per step = parameter bytes (numel x element size)
                     + 2 x layers x kv_heads x head_dim x avg_len x B x element size    (keys and values)
    avg_len        = P + N / 2  (the context length half-way through the response)
    limit tokens/s = B / (bytes per step / bandwidth)

and `fraction` = measured tokens/s / limit tokens/s. The limit ignores compute, the prefill and activations, so a
fraction near 1 is the ceiling; compiled's static cache attends over the whole preallocated cache (P rounded up to
the prompt bucket, + N), so it reads somewhat more than the estimate counts. Bandwidth: `--bandwidth-gbs`, else a
table of GPU peak figures matched on torch.cuda.get_device_name(), else (CPU, or a GPU not in the table) a measured
tensor copy (bytes read + written per second); `bandwidth_source` says which.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import os
import re
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _bench_common import (  # noqa: E402
    Clock,
    emit,
    keep_stdout_for_results,
    load_benchmark_tokenizer,
    peak_memory,
    versions,
)

BACKENDS = ("hf", "compiled", "vllm")
TEMPERATURE = 0.7

# Peak memory bandwidth in GB/s (10^9 bytes/s), vendor figures; the first pattern that matches the device name wins.
GPU_BANDWIDTH_GBS = (
    (r"H200", 4800.0),
    (r"H100(?!.*PCIe)", 3350.0),  # H100 SXM (HBM3); the PCIe card (2000) is not in the table
    (r"A100.*80\s*GB", 2039.0),
    (r"A100", 1555.0),  # A100 40GB
    (r"\bL4\b", 300.0),
)

# name -> (kind, config keyword arguments). Random weights; `tiny` is our builtin:tiny-gpt2 shape.
MODELS = {
    "tiny": ("gpt2", {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 1024, "tokenizer": "builtin-1024"}),
    "gpt2-124m": ("gpt2", {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024, "tokenizer": "gpt2"}),
    "smollm2-135m": ("llama", {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                               "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152,
                               "max_position_embeddings": 8192, "rope_theta": 100000.0,
                               "tie_word_embeddings": True}),
    "1b": ("llama", {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 128256,
                     "max_position_embeddings": 8192, "rope_theta": 500000.0, "tie_word_embeddings": True}),
}  # fmt: skip


def log(message: str) -> None:
    print(f"[rollout_speed] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ the bandwidth-bound estimate (pure functions)


def average_context(prompt_length: int, new_tokens: int) -> float:
    """Context length half-way through the response: the mean KV length a decoding step reads."""
    return prompt_length + new_tokens / 2


def kv_bytes_per_step(*, layers: int, kv_heads: int, head_dim: int, avg_len: float, batch: int,
                      elem_size: int) -> float:  # fmt: skip
    """Keys and values of every layer, for `batch` rows of `avg_len` positions."""
    return 2 * layers * kv_heads * head_dim * avg_len * batch * elem_size


def bandwidth_bound(*, parameters: int, layers: int, kv_heads: int, head_dim: int, prompt_length: int,
                    new_tokens: int, batch: int, elem_size: int, bandwidth_gbs: float) -> dict:  # fmt: skip
    """Bytes one decoding step reads (all parameters + the KV cache at the average context length) and the decode
    tokens/s that memory bandwidth allows: batch / (bytes per step / bandwidth)."""
    avg_len = average_context(prompt_length, new_tokens)
    parameter_bytes = parameters * elem_size
    kv_bytes = kv_bytes_per_step(layers=layers, kv_heads=kv_heads, head_dim=head_dim, avg_len=avg_len, batch=batch,
                                 elem_size=elem_size)  # fmt: skip
    step_bytes = parameter_bytes + kv_bytes
    step_seconds = step_bytes / (bandwidth_gbs * 1e9)
    return {
        "parameter_bytes": parameter_bytes,
        "kv_bytes_per_step": kv_bytes,
        "bytes_per_step": step_bytes,
        "avg_context_length": avg_len,
        "limit_ms_per_step": step_seconds * 1000,
        "limit_tokens_per_s": batch / step_seconds,
    }


def table_bandwidth(device_name: str) -> float | None:
    for pattern, gbs in GPU_BANDWIDTH_GBS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return gbs
    return None


def measure_copy_bandwidth(device: str, megabytes: int = 256, repeats: int = 5) -> float:
    """GB/s of a large tensor copy on `device`: (bytes read + bytes written) / seconds, best of `repeats`."""
    import torch

    elements = megabytes * 2**20 // 4
    source = torch.ones(elements, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    clock = Clock(device)
    target.copy_(source)  # first touch: page faults, not bandwidth
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        target.copy_(source)
        best = min(best, clock() - start)
    del source, target
    return 2 * elements * 4 / best / 1e9


def pick_bandwidth(device: str, override: float | None) -> tuple[float, str]:
    if override:
        return override, "--bandwidth-gbs"
    if device.startswith("cuda"):
        import torch

        name = torch.cuda.get_device_name()
        gbs = table_bandwidth(name)
        if gbs:
            return gbs, f"table: {name} peak"
        return round(measure_copy_bandwidth(device), 1), f"measured: tensor copy on {name} (not in the table)"
    return round(measure_copy_bandwidth(device), 1), "measured: tensor copy on the CPU (bytes read + written)"


# ------------------------------------------------------------------ the model


def build_model(name: str, device: str, dtype):
    """(model, tokenizer or None, pad_id, eos_id, description) for a named shape (random init) or a local model
    directory."""
    import torch

    if name in MODELS:
        kind, settings = MODELS[name]
        settings = dict(settings)
        torch.manual_seed(0)
        if kind == "gpt2":
            from transformers import GPT2Config, GPT2LMHeadModel

            tokenizer, tokenizer_text, vocab = load_benchmark_tokenizer(settings.pop("tokenizer"), log)
            eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
            config = GPT2Config(vocab_size=vocab, bos_token_id=eos, eos_token_id=eos, pad_token_id=pad, **settings)
            model_class = GPT2LMHeadModel
        else:
            from transformers import LlamaConfig, LlamaForCausalLM

            tokenizer, tokenizer_text, eos, pad = None, "none (random token ids)", 2, 2
            config = LlamaConfig(bos_token_id=1, eos_token_id=eos, pad_token_id=pad, **settings)
            model_class = LlamaForCausalLM
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = model_class(config)
        finally:
            torch.set_default_dtype(previous)
        description = {"name": name, "type": f"{model_class.__name__} (random init)", "tokenizer": tokenizer_text}
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(name)
        if not path.is_dir():
            raise SystemExit(f"--model {name}: not one of {', '.join(MODELS)} and not a local model directory")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        tokenizer = AutoTokenizer.from_pretrained(path)
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        if isinstance(eos, list):
            eos = eos[0]
        description = {"name": str(path), "type": f"{type(model).__name__} (from {path})"}
    model.eval()
    model.generation_config.pad_token_id = pad
    model.generation_config.eos_token_id = eos
    return model, tokenizer, pad, eos, description


def model_shape(model) -> dict:
    """Layers, KV heads, head dim, parameter count and element size, from the model's config and weights."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    parameters = sum(p.numel() for p in model.parameters())  # tied embeddings once, as they are read once
    elem_size = next(model.parameters()).element_size()
    return {"layers": layers, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "hidden": hidden,
            "vocab_size": config.vocab_size, "parameters": parameters, "elem_size": elem_size}  # fmt: skip


# ------------------------------------------------------------------ measuring one backend


def vllm_unavailable(device: str) -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "the vllm package is not installed (pip install \"rlhf-cli[vllm]\")"
    if not device.startswith("cuda"):
        return "vllm needs a CUDA GPU, and this run has none"
    return None


def make_prompts(batch: int, length: int, vocab: int, avoid: set[int], device: str, seed: int = 0):
    """(ids, mask): `batch` prompts of exactly `length` random token ids (none of the special ids), no padding."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    for special in avoid:
        ids[ids == special] = (special + 1) % vocab
    return ids.to(device), torch.ones_like(ids, device=device)


def measure_backend(name: str, model, query_ids, query_mask, options: dict, *, repeats: int, warmup: int,
                    device: str, tokenizer=None) -> dict:  # fmt: skip
    import torch

    from rlhf_cli.generation import Decoder, resolve_backend
    from rlhf_cli.recipe import GenerationSpec

    batch, new_tokens = query_ids.shape[0], options["max_new_tokens"]
    backend = resolve_backend(GenerationSpec(backend=name), model, what="rollout_speed")
    decoder = Decoder(backend, batch_size=batch)
    if backend.name == "vllm":  # untested so far (no GPU with vllm yet); a failure becomes an error line
        import tempfile

        from accelerate import Accelerator

        if not Path(model.name_or_path or "").is_dir():  # a random-init model: vLLM loads it from a directory
            if tokenizer is None:
                raise RuntimeError("vllm needs a tokenizer: use a gpt2 shape or a local model directory")
            saved = tempfile.mkdtemp(prefix="rollout-speed-")
            model.save_pretrained(saved)
            tokenizer.save_pretrained(saved)
            model.name_or_path = model.config._name_or_path = saved

        engine = decoder.vllm_engine(model, Accelerator(), tokenizer, options,
                                     max_model_length=query_ids.shape[1] + new_tokens)  # fmt: skip
        engine.generation_kwargs = {**engine.generation_kwargs, "ignore_eos": True, "min_tokens": new_tokens}
    clock = Clock(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    def one_call() -> float:
        start = clock()
        with torch.inference_mode():
            out = decoder.generate(model, query_ids, query_mask, options)
        seconds = clock() - start
        if tuple(out.shape) != (batch, new_tokens):
            raise RuntimeError(f"{name} returned {tuple(out.shape)} tokens, expected ({batch}, {new_tokens})")
        return seconds

    torch.manual_seed(0)
    first = one_call()
    for _ in range(warmup):
        one_call()
    seconds = [one_call() for _ in range(repeats)]
    mean_s = statistics.fmean(seconds)
    return {
        "backend": backend.name,
        "fallback_reason": backend.fallback_reason,
        "tokens_per_s": batch * new_tokens / mean_s,
        "ms_per_step": mean_s / new_tokens * 1000,
        "seconds_per_call": mean_s,
        "seconds_each_run": [round(s, 4) for s in seconds],
        "compile_s": round(first, 3),
        **peak_memory(device),
    }


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help=f"{', '.join(MODELS)}, or a local model directory")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                        help="default: bfloat16 on a GPU, float32 on CPU")  # fmt: skip
    parser.add_argument("--batch", type=int, help="prompts decoded together (default: 64 on a GPU, 8 on CPU)")
    parser.add_argument("--prompt-length", type=int, default=64, help="tokens per prompt (default 64)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt (default 128)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per backend (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls after the first one (default 1)")
    parser.add_argument("--backends", default="hf,compiled,vllm", help="comma-separated, from hf, compiled, vllm")
    parser.add_argument("--bandwidth-gbs", type=float, help="memory bandwidth in GB/s (default: table or measured)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    args = parser.parse_args(argv)

    args.backend_names = backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not backends or set(backends) - set(BACKENDS):
        parser.error(f"--backends: choose from {', '.join(BACKENDS)}")
    for option in ("prompt_length", "new_tokens", "repeats"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    if args.warmup < 1:
        parser.error("--warmup must be at least 1")
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args, parser)
    finally:
        torch.set_num_threads(threads_before)  # main() may run inside another process (the tests)


def run(args, parser) -> int:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))
    batch = args.batch or (64 if on_gpu else 8)

    log(f"building {args.model} on {device} ({dtype})")
    model, tokenizer, pad, eos, description = build_model(args.model, device, dtype)
    shape = model_shape(model)
    limit_positions = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 0)
    if limit_positions and args.prompt_length + args.new_tokens > limit_positions:
        parser.error(f"--prompt-length + --new-tokens exceeds the model's {limit_positions} positions")
    bandwidth, bandwidth_source = pick_bandwidth(device, args.bandwidth_gbs)
    log(f"bandwidth {bandwidth} GB/s ({bandwidth_source})")
    bound = bandwidth_bound(parameters=shape["parameters"], layers=shape["layers"], kv_heads=shape["kv_heads"],
                            head_dim=shape["head_dim"], prompt_length=args.prompt_length, new_tokens=args.new_tokens,
                            batch=batch, elem_size=shape["elem_size"], bandwidth_gbs=bandwidth)  # fmt: skip

    from rlhf_cli.generation import sampling_options

    query_ids, query_mask = make_prompts(batch, args.prompt_length, shape["vocab_size"], {pad, eos}, device)
    options = sampling_options(max_new_tokens=args.new_tokens, temperature=TEMPERATURE, top_p=1.0, pad_id=pad,
                               eos_id=eos)  # fmt: skip
    options["min_new_tokens"] = args.new_tokens  # never stop early: every call decodes the full length

    device_text = device + (f" ({torch.cuda.get_device_name()})" if on_gpu else "")
    common = {
        "model": {**description, **shape},
        "device": device_text,
        "dtype": str(dtype).replace("torch.", ""),
        "batch": batch,
        "prompt_length": args.prompt_length,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "bandwidth_gbs": bandwidth,
        "bandwidth_source": bandwidth_source,
        "bytes_per_step": bound["bytes_per_step"],
        "parameter_bytes": bound["parameter_bytes"],
        "kv_bytes_per_step": bound["kv_bytes_per_step"],
        "avg_context_length": bound["avg_context_length"],
        "limit_tokens_per_s": significant(bound["limit_tokens_per_s"]),
        "limit_ms_per_step": significant(bound["limit_ms_per_step"]),
        "stop": "forced full length (min_new_tokens = max_new_tokens)",
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m_start": round(os.getloadavg()[0], 2),
        "versions": versions(),
    }
    failed = False
    for name in args.backend_names:
        line = {"backend": name}
        problem = vllm_unavailable(device) if name == "vllm" else None
        if problem:
            log(f"vllm skipped: {problem}")
            emit({**line, "skipped": problem, **stamp(), **common}, args.out)
            continue
        log(f"{name}: first call, {args.warmup} warmup, {args.repeats} timed (batch {batch}, "
            f"{args.prompt_length}+{args.new_tokens} tokens)")  # fmt: skip
        load_before = os.getloadavg()[0]
        try:
            result = measure_backend(name, model, query_ids, query_mask, options, repeats=args.repeats,
                                     warmup=args.warmup, device=device,
                                     tokenizer=tokenizer)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - one backend failing must not hide the others' lines
            failed = True
            log(f"{name} failed: {type(exc).__name__}: {exc}")
            emit({**line, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                  **stamp(), **common}, args.out)  # fmt: skip
            continue
        line.update(
            backend_used=result["backend"],
            tokens_per_s=significant(result["tokens_per_s"]),
            fraction=significant(result["tokens_per_s"] / bound["limit_tokens_per_s"]),
            ms_per_step=significant(result["ms_per_step"]),
            compile_s=result["compile_s"],
            seconds_per_call=significant(result["seconds_per_call"], 5),
            seconds_each_run=result["seconds_each_run"],
            peak_memory_mb=result["peak_memory_mb"],
            peak_memory_kind=result["peak_memory_kind"],
            host_peak_rss_mb=result["host_peak_rss_mb"],
            loadavg_1m=[round(load_before, 2), round(os.getloadavg()[0], 2)],
        )
        if result["fallback_reason"]:
            line["fallback_reason"] = result["fallback_reason"]
        emit({**line, **stamp(), **common}, args.out)
        log(f"{name}: {line['tokens_per_s']} tokens/s, {line['ms_per_step']} ms/step, "
            f"{line['fraction']:.1%} of the {common['limit_tokens_per_s']} tokens/s bandwidth limit")  # fmt: skip
    return 1 if failed else 0


def significant(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def stamp() -> dict:
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


if __name__ == "__main__":
    keep_stdout_for_results()
    sys.exit(main())
