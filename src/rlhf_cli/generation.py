"""Decoding backends: how every stage that samples (PPO's rollout, eval, generate, label) turns prompts into
response tokens. The recipe's `generation:` section (recipe.GenerationSpec) picks one; docs/generation.md.

    hf        transformers' `generate` with its dynamic KV cache: works everywhere, bound by Python and kernel
              launches on a GPU (one small kernel per layer per token)
    compiled  the same `generate` with a static KV cache and a torch.compile'd decoding step (transformers'
              auto-compile; CUDA graphs on a GPU). Prompts are left-padded to a multiple of `prompt_bucket` and
              short batches filled up to the batch size, so the compiled step sees a few fixed shapes
    vllm      a colocated vLLM engine (TRL's VLLMGeneration), weights pushed after every PPO step

Only the sampled token ids come out of here: PPO recomputes every log-probability with its training forward pass,
so a backend changes the speed of sampling, never the numbers the loss sees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rlhf_cli.errors import UserError
from rlhf_cli.recipe import GenerationSpec

if TYPE_CHECKING:
    import torch

VLLM_INSTALL = 'pip install "rlhf-cli[vllm]"'


@dataclass(frozen=True)
class Backend:
    """The backend a run decodes with, after `resolve_backend`: the name, and why it differs from the recipe's
    (None when it is what was asked for)."""

    name: str  # hf | compiled | vllm
    spec: GenerationSpec
    fallback_reason: str | None = None


def vllm_problem(spec: GenerationSpec | None) -> str | None:
    """Why the recipe's `backend: vllm` cannot run here (not installed), as a sentence; None when it can."""
    import importlib.util

    if spec is None or spec.backend != "vllm" or importlib.util.find_spec("vllm") is not None:
        return None
    return f"generation.backend: vllm needs the vllm package, which is not installed: {VLLM_INSTALL} (or use hf)."


def compiled_unsupported(model, *, zero3: bool) -> str | None:
    """Why `compiled` cannot decode with this model (None when it can): the reasons transformers' static cache or
    our gather-once ZeRO-3 generation rule it out."""
    if zero3:
        return "parameters sharded by ZeRO-3 are gathered once per rollout, which a compiled graph cannot follow"
    base = getattr(model, "get_base_model", lambda: model)()  # a PEFT model: the transformers model inside
    if not getattr(base, "_can_compile_fullgraph", False):
        return f"{type(base).__name__} does not support transformers' static KV cache"
    return None


def resolve_backend(spec: GenerationSpec | None, model, *, zero3: bool = False, what: str = "generation") -> Backend:
    """The backend to decode with on this machine. `auto` is compiled on a GPU and hf on CPU (where compiling
    costs more than it saves on short runs); `compiled` where the model cannot take it falls back to hf with a
    one-line warning; `vllm` needs the package and a GPU (exit 2 otherwise: a silent hf run would be a
    different, slower experiment than the recipe asks for)."""
    spec = spec or GenerationSpec()
    on_gpu = model.device.type == "cuda"
    if spec.backend == "vllm":
        problem = vllm_problem(spec)
        if problem:
            raise UserError(problem)
        if not on_gpu:
            raise UserError("generation.backend: vllm runs on a CUDA GPU, and this run has none; use hf or compiled.")
        return Backend("vllm", spec)
    if spec.backend == "hf" or (spec.backend == "auto" and not on_gpu):
        return Backend("hf", spec)
    reason = compiled_unsupported(model, zero3=zero3)
    if reason is None:
        return Backend("compiled", spec)
    if spec.backend == "compiled":
        warn(f"{what}: backend compiled is not available here ({reason}); decoding with hf.")
    return Backend("hf", spec, fallback_reason=reason)


def warn(message: str) -> None:
    """One line on stderr, from the main process only."""
    import os

    if os.environ.get("RANK", "0") == "0":
        from rich.markup import escape

        from rlhf_cli.console import make_console

        make_console(stderr=True, soft_wrap=True).print(f"[yellow]Warning:[/] {escape(message)}", highlight=False)


def bucketed_width(length: int, bucket: int) -> int:
    """The padded prompt width: the next multiple of `bucket` at or above `length`, ceil(L / b) * b."""
    return max(bucket, math.ceil(length / bucket) * bucket)


def pad_for_compiled(query_ids: torch.Tensor, query_mask: torch.Tensor, pad_id: int, bucket: int, rows: int):
    """Left-pad (B, L) prompts to (rows, bucketed_width(L)): extra columns of padding on the left (masked out), and
    extra rows repeating the last prompt (their responses are dropped). Returns ids, mask and the real row count."""
    import torch

    batch, length = query_ids.shape
    extra_columns = bucketed_width(length, bucket) - length
    if extra_columns:
        query_ids = torch.cat([query_ids.new_full((batch, extra_columns), pad_id), query_ids], dim=1)
        query_mask = torch.cat([query_mask.new_zeros((batch, extra_columns)), query_mask], dim=1)
    if rows > batch:
        fill = rows - batch
        query_ids = torch.cat([query_ids, query_ids[-1:].expand(fill, -1)], dim=0)
        query_mask = torch.cat([query_mask, query_mask[-1:].expand(fill, -1)], dim=0)
    return query_ids, query_mask, batch


def sampling_options(*, max_new_tokens: int, temperature: float, top_p: float, pad_id: int, eos_id: int) -> dict:
    """generate()'s keyword arguments for plain sampling (temperature > 0, no top-k) or greedy decoding (0)."""
    options = {"max_new_tokens": max_new_tokens, "pad_token_id": pad_id, "eos_token_id": eos_id}
    if temperature > 0:
        options.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return options


class Decoder:
    """Decodes batches of left-padded prompts with one backend; `generate` returns the response ids (B, T) only,
    whatever padding the backend added. One Decoder per model: the compiled graph and the vLLM engine live here."""

    def __init__(self, backend: Backend, *, batch_size: int):
        self.backend = backend
        self.batch_size = batch_size  # compiled: every batch is filled up to this many rows
        self._compile_config = None
        self._vllm = None

    @property
    def name(self) -> str:
        return self.backend.name

    def generate(self, model, query_ids, query_mask, options: dict) -> torch.Tensor:
        if self.backend.name == "compiled":
            return self._compiled(model, query_ids, query_mask, options)
        if self.backend.name == "vllm":
            return self._vllm_generate(model, query_ids, query_mask, options)
        output = model.generate(input_ids=query_ids, attention_mask=query_mask, **options)
        return output[:, query_ids.shape[1]:]

    # ---------------------------------------------------------------- compiled

    def compile_config(self, model):
        """transformers' CompileConfig for the decoding step: fixed shapes (dynamic=False); CUDA graphs on a GPU
        ("reduce-overhead"); on CPU transformers only auto-compiles when told to compile on every device."""
        if self._compile_config is None:
            from transformers import CompileConfig

            on_gpu = model.device.type == "cuda"
            config = CompileConfig(fullgraph=False, dynamic=False, mode="reduce-overhead" if on_gpu else "default")
            config._compile_all_devices = not on_gpu  # private in transformers 5.x; pinned by tests/test_generation.py
            self._compile_config = config
        return self._compile_config

    def _compiled(self, model, query_ids, query_mask, options: dict):
        pad_id = options["pad_token_id"]
        rows = max(self.batch_size, query_ids.shape[0])
        padded_ids, padded_mask, real_rows = pad_for_compiled(query_ids, query_mask, pad_id,
                                                              self.backend.spec.prompt_bucket, rows)  # fmt: skip
        output = model.generate(input_ids=padded_ids, attention_mask=padded_mask, cache_implementation="static",
                                compile_config=self.compile_config(model), **options)  # fmt: skip
        return output[:real_rows, padded_ids.shape[1]:]

    # ---------------------------------------------------------------- vllm

    def vllm_engine(self, model, accelerator, tokenizer, options: dict, *, max_model_length: int):
        """TRL's colocated vLLM engine for `model` (made once): sampling parameters mapped 1:1 from generate's."""
        if self._vllm is None:
            from trl.generation.vllm_generation import VLLMGeneration

            spec = self.backend.spec
            sampled = options.get("do_sample", False)
            self._vllm = VLLMGeneration(
                model, accelerator, tokenizer, mode="colocate", gpu_memory_utilization=spec.gpu_memory_utilization,
                max_model_length=max_model_length, enable_sleep_mode=spec.sleep,
                temperature=options["temperature"] if sampled else 0.0, top_p=options["top_p"] if sampled else 1.0,
                top_k=0, max_completion_length=options["max_new_tokens"], logprobs=None,
            )  # fmt: skip
        return self._vllm

    def close(self) -> None:
        """Free the vLLM engine's GPU memory (eval makes one engine per policy, one after the other)."""
        if self._vllm is not None:
            import gc

            import torch

            self._vllm = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def sync_weights(self) -> None:
        """Push the policy's current weights into the vLLM engine (after a PPO update); a no-op otherwise."""
        if self._vllm is not None:
            self._vllm.sync_weights()

    def _vllm_generate(self, model, query_ids, query_mask, options: dict):
        import torch

        if self._vllm is None:
            raise RuntimeError("Decoder.vllm_engine must be called before decoding with vllm")
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(query_ids, query_mask)]
        _, completions, _, _ = self._vllm.generate(prompts, None, 1)
        width = max((len(c) for c in completions), default=0) or 1
        out = torch.full((len(completions), width), options["pad_token_id"], dtype=torch.long, device=query_ids.device)
        for row, tokens in enumerate(completions):
            out[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return out


def planned_line(spec: GenerationSpec | None) -> str:
    """The recipe's decoding backend as a plan says it, before any model is loaded (the device decides `auto`)."""
    spec = spec or GenerationSpec()
    return {"auto": "auto (compiled on a GPU, hf on CPU)", "hf": "hf (transformers generate)",
            "compiled": f"compiled (static KV cache, prompts padded to multiples of {spec.prompt_bucket} tokens)",
            "vllm": f"vllm (colocated, {spec.gpu_memory_utilization:.0%} of each GPU"
                    f"{', asleep while training' if spec.sleep else ''})"}[spec.backend]  # fmt: skip


def backend_line(decoder: Decoder) -> str:
    """How the run decodes, for the plan and the summary."""
    backend = decoder.backend
    asked = backend.spec.backend
    if backend.fallback_reason and asked == "compiled":
        return f"hf (compiled unavailable: {backend.fallback_reason})"
    line = backend.name if asked in (backend.name, "hf", "vllm") else f"{backend.name} (auto)"
    if backend.name == "compiled":
        line += f", prompts padded to multiples of {backend.spec.prompt_bucket} tokens"
    return line
