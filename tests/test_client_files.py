"""The three kinds of client data that once gave wrong answers without a word, end to end through documented recipe
keys and no conversion script: long preference pairs, a winner label column, nested instruction + input."""

import json
import random
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import TINY
from rlhf_cli.cli import app

WORDS = ("please thank you answer question kind helpful sorry the a of to and is it what why how when where "
         "because maybe sure certainly here there number one two three four five six seven eight nine ten").split()


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("client") / "rm"
    invoke("train-rm", str(TINY / "rm.yaml"), "-o", str(out), "--set", "training.max_steps=4")
    return out


def test_long_preference_pairs_are_all_trained_on(tmp_path):
    """Long pairs (OpenAssistant-like, far over max_length): every pair is kept and truncated, none dropped."""
    rng = random.Random(0)
    rows = [{"prompt": words(rng, 60), "chosen": words(rng, 150), "rejected": words(rng, 150)} for _ in range(60)]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = write_recipe(tmp_path / "rm.yaml", {
        "stage": "rm", "model": {"name_or_path": "builtin:tiny-gpt2"},
        "data": {"train": {"path": str(data)}, "max_length": 64},
        "training": {"max_steps": 2, "per_device_train_batch_size": 8, "activation_checkpointing": False},
    })  # fmt: skip
    out = tmp_path / "out"
    invoke("train-rm", str(recipe), "-o", str(out))
    summary = json.loads((out / "summary.json").read_text())
    held_out = summary.get("rows held out for evaluation", 0)
    assert summary["rows read"] == 60
    assert summary["rows kept"] + held_out == 60
    assert summary["rows truncated"] == summary["rows kept"]  # every kept pair was too long, and was cut, not lost
    assert summary.get("rows dropped as too long", 0) == 0


def test_a_winner_column_is_read_as_the_labels_say(tmp_path, tiny_rm):
    """AlpacaFarm layout: accuracy under the winner column equals accuracy on the same pairs converted by hand."""
    rng = random.Random(1)
    rows, converted = [], []
    for _ in range(48):
        good, bad = "Certainly, here is the answer: " + words(rng, 6), words(rng, 3)
        label = rng.choice([1, 2, 0])
        first, second = (good, bad) if label != 2 else (bad, good)
        row = {"instruction": words(rng, 8), "input": "", "output_1": first, "output_2": second,
               "preference": label}  # fmt: skip
        rows.append(row)
        if label in (1, 2):
            chosen, rejected = (first, second) if label == 1 else (second, first)
            converted.append({"instruction": row["instruction"], "chosen": chosen, "rejected": rejected})
    labelled, by_hand = tmp_path / "farm.json", tmp_path / "converted.jsonl"
    labelled.write_text(json.dumps(rows))
    by_hand.write_text("".join(json.dumps(row) + "\n" for row in converted))

    def evaluate(preferences: dict, name: str) -> dict:
        recipe = write_recipe(tmp_path / f"{name}.yaml", {
            "stage": "eval", "eval": {"reward_model": str(tiny_rm), "preferences": preferences},
        })  # fmt: skip
        invoke("eval", str(recipe), "-o", str(tmp_path / name))
        return json.loads((tmp_path / name / "eval.json").read_text())["reward_model"]

    winner = {"column": "preference", "responses": ["output_1", "output_2"], "first": 1, "second": 2, "tie": 0}
    from_labels = evaluate({"path": str(labelled), "winner": winner}, "labels")
    from_hand = evaluate({"path": str(by_hand)}, "hand")
    assert from_labels["num_pairs"] == from_hand["num_pairs"] == len(converted)
    assert from_labels["accuracy"] == from_hand["accuracy"]


def test_nested_instruction_and_input_reach_the_prompt(tmp_path):
    """Self-Instruct seed tasks: the nested input goes into the prompt through prompt_template."""
    rows = [{"id": f"seed_{n}", "instruction": f"Sort these numbers {n}", "instances": [
        {"input": f"INPUT-{n}: 3, 1, 2", "output": "1, 2, 3"}]} for n in range(12)]  # fmt: skip
    data = tmp_path / "seed_tasks.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = write_recipe(tmp_path / "sft.yaml", {
        "stage": "sft", "model": {"name_or_path": "builtin:tiny-gpt2"},
        "data": {"train": {"path": str(data), "format": "prompt_completion",
                           "prompt_template": "{instruction}\n\n{instances.0.input}",
                           "columns": {"completion": "instances.0.output"}}, "max_length": 64},
        "training": {"max_steps": 1, "activation_checkpointing": False},
    })  # fmt: skip
    shown = invoke("data", "inspect", str(recipe)).output
    assert "INPUT-0: 3, 1, 2" in shown  # the rendered example holds the nested input
    out = tmp_path / "out"
    invoke("sft", str(recipe), "-o", str(out))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows read"] == summary["rows kept"] == 12
