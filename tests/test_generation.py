"""The `generation:` setting (rlhf_cli.generation): backend choice and fallbacks, the compiled path's padding and
its token-for-token agreement with hf under greedy decoding, vLLM's mapping (through a stand-in of TRL's engine,
since vLLM needs a GPU), GRPO/RLOO's TRL keys, and the errors a recipe gets."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY, assert_clean_failure
from rlhf_cli.errors import UserError
from rlhf_cli.generation import (
    Decoder,
    bucketed_width,
    pad_for_compiled,
    planned_line,
    resolve_backend,
    sampling_options,
)
from rlhf_cli.recipe import GenerationSpec, SamplingSpec


@pytest.fixture(scope="module")
def tiny():
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhf_cli.models import build_builtin_tokenizer

    tokenizer = build_builtin_tokenizer(512)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    return model.eval(), tokenizer


# ---------------------------------------------------------------- pure pieces


@pytest.mark.parametrize(("length", "bucket", "width"), [(1, 32, 32), (32, 32, 32), (33, 32, 64), (70, 16, 80)])
def test_bucketed_width_is_the_next_multiple(length, bucket, width):
    assert bucketed_width(length, bucket) == width


def test_pad_for_compiled_adds_masked_columns_on_the_left_and_repeats_the_last_row():
    ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    padded, padded_mask, real = pad_for_compiled(ids, mask, pad_id=0, bucket=4, rows=3)
    assert real == 2
    assert padded.tolist() == [[0, 0, 5, 6], [0, 7, 8, 9], [0, 7, 8, 9]]
    assert padded_mask.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1], [0, 1, 1, 1]]


def test_sampling_options_greedy_and_sampled():
    greedy = sampling_options(max_new_tokens=8, temperature=0.0, top_p=0.9, pad_id=1, eos_id=2)
    assert greedy["do_sample"] is False and greedy["temperature"] is None
    sampled = sampling_options(max_new_tokens=8, temperature=0.7, top_p=0.9, pad_id=1, eos_id=2)
    assert (sampled["do_sample"], sampled["temperature"], sampled["top_p"], sampled["top_k"]) == (True, 0.7, 0.9, 0)


# ---------------------------------------------------------------- choosing a backend


def test_auto_is_hf_on_cpu_and_compiled_is_kept_when_asked(tiny):
    model, _ = tiny
    assert resolve_backend(None, model).name == "hf"
    assert resolve_backend(GenerationSpec(backend="auto"), model).name == "hf"
    assert resolve_backend(GenerationSpec(backend="compiled"), model).name == "compiled"


def test_compiled_falls_back_to_hf_with_one_warning(tiny, capsys):
    model, _ = tiny
    backend = resolve_backend(GenerationSpec(backend="compiled"), model, zero3=True, what="ppo rollout")
    assert backend.name == "hf" and "ZeRO-3" in backend.fallback_reason
    err = capsys.readouterr().err
    assert err.count("Warning:") == 1 and "ppo rollout: backend compiled is not available here" in err

    class NoStaticCache(torch.nn.Module):  # a model transformers cannot compile
        device = torch.device("cpu")
        _can_compile_fullgraph = False

    backend = resolve_backend(GenerationSpec(backend="compiled"), NoStaticCache())
    assert backend.name == "hf" and "static KV cache" in backend.fallback_reason
    assert "decoding with hf" in capsys.readouterr().err


def test_vllm_without_the_package_or_without_a_gpu_is_refused(tiny, monkeypatch):
    import importlib.util

    model, _ = tiny
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    with pytest.raises(UserError, match=r'pip install "rlhf-cli\[vllm\]"'):
        resolve_backend(GenerationSpec(backend="vllm"), model)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real_find_spec(name, *a))
    with pytest.raises(UserError, match="CUDA GPU"):
        resolve_backend(GenerationSpec(backend="vllm"), model)


def test_plan_lines_name_the_backend():
    assert planned_line(None).startswith("auto (compiled on a GPU, hf on CPU)")
    assert "multiples of 16" in planned_line(GenerationSpec(backend="compiled", prompt_bucket=16))
    assert planned_line(GenerationSpec(backend="vllm", gpu_memory_utilization=0.25)).startswith("vllm (colocated, 25%")


def test_transformers_compile_config_still_has_the_private_switch_we_set():
    # On CPU, transformers auto-compiles generate() only when CompileConfig._compile_all_devices is set; this pins it.
    from transformers import CompileConfig

    assert hasattr(CompileConfig(), "_compile_all_devices")


# ---------------------------------------------------------------- decoding


def test_compiled_greedy_decoding_matches_hf_token_for_token(tiny):
    """Prompts of several lengths (left-padded, then padded again to the bucket) and a last batch shorter than the
    batch size (filled up with repeated rows): every response equals hf's."""
    from rlhf_cli.inference import sample

    model, tokenizer = tiny
    texts = ["What is 1 plus 1?", "Name a colour.", "What sound does a dog make? Answer in one word please.",
             "Hi", "What is the capital of France?"]  # fmt: skip
    queries = [tokenizer(text)["input_ids"] for text in texts]
    spec = SamplingSpec(max_new_tokens=12, temperature=0.0, batch_size=4)
    hf = sample(model, tokenizer, queries, spec, seed=0, generation=GenerationSpec(backend="hf"))
    compiled = sample(model, tokenizer, queries, spec, seed=0,
                      generation=GenerationSpec(backend="compiled", prompt_bucket=8))  # fmt: skip
    assert compiled.tokens == hf.tokens and compiled.texts == hf.texts and compiled.finished == hf.finished
    assert all(len(tokens) > 0 for tokens in hf.tokens)


class FakeVLLMGeneration:
    """Stands in for trl.generation.vllm_generation.VLLMGeneration: records how it was built and called."""

    made: list[dict] = []

    def __init__(self, model, accelerator, tokenizer, **kwargs):
        self.kwargs, self.synced, self.calls = kwargs, 0, []
        FakeVLLMGeneration.made.append(kwargs)
        self.instance = self

    def generate(self, prompts, images, num_generations):
        self.calls.append(prompts)
        completions = [[7] * (1 + index % 3) for index in range(len(prompts))]  # ragged, as vLLM returns them
        return prompts, completions, None, None

    def sync_weights(self):
        self.synced += 1


def test_vllm_decoder_maps_sampling_one_to_one_and_unpads_prompts(tiny, monkeypatch):
    import trl.generation.vllm_generation as vllm_generation

    from rlhf_cli.generation import Backend

    monkeypatch.setattr(vllm_generation, "VLLMGeneration", FakeVLLMGeneration)
    model, tokenizer = tiny
    spec = GenerationSpec(backend="vllm", gpu_memory_utilization=0.4, sleep=False)
    decoder = Decoder(Backend("vllm", spec), batch_size=2)
    options = sampling_options(max_new_tokens=9, temperature=0.7, top_p=0.8, pad_id=0, eos_id=2)
    engine = decoder.vllm_engine(model, accelerator=None, tokenizer=tokenizer, options=options, max_model_length=64)
    assert engine.kwargs == {"mode": "colocate", "gpu_memory_utilization": 0.4, "max_model_length": 64,
                             "enable_sleep_mode": False, "temperature": 0.7, "top_p": 0.8, "top_k": 0,
                             "max_completion_length": 9, "logprobs": None}  # fmt: skip
    ids = torch.tensor([[0, 0, 5, 6], [3, 4, 5, 6]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    out = decoder.generate(model, ids, mask, options)
    assert engine.calls == [[[5, 6], [3, 4, 5, 6]]]  # the padding is not sent
    assert out.tolist() == [[7, 0], [7, 7]]  # right-padded with pad_id
    decoder.sync_weights()
    assert engine.synced == 1
    decoder.close()  # eval: one engine per policy, freed before the next
    assert decoder._vllm is None
    decoder.sync_weights()  # nothing to push into
    greedy = Decoder(Backend("vllm", spec), batch_size=2)
    greedy.vllm_engine(model, None, tokenizer, sampling_options(max_new_tokens=4, temperature=0.0, top_p=0.5,
                                                                pad_id=0, eos_id=2), max_model_length=32)  # fmt: skip
    assert (FakeVLLMGeneration.made[-1]["temperature"], FakeVLLMGeneration.made[-1]["top_p"]) == (0.0, 1.0)


# ---------------------------------------------------------------- recipes


def test_grpo_and_rloo_get_trls_own_keys():
    from rlhf_cli.recipe import Recipe
    from rlhf_cli.stages.grpo_rloo import generation_keys

    def recipe(backend, training=None):
        return Recipe.model_validate({"generation": {"backend": backend, "gpu_memory_utilization": 0.5},
                                      "training": training or {}})  # fmt: skip

    assert generation_keys(recipe("auto")) == {} and generation_keys(recipe("hf")) == {}
    assert generation_keys(recipe("compiled")) == {"cache_implementation": "static"}
    assert generation_keys(recipe("vllm")) == {"use_vllm": True, "vllm_mode": "colocate",
                                               "vllm_gpu_memory_utilization": 0.5, "vllm_enable_sleep_mode": True}
    assert generation_keys(recipe("vllm", {"use_vllm": True})) ["use_vllm"] is True
    with pytest.raises(UserError, match="training.use_vllm: False contradicts generation.backend: vllm"):
        generation_keys(recipe("vllm", {"use_vllm": False}))


def test_a_generation_section_where_nothing_samples_is_refused(tmp_path):
    recipe = tmp_path / "sft.yaml"
    recipe.write_text((TINY / "sft.yaml").read_text().replace("\nmodel:", "\ngeneration: {backend: hf}\nmodel:", 1))
    assert_clean_failure(["recipe", "validate", str(recipe)], "`generation:` section, but the sft stage samples "
                         "nothing")  # fmt: skip
    bad = tmp_path / "gen.yaml"
    bad.write_text(f"stage: generate\nmodel: {{name_or_path: 'builtin:tiny-gpt2'}}\ngeneration: {{backend: fast}}\n"
                   f"generate: {{prompts: {{path: {TINY / 'data' / 'prompts.jsonl'}}}}}\n")
    assert_clean_failure(["recipe", "validate", str(bad)], "generation.backend")


@pytest.mark.slow
@pytest.mark.extended
def test_generate_with_compiled_decoding_end_to_end(tmp_path):
    """`rlhf generate` with `generation: {backend: compiled}` on CPU: greedy answers equal hf's, the plan says how."""
    from typer.testing import CliRunner

    from rlhf_cli.cli import app

    outputs = {}
    for backend in ("hf", "compiled"):
        recipe = tmp_path / f"{backend}.yaml"
        recipe.write_text(f"stage: generate\nmodel: {{name_or_path: 'builtin:tiny-gpt2'}}\n"
                          f"generation: {{backend: {backend}, prompt_bucket: 16}}\n"
                          f"generate: {{prompts: {{path: {TINY / 'data' / 'prompts.jsonl'}}}, num_prompts: 6, "
                          f"max_new_tokens: 8, temperature: 0.0, batch_size: 4}}\n"
                          f"output_dir: {tmp_path / backend}\n")  # fmt: skip
        result = CliRunner().invoke(app, ["generate", str(recipe)])
        assert result.exit_code == 0, result.output
        assert json.loads((tmp_path / backend / "summary.json").read_text())["decoding"].startswith(backend)
        outputs[backend] = [json.loads(line)["completion"] for line in
                            (tmp_path / backend / "generations.jsonl").read_text().splitlines()]  # fmt: skip
    assert outputs["compiled"] == outputs["hf"] and len(outputs["hf"]) == 6


def test_a_pipelines_top_level_generation_reaches_only_the_stages_that_sample(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from rlhf_cli.cli import app

    text = (TINY / "pipeline.yaml").read_text().replace("\nstages:", "\ngeneration: {backend: compiled}\nstages:", 1)
    text = text.replace("path: data/", f"path: {TINY / 'data'}/")
    recipe = tmp_path / "pipeline.yaml"
    recipe.write_text(text + "\n")
    result = CliRunner().invoke(app, ["recipe", "show", str(recipe), "--set", "stages.eval.generation={prompt_bucket: 8}"])
    assert result.exit_code == 0, result.output
    documents = {document["stage"]: document for document in yaml.safe_load_all(result.output)}
    assert set(documents) == {"sft", "rm", "ppo", "eval"}
    assert documents["sft"]["generation"] is None and documents["rm"]["generation"] is None
    assert documents["ppo"]["generation"]["backend"] == "compiled" and documents["ppo"]["generation"]["prompt_bucket"] == 32
    assert documents["eval"]["generation"]["backend"] == "compiled" and documents["eval"]["generation"]["prompt_bucket"] == 8


@pytest.mark.parametrize(("setting", "fragment"), [
    ("{backend: fast}", "generation.backend"),
    ("{prompt_bucket: 0}", "generation.prompt_bucket"),
    ("{gpu_memory_utilization: 1.5}", "generation.gpu_memory_utilization"),
    ("{sleep: 'yes'}", "generation.sleep"),
    ("{backend: compiled, buckets: 8}", "generation.buckets"),
])  # fmt: skip
def test_bad_generation_settings_are_named(tmp_path, setting, fragment):
    recipe = tmp_path / "gen.yaml"
    recipe.write_text(f"stage: generate\nmodel: {{name_or_path: 'builtin:tiny-gpt2'}}\n"
                      f"generate: {{prompts: {{path: {TINY / 'data' / 'prompts.jsonl'}}}}}\n")  # fmt: skip
    assert_clean_failure(["generate", str(recipe), "--dry-run", "--set", f"generation={setting}"], fragment)

