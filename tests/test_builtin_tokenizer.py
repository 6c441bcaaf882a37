"""The builtin tiny GPT-2 with a real tokenizer: a vocab.json + merges.txt folder loads as a GPT-2 byte-level BPE,
the random model embeds exactly that tokenizer's tokens (cached per tokenizer), and a tokenizer that encodes text to
nothing is refused before training."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import TINY, assert_clean_failure
from rlhf_cli.cli import app

MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "i s"]


def handmade_bpe(folder: Path, merges: list[str] = MERGES) -> Path:
    """A tiny byte-level BPE: the 256 byte symbols, a few merges and <|endoftext|>, as vocab.json + merges.txt."""
    from tokenizers import pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {symbol: index for index, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for merge in merges:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def empty_bpe(folder: Path) -> Path:
    """A 'tokenizer' whose vocabulary holds only <|endoftext|>: it encodes every text to no token at all (what
    GPT2Tokenizer(vocab_file=..., merges_file=...) silently gives in transformers 5)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({"<|endoftext|>": 0}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


def test_a_vocab_and_merges_folder_loads_as_a_gpt2_bpe(tmp_path):
    from rlhf_cli.models import load_tokenizer, read_tokenizer
    from rlhf_cli.recipe import ModelSpec

    folder = handmade_bpe(tmp_path / "bpe")
    tokenizer = read_tokenizer(str(folder))
    assert len(tokenizer) == 256 + len(MERGES) + 1
    ids = tokenizer(" the cat is")["input_ids"]
    assert ids and tokenizer.decode(ids) == " the cat is"
    assert tokenizer.convert_ids_to_tokens(ids)[0] == "Ġthe"  # the merges apply
    loaded = load_tokenizer(ModelSpec(name_or_path="builtin:tiny-gpt2", tokenizer=str(folder)), "unused",
                            conversational=True)  # fmt: skip
    assert loaded.eos_token == loaded.pad_token == "<|endoftext|>" and loaded.chat_template  # the plain template


def test_a_tokenizer_that_encodes_nothing_is_refused_naming_it(tmp_path):
    from rlhf_cli.errors import UserError
    from rlhf_cli.models import read_tokenizer

    folder = empty_bpe(tmp_path / "empty")
    with pytest.raises(UserError, match="encodes the text .* to no tokens at all") as caught:
        read_tokenizer(str(folder))
    assert str(folder) in str(caught.value)


def test_the_builtin_model_embeds_the_tokenizer_it_is_given_and_is_cached_per_tokenizer(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    from rlhf_cli.models import materialize_builtin
    from rlhf_cli.recipe import BuiltinSpec

    first = handmade_bpe(tmp_path / "first")
    second = handmade_bpe(tmp_path / "second", MERGES[:2])  # another vocabulary (two merges fewer)
    spec = BuiltinSpec(n_layer=1, n_embd=32, n_head=2)
    one = materialize_builtin("builtin:tiny-gpt2", spec, seed=3, tokenizer=str(first))
    assert AutoConfig.from_pretrained(one).vocab_size == 256 + len(MERGES) + 1
    assert len(AutoTokenizer.from_pretrained(one)) == 256 + len(MERGES) + 1  # saved with the model
    again = materialize_builtin("builtin:tiny-gpt2", spec, seed=3, tokenizer=str(handmade_bpe(tmp_path / "copy")))
    assert again == one  # the same vocabulary elsewhere: the same cached model
    other = materialize_builtin("builtin:tiny-gpt2", spec, seed=3, tokenizer=str(second))
    assert other != one and AutoConfig.from_pretrained(other).vocab_size == 256 + 2 + 1
    own = materialize_builtin("builtin:tiny-gpt2", spec, seed=3)
    assert own not in (one, other)



def train_with_tokenizer(command: str, recipe: str, out: Path, tokenizer_folder: Path) -> None:
    """Two quick steps of a tiny recipe on the builtin model with `tokenizer_folder` as model.tokenizer."""
    result = CliRunner().invoke(app, [command, str(TINY / recipe), "-o", str(out),
                                      "--set", f"model.tokenizer={tokenizer_folder}", "--set", "data.train.limit=16",
                                      "--set", "training.max_steps=2",
                                      "--set", "training.per_device_train_batch_size=8"])  # fmt: skip
    assert result.exit_code == 0, result.output

def test_train_rm_on_the_builtin_with_a_handmade_tokenizer(tmp_path):
    folder = handmade_bpe(tmp_path / "bpe")
    out = tmp_path / "rm"
    train_with_tokenizer("train-rm", "rm.yaml", out, folder)
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(out).vocab_size == len(AutoTokenizer.from_pretrained(out)) == 262
    rendering = json.loads((out / "rendering.json").read_text())
    assert rendering["tokenizer"] == str(folder) and rendering["eos_token"] == "<|endoftext|>"


def test_an_empty_tokenizer_stops_training_before_anything_is_written(tmp_path):
    folder = empty_bpe(tmp_path / "empty")
    out = tmp_path / "rm"
    assert_clean_failure(["train-rm", str(TINY / "rm.yaml"), "-o", str(out), "--set", f"model.tokenizer={folder}",
                          "--set", "training.max_steps=1"], f"The tokenizer '{folder}'", "to no tokens at all",
                         out=out)  # fmt: skip


# ---------------------------------------------------------------- the real GPT-2 tokenizer


def test_the_real_gpt2_tokenizer_loads_from_its_two_files(shared_dir):
    from rlhf_cli.models import read_tokenizer

    tokenizer = read_tokenizer(str(shared_dir / "models" / "gpt2-tokenizer"))
    assert len(tokenizer) == 50257 and tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]


def test_sft_on_the_builtin_with_the_real_gpt2_tokenizer(shared_dir, tmp_path):
    folder = shared_dir / "models" / "gpt2-tokenizer"
    out = tmp_path / "sft"
    train_with_tokenizer("sft", "sft.yaml", out, folder)
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(out).vocab_size == 50257
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == 50257 and tokenizer("Hello world")["input_ids"] == [15496, 995]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mean train loss"] > 1.0  # a real next-token loss over 50k tokens, not a flat loss on empty rows
