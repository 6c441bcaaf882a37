"""Bad inputs to `rlhf eval` and `rlhf generate`: one paragraph on stderr, exit code 2, no traceback, nothing written.

No trained model is needed: the models here are the builtin tiny GPT-2 (random weights, built in a second) and
directories made to look wrong.
"""

import json
import shutil
from pathlib import Path

import pytest

from conftest import TINY, assert_clean_failure

@pytest.fixture(scope="module")
def causal_lm() -> Path:
    """A real causal-LM checkpoint directory: the builtin tiny GPT-2 (policy-shaped, not a reward model)."""
    from rlhf_cli.models import materialize_builtin
    from rlhf_cli.recipe import BuiltinSpec

    return materialize_builtin("builtin:tiny-gpt2", BuiltinSpec(), seed=42)


@pytest.fixture(scope="module")
def other_tokenizer_lm() -> Path:
    """A causal LM whose tokenizer differs from the builtin default's (512 tokens instead of 1024)."""
    from rlhf_cli.models import materialize_builtin
    from rlhf_cli.recipe import BuiltinSpec

    return materialize_builtin("builtin:tiny-gpt2", BuiltinSpec(vocab_size=512), seed=42)


def recipe(tmp_path: Path, stage: str, body: dict) -> Path:
    """An eval/generate recipe next to a copy of the tiny data (paths in `body` are relative to it)."""
    shutil.copytree(TINY / "data", tmp_path / "data", dirs_exist_ok=True)
    path = tmp_path / f"{stage}.yaml"
    path.write_text(json.dumps({"stage": stage, **body}))  # JSON is YAML
    return path


PROMPTS = {"path": "data/prompts.jsonl"}


def test_missing_policy_path(tmp_path):
    out = tmp_path / "out"
    path = recipe(tmp_path, "eval", {"model": {"name_or_path": "./no-such-policy"}, "eval": {"prompts": PROMPTS}})
    assert_clean_failure(["eval", str(path), "-o", str(out)], "model.name_or_path: './no-such-policy' does not exist",
                         out=out)


def test_policy_directory_without_a_model(tmp_path):
    out, empty = tmp_path / "out", tmp_path / "empty-model"
    empty.mkdir()
    path = recipe(tmp_path, "eval", {"model": {"name_or_path": str(empty)}, "eval": {"prompts": PROMPTS}})
    assert_clean_failure(["eval", str(path), "-o", str(out)], "Cannot load the tokenizer from", str(empty), out=out)


def test_missing_reward_model(tmp_path):
    out = tmp_path / "out"
    path = recipe(tmp_path, "eval", {"eval": {"reward_model": "../runs/no-rm",
                                              "preferences": {"path": "data/heldout-preference.jsonl"}}})
    assert_clean_failure(["eval", str(path), "-o", str(out)], "eval.reward_model: '../runs/no-rm' does not exist",
                         out=out)


def test_reward_model_that_is_a_causal_lm(tmp_path, causal_lm):
    out = tmp_path / "out"
    path = recipe(tmp_path, "eval", {"eval": {"reward_model": str(causal_lm),
                                              "preferences": {"path": "data/heldout-preference.jsonl"}}})
    assert_clean_failure(["eval", str(path), "-o", str(out)], "eval.reward_model", "is a GPT2LMHeadModel",
                         "must be a reward model", out=out)


def test_prompt_file_of_the_wrong_shape(tmp_path, causal_lm):
    out = tmp_path / "out"
    (tmp_path / "texts.jsonl").write_text('{"text": "just some text"}\n')
    path = recipe(tmp_path, "eval", {"model": {"name_or_path": str(causal_lm)},
                                     "eval": {"prompts": {"path": "texts.jsonl"}}})
    assert_clean_failure(["eval", str(path), "-o", str(out)], "eval.prompts", "cannot tell the format from columns "
                         "[text]", "a prompt dataset needs prompt", out=out)
    generate = recipe(tmp_path, "generate", {"model": {"name_or_path": str(causal_lm)},
                                             "generate": {"prompts": {"path": "texts.jsonl"}}})
    assert_clean_failure(["generate", str(generate), "-o", str(out)], "generate.prompts", "cannot tell the format",
                         out=out)


def test_preference_file_given_as_prompts_format_mismatch(tmp_path, causal_lm):
    out = tmp_path / "out"
    path = recipe(tmp_path, "eval", {"model": {"name_or_path": str(causal_lm)},
                                     "eval": {"prompts": {"path": "data/sft.jsonl", "format": "messages"}}})
    assert_clean_failure(["eval", str(path), "-o", str(out)], "eval.prompts", "format 'messages' does not fit",
                         out=out)


def test_mismatched_tokenizers_of_policy_and_reference(tmp_path, causal_lm, other_tokenizer_lm):
    out = tmp_path / "out"
    path = recipe(tmp_path, "eval", {"model": {"name_or_path": str(causal_lm)},
                                     "eval": {"reference": str(other_tokenizer_lm), "prompts": PROMPTS}})
    assert_clean_failure(["eval", str(path), "-o", str(out)], "eval.reference", "uses a different tokenizer from "
                         "the policy", "same token ids", out=out)


def test_judge_function_that_cannot_be_imported(tmp_path, causal_lm):
    out = tmp_path / "out"
    path = recipe(tmp_path, "eval", {"model": {"name_or_path": str(causal_lm)},
                                     "eval": {"prompts": PROMPTS, "judge": {"function": "no_such_module:judge"}}})
    assert_clean_failure(["eval", str(path), "-o", str(out)], "eval.judge.function 'no_such_module:judge' cannot "
                         "be imported", out=out)


def test_ppo_run_without_metrics(tmp_path, causal_lm):
    out = tmp_path / "out"
    path = recipe(tmp_path, "eval", {"eval": {"ppo_run": str(causal_lm)}})
    assert_clean_failure(["eval", str(path), "-o", str(out)], "eval.ppo_run", "holds no metrics.jsonl", out=out)


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        ({"eval": {"num_prompts": 4}}, ["nothing to evaluate"]),
        ({"eval": {"preferences": {"path": "data/heldout-preference.jsonl"}}}, ["set reward_model"]),
        ({"eval": {"prompts": PROMPTS}}, ["eval.prompts is for evaluating a policy", "model.name_or_path"]),
        ({"eval": {"ppo_run": "."}, "training": {"learning_rate": 1e-4}}, ["eval stage trains nothing",
                                                                           "no `training:` section"]),
        ({"eval": {"ppo_run": "."}, "data": {"train": PROMPTS}}, ["reads no `data:` section", "eval.prompts"]),
        ({"eval": {"ppo_run": ".", "temperature": -1}}, ["eval.temperature", "greater than or equal to 0"]),
        ({"eval": {"ppo_run": ".", "top_p": 0}}, ["eval.top_p"]),
        ({"eval": {"ppo_run": ".", "promts": PROMPTS}}, ["eval.promts: unknown key", "Did you mean 'prompts'?"]),
        ({"eval": {"ppo_run": "."}, "distributed": {"strategy": "ddp"}}, ["runs in one process"]),
        ({}, ["eval: required key is missing"]),
    ],
)
def test_eval_recipe_errors(tmp_path, body, fragments):
    out = tmp_path / "out"
    assert_clean_failure(["eval", str(recipe(tmp_path, "eval", body)), "-o", str(out)], *fragments, out=out)


def test_generate_recipe_errors(tmp_path):
    out = tmp_path / "out"
    path = recipe(tmp_path, "generate", {"generate": {"prompts": PROMPTS}})
    assert_clean_failure(["generate", str(path), "-o", str(out)], "model: required key is missing", out=out)
    path = recipe(tmp_path, "generate", {"model": {"name_or_path": "builtin:tiny-gpt2"}, "generate": {}})
    assert_clean_failure(["generate", str(path), "-o", str(out)], "generate.prompts: required key is missing", out=out)


def test_stage_and_command_must_agree(tmp_path):
    assert_clean_failure(["sft", str(TINY / "eval.yaml")], "says `stage: eval`; run it with `rlhf eval`")
    assert_clean_failure(["eval", str(TINY / "sft.yaml")], "says `stage: sft`; run it with `rlhf sft`")
    path = recipe(tmp_path, "sft", {"model": {"name_or_path": "builtin:tiny-gpt2"}, "data": {"train": PROMPTS},
                                    "eval": {"prompts": PROMPTS}})
    assert_clean_failure(["sft", str(path)], "has an `eval:` section", "rlhf eval")


def test_output_directory_not_empty(tmp_path, causal_lm):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    path = recipe(tmp_path, "generate", {"model": {"name_or_path": str(causal_lm)}, "generate": {"prompts": PROMPTS}})
    assert_clean_failure(["generate", str(path), "-o", str(out)], "is not empty", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
