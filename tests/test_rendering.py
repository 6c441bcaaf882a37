"""One rendering per reward model: `rlhf train-rm` records how pairs became tokens (rendering.json), and every later
scorer reads text that way.

The central check: `rlhf eval`'s per-pair scores (pair_scores.jsonl) equal the scores computed by hand from the very
token ids the trainer trained on (`lengths.fit_dataset`, what `rlhf train-rm` hands to TRL), for a reward model
trained on conversations and for one trained on plain text, with pairs long enough to be cut.
"""

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import TINY
from rlhf_cli.cli import app
from test_eval_e2e import rlhf

MAX_LENGTH = 24  # short enough that many tiny pairs are cut
RM_FAST = ["--set", "data.train.limit=32", "--set", f"data.max_length={MAX_LENGTH}", "--set", "training.max_steps=3",
           "--set", "training.per_device_train_batch_size=8", "--set", "training.logging_steps=1"]  # fmt: skip




def invoke(*args) -> str:
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 0, result.output
    return result.output


def text_pairs(path: Path) -> Path:
    """The tiny conversational pairs as plain text: 'Question: ...\\nAnswer:' and ' <response>'."""
    rows = [json.loads(line) for line in (TINY / "data" / "preference.jsonl").read_text().splitlines()[:48]]
    with path.open("w") as handle:
        for row in rows:
            handle.write(json.dumps({"prompt": f"Question: {row['prompt'][-1]['content']}\nAnswer:",
                                     "chosen": " " + row["chosen"][0]["content"],
                                     "rejected": " " + row["rejected"][0]["content"]}) + "\n")  # fmt: skip
    return path


@pytest.fixture(scope="module")
def rms(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("rendering")
    data = {"conversational": TINY / "data" / "preference.jsonl", "text": text_pairs(root / "text.jsonl")}
    runs = {style: root / style for style in data}
    rlhf(*[["train-rm", str(TINY / "rm.yaml"), "-o", str(runs[style]), "--set", f"data.train.path={data[style]}",
            *RM_FAST] for style in data])  # fmt: skip
    return {style: {"run": runs[style], "data": data[style]} for style in data}


def trained_ids(data: Path, conversational: bool, *, format: str = "auto", max_length: int = MAX_LENGTH):
    """(chosen ids, rejected ids) of every pair exactly as `rlhf train-rm` handed them to TRL."""
    from rlhf_cli.data import load_data
    from rlhf_cli.lengths import fit_dataset
    from rlhf_cli.models import load_tokenizer, resolve_model_path
    from rlhf_cli.recipe import DataSource, ModelSpec

    spec = ModelSpec(name_or_path="builtin:tiny-gpt2")
    tokenizer = load_tokenizer(spec, resolve_model_path(spec, 42), conversational=conversational)
    dataset = load_data(DataSource(path=str(data), limit=32, format=format), "preference")
    fitted, _ = fit_dataset(dataset, tokenizer, "preference", max_length=max_length, on_too_long="truncate",
                            what="data.train")  # fmt: skip
    return fitted["chosen_ids"], fitted["rejected_ids"]


def scores_by_hand(run: Path, sequences: list[list[int]]) -> list[float]:
    """The reward model on each token sequence alone (no padding), as its classifier reads it."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(run, num_labels=1).eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0, 0].item() for ids in sequences]


def eval_pairs(tmp_path: Path, run: Path, data: Path, name: str, **extra) -> tuple[list[dict], str]:
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(json.dumps({"stage": "eval", "eval": {"reward_model": str(run), "batch_size": 7,
                                  "preferences": {"path": str(data), "limit": 32, **extra}}}))  # fmt: skip
    output = invoke("eval", recipe, "-o", tmp_path / name)
    rows = [json.loads(line) for line in (tmp_path / name / "pair_scores.jsonl").read_text().splitlines()]
    return rows, output


# ---------------------------------------------------------------- the record


def test_train_rm_writes_how_pairs_became_tokens(rms):
    from rlhf_cli.models import BUILTIN_CHAT_TEMPLATE

    conversational = json.loads((rms["conversational"]["run"] / "rendering.json").read_text())
    assert conversational["style"] == "conversational" and conversational["chat_template"] == BUILTIN_CHAT_TEMPLATE
    assert conversational["eos_appended"] is False and conversational["data_format"] == "preference"
    text = json.loads((rms["text"]["run"] / "rendering.json").read_text())
    assert text["style"] == "text" and text["chat_template"] is None and text["eos_appended"] is True
    assert text["eos_token"] == "<|end|>" and text["text_layout"] is None and text["implicit_prompt"] is False
    for record in (conversational, text):
        assert record["max_length"] == MAX_LENGTH and record["on_too_long"] == "truncate"
        assert record["version"] == 1 and "prompt's end" in record["truncation"]
        assert record["pad_token_id"] is not None and "pad token" in record["score_position"]


# ---------------------------------------------------------------- eval scores = scores of the trained ids


@pytest.mark.parametrize("style", ["conversational", "text"])
def test_eval_scores_each_pair_on_the_token_ids_it_was_trained_on(rms, tmp_path, style):
    run, data = rms[style]["run"], rms[style]["data"]
    rows, output = eval_pairs(tmp_path, run, data, style)
    assert "has no rendering.json" not in output
    chosen_ids, rejected_ids = trained_ids(data, style == "conversational")
    assert len(rows) == len(chosen_ids) == 32
    assert any(row["cut"] for row in rows)  # training's windows matter here
    expected_chosen = scores_by_hand(run, chosen_ids)
    expected_rejected = scores_by_hand(run, rejected_ids)
    assert [row["chosen_score"] for row in rows] == pytest.approx(expected_chosen, rel=1e-5, abs=1e-5)
    assert [row["rejected_score"] for row in rows] == pytest.approx(expected_rejected, rel=1e-5, abs=1e-5)
    meta = json.loads((tmp_path / style / "eval.json").read_text())["meta"]
    assert "from its rendering.json" in meta["reward model rendering"]
    assert meta["preference pairs truncated"].startswith(f"{sum(row['cut'] for row in rows)} of 32, longer than "
                                                         f"{MAX_LENGTH} tokens")  # fmt: skip


def test_a_set_eval_max_length_cuts_there_with_a_note(rms, tmp_path):
    run, data = rms["conversational"]["run"], rms["conversational"]["data"]
    recipe = tmp_path / "set.yaml"
    recipe.write_text(json.dumps({"stage": "eval", "eval": {"reward_model": str(run), "max_length": 512,
                                  "preferences": {"path": str(data), "limit": 32}}}))  # fmt: skip
    output = " ".join(invoke("eval", recipe, "-o", tmp_path / "set").split())
    assert f"was trained on pairs cut to {MAX_LENGTH} tokens" in output
    rows = [json.loads(line) for line in (tmp_path / "set" / "pair_scores.jsonl").read_text().splitlines()]
    assert not any(row["cut"] for row in rows)
    chosen_ids, _ = trained_ids(data, True, max_length=512)
    assert [row["chosen_score"] for row in rows] == pytest.approx(scores_by_hand(run, chosen_ids), rel=1e-5,
                                                                  abs=1e-5)  # fmt: skip


def test_sampled_responses_are_scored_as_a_chosen_response_is(rms):
    """eval.prompts, generate and PPO score (prompt, response text) through the same reader: an uncut pair's
    chosen response gives the pair's chosen score."""
    from rlhf_cli.data import load_data
    from rlhf_cli.recipe import DataSource, RewardSpec
    from rlhf_cli.inference import load_scorer

    for style in ("conversational", "text"):
        run, data = rms[style]["run"], rms[style]["data"]
        scorer = load_scorer(RewardSpec(model=str(run)), "eval", None, None, conversational=style == "conversational",
                             max_length=64)  # fmt: skip
        reader = scorer.reader
        pairs = load_data(DataSource(path=str(data), limit=32), "preference")
        uncut = [row for row in pairs if reader.encode_pair(row).length <= reader.max_length][:4]
        assert uncut
        texts = [row["chosen"][0]["content"] if style == "conversational" else row["chosen"] for row in uncut]
        pair_scores = [reader.score_sequences(scorer.model, reader.cut(reader.encode_pair(row)), "cpu")[0]
                       for row in uncut]  # fmt: skip
        sampled = reader.score_responses(scorer.model, [row["prompt"] for row in uncut], texts, "cpu")
        assert sampled == pytest.approx(pair_scores, rel=1e-5, abs=1e-5)


def test_a_reward_model_without_a_record_is_read_as_before_with_a_note(rms, tmp_path):
    copy = tmp_path / "hub-like"
    shutil.copytree(rms["conversational"]["run"], copy)
    (copy / "rendering.json").unlink()
    rows, output = eval_pairs(tmp_path, copy, rms["conversational"]["data"], "assumed")
    flat = " ".join(output.split())
    assert ("has no rendering.json (it was not saved by `rlhf train-rm`), so it is assumed to read "
            "conversational") in flat
    assert len(rows) == 32 and not any(row["cut"] for row in rows)  # eval.max_length (512) as before
    meta = json.loads((tmp_path / "assumed" / "eval.json").read_text())["meta"]
    assert "assumed: no rendering.json" in meta["reward model rendering"]


def test_a_broken_record_is_a_clean_error(rms, tmp_path):
    from conftest import assert_clean_failure

    copy = tmp_path / "broken"
    shutil.copytree(rms["text"]["run"], copy)
    (copy / "rendering.json").write_text('{"style": "sideways"}')
    recipe = tmp_path / "broken.yaml"
    recipe.write_text(json.dumps({"stage": "eval", "eval": {"reward_model": str(copy),
                                  "preferences": {"path": str(rms["text"]["data"])}}}))  # fmt: skip
    assert_clean_failure(["eval", str(recipe), "-o", str(tmp_path / "out")], "rendering.json is not a rendering record",
                         out=tmp_path / "out")  # fmt: skip


def test_ppo_scores_with_the_reward_models_rendering(rms, tmp_path):
    out = tmp_path / "ppo"
    output = invoke("ppo", TINY / "ppo.yaml", "-o", out, "--set", "model.name_or_path=builtin:tiny-gpt2",
                    "--set", f"ppo.reward.model={rms['text']['run']}", "--set", "training.steps=2",
                    "--set", "training.rollout_batch_size=4", "--set", "training.mini_batch_size=4",
                    "--set", "training.response_length=6", "--set", "training.save_steps=100")  # fmt: skip
    flat = " ".join(output.split())
    # the tiny prompts are conversations, the reward model read text: the note says how it reads them
    assert "data.train is conversational but the reward model" in flat and "trained on plain text" in flat
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(abs(record["score"]) < 1e6 for record in records)


def test_data_inspect_renders_eval_pairs_as_the_reward_model_reads_them(rms, tmp_path):
    recipe = tmp_path / "inspect.yaml"
    recipe.write_text(json.dumps({"stage": "eval", "eval": {"reward_model": str(rms["text"]["run"]),
                                  "preferences": {"path": str(rms["text"]["data"]), "limit": 8}}}))  # fmt: skip
    output = invoke("data", "inspect", recipe, "-n", "1")
    assert "(as the reward model was trained: text: prompt + response + EOS '<|end|>')" in output
    assert f"max_length     {MAX_LENGTH} (rendering.json max_length)" in output
    assert "Answer: " in output and "<|end|>" in output  # the decoded (cut) text the reward model reads


# ---------------------------------------------------------------- style conversions


def test_hh_transcripts_and_messages_convert_both_ways():
    from rlhf_cli.rendering import hh_messages, hh_transcript

    text = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant: 4"
    messages = hh_messages(text)
    assert messages == [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]  # fmt: skip
    assert hh_transcript(messages) == text
    assert hh_messages("\n\nHuman: Hi\n\nAssistant:") == [{"role": "user", "content": "Hi"}]  # the cue to answer
    assert hh_messages("Question: Hi") is None


def test_text_prompts_for_a_conversational_reward_model_become_turns():
    from rlhf_cli.models import PLAIN_CHAT_TEMPLATE
    from rlhf_cli.rendering import Rendering, RewardReader

    class Template:  # a stand-in tokenizer that shows what it was asked to render
        chat_template, eos_token, pad_token_id = PLAIN_CHAT_TEMPLATE, "<eos>", 0

    rendering = Rendering(style="conversational", chat_template=PLAIN_CHAT_TEMPLATE, eos_token="<eos>",
                          eos_appended=False, max_length=64)  # fmt: skip
    reader = RewardReader(rendering, Template(), 64, 0)
    prompt, responses = reader._styled("What is 2+2?", [" 4", " 5"])
    assert prompt == [{"role": "user", "content": "What is 2+2?"}]
    assert responses == [[{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}]]
    prompt, responses = reader._styled("\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: 2+2?\n\nAssistant:", [" 4"])
    assert [m["role"] for m in prompt] == ["user", "assistant", "user"]
    assert responses == [[{"role": "assistant", "content": "4"}]]

    hh = Rendering(style="text", chat_template=None, eos_token="<eos>", eos_appended=True, max_length=64,
                   text_layout="hh", implicit_prompt=True)  # fmt: skip
    reader = RewardReader(hh, Template(), 64, 0)
    turns = [{"role": "user", "content": "Hi"}]
    prompt, responses = reader._styled(turns, [[{"role": "assistant", "content": "Yo"}],
                                               [{"role": "assistant", "content": "Go away"}]])  # fmt: skip
    assert prompt is None and responses == ["\n\nHuman: Hi\n\nAssistant: Yo", "\n\nHuman: Hi\n\nAssistant: Go away"]
    prompt, responses = reader._styled(turns, [[{"role": "assistant", "content": "Yo"}]])  # one sampled response
    assert prompt + responses[0] == "\n\nHuman: Hi\n\nAssistant: Yo" and prompt.endswith("Assistant:")


# ---------------------------------------------------------------- the reported case, on the real HH data


def test_format_hh_renders_as_docs_data_formats_says(tmp_path, shared_dir):
    """docs/data-formats.md: an hh pair through a tokenizer without a chat template (the real GPT-2's) becomes the
    plain 'User:/Assistant:' template with EOS closing the assistant turn."""
    from rlhf_cli.data import load_data
    from rlhf_cli.lengths import encode_pair
    from rlhf_cli.models import load_tokenizer
    from rlhf_cli.recipe import DataSource, ModelSpec

    path = tmp_path / "hh.jsonl"
    path.write_text(json.dumps({"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4.",
                                "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 5."}) + "\n")  # fmt: skip
    row = load_data(DataSource(path=str(path)), "preference")[0]
    spec = ModelSpec(name_or_path="builtin:tiny-gpt2", tokenizer=str(shared_dir / "models" / "gpt2-tokenizer"))
    tokenizer = load_tokenizer(spec, "unused", conversational=True)
    encoded = encode_pair(tokenizer, row)
    chosen, rejected = (tokenizer.decode(ids) for ids in encoded.sequences)
    assert chosen == "User: What is 2+2?\n\nAssistant: 4.<|endoftext|>\n\n"
    assert rejected == "User: What is 2+2?\n\nAssistant: 5.<|endoftext|>\n\n"
    assert tokenizer.decode(encoded.sequences[0][: encoded.boundary]) == "User: What is 2+2?\n\nAssistant:"


def test_a_reward_model_trained_on_raw_hh_transcripts_is_scored_on_them(tmp_path, shared_dir):
    """Trained on the transcripts as text (format: preference), evaluated on the same file read as `hh`
    (conversations): eval writes the turns back out as transcripts and scores exactly the trained ids."""
    pairs = shared_dir / "data" / "hh-rlhf-harmless" / "pairs.jsonl.gz"
    run = tmp_path / "hh-rm"
    rlhf(["train-rm", str(TINY / "rm.yaml"), "-o", str(run), "--set", f"data.train.path={pairs}",
          "--set", "data.train.format=preference", "--set", "data.train.limit=32", "--set", "data.max_length=96",
          "--set", "training.max_steps=2", "--set", "training.per_device_train_batch_size=8"])  # fmt: skip
    record = json.loads((run / "rendering.json").read_text())
    assert (record["style"], record["text_layout"], record["implicit_prompt"]) == ("text", "hh", True)

    rows, output = eval_pairs(tmp_path, run, pairs, "hh")  # format auto: read as hh conversations
    assert "trained on HH transcripts: the turns are written out" in " ".join(output.split())
    shown = invoke("data", "inspect", tmp_path / "hh.yaml", "-n", "1")
    assert "format         hh (detected)" in shown and "text (HH transcripts): prompt + response + EOS" in shown
    assert "      Assistant: " in shown and "User: " not in shown  # the transcripts (cut), not the chat template
    chosen_ids, rejected_ids = trained_ids(pairs, False, format="preference", max_length=96)
    assert any(row["cut"] for row in rows)
    assert [row["chosen_score"] for row in rows] == pytest.approx(scores_by_hand(run, chosen_ids), rel=1e-5,
                                                                  abs=1e-5)  # fmt: skip
    assert [row["rejected_score"] for row in rows] == pytest.approx(scores_by_hand(run, rejected_ids), rel=1e-5,
                                                                    abs=1e-5)  # fmt: skip
