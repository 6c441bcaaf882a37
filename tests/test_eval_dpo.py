"""`rlhf eval` on DPO policies: the implicit reward beta * log(pi/pi_ref) on held-out pairs, and several policies
(eval.compare) in one report.

The fast tests need no trained model: the beta/cut plan reads recipe.yaml files written here, the log-prob check
uses the builtin tiny GPT-2, and bad recipes fail before any model loads. The slow ones evaluate a real (short)
`rlhf dpo` run trained from the builtin model, which is then its reference.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import REPO, TINY, assert_clean_failure
from rlhf_cli.cli import app

PAIRS = {"path": "data/heldout-preference.jsonl"}
PROMPTS = {"path": "data/prompts.jsonl"}


def recipe(tmp_path: Path, body: dict, name: str = "eval.yaml") -> Path:
    """An eval recipe next to a copy of the tiny data (paths in `body` are relative to it)."""
    shutil.copytree(TINY / "data", tmp_path / "data", dirs_exist_ok=True)
    path = tmp_path / name
    path.write_text(json.dumps({"stage": "eval", **body}))  # JSON is YAML
    return path


def run_directory(path: Path, resolved: dict) -> Path:
    """A directory holding only a resolved recipe.yaml, as a training run writes one next to its model."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "recipe.yaml").write_text(yaml.safe_dump(resolved))
    return path


def dpo_recipe(algorithm: str = "dpo", beta: float | None = None, max_length: int = 64) -> dict:
    training = {"loss_type": "sigmoid"} if beta is None else {"beta": beta, "loss_type": "sigmoid"}
    return {"stage": "dpo", "model": {"name_or_path": "/runs/sft"}, "data": {"max_length": max_length},
            "dpo": {"algorithm": algorithm, "ref_model": None}, "training": training}  # fmt: skip


# ---------------------------------------------------------------- beta and cut: from each policy's recipe.yaml


def plan(policies: dict[str, Path | str], **spec):
    from rlhf_cli.recipe import DataSource, EvalSpec
    from rlhf_cli.stages.evaluate import Policy, plan_implicit_rewards

    spec = EvalSpec(preferences=DataSource(path="pairs.jsonl"), reference="/runs/sft", **spec)
    entries = [Policy(name, str(path), f"eval.compare.{name}") for name, path in policies.items()]
    plan_implicit_rewards(entries, spec)
    return {entry.name: entry.implicit for entry in entries}


def test_beta_and_cut_come_from_the_dpo_recipe_else_are_assumed(tmp_path, capsys):
    runs = {
        "dpo": run_directory(tmp_path / "dpo", dpo_recipe(beta=0.25, max_length=48)),
        "dpo_default": run_directory(tmp_path / "dpo-default", dpo_recipe()),
        "simpo": run_directory(tmp_path / "simpo", dpo_recipe("simpo", beta=2.0)),
        "orpo": run_directory(tmp_path / "orpo", dpo_recipe("orpo")),
        "sft": run_directory(tmp_path / "sft", {"stage": "sft", "training": {"beta": 5.0}}),
        "bare": tmp_path / "no-recipe",
    }
    plans = plan(runs)
    assert (plans["dpo"].beta, plans["dpo"].max_length) == (0.25, 48)
    assert plans["dpo"].beta_source == f"training.beta of {tmp_path / 'dpo' / 'recipe.yaml'}"
    assert plans["dpo"].length_source == "data.max_length of its DPO recipe"
    assert plans["dpo_default"].beta == 0.1 and "TRL's DPOConfig default" in plans["dpo_default"].beta_source
    assert plans["simpo"] is None and plans["orpo"] is None  # reference-free: no implicit reward against pi_ref
    for name in ("sft", "bare"):  # not DPO runs: 0.1, assumed (an sft recipe's training keys are not DPO's)
        assert plans[name].beta == 0.1 and plans[name].beta_source.startswith("assumed")
        assert plans[name].max_length == 512  # eval.max_length's default
    err = " ".join(capsys.readouterr().err.split())
    assert "simpo, which is reference-free" in err and "orpo, which is reference-free" in err
    assert f"eval.compare.sft ({tmp_path / 'sft'}) is not a DPO run" in err and "beta = 0.1, assumed" in err
    assert "trained by DPO against /runs/sft" not in err  # the DPO runs' reference is eval.reference


def test_eval_beta_and_max_length_override_and_a_reward_model_limits_it_to_dpo_policies(tmp_path, capsys):
    runs = {"dpo": run_directory(tmp_path / "dpo", dpo_recipe(beta=0.25, max_length=48)),
            "sft": run_directory(tmp_path / "sft", {"stage": "sft"})}  # fmt: skip
    plans = plan(runs, beta=0.5, max_length=40)
    assert (plans["dpo"].beta, plans["dpo"].beta_source, plans["dpo"].max_length) == (0.5, "eval.beta", 40)
    assert (plans["sft"].beta, plans["sft"].max_length) == (0.5, 40)
    assert "was trained on pairs cut to 48 tokens" in " ".join(capsys.readouterr().err.split())
    # With a reward model the pairs are its; only DPO policies are also measured by their implicit reward.
    plans = plan(runs, reward_model="/runs/rm")
    assert plans["dpo"].beta == 0.25 and plans["sft"] is None
    # ... unless eval.beta asks for every policy.
    assert plan(runs, reward_model="/runs/rm", beta=0.1)["sft"] is not None


def test_a_dpo_policy_trained_against_another_reference_is_noted(tmp_path, capsys):
    other = dpo_recipe()
    other["dpo"]["ref_model"] = "/runs/other-sft"
    plan({"dpo": run_directory(tmp_path / "dpo", other)})
    err = " ".join(capsys.readouterr().err.split())
    assert "was trained by DPO against /runs/other-sft" in err and "against eval.reference (/runs/sft)" in err


# ---------------------------------------------------------------- the log-probabilities of cut pairs


def test_pair_log_probs_are_those_of_an_unpadded_forward_on_pairs_cut_as_in_training():
    """Batched, left-padded scoring of (prompt's end, response's start) equals the plain forward of each sequence."""
    import torch

    from rlhf_cli.data import load_data
    from rlhf_cli.lengths import encode_pair, windows
    from rlhf_cli.recipe import DataSource, ModelSpec
    from rlhf_cli.inference import load_causal_lm, sequence_logprobs
    from rlhf_cli.stages.evaluate import pair_tokens

    model, tokenizer = load_causal_lm(ModelSpec(name_or_path="builtin:tiny-gpt2"), 42, "model", conversational=True)
    pairs = load_data(DataSource(path=str(TINY / "data" / "heldout-preference.jsonl"), limit=5), "preference")
    encodings = [encode_pair(tokenizer, row) for row in pairs]
    for max_length in (64, 16):
        tokens = pair_tokens(encodings, max_length)
        assert tokens.cut == [encoded.length > max_length for encoded in encodings]
        for i, encoded in enumerate(encodings):  # the tokens kept are training's windows, the prompt cut once
            for side, (start, stop) in enumerate(windows([len(s) for s in encoded.sequences], encoded.boundary,
                                                         max_length)):  # fmt: skip
                query, response = tokens.queries[2 * i + side], tokens.responses[2 * i + side]
                assert query + response == encoded.sequences[side][start:stop]
                assert len(query) == encoded.boundary - start
        batched = sequence_logprobs(model, tokens.queries, tokens.responses, tokenizer.pad_token_id, batch_size=3)
        for query, response, value in zip(tokens.queries, tokens.responses, batched):
            ids = torch.tensor([query + response])
            with torch.no_grad():
                logps = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            expected = logps.gather(1, ids[0, 1:, None])[-len(response):].sum().item()
            assert value == pytest.approx(expected, abs=1e-4)
    assert any(tokens.cut)  # 16 tokens cut some of them


# ---------------------------------------------------------------- the report of several policies


def test_report_of_several_policies_round_trips_and_shows_only_the_parts_that_ran(tmp_path):
    from rlhf_cli.evaluation.metrics import diversity_metrics, implicit_reward_metrics, summarize, win_rate
    from rlhf_cli.evaluation.report import write_report

    implicit = implicit_reward_metrics([-10.0, -8.0], [-20.0, -9.0], [-9.0, -6.0], [-15.0, -10.0], 0.1)
    implicit.update(beta_source="eval.beta", max_length=64, max_length_source="eval.max_length", pairs_cut=0)
    policies = {
        "ppo": {"path": "runs/ppo", "prompts": 2, "judge_score": summarize([1.0, 0.0]),
                "judge_win_rate": win_rate([1.0, 0.0], [0.0, 0.0]), "diversity": diversity_metrics([[1, 2], [3]], 3)},
        "dpo": {"path": "runs/dpo", "prompts": 2, "judge_score": summarize([1.0, 1.0]),
                "judge_win_rate": win_rate([1.0, 1.0], [0.0, 0.0]), "diversity": diversity_metrics([[1], [3]], 3),
                "implicit_reward": implicit},
    }  # fmt: skip
    results = {"meta": {"policy": "runs/ppo"}, "warnings": ["likelihood displacement: on 2 held-out pairs ..."],
               "policies": policies,
               "head_to_head": [{"a": "ppo", "b": "dpo", "scorer": "judge", **win_rate([1.0, 0.0], [1.0, 1.0])}]}
    write_report(tmp_path, results, [])
    assert json.loads((tmp_path / "eval.json").read_text()) == results
    report = (tmp_path / "report.md").read_text()
    assert report.index("## Warnings") < report.index("## Implicit reward") < report.index("## Policies compared")
    # log-ratios: chosen -1, -2; rejected -5, +1 -> rewards (beta 0.1) -0.1 vs -0.5 (win), -0.2 vs 0.1 (loss)
    assert "| dpo | 2 | 0.100 | 0.500 | 0 (0.000) | 0.500 | 0.050 | -0.150 | -0.200 |" in report
    assert "| dpo | chosen | -9.000 | -7.500 | -1.500 |" in report
    # no reward model, no reference KL, no perplexity ran: those columns are left out
    assert ("| policy | judge mean | judge win rate [95% CI] | mean length | EOS rate | distinct-2 | implicit-reward "
            "accuracy |") in report
    assert "| ppo | 0.500 | 0.750 [" in report and "| n/a |" in report  # ppo has no implicit reward
    assert "| ppo | dpo | judge | 0.250 | " in report  # a tie and a loss: 0.5 / 2


# ---------------------------------------------------------------- bad inputs: exit 2, one paragraph, nothing written


BUILTIN = {"name_or_path": "builtin:tiny-gpt2"}


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        ({"model": BUILTIN, "eval": {"prompts": PROMPTS, "compare": {"b": "./no-such-policy"}}},
         ["eval.compare.b: './no-such-policy' does not exist"]),
        ({"model": BUILTIN, "eval": {"prompts": PROMPTS, "name": "dpo", "compare": {"dpo": "builtin"}}},
         ["compare.dpo has the name of the policy `model:` (eval.name = 'dpo')"]),
        ({"model": BUILTIN, "eval": {"prompts": PROMPTS, "compare": {"policy": "builtin"}}},
         ["compare.policy has the name of the policy"]),
        ({"model": BUILTIN, "eval": {"prompts": PROMPTS, "compare": {"reference": "builtin"}}},
         ["compare.reference: 'reference' names eval.reference"]),
        ({"model": BUILTIN, "eval": {"preferences": PAIRS, "reference": "builtin", "beta": 0}},
         ["eval.beta", "greater than 0"]),
        ({"model": BUILTIN, "eval": {"preferences": PAIRS, "reference": "builtin", "beta": -0.1}},
         ["eval.beta", "greater than 0"]),
        ({"model": BUILTIN, "eval": {"preferences": PAIRS}}, ["set reward_model or reference"]),
        ({"eval": {"preferences": PAIRS, "reference": "builtin"}}, ["names no policy", "model.name_or_path"]),
        ({"eval": {"ppo_run": ".", "compare": {"b": "builtin"}}},
         ["compare evaluates every policy on prompts, demonstrations or (with a reference) preferences"]),
    ],
)
def test_bad_dpo_eval_recipes(tmp_path, body, fragments):
    out = tmp_path / "out"
    assert_clean_failure(["eval", str(recipe(tmp_path, body)), "-o", str(out)], *fragments, out=out)


def test_no_policy_with_an_implicit_reward_and_no_reward_model(tmp_path):
    """Reference-free policies only, and no reward model: the pairs would score nothing. Said before any model loads."""
    orpo = run_directory(tmp_path / "orpo", dpo_recipe("orpo"))
    simpo = run_directory(tmp_path / "simpo", dpo_recipe("simpo"))
    out = tmp_path / "out"
    path = recipe(tmp_path, {"model": {"name_or_path": str(orpo)},
                             "eval": {"preferences": PAIRS, "reference": str(orpo), "compare": {"s": str(simpo)}}})
    assert_clean_failure(["eval", str(path), "-o", str(out)], "no policy here has one", "orpo and simpo policies are "
                         "reference-free", "Set eval.reward_model", out=out)


def test_compared_policy_with_another_tokenizer(tmp_path):
    from rlhf_cli.models import materialize_builtin
    from rlhf_cli.recipe import BuiltinSpec

    other = materialize_builtin("builtin:tiny-gpt2", BuiltinSpec(vocab_size=512), seed=42)
    out = tmp_path / "out"
    path = recipe(tmp_path, {"model": BUILTIN, "eval": {"prompts": PROMPTS, "compare": {"small": str(other)}}})
    assert_clean_failure(["eval", str(path), "-o", str(out)], f"eval.compare.small ({other}) uses a different "
                         "tokenizer from the policy", out=out)


# ---------------------------------------------------------------- end to end on a real tiny DPO run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A short `rlhf dpo` run from the builtin tiny GPT-2, whose materialized weights are its reference ("base")."""
    from rlhf_cli.models import materialize_builtin
    from rlhf_cli.recipe import BuiltinSpec

    dpo = tmp_path_factory.mktemp("dpo-runs") / "dpo"
    args = ["dpo", str(TINY / "dpo.yaml"), "-o", str(dpo), "--set", "model.name_or_path=builtin:tiny-gpt2",
            "--set", "training.max_steps=6", "--set", "training.per_device_train_batch_size=8"]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "rlhf_cli.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return {"dpo": dpo, "base": materialize_builtin("builtin:tiny-gpt2", BuiltinSpec(), seed=42)}


def evaluate(tmp_path: Path, body: dict, name: str) -> tuple[dict, str, Path]:
    out = tmp_path / name
    result = CliRunner().invoke(app, ["eval", str(recipe(tmp_path, body, f"{name}.yaml")), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads((out / "eval.json").read_text()), " ".join(result.output.split()), out


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_dpo_policy_compared_with_its_twin_and_its_reference(runs, tmp_path):
    """model: the DPO run; compare: the same run again ("twin") and its starting weights ("start", = the reference).
    Every policy answers the same prompts with the same seeds, so the twin matches the policy answer for answer and
    the start matches the reference."""
    dpo, base = str(runs["dpo"]), str(runs["base"])
    results, output, out = evaluate(tmp_path, {"model": {"name_or_path": dpo}, "eval": {
        "reference": base, "compare": {"twin": dpo, "start": base}, "preferences": {**PAIRS, "limit": 32},
        "judge": {"function": "rlhf_cli.demo:correct_answer"}, "prompts": PROMPTS, "num_prompts": 8,
        "max_new_tokens": 8, "batch_size": 8}}, "compare")  # fmt: skip

    # the single-policy sections describe `model:` as before; the comparison is added beside them
    assert {"meta", "implicit_reward", "policy", "diversity", "judge", "policies", "head_to_head"} <= set(results)
    assert set(results["diversity"]) == {"policy", "reference"} and results["judge"]["win_rate"]["n"] == 8
    implicit = results["implicit_reward"]
    assert implicit["num_pairs"] == 32 and implicit["accuracy"] > 0.5 and implicit["mean_margin"] > 0
    assert implicit["beta"] == 0.1 and implicit["beta_source"] == f"training.beta of {dpo}/recipe.yaml"
    assert (implicit["max_length"], implicit["pairs_cut"]) == (64, 0)  # data.max_length of recipes/tiny/dpo.yaml
    assert ("warnings" in results) == implicit["likelihood_displacement"]

    policies = results["policies"]
    assert list(policies) == ["policy", "twin", "start"]
    for name, entry in policies.items():
        assert {"path", "prompts", "judge_score", "judge_win_rate", "kl", "diversity", "implicit_reward"} <= set(entry)
        assert entry["prompts"] == entry["judge_score"]["count"] == 8
    assert policies["policy"]["implicit_reward"] == implicit and policies["policy"]["kl"] == results["policy"]["kl"]
    assert policies["twin"]["diversity"] == policies["policy"]["diversity"]
    assert policies["twin"]["implicit_reward"]["accuracy"] == implicit["accuracy"]
    start = policies["start"]  # the reference itself: every log-ratio 0, every pair a tie
    assert start["implicit_reward"]["ties"] == 32 and start["implicit_reward"]["accuracy"] == 0.5
    assert start["implicit_reward"]["mean_margin"] == 0 and not start["implicit_reward"]["likelihood_displacement"]
    assert start["implicit_reward"]["beta_source"].startswith("assumed")
    assert start["kl"]["kl"] == pytest.approx(0.0, abs=1e-6) and start["diversity"] == results["diversity"]["reference"]

    pairs = [(h["a"], h["b"], h["scorer"]) for h in results["head_to_head"]]
    assert pairs == [("policy", "twin", "judge"), ("policy", "start", "judge"), ("twin", "start", "judge")]
    twin = results["head_to_head"][0]
    assert (twin["win_rate"], twin["ties"], twin["n"]) == (0.5, 8, 8) and twin["ci_low"] < 0.5 < twin["ci_high"]

    samples = lines(out / "samples.jsonl")
    assert len(samples) == 8
    for row in samples:  # same prompts, same seeds
        assert row["compare"]["twin"]["response"] == row["policy_response"]
        assert row["compare"]["start"]["response"] == row["reference_response"]
        assert row["compare"]["start"]["log_ratio"] == pytest.approx(0.0, abs=1e-5)
    rows = lines(out / "implicit_rewards.jsonl")
    assert [row["policy"] for row in rows] == ["policy"] * 32 + ["twin"] * 32 + ["start"] * 32
    mine = [row for row in rows if row["policy"] == "policy"]
    assert [row["pair"] for row in mine] == list(range(1, 33))
    assert sum(row["chosen_reward"] for row in mine) / 32 == pytest.approx(implicit["chosen_reward"])
    assert sum(row["chosen_logp_policy"] for row in mine) / 32 == pytest.approx(implicit["logps"]["policy"]["chosen"])
    assert all(row["chosen_reward"] == pytest.approx(0.1 * (row["chosen_logp_policy"] - row["chosen_logp_reference"]))
               for row in mine)  # fmt: skip

    report = (out / "report.md").read_text()
    for heading in ("## Implicit reward on preference pairs", "### Log-probabilities of the held-out responses",
                    "## Policies compared", "### Head to head"):  # fmt: skip
        assert heading in report, heading
    assert "| policy | twin | judge | 0.500 |" in report
    assert "implicit reward on pairs" in output and "policy vs twin (judge)" in output
    assert f"eval.compare.start ({base}) is not a DPO run" in output  # its beta is assumed, and said so


@pytest.mark.slow
def test_likelihood_displacement_is_warned_in_eval_json_report_and_stderr(runs, tmp_path):
    """The same pairs scored with policy and reference swapped: every log-ratio changes sign, so exactly one of the
    two directions has its chosen responses less likely than under its reference — and that one must warn."""
    dpo, base = str(runs["dpo"]), str(runs["base"])
    body = {"eval": {"preferences": {**PAIRS, "limit": 32}, "batch_size": 16}}
    forward, forward_output, forward_dir = evaluate(tmp_path, {"model": {"name_or_path": dpo},
                                                               "eval": {**body["eval"], "reference": base}}, "fwd")
    backward, backward_output, backward_dir = evaluate(tmp_path, {"model": {"name_or_path": base},
                                                                  "eval": {**body["eval"], "reference": dpo}}, "bwd")
    for results in (forward, backward):  # one policy, pairs only: no comparison sections
        assert set(results) - {"warnings"} == {"meta", "implicit_reward"}
    change = forward["implicit_reward"]["logps"]["change"]["chosen"]
    assert backward["implicit_reward"]["logps"]["change"]["chosen"] == pytest.approx(-change, abs=1e-4)
    assert change != 0
    forward_rows, backward_rows = (lines(out / "implicit_rewards.jsonl") for out in (forward_dir, backward_dir))
    for row, reverse in zip(forward_rows, backward_rows, strict=True):
        assert reverse["margin"] == pytest.approx(-row["margin"], abs=1e-5)
    assert backward["implicit_reward"]["accuracy"] == pytest.approx(1 - forward["implicit_reward"]["accuracy"])

    displaced, output, out = ((forward, forward_output, forward_dir) if change < 0
                              else (backward, backward_output, backward_dir))  # fmt: skip
    calm = backward if change < 0 else forward
    assert displaced["implicit_reward"]["likelihood_displacement"] and "warnings" not in calm
    assert len(displaced["warnings"]) == 1 and displaced["warnings"][0].startswith("likelihood displacement")
    assert "Warning: likelihood displacement" in output and "LESS likely under the policy" in output
    assert "## Warnings" in (out / "report.md").read_text()
