"""Rule rewards in rlhf_cli.rewards: number extraction, GSM8K gold answers, the exact-match reward, the recipe."""

import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlhf_cli.cli import app
from rlhf_cli.errors import UserError
from rlhf_cli.rewards import (
    GSM8K_ENV,
    exact_match_reward,
    extract_final_number,
    gsm8k_exact_match,
    gsm8k_gold,
    load_answers,
    prompt_text,
)

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "gsm8k" / "ppo.yaml"

# Questions and answers in GSM8K's shape, answers worked by hand.
TINY_GSM8K = [
    {"question": "Ann has 3 apples and buys 4 more. How many apples does she have?",
     "answer": "She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "A car costs $1,200 and a bike $80. How much do both cost?",
     "answer": "Both cost 1,200 + 80 = <<1200+80=1280>>1,280 dollars.\n#### 1,280"},
    {"question": "The temperature is 2 degrees and drops by 7. What is it now?",
     "answer": "It is 2 - 7 = <<2-7=-5>>-5 degrees.\n#### -5"},
]


@pytest.fixture
def gsm8k_file(tmp_path, monkeypatch):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in TINY_GSM8K), encoding="utf-8")
    monkeypatch.setenv(GSM8K_ENV, str(path))
    return path


# ---------------------------------------------------------------- extract_final_number


@pytest.mark.parametrize(("text", "expected"), [
    ("#### 72", Decimal(72)),
    ("The answer is 1,234.", Decimal(1234)),
    ("She makes $18 every day.", Decimal(18)),
    ("It ends at -5 degrees", Decimal(-5)),
    ("It ends at \u22125 degrees", Decimal(-5)),  # the Unicode minus sign
    ("Each costs 2.5, so 3 cost 7.50", Decimal("7.5")),
    ("10-3=7", Decimal(7)),  # a minus between numbers is subtraction, not a sign
    ("1,234,567 grains", Decimal(1234567)),
    ("Take 1,2345 of them", Decimal(2345)),  # not a thousands group: two numbers, 1 and 2345
    ("#### 18\nI double-checked with 2 methods.", Decimal(18)),  # the number after '####' wins over the last one
    ("first 3 then #### 1,080 and 4", Decimal(1080)),
    ("so 5 #### (none)", Decimal(5)),  # nothing after '####': fall back to the last number
    ("50% of them", Decimal(50)),
    ("no digits here", None),
    ("", None),
])
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected


def test_numbers_compare_as_exact_decimals():
    assert extract_final_number("72.00") == extract_final_number("#### 72")
    assert extract_final_number("0.1") == Decimal("0.1")


def test_gsm8k_gold():
    assert gsm8k_gold("2 + 2 = <<2+2=4>>4\n#### 4") == 4
    assert gsm8k_gold("...\n#### 1,080") == 1080
    assert gsm8k_gold("...\n#### -12") == -12
    with pytest.raises(ValueError, match="no '#### <number>' answer line"):
        gsm8k_gold("The answer is 4")


# ---------------------------------------------------------------- prompts and the exact-match reward


def test_prompt_text_of_text_and_messages():
    assert prompt_text("What is 2 + 2?") == "What is 2 + 2?"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "First?"},
            {"role": "assistant", "content": "1"}, {"role": "user", "content": "What is 2 + 2?"}]
    assert prompt_text(chat) == "What is 2 + 2?"
    with pytest.raises(UserError, match="no user turn"):
        prompt_text([{"role": "system", "content": "Be brief."}])


def test_exact_match_reward_from_a_mapping():
    reward = exact_match_reward({"What is 2 + 2?": 4, "Half of 5?": 2.5, "Big?": "1,000,000"})
    prompts = ["What is 2 + 2?", "What is 2 + 2?", "Half of 5?", "Big?", "  What is  2 + 2?\n"]
    completions = ["2 + 2 = 4", "It is 5.", "That is 2.50", "#### 1,000,000", "4"]
    assert reward(prompts, completions) == [1.0, 0.0, 1.0, 1.0, 1.0]  # whitespace in the prompt does not matter


def test_gsm8k_exact_match_on_text_prompts(gsm8k_file):
    prompts = [row["question"] for row in TINY_GSM8K] * 2
    completions = [
        "3 + 4 = 7. The answer is 7.",
        "1200 + 80 = 1280, so $1,280.",
        "2 - 7 = -5, so it is -5 degrees.",
        "3 + 4 = 8",  # wrong
        "The answer is 1,208.",  # wrong
        "It is 5 degrees.",  # the sign matters
    ]
    assert gsm8k_exact_match(prompts, completions) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_gsm8k_exact_match_on_message_prompts(gsm8k_file):
    # What `format: alpaca, columns: {instruction: question}` makes of a row: one user turn (plus a system turn here)
    prompts = [[{"role": "system", "content": "Solve it."}, {"role": "user", "content": row["question"]}]
               for row in TINY_GSM8K]
    assert gsm8k_exact_match(prompts, ["#### 7", "#### 1280", "no idea"]) == [1.0, 1.0, 0.0]


def test_gsm8k_reference_solutions_score_one(gsm8k_file):
    rows = TINY_GSM8K
    assert gsm8k_exact_match([r["question"] for r in rows], [r["answer"] for r in rows]) == [1.0] * len(rows)


def test_unknown_prompt_is_a_user_error_naming_it(gsm8k_file):
    with pytest.raises(UserError) as caught:
        gsm8k_exact_match(["How many legs has a spider?"], ["8"])
    message = str(caught.value)
    assert "How many legs has a spider?" in message and GSM8K_ENV in message and "3 questions" in message


def test_missing_environment_variable_says_what_to_set(monkeypatch):
    monkeypatch.delenv(GSM8K_ENV, raising=False)
    with pytest.raises(UserError, match=f"set {GSM8K_ENV}"):
        gsm8k_exact_match(["q"], ["1"])


def test_env_var_takes_a_directory_and_several_paths(tmp_path, monkeypatch):
    first, second = tmp_path / "a", tmp_path / "b"
    for folder, rows in ((first, TINY_GSM8K[:2]), (second, TINY_GSM8K[2:])):
        folder.mkdir()
        (folder / "part.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    monkeypatch.setenv(GSM8K_ENV, f"{first}{os.pathsep}{second / 'part.jsonl'}")
    prompts = [row["question"] for row in TINY_GSM8K]
    assert gsm8k_exact_match(prompts, ["7", "1280", "-5"]) == [1.0, 1.0, 1.0]


def test_bad_answers_file_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(TINY_GSM8K[0]) + "\n" + json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl, line 2: no '#### <number>'"):
        load_answers(path)
    path.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n" + json.dumps({"question": "q",
                                                                                            "answer": "#### 2"}))
    with pytest.raises(UserError, match="two different answers"):
        load_answers(path)
    with pytest.raises(UserError, match="does not exist"):
        load_answers(tmp_path / "nope.jsonl")


def test_rewards_module_does_not_import_torch():
    code = "import sys, rlhf_cli.rewards; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# ---------------------------------------------------------------- the real GSM8K data and the recipe


def test_real_gsm8k_gold_answers_parse_and_reference_solutions_score_one(shared_dir, monkeypatch):
    path = shared_dir / "data" / "gsm8k" / "test.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    golds = [gsm8k_gold(row["answer"]) for row in rows]  # raises on any answer without a '#### N' line
    assert len(golds) == len(rows) > 1000
    assert all(gold == gold.to_integral_value() for gold in golds)  # GSM8K's answers are whole numbers
    monkeypatch.setenv(GSM8K_ENV, str(path))
    first = rows[:50]
    assert gsm8k_exact_match([r["question"] for r in first], [r["answer"] for r in first]) == [1.0] * 50
    chats = [[{"role": "user", "content": r["question"]}] for r in first]
    off_by_one = [f"#### {gsm8k_gold(r['answer']) + 1}" for r in first]
    assert gsm8k_exact_match(chats, off_by_one) == [0.0] * 50


def test_the_gsm8k_recipe_validates_and_dry_runs(shared_dir, tmp_path, monkeypatch):
    if not (shared_dir / "data" / "gsm8k" / "train.jsonl").is_file():
        pytest.skip("the GSM8K data is absent from ../shared")
    monkeypatch.chdir(tmp_path)  # the relative output_dir would land here, and must not be created
    runner = CliRunner()
    result = runner.invoke(app, ["recipe", "validate", str(RECIPE)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["ppo", str(RECIPE), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "rlhf_cli.rewards:gsm8k_exact_match" in result.output and "Dry run" in result.output
    assert list(tmp_path.iterdir()) == []


def test_the_gsm8k_recipe_prompts_are_the_questions(shared_dir):
    """The recipe's data section turns each row into one user turn holding the question, which the reward finds."""
    from rlhf_cli.data import load_data
    from rlhf_cli.recipe import apply_overrides, read_recipe_file, validate_recipe

    if not (shared_dir / "data" / "gsm8k" / "train.jsonl").is_file():
        pytest.skip("the GSM8K data is absent from ../shared")
    raw = apply_overrides(read_recipe_file(RECIPE), ["data.train.limit=5"])
    recipe = validate_recipe(raw, "ppo", source=str(RECIPE), base_dir=RECIPE.parent)
    prompts = load_data(recipe.data.train, "prompt")["prompt"]
    lines = Path(recipe.data.train.path).read_text(encoding="utf-8").splitlines()[:5]
    rows = [json.loads(line) for line in lines]
    assert prompts == [[{"role": "user", "content": row["question"]}] for row in rows]
