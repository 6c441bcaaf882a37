"""Model and tokenizer loading: hub ids, local directories, GGUF files and the builtin tiny GPT-2.

Torch and transformers are imported inside the functions so that the CLI answers `--help` without them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from rlhf_cli.errors import UserError
from rlhf_cli.recipe import BuiltinSpec, ModelSpec

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Used when the tokenizer has none and the data is conversational. Base models (GPT-2, Llama base) ship no template.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n\n"
    "{% else %}Assistant: {{ message['content'] }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

# The builtin tokenizer's own template: one special token per role, each turn closed by <|end|> (also its EOS).
BUILTIN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_BUILTIN_SPECIALS = ["<|end|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]


def cache_dir() -> Path:
    return Path(os.environ.get("RLHF_CLI_CACHE", Path.home() / ".cache" / "rlhf-cli"))


# ---------------------------------------------------------------- builtin tiny GPT-2


def build_builtin_tokenizer(vocab_size: int) -> PreTrainedTokenizerBase:
    """A byte-level BPE trained on the demo corpus: deterministic, offline, ~1 s."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from rlhf_cli.demo import demo_corpus

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_BUILTIN_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(demo_corpus(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|end|>", pad_token="<|pad|>", padding_side="right"
    )
    wrapped.add_special_tokens({"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]})
    wrapped.chat_template = BUILTIN_CHAT_TEMPLATE
    return wrapped


def materialize_builtin(name: str, spec: BuiltinSpec, seed: int) -> Path:
    """Build (once) and cache the builtin model as an ordinary checkpoint directory; return its path.

    Keyed by shape and seed, so every stage and every process of a run sees the same weights and tokenizer.
    """
    key = hashlib.sha256(json.dumps([name, spec.model_dump(), seed], sort_keys=True).encode()).hexdigest()[:12]
    target = cache_dir() / "builtin" / f"{name.removeprefix('builtin:')}-{key}"
    if (target / "config.json").is_file():
        return target

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_builtin_tokenizer(spec.vocab_size)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=spec.n_positions,
        n_embd=spec.n_embd,
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # Write to a temporary sibling and rename, so concurrent processes never see half a checkpoint.
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(target)
    except OSError:  # another process won the race; its copy is identical
        import shutil

        shutil.rmtree(partial, ignore_errors=True)
    return target


def resolve_model_path(spec: ModelSpec, seed: int) -> str:
    """The directory or hub id to load; builtin models are materialized first."""
    if spec.is_builtin:
        return str(materialize_builtin(spec.name_or_path, spec.builtin, seed))
    return spec.name_or_path


# ---------------------------------------------------------------- loading


def _torch_dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def load_tokenizer(spec: ModelSpec, model_path: str, *, conversational: bool) -> PreTrainedTokenizerBase:
    """Tokenizer with a pad token, and a chat template when the data is conversational."""
    from transformers import AutoTokenizer

    source = spec.tokenizer or model_path
    kwargs = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
    if spec.gguf_file and not spec.tokenizer:
        kwargs["gguf_file"] = spec.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"Cannot load the tokenizer from {source!r}: {_first_line(exc)}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"The tokenizer of {source!r} has neither a pad nor an EOS token; set one in the model.")
        tokenizer.pad_token = tokenizer.eos_token  # the usual choice; attention masks keep padding out of the loss
    if spec.chat_template:
        tokenizer.chat_template = spec.chat_template
    elif conversational and not tokenizer.chat_template:
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    return tokenizer


def load_model(
    spec: ModelSpec,
    model_path: str,
    kind: Literal["causal_lm", "reward"],
    tokenizer: PreTrainedTokenizerBase,
) -> PreTrainedModel:
    """Load the model for training: a causal LM, or a sequence classifier with one output (the reward)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs = {
        "revision": spec.revision,
        "trust_remote_code": spec.trust_remote_code,
        "dtype": _torch_dtype(spec.dtype),
    }
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    if spec.gguf_file:
        kwargs["gguf_file"] = spec.gguf_file
    if kind == "reward":
        kwargs["num_labels"] = 1
    auto_class = AutoModelForSequenceClassification if kind == "reward" else AutoModelForCausalLM
    try:
        model = auto_class.from_pretrained(model_path, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"Cannot load the model {model_path!r}: {_first_line(exc)}") from None
    if spec.gguf_file:
        model = _plain_copy(model, auto_class)
    check_tokenizer_fits(model, tokenizer, model_path)
    if kind == "reward":
        model.config.pad_token_id = tokenizer.pad_token_id  # the classifier reads the score at the last non-pad token
    return model


def _plain_copy(model: PreTrainedModel, auto_class) -> PreTrainedModel:
    """A GGUF model is dequantized on load but still flagged as quantized, which blocks full fine-tuning and
    save_pretrained; copy its weights into an ordinary model of the same config."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = auto_class.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict())
    return plain


def check_tokenizer_fits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, model_path: str) -> None:
    """A tokenizer producing ids the model cannot embed fails deep inside the first forward pass; say it here."""
    embedded = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > embedded:
        raise UserError(
            f"The tokenizer has {len(tokenizer)} tokens but the model {model_path!r} embeds only {embedded}: they do "
            "not belong together. Use the model's own tokenizer (drop model.tokenizer) or a model trained with it."
        )


def lora_config(spec: ModelSpec, kind: Literal["causal_lm", "reward"]):
    """peft LoraConfig from the recipe, or None when the recipe trains all weights."""
    if spec.lora is None:
        return None
    from peft import LoraConfig, TaskType

    return LoraConfig(
        r=spec.lora.r,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=spec.lora.target_modules,
        task_type=TaskType.SEQ_CLS if kind == "reward" else TaskType.CAUSAL_LM,
    )


TOKENIZER_FACTS = ("vocabulary", "EOS token", "pad token", "chat template")


def tokenizer_mismatch(expected, other, facts=("vocabulary", "EOS token")) -> str | None:
    """How `other` reads text differently from `expected`, among `facts` (see TOKENIZER_FACTS), or None.
    A missing pad token is no mismatch: every stage supplies EOS as pad the same way."""
    for fact in facts:
        if fact == "vocabulary":
            if other.get_vocab() != expected.get_vocab():
                return f"its vocabulary differs ({len(other)} vs {len(expected)} tokens, or other ids)"
            continue
        attribute = {"EOS token": "eos_token", "pad token": "pad_token", "chat template": "chat_template"}[fact]
        mine, theirs = getattr(expected, attribute), getattr(other, attribute)
        if fact == "pad token" and theirs is None:
            continue
        if theirs != mine:
            return f"its {fact} differs" if fact == "chat template" else f"its {fact} is {theirs!r}, not {mine!r}"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
