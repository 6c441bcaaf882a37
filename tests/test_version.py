"""`rlhf --version`: rlhf-cli's version, Python's and the libraries', from package metadata without importing them."""

import importlib.metadata
import platform
import subprocess
import sys

from typer.testing import CliRunner

from rlhf_cli.cli import app

LIBRARIES = ("torch", "transformers", "trl", "datasets", "accelerate", "peft", "deepspeed")


def installed(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def test_version_lists_the_tool_python_and_each_library():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"rlhf-cli {importlib.metadata.version('rlhf-cli')}"
    assert f"python {platform.python_version()}" in lines
    for name in LIBRARIES:
        assert f"{name} {installed(name)}" in lines, (name, lines)


def test_version_is_eager_and_says_when_a_library_is_missing(monkeypatch):
    real = importlib.metadata.version

    def without_deepspeed(name):
        if name == "deepspeed":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", without_deepspeed)
    result = CliRunner().invoke(app, ["--version", "sft", "no-such-recipe.yaml"])  # eager: the command never runs
    assert result.exit_code == 0, result.output
    assert "deepspeed not installed" in result.output.splitlines()


def test_version_imports_neither_torch_nor_transformers():
    code = ("import sys; from rlhf_cli.cli import app; app(['--version'], standalone_mode=False); "
            "print(sorted(m for m in ('torch', 'transformers', 'trl', 'datasets', 'peft') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines()[-1] == "[]", result.stdout
