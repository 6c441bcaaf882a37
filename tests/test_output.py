"""Output that survives a pipe: nothing cut at 80 columns when stdout is a file or a CI log."""

import subprocess
import sys

from conftest import REPO, TINY

RLHF = [sys.executable, "-m", "rlhf_cli.cli"]


def piped(*args: str) -> str:
    result = subprocess.run([*RLHF, *args], capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={k: v for k, v in __import__("os").environ.items() if k != "COLUMNS"})  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_dry_run_prints_full_paths_and_the_exact_launch_command(tmp_path):
    out = tmp_path / ("a-rather-long-directory-name-" * 4) / "run"
    text = piped("train-rm", str(TINY / "rm.yaml"), "--dry-run", "-o", str(out),
                 "--set", "distributed.strategy=zero3", "--set", "distributed.num_processes=2")  # fmt: skip
    assert "…" not in text
    assert f"deepspeed_config_file: {out / 'deepspeed.json'}" in text
    command = next(line for line in text.splitlines() if "accelerate.commands.launch" in line)
    assert command.endswith(f"--run-dir {out}")


def test_recipe_defaults_table_is_not_cut(tmp_path):
    text = piped("recipe", "show", "--defaults")
    assert "…" not in text
    from rlhf_cli.recipe import describe_keys

    lines = text.splitlines()
    for key, _, meaning in describe_keys():
        row = next(line for line in lines if line.split("│")[1:2] and line.split("│")[1].strip() == key)
        assert " ".join(meaning.split()) in " ".join(row.split()), key  # the whole help text on the key's line


def test_recipe_defaults_list_every_ppo_training_key():
    from dataclasses import fields

    from rlhf_cli.ppo.config import PPOConfig
    from rlhf_cli.recipe import describe_keys

    rows = {key: (default, meaning) for key, default, meaning in describe_keys()}
    for field in fields(PPOConfig):
        assert f"training.{field.name} (ppo)" in rows, field.name
    assert rows["training.snapshot_steps (ppo)"][0] == "null"
    assert rows["training.kl_coef (ppo)"] == ("0.05", "beta in r_t = -beta * KL_t + [t = last] * score.")
    assert rows["training.gradient_checkpointing (ppo)"][0] == "false"
