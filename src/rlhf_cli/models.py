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


def describe_chat_template(template: str | None) -> str:
    """Which chat template this is, in words (for `rlhf data inspect` and the reward models' rendering notes)."""
    if template == PLAIN_CHAT_TEMPLATE:
        return "the plain 'User:/Assistant:' chat template, EOS closing each assistant turn"
    if template == BUILTIN_CHAT_TEMPLATE:
        return "the builtin chat template, <|user|>/<|assistant|> opening and <|end|> closing each turn"
    return "its tokenizer's chat template" if template else "no chat template"


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


def materialize_builtin(name: str, spec: BuiltinSpec, seed: int, tokenizer: str | None = None) -> Path:
    """Build (once) and cache the builtin model as an ordinary checkpoint directory; return its path.

    Keyed by shape and seed, so every stage and every process of a run sees the same weights and tokenizer. With
    `tokenizer` (the recipe's `model.tokenizer`: a hub id, a tokenizer directory, or a folder holding only a GPT-2
    style vocab.json + merges.txt) the random model embeds that tokenizer's tokens (vocab_size = len(tokenizer))
    instead of the builtin BPE's, and the cache key includes a fingerprint of that tokenizer's vocabulary.
    """
    if tokenizer is None:
        built = None
        identity: list = [name, spec.model_dump(), seed]
    else:
        built = read_tokenizer(tokenizer)
        identity = [name, spec.model_dump(), seed, tokenizer_fingerprint(built)]
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    target = cache_dir() / "builtin" / f"{name.removeprefix('builtin:')}-{key}"
    if (target / "config.json").is_file():
        return target

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    if built is None:
        built = build_builtin_tokenizer(spec.vocab_size)
    elif built.pad_token is None:
        built.pad_token = built.eos_token  # as load_tokenizer does: the saved checkpoint reads the same ids
    config = GPT2Config(
        vocab_size=len(built),
        n_positions=spec.n_positions,
        n_embd=spec.n_embd,
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        bos_token_id=built.eos_token_id,
        eos_token_id=built.eos_token_id,
        pad_token_id=built.pad_token_id,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = built.pad_token_id
    # Write to a temporary sibling and rename, so concurrent processes never see half a checkpoint.
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    model.save_pretrained(partial)
    built.save_pretrained(partial)
    try:
        partial.rename(target)
    except OSError:  # another process won the race; its copy is identical
        import shutil

        shutil.rmtree(partial, ignore_errors=True)
    return target


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of what decides a tokenizer's ids: its vocabulary (added tokens included) and special tokens."""
    facts = {"vocab": sorted(tokenizer.get_vocab().items()), "special": tokenizer.special_tokens_map}
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve_model_path(spec: ModelSpec, seed: int) -> str:
    """The directory or hub id to load; builtin models are materialized first."""
    if spec.is_builtin:
        return str(materialize_builtin(spec.name_or_path, spec.builtin, seed, tokenizer=spec.tokenizer))
    return spec.name_or_path


# ---------------------------------------------------------------- loading


def _torch_dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


# A folder with only these two files is a GPT-2 style byte-level BPE (as OpenAI published GPT-2's tokenizer).
BPE_FILES = ("vocab.json", "merges.txt")
# Any real tokenizer turns this into at least one token; one that gives none would train on empty sequences.
SAMPLE_TEXT = "Hello, world! What is 1 plus 1? It is 2."


def _bpe_files_only(source: str) -> Path | None:
    """The folder, when `source` is a local folder holding vocab.json + merges.txt and no tokenizer.json or
    tokenizer_config.json (which AutoTokenizer cannot load in transformers 5); else None."""
    folder = Path(source).expanduser()
    if not folder.is_dir() or not all((folder / name).is_file() for name in BPE_FILES):
        return None
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        return None
    return folder


def read_tokenizer(source: str, *, revision: str | None = None, trust_remote_code: bool = False,
                   gguf_file: str | None = None) -> PreTrainedTokenizerBase:  # fmt: skip
    """The tokenizer at `source` as saved (no pad token or template added), checked to encode text to tokens.

    A folder with only vocab.json + merges.txt loads as a GPT-2 byte-level BPE. (transformers 5 takes those files as
    `GPT2Tokenizer(vocab=..., merges=...)`; the old keywords vocab_file=/merges_file= are silently ignored and give
    a one-token tokenizer that encodes everything to nothing, which the check below refuses.)
    """
    folder = _bpe_files_only(source)
    try:
        if folder is not None:
            from transformers import GPT2Tokenizer

            tokenizer = GPT2Tokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
        else:
            from transformers import AutoTokenizer

            kwargs: dict = {"revision": revision, "trust_remote_code": trust_remote_code}
            if gguf_file:
                kwargs["gguf_file"] = gguf_file
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"Cannot load the tokenizer from {source!r}: {_first_line(exc)}") from None
    check_tokenizer_encodes(tokenizer, source)
    return tokenizer


def check_tokenizer_encodes(tokenizer: PreTrainedTokenizerBase, source: str) -> None:
    """Refuse a tokenizer that encodes a plain sentence to no token ids: training would run on empty sequences."""
    try:
        ids = list(tokenizer(SAMPLE_TEXT, add_special_tokens=False)["input_ids"])
    except Exception as exc:  # a broken tokenizer fails in many ways; each means the same here
        raise UserError(f"The tokenizer {source!r} cannot encode text: {type(exc).__name__}: "
                        f"{_first_line(exc)}") from None  # fmt: skip
    if not ids:
        hint = ""
        if (Path(source).expanduser() / "vocab.json").is_file():
            hint = (" Check its vocab.json and merges.txt (a GPT-2 BPE built with transformers 5 takes "
                    "GPT2Tokenizer(vocab=..., merges=...); vocab_file=/merges_file= are ignored).")  # fmt: skip
        raise UserError(f"The tokenizer {source!r} ({len(tokenizer)} tokens) encodes the text {SAMPLE_TEXT!r} to no "
                        f"tokens at all: it cannot be trained or scored with.{hint}")  # fmt: skip


def load_tokenizer(spec: ModelSpec, model_path: str, *, conversational: bool) -> PreTrainedTokenizerBase:
    """Tokenizer with a pad token, and a chat template when the data is conversational."""
    source = spec.tokenizer or model_path
    tokenizer = read_tokenizer(source, revision=spec.revision, trust_remote_code=spec.trust_remote_code,
                               gguf_file=None if spec.tokenizer else spec.gguf_file)  # fmt: skip
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


def check_same_vocabulary(tokenizer, other_path: str, what: str) -> None:
    """A second model of a stage (PPO's reference, critic and reward model; DPO's reference) reads the policy's
    token ids, so its tokenizer, where one is saved with it, must agree with the policy's."""
    from transformers import AutoTokenizer

    try:
        other = AutoTokenizer.from_pretrained(other_path)
    except (OSError, ValueError):
        return  # no tokenizer saved there: nothing to compare
    mismatch = tokenizer_mismatch(tokenizer, other)
    if mismatch:
        raise UserError(f"{what} ({other_path}) uses a different tokenizer from the policy: {mismatch}. Every model "
                        "of the stage must read the same token ids.")  # fmt: skip


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
