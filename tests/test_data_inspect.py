"""`rlhf data inspect`: a recipe's data as the trainer will see it, from the tokenizer alone; and the same data
lines in a training dry run."""

import re

from typer.testing import CliRunner

from conftest import TINY
from rlhf_cli.cli import app


def inspect(*args: str) -> str:
    result = CliRunner().invoke(app, ["data", "inspect", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


def test_inspect_the_tiny_reward_recipe():
    output = inspect(TINY / "rm.yaml")
    assert "rm recipe, read as TRL RewardTrainer reads it" in output
    assert "format         preference (detected), preference data, messages (chat template)" in output
    assert "columns        chosen, rejected, prompt" in output
    assert "rows           256 read, 256 kept by the loader; dropped: none" in output
    assert re.search(r"token lengths  p50 \d+, p90 \d+, p95 \d+, p99 \d+, max \d+", output)
    assert "on_too_long    truncate: every row fits data.max_length = 64" in output
    assert "to the trainer 256 rows (0 truncated, 0 dropped)" in output
    # Two rendered examples, chat template applied, as the reward model reads them.
    assert output.count("  example ") == 2
    assert "<|user|>What is 7 plus 1?<|end|><|assistant|>Happy to help. 7 plus 1 is 8. Thanks for asking!<|end|>" \
        in output  # fmt: skip


def test_inspect_shows_the_cut_and_keeps_long_lines_whole():
    output = inspect(TINY / "rm.yaml", "--set", "data.max_length=24")
    lines = output.splitlines()
    long_line = next(line for line in lines if line.startswith("  on_too_long"))
    assert re.fullmatch(r"  on_too_long    truncate: \d+ of 256 rows are longer than data.max_length = 24; each keeps "
                        r"the prompt's end and each response's start", long_line)  # fmt: skip  # one line, not wrapped
    example = next(line for line in lines if "cut from" in line)
    assert re.fullmatch(r"  example 2: row \d+, cut from \d+ to 24 tokens, as the model reads it", example)


def test_inspect_with_on_too_long_error_says_the_run_would_stop():
    output = inspect(TINY / "sft.yaml", "--set", "data.max_length=16", "--set", "data.on_too_long=error", "-n", "0")
    assert re.search(r"rows are longer than data.max_length = 16; the run would stop \(first: row \d+, \d+ tokens\)",
                     output)  # fmt: skip
    assert "example" not in output


def test_inspect_an_eval_recipe_reads_each_source_with_its_tokenizer():
    from rlhf_cli.models import resolve_model_path
    from rlhf_cli.recipe import ModelSpec

    builtin = resolve_model_path(ModelSpec(name_or_path="builtin:tiny-gpt2"), 42)  # a directory with a tokenizer
    output = inspect(TINY / "eval.yaml", "-n", "1", "--set", "model.name_or_path=builtin:tiny-gpt2",
                     "--set", "eval.reference=null", "--set", "eval.ppo_run=null",
                     "--set", f"eval.reward_model={builtin}", "--set", "eval.max_prompt_length=8")  # fmt: skip
    for what in ("eval.preferences:", "eval.demonstrations:", "eval.prompts:"):
        assert what in output
    assert f"tokenizer      {builtin}" in output  # the pairs are read by the reward model's tokenizer
    assert "rows are longer than eval.max_prompt_length = 8; each keeps its last 8 tokens" in output


def test_dry_run_prints_the_data_lines():
    result = CliRunner().invoke(app, ["train-rm", str(TINY / "rm.yaml"), "--dry-run"])
    assert result.exit_code == 0, result.output
    data = result.output.split("Data:")[1].split("Launch:")[0]
    assert "format         preference (detected)" in data and "to the trainer 256 rows" in data
    assert "example" not in data
