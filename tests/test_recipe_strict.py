"""Recipes mean what they say: strict types, YAML 1.2 booleans, no duplicate keys, finite numbers, known enum
values, and every check that needs no model done by `rlhf recipe validate` (and so by every run) up front."""

import pytest

from conftest import TINY, assert_clean_failure
from test_cli_errors import tiny_recipe


def validate(path, *sets):
    args = ["recipe", "validate", str(path)]
    for item in sets:
        args += ["--set", item]
    return args


@pytest.mark.parametrize("setting, fragment", [
    ("training.learning_rate=.inf", "training.learning_rate must be a finite number"),
    ("training.learning_rate=.nan", "must be a finite number"),
    ("model.trust_remote_code=yes", "model.trust_remote_code"),
    ('model.trust_remote_code="true"', "model.trust_remote_code"),
    ("training.bf16=yes", "training.bf16: expected bool"),
    ("training.save_strategy=never", "'never' is not one of no, steps, epoch, best"),
    ("training.lr_scheduler_type=cosinus", "Did you mean 'cosine'?"),
    ("training.optim=adam", "training.optim"),
    ("report_to=nonsense", "report_to: 'nonsense' is not a tracker"),
    ("report_to=wandb", "needs the wandb package"),
    ("model.attn_implementation=flash_attention_2", "needs the flash_attn package"),
    ("model.attn_implementation=fastest", "is not one of eager, sdpa"),
    ("training.eval_strategy=steps", "there is no evaluation data"),
    ("training.wandb_api_key=abc", "is a credential"),
    ("distributed.strategy=ddp", None),  # fine by itself; with the count below it is too many
])
def test_bad_settings_are_refused_by_validate(tmp_path, setting, fragment):
    path = tiny_recipe(tmp_path)
    if fragment is None:
        assert_clean_failure(validate(path, setting, "distributed.num_processes=10000"), "num_processes: 10000")
        return
    assert_clean_failure(validate(path, setting), fragment)


@pytest.mark.parametrize("setting, fragment", [
    ("training.top_p=0", "top_p"),
    ("training.kl_horizon=0", "kl_horizon"),
    ("training.mini_batch_size=3", "mini_batch_size must divide rollout_batch_size"),
    ("ppo.reward.function=no_such_module:reward", "cannot be imported"),
])
def test_ppo_settings_are_checked_by_validate(tmp_path, setting, fragment):
    path = tiny_recipe(tmp_path, "ppo.yaml")
    sets = [f"model.name_or_path={TINY}", f"ppo.reward.model={TINY}"]
    if setting.startswith("ppo.reward.function"):
        sets = [f"model.name_or_path={TINY}", "ppo.reward.model=null"]
    assert_clean_failure(validate(path, *sets, setting), fragment)


def test_no_and_yes_are_strings_where_trl_wants_a_string(tmp_path):
    from typer.testing import CliRunner

    from rlhf_cli.cli import app

    path = tiny_recipe(tmp_path, "sft.yaml", **{"  save_steps: 64\n": "  save_steps: 64\n  save_strategy: no\n"})
    result = CliRunner().invoke(app, ["recipe", "show", str(path)])
    assert result.exit_code == 0, result.output
    assert "save_strategy: 'no'" in result.output


def test_a_duplicate_key_is_refused_with_both_lines(tmp_path):
    path = tiny_recipe(tmp_path, "sft.yaml", **{"output_dir: runs/tiny-sft\n": "output_dir: runs/tiny-sft\ntraining:\n  learning_rate: 1.0e-4\n"})
    assert_clean_failure(["recipe", "validate", str(path)], "key 'training' appears twice")


def test_an_output_dir_that_is_a_file_is_refused_by_validate(tmp_path):
    path = tiny_recipe(tmp_path)
    target = tmp_path / "taken"
    target.write_text("a file")
    assert_clean_failure(validate(path, f"output_dir={target}"), "is a file")


def test_a_recipe_that_is_not_utf8_is_one_paragraph(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes((TINY / "sft.yaml").read_bytes() + "# caf\xe9\n".encode("latin-1"))
    assert_clean_failure(["recipe", "validate", str(path)], "is not UTF-8")


def test_a_hub_token_is_never_written_to_the_run_directory(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from rlhf_cli.cli import app

    monkeypatch.setenv("HF_TOKEN", "")  # restored after the test
    secret = "hf_SECRETsecretSECRET123"
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["sft", str(TINY / "sft.yaml"), "-o", str(out), "--set", f"training.hub_token={secret}",
                                      "--set", "training.max_steps=2", "--set", "training.save_steps=1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert secret not in result.output
    for file in out.rglob("*"):
        if file.is_file():
            assert secret.encode() not in file.read_bytes(), file
    args = (out / "checkpoint-2" / "training_args.bin").read_bytes()
    assert secret.encode() not in args
    import os

    assert os.environ.get("HF_TOKEN") == secret  # handed to the libraries through the environment instead


@pytest.mark.parametrize("missing, sets, fragment", [
    ("gguf", ["model.gguf_file=model.gguf"], 'pip install "rlhf-cli[gguf]"'),
    ("deepspeed", ["distributed.strategy=zero3", "distributed.num_processes=2"], 'pip install "rlhf-cli[deepspeed]"'),
])  # fmt: skip
def test_a_missing_optional_package_is_named_with_its_install_command(tmp_path, monkeypatch, missing, sets, fragment):
    import rlhf_cli.preflight as preflight

    real = preflight.installed
    monkeypatch.setattr(preflight, "installed", lambda package: package != missing and real(package))
    path = tiny_recipe(tmp_path)
    out = tmp_path / "out"
    assert_clean_failure(validate(path, *sets), fragment)
    assert_clean_failure(["sft", str(path), "--dry-run", *sum((["--set", s] for s in sets), [])], fragment)
    assert_clean_failure(["sft", str(path), "-o", str(out), *sum((["--set", s] for s in sets), [])], fragment, out=out)


def test_processes_and_bf16_are_checked_against_the_machine(tmp_path):
    from rlhf_cli.errors import UserError
    from rlhf_cli.launch import Hardware
    from rlhf_cli.preflight import check_hardware
    from rlhf_cli.recipe import load_recipe

    path = tiny_recipe(tmp_path)
    two = load_recipe(path, "sft", ["distributed.strategy=ddp", "distributed.num_processes=2"])
    check_hardware(two, Hardware(gpus=2, bf16_supported=True))  # fits
    with pytest.raises(UserError, match="this machine has 1 GPU"):
        check_hardware(two, Hardware(gpus=1, bf16_supported=True))
    over_two_machines = load_recipe(path, "sft", ["distributed.strategy=ddp", "distributed.num_processes=4",
                                                  "distributed.num_machines=2", "distributed.main_process_ip=10.0.0.1"])
    check_hardware(over_two_machines, Hardware(gpus=2, bf16_supported=True))  # 2 per machine
    bf16 = load_recipe(path, "sft", ["training.bf16=true"])
    with pytest.raises(UserError, match="does not support bfloat16"):
        check_hardware(bf16, Hardware(gpus=1, bf16_supported=False))
    check_hardware(bf16, Hardware(gpus=0))  # CPU: trains in float32, with a note
    # A GPU recipe (8 processes, bf16) validated on a laptop: a note when planning, refused when running.
    gpu_recipe = load_recipe(path, "sft", ["distributed.strategy=ddp", "distributed.num_processes=8",
                                           "model.dtype=bfloat16"])  # fmt: skip
    assert "not checked against this machine" in check_hardware(gpu_recipe, Hardware(gpus=0), planning=True)
    with pytest.raises(UserError, match="no GPU"):
        check_hardware(gpu_recipe, Hardware(gpus=0))


@pytest.mark.parametrize("setting, fragment", [
    ("divergence.loss_spike=0.5", "divergence.loss_spike"),
    ("divergence.loss_spike=.inf", "must be a finite number"),
    ("divergence.spike_window=0", "divergence.spike_window"),
    ("divergence.loss_spik=10", "Did you mean 'loss_spike'?"),
])  # fmt: skip
def test_bad_divergence_settings_are_refused(tmp_path, setting, fragment):
    assert_clean_failure(validate(tiny_recipe(tmp_path), setting), fragment)


@pytest.mark.parametrize("args, fragment", [
    (["/no/such/recipe.yaml"], "does not exist"),
    (["RECIPE", "--set", "data.on_too_long=cut"], "data.on_too_long"),
    (["RECIPE", "--stage", "nonsense"], "cannot tell which stage"),
    (["RECIPE", "--set", "data.train.path=missing.jsonl"], "does not exist"),
])  # fmt: skip
def test_data_inspect_refuses_bad_input_with_one_paragraph(tmp_path, args, fragment):
    path = str(tiny_recipe(tmp_path))
    assert_clean_failure(["data", "inspect", *[path if a == "RECIPE" else a for a in args]], fragment)
