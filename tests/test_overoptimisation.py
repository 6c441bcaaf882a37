"""The over-optimisation curve: the pure functions against hand-computed values, PPO policy snapshots at the
interval (and at the end) from a short real run, `rlhf eval` with eval.curve on those snapshots, and bad inputs.

The PPO run is a module fixture: the builtin tiny GPT-2 (random weights) against a rule reward, a few steps. The
proxy reward model is the same builtin body with a fresh one-logit head: a real sequence classifier, not a good
one; the gold is a rule whose value the test recomputes from the responses written to curve_samples.jsonl.
"""

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import TINY, assert_clean_failure
from rlhf_cli.cli import app
from rlhf_cli.evaluation.metrics import curve_point, gold_peak

# ---------------------------------------------------------------- pure functions


def test_curve_point_by_hand():
    # d = (-1 - -2, -2 - -2, -3 - -5) = (1, 0, 2): KL = 1, sqrt = 1, stderr = std(d, ddof=1) / sqrt(3) = 1 / sqrt(3)
    point = curve_point(5, [1.0, 2.0, 3.0], [0.0, 1.0, 1.0], [-1.0, -2.0, -3.0], [-2.0, -2.0, -5.0])
    assert point["step"] == 5 and point["n"] == 3
    assert point["kl"] == pytest.approx(1.0) and point["sqrt_kl"] == pytest.approx(1.0)
    assert point["kl_stderr"] == pytest.approx(1 / math.sqrt(3))
    assert point["proxy_mean"] == pytest.approx(2.0) and point["gold_mean"] == pytest.approx(2 / 3)
    # KL 2.25 -> sqrt 1.5; a negative sampled KL is drawn at sqrt 0
    assert curve_point(1, [0, 0], [0, 0], [0.0, 0.0], [-2.0, -2.5])["sqrt_kl"] == pytest.approx(1.5)
    negative = curve_point(0, [0.0, 1.0], [1.0, 1.0], [-1.0, -1.0], [-0.5, -0.5])
    assert negative["kl"] == pytest.approx(-0.5) and negative["sqrt_kl"] == 0.0


def test_curve_point_needs_the_same_responses():
    with pytest.raises(ValueError, match="paired"):
        curve_point(0, [1.0, 2.0], [1.0], [0.0, 0.0], [0.0, 0.0])
    with pytest.raises(ValueError, match="same responses"):
        curve_point(0, [1.0, 2.0], [1.0, 0.0], [0.0], [0.0])


def _points(golds):
    return [{"step": 10 * k, "sqrt_kl": 0.5 * k, "gold_mean": gold} for k, gold in enumerate(golds)]


def test_gold_peak_inverted_u():
    peak = gold_peak(_points([0.2, 0.5, 0.4, 0.3]))
    assert peak["gold_peak"] == {"step": 10, "sqrt_kl": 0.5, "gold_mean": 0.5}
    assert peak["gold_peaks_before_end"] is True and peak["gold_drop_after_peak"] == pytest.approx(0.2)


def test_gold_peak_still_rising_and_ties():
    rising = gold_peak(_points([0.1, 0.2, 0.3]))
    assert rising["gold_peak"]["step"] == 20 and rising["gold_peaks_before_end"] is False
    assert rising["gold_drop_after_peak"] == 0.0
    plateau = gold_peak(_points([0.3, 0.5, 0.5]))  # the earliest of equal peaks; no fall after it
    assert plateau["gold_peak"]["step"] == 10 and plateau["gold_peaks_before_end"] is False
    with pytest.raises(ValueError):
        gold_peak([])


def test_list_snapshots_every_nth_and_the_last(tmp_path):
    from rlhf_cli.errors import UserError
    from rlhf_cli.stages.evaluate import list_snapshots

    for step in (5, 10, 15, 20, 25):
        (tmp_path / "snapshots" / f"step-{step}").mkdir(parents=True)
        (tmp_path / "snapshots" / f"step-{step}" / "config.json").write_text("{}")
    (tmp_path / "snapshots" / "step-30.partial").mkdir()  # an unfinished one is not a snapshot
    assert [step for step, _ in list_snapshots(str(tmp_path), 1)] == [5, 10, 15, 20, 25]
    assert [step for step, _ in list_snapshots(str(tmp_path), 2)] == [5, 15, 25]
    assert [step for step, _ in list_snapshots(str(tmp_path), 3)] == [5, 20, 25]
    with pytest.raises(UserError, match="snapshot_steps"):
        list_snapshots(str(tmp_path / "snapshots"), 1)


# ---------------------------------------------------------------- a short real run


def invoke(*args) -> str:
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """A 4-step PPO run snapshotting every 3 steps (so step-3 by the interval and step-4 at the end), and a proxy
    reward model on the same tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_cli.models import materialize_builtin
    from rlhf_cli.recipe import BuiltinSpec

    root = tmp_path_factory.mktemp("overoptimisation")
    base = materialize_builtin("builtin:tiny-gpt2", BuiltinSpec(), seed=42)
    proxy = root / "proxy"
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(proxy)
    tokenizer.save_pretrained(proxy)
    ppo = root / "ppo"
    invoke("ppo", TINY / "ppo.yaml", "-o", ppo, "--set", f"model.name_or_path={base}",
           "--set", "ppo.reward={function: 'rules:starts_with_sure'}", "--set", "training.steps=4",
           "--set", "training.rollout_batch_size=4", "--set", "training.mini_batch_size=4",
           "--set", "training.ppo_epochs=1", "--set", "training.response_length=6", "--set", "data.max_length=16",
           "--set", "training.sample_every=0", "--set", "training.save_steps=100",
           "--set", "training.snapshot_steps=3", "--set", "training.learning_rate=0.01")  # fmt: skip
    return {"base": base, "proxy": proxy, "ppo": ppo}


@pytest.mark.slow
def test_snapshots_at_the_interval_and_at_the_end(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    snapshots = run["ppo"] / "snapshots"
    assert sorted(path.name for path in snapshots.iterdir()) == ["step-3", "step-4"]
    final = AutoModelForCausalLM.from_pretrained(run["ppo"])
    last = AutoModelForCausalLM.from_pretrained(snapshots / "step-4")
    earlier = AutoModelForCausalLM.from_pretrained(snapshots / "step-3")
    AutoTokenizer.from_pretrained(snapshots / "step-3")  # a directory every command loads
    final_state, last_state = final.state_dict(), last.state_dict()
    assert all((final_state[key] == last_state[key]).all() for key in final_state)  # the end = the final policy
    assert any((earlier.state_dict()[key] != last_state[key]).any() for key in last_state)  # step 4 trained on


def curve_recipe(tmp_path: Path, runs: dict, **curve) -> Path:
    recipe = tmp_path / "curve.yaml"
    recipe.write_text(json.dumps({
        "stage": "eval", "model": {"name_or_path": str(runs["ppo"])},
        "eval": {"reference": str(runs["base"]), "reward_model": str(runs["proxy"]),
                 "prompts": {"path": str(TINY / "data" / "prompts.jsonl")}, "num_prompts": 6,
                 "max_new_tokens": 6, "temperature": 1.0, "batch_size": 8, "max_length": 32,
                 "curve": {"run": str(runs["ppo"]), "gold": {"function": "rules:starts_with_sure"}, **curve}},
        "seed": 3}), encoding="utf-8")  # fmt: skip
    return recipe


@pytest.mark.slow
def test_eval_curve_on_the_snapshots(run, tmp_path):
    from rlhf_cli.evaluation.metrics import sampled_kl

    out = tmp_path / "eval"
    output = invoke("eval", curve_recipe(tmp_path, run), "-o", out)
    assert "over-optimisation (gold)" in output
    section = json.loads((out / "eval.json").read_text())["overoptimisation"]
    points = section["points"]
    assert [point["step"] for point in points] == [0, 3, 4]
    for point in points:
        assert set(point) == {"step", "kl", "kl_stderr", "sqrt_kl", "proxy_mean", "gold_mean", "n"}
        assert point["n"] == 6 and point["sqrt_kl"] == pytest.approx(math.sqrt(max(point["kl"], 0.0)))
    assert points[0]["kl"] == 0.0  # the reference against itself
    assert set(section["gold_peak"]) == {"step", "sqrt_kl", "gold_mean"}
    assert isinstance(section["gold_peaks_before_end"], bool)
    assert section["gold"] == "rules:starts_with_sure" and section["proxy"] == str(run["proxy"])

    # Gold and proxy are means over the SAME responses: the gold rule recomputed on the written responses, the
    # proxy's and the KL's per-response values averaged, give each point's figures.
    rows = [json.loads(line) for line in (out / "curve_samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6 * 3
    for point in points:
        mine = [row for row in rows if row["step"] == point["step"]]
        gold = [1.0 if row["response"].strip().startswith("Sure") else 0.0 for row in mine]
        assert [row["gold"] for row in mine] == gold
        assert point["gold_mean"] == pytest.approx(sum(gold) / len(gold))
        assert point["proxy_mean"] == pytest.approx(sum(row["proxy"] for row in mine) / len(mine))
        ratios = [row["log_ratio"] for row in mine]
        assert point["kl"] == pytest.approx(sampled_kl(ratios, [0.0] * len(ratios))["kl"])
    # step 4 is the final policy, evaluated as `model:` on the same prompts and seeds: the same responses
    policy_rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [row["policy_response"] for row in policy_rows] == [row["response"] for row in rows if row["step"] == 4]

    assert (out / "overoptimisation_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "## Over-optimisation curve" in report and "overoptimisation_curve.png" in report


@pytest.mark.slow
@pytest.mark.extended
def test_eval_curve_every_second_snapshot_keeps_the_last(run, tmp_path):
    from rlhf_cli.stages.evaluate import list_snapshots

    assert [step for step, _ in list_snapshots(str(run["ppo"]), 2)] == [3, 4]
    assert [step for step, _ in list_snapshots(str(run["ppo"]), 5)] == [3, 4]


# ---------------------------------------------------------------- bad inputs: exit 2, one paragraph, nothing written


def test_curve_needs_prompts_reference_and_proxy(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(json.dumps({"stage": "eval", "model": {"name_or_path": "builtin:tiny-gpt2"}, "eval": {
        "prompts": {"path": str(TINY / "data" / "prompts.jsonl")},
        "curve": {"run": str(tmp_path), "gold": {"function": "rlhf_cli.demo:correct_answer"}}}}))  # fmt: skip
    assert_clean_failure(["eval", str(recipe), "-o", str(tmp_path / "out")], "curve needs reference, reward_model",
                         out=tmp_path / "out")  # fmt: skip


def test_curve_needs_a_run_and_a_gold(tmp_path):
    recipe = tmp_path / "bad.yaml"
    eval_spec = {"reference": "x", "reward_model": "y", "prompts": {"path": str(TINY / "data" / "prompts.jsonl")},
                 "curve": {"gold": {"function": "rlhf_cli.demo:correct_answer"}}}  # fmt: skip
    recipe.write_text(json.dumps({"stage": "eval", "model": {"name_or_path": "builtin:tiny-gpt2"}, "eval": eval_spec}))
    assert_clean_failure(["eval", str(recipe)], "curve needs a PPO run")
    eval_spec["curve"] = {"run": str(tmp_path)}
    recipe.write_text(json.dumps({"stage": "eval", "model": {"name_or_path": "builtin:tiny-gpt2"}, "eval": eval_spec}))
    assert_clean_failure(["eval", str(recipe)], "curve.gold")


@pytest.mark.slow
def test_curve_on_a_run_without_snapshots(run, tmp_path):
    out = tmp_path / "out"
    empty = tmp_path / "no-snapshots"
    empty.mkdir()
    recipe = curve_recipe(tmp_path, run, run=str(empty))
    assert_clean_failure(["eval", str(recipe), "-o", str(out)], "holds no policy snapshots",
                         "training.snapshot_steps", out=out)  # fmt: skip


@pytest.mark.slow
def test_curve_gold_rule_that_cannot_be_imported(run, tmp_path):
    out = tmp_path / "out"
    recipe = curve_recipe(tmp_path, run, gold={"function": "no_such_module:gold"})
    assert_clean_failure(["eval", str(recipe), "-o", str(out)], "eval.curve.gold.function", out=out)


def test_snapshot_steps_must_be_positive(tmp_path):
    assert_clean_failure(["ppo", str(TINY / "ppo.yaml"), "--set", "model.name_or_path=builtin:tiny-gpt2",
                          "--set", "ppo.reward={function: 'rules:starts_with_sure'}",
                          "--set", "training.snapshot_steps=0"], "snapshot_steps")  # fmt: skip


def test_demo_rule_pairs_are_labelled_by_the_gold_rule():
    from rlhf_cli.demo import build_rule_pairs, correct_answer

    pairs = build_rule_pairs()
    assert len(pairs) > 100
    prompts = [pair["prompt"] for pair in pairs]
    assert correct_answer(prompts, [pair["chosen"][0]["content"] for pair in pairs]) == [1.0] * len(pairs)
    assert correct_answer(prompts, [pair["rejected"][0]["content"] for pair in pairs]) == [0.0] * len(pairs)
    shipped = (TINY / "overoptimisation-pairs.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in shipped] == pairs  # the file the proxy's recipe reads
