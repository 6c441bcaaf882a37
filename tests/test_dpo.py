"""`rlhf dpo`: the pure pieces against hand-made values, the TRL APIs relied on (experimental ORPO/CPO included),
end-to-end runs of dpo / orpo / simpo on the tiny task, ZeRO-3 in two CPU processes, Ctrl-C + resume, bad inputs."""

import inspect
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, RLHF, TINY, assert_clean_failure, rlhf
from rlhf_cli.lengths import Encoded, check_prompted
from rlhf_cli.stages.dpo import likelihood_displacement



def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- pure pieces


def test_pairs_reach_dpo_as_prompt_and_response_ids():
    import datasets

    from rlhf_cli.lengths import Fitted, LengthReport, trainer_dataset

    rows = datasets.Dataset.from_dict({"prompt": ["p"], "chosen": ["c"], "rejected": ["r"]})
    encoded = Encoded([[1, 2, 3, 4, 5], [1, 2, 3, 9]], 3)
    fitted = Fitted([0], [encoded], LengthReport(what="x", max_length=8, on_too_long="truncate",
                                                   limit_key="k", rows_in=1, percentiles={}, fits_95=5))
    out = trainer_dataset(rows, "preference", fitted, split_prompt=True)[0]
    assert (out["prompt_ids"], out["chosen_ids"], out["rejected_ids"]) == ([1, 2, 3], [4, 5], [9])
    assert out["prompt"] == "p"  # the text stays for trainers that read it (ORPO/CPO extract and template it)
    whole = trainer_dataset(rows, "preference", fitted)[0]  # the reward model reads whole sequences
    assert whole == {"chosen_ids": [1, 2, 3, 4, 5], "rejected_ids": [1, 2, 3, 9]}


def test_a_pair_without_a_prompt_or_without_a_response_is_refused():
    from rlhf_cli.errors import UserError

    check_prompted([Encoded([[1, 2], [1, 3]], 1)], "data.train")
    with pytest.raises(UserError, match=r"row 2: no prompt"):
        check_prompted([Encoded([[1, 2], [1, 3]], 1), Encoded([[4, 2], [5, 3]], 0)], "data.train")
    with pytest.raises(UserError, match=r"row 1: the rejected response has no token"):
        check_prompted([Encoded([[1, 2, 3], [1, 2]], 2)], "data.train")


def test_likelihood_displacement_reads_held_out_chosen_rewards_first():
    from types import SimpleNamespace

    recipe = SimpleNamespace(dpo=SimpleNamespace(algorithm="dpo"))
    history = [{"rewards/chosen": 0.3}, {"eval_rewards/chosen": -0.02}]
    (warning,) = likelihood_displacement(recipe, history)
    assert "held-out" in warning and "-0.02" in warning
    assert likelihood_displacement(recipe, [{"rewards/chosen": -0.1}, {"eval_rewards/chosen": 0.2}]) == []
    assert "training" in likelihood_displacement(recipe, [{"rewards/chosen": -0.1}])[0]
    assert likelihood_displacement(SimpleNamespace(dpo=SimpleNamespace(algorithm="simpo")), history) == []


def test_loss_types_come_from_the_installed_trainers():
    from rlhf_cli.trl_fields import loss_types

    assert {"sigmoid", "ipo", "hinge", "robust", "sft", "apo_zero"} <= set(loss_types("DPOConfig"))
    assert "kto" in loss_types("KTOConfig") and "simpo" in loss_types("CPOConfig")


# ---------------------------------------------------------------- the TRL APIs relied on


def test_trl_dpo_and_kto_take_their_own_tokenized_columns():
    """Our subclasses skip `_prepare_dataset` for rows holding the columns TRL's collators read."""
    from trl import DPOTrainer, KTOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    for trainer in (DPOTrainer, KTOTrainer):
        assert list(inspect.signature(trainer._prepare_dataset).parameters) == [
            "self", "dataset", "processing_class", "args", "dataset_name"]
    batch = DataCollatorForPreference(pad_token_id=0)([{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [1, 2, 4, 5]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 0], [0, 0, 1, 1]]
    rows = [{"prompt_ids": [1], "completion_ids": [2, 3], "KL_completion_ids": [4], "label": True},
            {"prompt_ids": [5], "completion_ids": [6], "KL_completion_ids": [2, 3], "label": False}]
    batch = DataCollatorForUnpairedPreference(pad_token_id=0)(rows)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [5, 6, 0]] and batch["label"].tolist() == [True, False]


def test_trl_experimental_orpo_and_cpo_api_is_what_the_stage_relies_on():
    """Pins trl.experimental's ORPO/CPO: rows go through `self.tokenize_row(feature, model)` in `__init__`, and
    the collator pads what `tokenized_pair` returns. A TRL release that changes this must fail here."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    from trl.experimental.utils import DPODataCollatorWithPadding

    from rlhf_cli.stages.pretokenized import tokenized_pair

    for trainer in (ORPOTrainer, CPOTrainer):
        assert list(inspect.signature(trainer.tokenize_row).parameters) == ["self", "feature", "model"]
        assert "map(self.tokenize_row" in inspect.getsource(trainer.__init__)
    for config in (ORPOConfig, CPOConfig):
        assert {"beta", "max_length"} <= set(config.__dataclass_fields__)
    assert {"cpo_alpha", "simpo_gamma", "loss_type"} <= set(CPOConfig.__dataclass_fields__)
    row = tokenized_pair({"prompt_ids": [7, 8], "chosen_ids": [1], "rejected_ids": [2, 3]})
    assert row["chosen_input_ids"] == [7, 8, 1] and row["chosen_labels"] == [-100, -100, 1]
    assert row["rejected_input_ids"] == [7, 8, 2, 3] and row["rejected_labels"] == [-100, -100, 2, 3]
    assert row["prompt_input_ids"] == [7, 8] and row["rejected_attention_mask"] == [1, 1, 1, 1]
    batch = DPODataCollatorWithPadding(pad_token_id=0)([row, tokenized_pair(
        {"prompt_ids": [9], "chosen_ids": [4, 5, 6], "rejected_ids": [1]})])
    assert batch["chosen_input_ids"].tolist() == [[7, 8, 1, 0], [9, 4, 5, 6]]
    assert batch["chosen_labels"].tolist() == [[-100, -100, 1, -100], [-100, 4, 5, 6]]


def test_kto_kl_completions_rotate_within_each_batch():
    from rlhf_cli.stages.pretokenized import rotated_completions

    assert rotated_completions([[1], [2], [3], [4], [5]], 2) == [[2], [1], [4], [3], [5]]
    assert rotated_completions([[1], [2], [3]], 3) == [[3], [1], [2]]


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_dpo_learns_the_pairs_and_saves_a_plain_causal_lm(tiny_sft, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "dpo"
    rlhf("dpo", str(TINY / "dpo.yaml"), "-o", str(out), "--set", f"model.name_or_path={tiny_sft}")
    result = summary(out)
    assert result["stage"] == "dpo"
    assert result["rows read"] == 256 and result["rows held out for evaluation"] == 13 and result["rows kept"] == 243
    assert result["held-out rows"] == 13
    assert result["held-out rewards/accuracies"] > 0.5  # the implicit reward ranks pairs it did not train on
    assert result["held-out rewards/margins"] > 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    recipe = (out / "recipe.yaml").read_text()
    assert "algorithm: dpo" in recipe and "beta: 0.1" in recipe


@pytest.mark.slow
@pytest.mark.parametrize("recipe,settings", [
    ("orpo.yaml", []),
    pytest.param("dpo.yaml", ["--set", "dpo.algorithm=simpo", "--set", "training.loss_type=simpo",
                              "--set", "training.beta=2.0"], marks=pytest.mark.extended),
    pytest.param("dpo.yaml", ["--set", "training.loss_type=[sigmoid, sft]", "--set", "training.loss_weights=[1.0, 0.5]"],
                 marks=pytest.mark.extended),
], ids=["orpo", "simpo", "mpo-style-mix"])
def test_other_algorithms_and_combined_losses_train(tiny_sft, tmp_path, recipe, settings):
    out = tmp_path / "run"
    rlhf("dpo", str(TINY / recipe), "-o", str(out), "--set", f"model.name_or_path={tiny_sft}",
         "--set", "training.max_steps=6", "--set", "data.eval_split=0", *settings)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in history if "loss" in row]
    assert losses and all(loss == loss for loss in losses)
    assert summary(out)["steps"] == 6 and "rewards/margins (last log window)" in " ".join(summary(out))


@pytest.mark.slow
@pytest.mark.extended
def test_dpo_under_deepspeed_zero3_in_two_cpu_processes(tiny_sft, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "zero3"
    rlhf("dpo", str(TINY / "dpo.yaml"), "-o", str(out), "--set", f"model.name_or_path={tiny_sft}",
         "--set", "distributed.strategy=zero3", "--set", "distributed.num_processes=2",
         "--set", "training.num_train_epochs=1")
    ds = json.loads((out / "deepspeed.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3 and ds["train_batch_size"] == 16 * 2
    result = summary(out)
    # 243 training pairs / (16 per process x 2 processes) = 8 optimizer steps: both processes took part
    assert result["steps"] == 8 and result["rows kept"] == 243 and "held-out rewards/accuracies" in result
    model = AutoModelForCausalLM.from_pretrained(out)
    assert all(p.numel() > 0 and torch.isfinite(p).all() for p in model.parameters())  # gathered, not shards


@pytest.mark.slow
@pytest.mark.extended
def test_ctrl_c_saves_a_dpo_checkpoint_and_resume_finishes(tiny_sft, tmp_path):
    out = tmp_path / "interrupted"
    args = [*RLHF, "dpo", str(TINY / "dpo.yaml"), "-o", str(out), "--set", f"model.name_or_path={tiny_sft}",
            "--set", "training.num_train_epochs=200", "--set", "training.logging_steps=1",
            "--set", "training.save_steps=100000", "--set", "data.eval_split=0"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    (checkpoint,) = out.glob("checkpoint-*")
    stopped_at = int(checkpoint.name.split("-")[1])
    rlhf("dpo", str(TINY / "dpo.yaml"), "-o", str(out), "--resume", "--set", f"model.name_or_path={tiny_sft}",
         "--set", f"training.max_steps={stopped_at + 2}", "--set", "training.num_train_epochs=200",
         "--set", "training.logging_steps=1", "--set", "data.eval_split=0")
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == sorted(set(steps)) and steps[-1] == stopped_at + 2  # no step trained twice
    assert summary(out)["steps"] == stopped_at + 2


# ---------------------------------------------------------------- bad input: exit 2, one paragraph, nothing written


BAD_SETTINGS = [
    (["--set", "training.loss_type=sigmod"], ["'sigmod' is not a loss type", "sigmoid"]),
    (["--set", "training.loss_type=[sigmoid, sft]", "--set", "training.loss_weights=[1.0]"],
     ["1 weight for 2 loss types"]),
    (["--set", "dpo.algorithm=simpo", "--set", "training.loss_type=ipo"], ["algorithm simpo", "loss_type"]),
    (["--set", "training.beta=0"], ["training.beta: must be > 0"]),
    (["--set", "dpo.algorithm=orpo"], ["training.loss_type: not a field of ORPOConfig"]),
]


@pytest.mark.parametrize("settings,fragments", BAD_SETTINGS, ids=["unknown-loss", "weights-length", "simpo-loss",
                                                                   "zero-beta", "orpo-has-no-loss-type"])
def test_bad_dpo_settings_are_refused_before_anything_loads(settings, fragments, tmp_path):
    out = tmp_path / "run"
    assert_clean_failure(["dpo", str(TINY / "dpo.yaml"), "-o", str(out), "--set", f"model.name_or_path={TINY}",
                          *settings], *fragments, out=out)


def test_orpo_with_a_reference_model_is_refused(tmp_path):
    out = tmp_path / "run"
    assert_clean_failure(["dpo", str(TINY / "orpo.yaml"), "-o", str(out), "--set", f"model.name_or_path={TINY}",
                          "--set", f"dpo.ref_model={TINY}"], "orpo is reference-free", out=out)


@pytest.mark.slow
def test_bad_dpo_data_is_refused_with_nothing_written(tiny_sft, tmp_path):
    same = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "Q?", "chosen": "A", "rejected": "A"}] * 30)
    no_prompt = write_jsonl(tmp_path / "np.jsonl", [{"chosen": "Yes indeed", "rejected": "No way"}] * 30)
    for data, fragments in ((same, ["identical", "nothing is left"]), (no_prompt, ["row 1: no prompt"])):
        out = tmp_path / "run"
        assert_clean_failure(["dpo", str(TINY / "dpo.yaml"), "-o", str(out), "--set", f"model.name_or_path={tiny_sft}",
                              "--set", f"data.train.path={data}"], *fragments, out=out)


def test_dpo_sections_belong_to_dpo_recipes(tmp_path):
    recipe = tmp_path / "sft.yaml"
    recipe.write_text((TINY / "sft.yaml").read_text().replace("seed: 42", "seed: 42\ndpo:\n  algorithm: orpo"))
    (tmp_path / "data").symlink_to(TINY / "data")
    assert_clean_failure(["sft", str(recipe)], "`dpo:` belongs in a recipe for `rlhf dpo`")
