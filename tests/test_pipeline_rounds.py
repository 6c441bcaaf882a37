"""`rlhf pipeline` rounds: `rounds: N` with a stages.label section. Round wiring, the accumulated preference data
and its round tags, hashes across rounds, skips and --from/--only per round (training stubbed), refusals (exit 2
before anything trains), and the tiny iterative recipe end to end."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY, assert_clean_failure, at_a_terminal
from rlhf_cli.demo import graded_answer
from rlhf_cli.errors import UserError
from rlhf_cli.pipeline import (PipelineStage, accumulate_preferences, check_human_labellers, round_counts, route_line,
                               stage_hashes, tag_rounds, upstream, validate_pipeline)  # fmt: skip

ITERATIVE = str(TINY / "iterative.yaml")


def _absolute_data_paths(node):
    if isinstance(node, dict):
        return {key: (str(TINY / value) if key == "path" and isinstance(value, str) else _absolute_data_paths(value))
                for key, value in node.items()}  # fmt: skip
    return node


BASE = yaml.safe_load(Path(ITERATIVE).read_text())
SECTIONS = _absolute_data_paths(BASE["stages"])
SEED_PAIRS = len((TINY / "data" / "preference.jsonl").read_text().splitlines())


def write_rounds(tmp_path: Path, names=("sft", "label", "rm", "ppo", "eval"), changes=None, rounds=2,
                 file="pipeline.yaml", **top) -> str:  # fmt: skip
    stages = {name: copy.deepcopy(SECTIONS[name]) for name in names if name in SECTIONS}
    if "dpo" in names:
        stages["dpo"] = {"data": copy.deepcopy(SECTIONS["rm"]["data"]),
                         "training": {"num_train_epochs": 1, "per_device_train_batch_size": 16}}  # fmt: skip
    for name, section in (changes or {}).items():
        stages.setdefault(name, {}).update(section)
    recipe = {"model": {"name_or_path": "builtin:tiny-gpt2"}, "seed": 42, "output_dir": str(tmp_path / "out"),
              **({"rounds": rounds} if rounds is not None else {}), **top, "stages": stages}  # fmt: skip
    path = tmp_path / file
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(path)


def wired(tmp_path, **kwargs) -> tuple[Path, dict[str, PipelineStage]]:
    out, stages = validate_pipeline(write_rounds(tmp_path, **kwargs))
    return out, {stage.name: stage for stage in stages}


# ---------------------------------------------------------------- wiring (validated recipes, nothing trains)


def test_round_wiring_of_the_ppo_route(tmp_path):
    out, stages = wired(tmp_path)
    assert list(stages) == ["sft", *(f"round-{k}.{kind}" for k in (1, 2) for kind in ("label", "rm", "ppo", "eval"))]
    assert route_line(list(stages.values())) == "sft -> 2 rounds of (label -> rm -> ppo -> eval)"
    data = {k: str(out / f"round-{k}" / "data" / "preferences.jsonl") for k in (1, 2)}
    for k, policy_before in ((1, out / "sft"), (2, out / "round-1" / "ppo")):
        label, rm, ppo, evaluation = (stages[f"round-{k}.{kind}"] for kind in ("label", "rm", "ppo", "eval"))
        assert label.run_dir == out / f"round-{k}" / "label"
        assert label.recipe.model.name_or_path == str(policy_before)  # the round samples from its policy
        assert label.recipe.seed == 42 + k - 1 and label.made_data == data[k]
        assert rm.recipe.model.name_or_path == str(out / "sft")  # retrained from SFT (the default)
        assert rm.recipe.data.train.path == data[k]
        assert ppo.recipe.model.name_or_path == str(policy_before)
        assert ppo.recipe.ppo.ref_model == str(out / "sft")  # the KL reference stays the SFT policy
        assert ppo.recipe.ppo.reward.model == str(out / f"round-{k}" / "rm")
        assert evaluation.recipe.model.name_or_path == str(out / f"round-{k}" / "ppo")
        assert (evaluation.recipe.eval.reference, evaluation.recipe.eval.reward_model, evaluation.recipe.eval.ppo_run) \
            == (str(out / "sft"), str(out / f"round-{k}" / "rm"), str(out / f"round-{k}" / "ppo"))
    assert stages["round-1.label"].base_data[0].path == str(TINY / "data" / "preference.jsonl")
    assert stages["round-2.label"].base_data == []
    assert {name: upstream(stage, out) for name, stage in stages.items()} == {
        "sft": [],
        "round-1.label": ["sft"], "round-1.rm": ["sft", "round-1.label"], "round-1.ppo": ["sft", "round-1.rm"],
        "round-1.eval": ["sft", "round-1.rm", "round-1.ppo"],
        "round-2.label": ["round-1.label", "round-1.ppo"], "round-2.rm": ["sft", "round-2.label"],
        "round-2.ppo": ["sft", "round-1.ppo", "round-2.rm"], "round-2.eval": ["sft", "round-2.rm", "round-2.ppo"],
    }  # fmt: skip


def test_rounds_settings_reference_previous_and_continue_the_reward_model(tmp_path):
    out, stages = wired(tmp_path, rounds={"count": 2, "reference": "previous", "reward_model": "continue"})
    assert stages["round-1.ppo"].recipe.ppo.ref_model == str(out / "sft")
    assert stages["round-2.ppo"].recipe.ppo.ref_model == str(out / "round-1" / "ppo")
    assert stages["round-1.rm"].recipe.model.name_or_path == str(out / "sft")
    assert stages["round-2.rm"].recipe.model.name_or_path == str(out / "round-1" / "rm")


def test_round_wiring_of_the_dpo_route(tmp_path):
    out, stages = wired(tmp_path, names=("sft", "label", "dpo", "eval"),
                        changes={"eval": {"eval": {**SECTIONS["eval"]["eval"]}}})  # fmt: skip
    assert list(stages) == ["sft", "round-1.label", "round-1.dpo", "round-1.eval", "round-2.label", "round-2.dpo",
                            "round-2.eval"]  # fmt: skip
    dpo = stages["round-2.dpo"].recipe
    assert dpo.model.name_or_path == str(out / "round-1" / "dpo") and dpo.dpo.ref_model == str(out / "sft")
    assert dpo.data.train.path == str(out / "round-2" / "data" / "preferences.jsonl")
    assert stages["round-2.label"].recipe.model.name_or_path == str(out / "round-1" / "dpo")
    assert stages["round-2.eval"].recipe.eval.reward_model is None


# ---------------------------------------------------------------- the accumulated data


def test_tag_rounds_keeps_earlier_rows_and_tags_the_new_pairs():
    earlier = [{"prompt": "p", "chosen": "a", "rejected": "b", "round": 0}] * 3
    new = [{"prompt": "q", "chosen": "c", "rejected": "d", "labeller": "rule", "item_id": "p1"}] * 2
    rows = tag_rounds(earlier, new, 1)
    assert rows[:3] == earlier and rows[3:] == [{"prompt": "q", "chosen": "c", "rejected": "d", "round": 1}] * 2
    assert round_counts(tag_rounds(rows, new[:1], 2)) == {"0": 3, "1": 2, "2": 1}
    conversation = [{"prompt": [{"role": "user", "content": "q"}], "chosen": [], "rejected": []}]
    with pytest.raises(UserError, match="holds text but the labelled pairs are conversations"):
        tag_rounds(earlier, conversation, 1)


def _labelled(stage: PipelineStage, rows: list[dict]) -> None:
    stage.run_dir.mkdir(parents=True)
    (stage.run_dir / "preferences.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_accumulate_preferences_across_rounds(tmp_path):
    out, stages = wired(tmp_path)
    pair = {"prompt": [{"role": "user", "content": "What is 1 plus 1?"}],
            "chosen": [{"role": "assistant", "content": "2"}], "rejected": [{"role": "assistant", "content": "3"}],
            "labeller": "rule"}  # fmt: skip
    first, second = stages["round-1.label"], stages["round-2.label"]
    _labelled(first, [pair] * 5)
    assert accumulate_preferences(first, out) == {"rows": SEED_PAIRS + 5, "rows per round": {"0": SEED_PAIRS, "1": 5}}
    _labelled(second, [pair] * 3)
    assert accumulate_preferences(second, out) == {"rows": SEED_PAIRS + 8,
                                                   "rows per round": {"0": SEED_PAIRS, "1": 5, "2": 3}}  # fmt: skip
    rows = [json.loads(line) for line in Path(second.made_data).read_text().splitlines()]
    assert [row["round"] for row in rows] == [0] * SEED_PAIRS + [1] * 5 + [2] * 3
    assert rows[-1] == {"prompt": pair["prompt"], "chosen": pair["chosen"], "rejected": pair["rejected"], "round": 2}
    assert json.loads((out / "round-2" / "data" / "summary.json").read_text())["rows"] == SEED_PAIRS + 8


# ---------------------------------------------------------------- hashes across rounds


def test_hashes_across_rounds(tmp_path):
    def hashes(**kwargs):
        out, stages = validate_pipeline(write_rounds(tmp_path, **kwargs))
        return out, stage_hashes(stages, out)

    out, before = hashes()
    assert len(set(before.values())) == len(before)
    Path(out / "round-1" / "data").mkdir(parents=True)  # the accumulated data a run writes is not hashed itself
    (out / "round-1" / "data" / "preferences.jsonl").write_text('{"prompt": "x"}\n')
    assert hashes()[1] == before
    _, three = hashes(rounds=3)  # one more round: the first two are unchanged
    assert {name: three[name] for name in before} == before and "round-3.eval" in three
    label = {"label": {"label": {**SECTIONS["label"]["label"], "num_prompts": 8}}}
    _, changed = hashes(changes=label)
    assert [name for name in before if changed[name] == before[name]] == ["sft"]  # every round reads round 1's data
    _, changed = hashes(changes={"ppo": {**SECTIONS["ppo"], "training": {**SECTIONS["ppo"]["training"], "steps": 4}}})
    assert [name for name in before if changed[name] == before[name]] == ["sft", "round-1.label", "round-1.rm"]
    seed = tmp_path / "seed.jsonl"
    seed.write_text("".join((TINY / "data" / "preference.jsonl").read_text().splitlines(True)[:-1]))
    seeded = {"rm": {**SECTIONS["rm"], "data": {**SECTIONS["rm"]["data"], "train": {"path": str(seed)}}}}
    _, changed = hashes(changes=seeded)
    assert [name for name in before if changed[name] == before[name]] == ["sft"]  # the seed data starts round 1


def test_skips_from_and_only_per_round(tmp_path, monkeypatch):
    """Which stages run, with the training replaced by writing each stage's finished marker."""
    import rlhf_cli.pipeline as pipeline

    ran: list[str] = []

    def fake_run_one(stage, **options):
        stage.run_dir.mkdir(parents=True, exist_ok=True)
        (stage.run_dir / ("eval.json" if stage.kind == "eval" else "summary.json")).write_text("{}")
        if stage.kind == "label":
            Path(stage.made_data).parent.mkdir(parents=True, exist_ok=True)
            Path(stage.made_data).write_text("{}\n")
        ran.append(stage.name)
        return 0

    monkeypatch.setattr(pipeline, "run_one", fake_run_one)

    def run(recipe, **flags) -> list[str]:
        ran.clear()
        assert pipeline.run_pipeline(recipe, **flags) == 0
        return list(ran)

    recipe = write_rounds(tmp_path)
    everything = ["sft", *(f"round-{k}.{kind}" for k in (1, 2) for kind in ("label", "rm", "ppo", "eval"))]
    assert run(recipe) == everything and run(recipe) == []
    assert run(recipe, from_stage="round-2") == everything[5:]
    assert run(recipe, from_stage="round-2.rm") == ["round-2.rm", "round-2.ppo", "round-2.eval"]
    assert run(recipe, from_stage="round-1.eval") == ["round-1.eval"]  # nothing reads an eval
    assert run(recipe, only="round-1.ppo") == ["round-1.ppo"]
    assert run(recipe) == []  # --only re-makes one stage; what reads it is re-run with --from
    assert run(recipe, overrides=["stages.ppo.training.steps=4"]) == [
        "round-1.ppo", "round-1.eval", "round-2.label", "round-2.rm", "round-2.ppo", "round-2.eval"]  # fmt: skip
    assert run(recipe, overrides=["stages.ppo.training.steps=4", "rounds=3"]) == [
        "round-3.label", "round-3.rm", "round-3.ppo", "round-3.eval"]  # fmt: skip
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [row["stage"] for row in summary][-4:] == ["round-3.label", "round-3.rm", "round-3.ppo", "round-3.eval"]


# ---------------------------------------------------------------- refusals: exit 2 before anything trains


@pytest.mark.parametrize("kwargs, fragments", [
    ({"names": ("sft", "rm", "ppo", "eval")}, ["rounds: 2 needs a labeller", "add a stages.label section"]),
    ({"rounds": None}, ["stages.label labels each round's samples; it needs `rounds: N`"]),
    ({"rounds": 0}, ["rounds must be a whole number >= 1"]),
    ({"rounds": {"count": 2, "reference": "base"}}, ["rounds.reference is 'base'; choose sft or previous"]),
    ({"rounds": {"count": 2, "every": 1}}, ["unknown key(s) rounds.every"]),
    ({"names": ("sft", "label", "ppo", "eval"),
      "changes": {"ppo": {**SECTIONS["ppo"], "ppo": {"reward": {"function": "rlhf_cli.demo:correct_answer"}}},
                  "eval": {"eval": {**SECTIONS["eval"]["eval"], "preferences": None}}}},
     ["a round needs a stage that learns from pairs", "not PPO with a rule reward and no rm stage"]),
    ({"changes": {"label": {"label": {**SECTIONS["label"]["label"], "format": "kto"}}}},
     ["stages.label: label.format kto writes unpaired rows"]),
    ({"changes": {"label": {"label": {"prompts": SECTIONS["label"]["label"]["prompts"]}}}},
     ["Stage round-1.label", "mode label needs a labeller"]),
])  # fmt: skip
def test_bad_rounds_are_one_paragraph_and_exit_2(tmp_path, kwargs, fragments):
    recipe = write_rounds(tmp_path, **kwargs)
    for command in (["pipeline", recipe], ["recipe", "validate", recipe]):
        flat = assert_clean_failure(command, *fragments, out=tmp_path / "out")
        assert flat.count("Error:") == 1


def test_a_human_labeller_without_a_terminal_is_refused_before_anything_trains(tmp_path):
    human = {"label": {"label": {**SECTIONS["label"]["label"], "labeller": {"type": "human"}}}}
    recipe = write_rounds(tmp_path, changes=human)
    assert_clean_failure(["pipeline", recipe, "--annotator", "ana"], "Stage round-1.label: the labeller is human",
                         "stdin is not a terminal", "use a judge, reward_model or rule labeller",
                         out=tmp_path / "out")  # fmt: skip
    _, stages = validate_pipeline(recipe)

    class Terminal:
        def isatty(self):
            return True

    with pytest.raises(UserError, match="pass --annotator NAME"):
        check_human_labellers(stages, None, Terminal())
    check_human_labellers(stages, "ana", Terminal())  # a person at a terminal: the pipeline may start


def test_from_takes_round_names(tmp_path):
    recipe = write_rounds(tmp_path)
    assert_clean_failure(["pipeline", recipe, "--from", "rm"], "--from rm: this pipeline's stages are sft, "
                         "round-1.label, round-1.rm", "(round-K for a round's first stage)", out=tmp_path / "out")
    assert_clean_failure(["pipeline", recipe, "--only", "round-3"], "--only round-3", out=tmp_path / "out")
    assert_clean_failure(["pipeline", recipe, "--only", "round-2.rm"], "Stage sft has not finished")


# ---------------------------------------------------------------- the tiny iterative recipe end to end

RLHF = [sys.executable, "-m", "rlhf_cli.cli"]


def run_iterative(out: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([*RLHF, "pipeline", ITERATIVE, "-o", str(out)], capture_output=True, text=True, cwd=REPO,
                            timeout=1200)  # fmt: skip
    assert result.returncode == 0, f"pipeline failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
@pytest.mark.extended
def test_tiny_iterative_recipe_end_to_end_then_skipped(tmp_path):
    out = tmp_path / "run"
    result = run_iterative(out)
    assert "sft -> 2 rounds of (label -> rm -> ppo -> eval)" in result.stdout
    rows = json.loads((out / "summary.json").read_text())
    names = ["sft", *(f"round-{k}.{kind}" for k in (1, 2) for kind in ("label", "rm", "ppo", "eval"))]
    assert [(row["stage"], row["this run"]) for row in rows] == [(name, "ran") for name in names]
    assert (out / "sft" / "model.safetensors").is_file()
    counts = {}
    for k in (1, 2):
        round_dir = out / f"round-{k}"
        for path in ("label/preferences.jsonl", "label/label_report.json", "data/preferences.jsonl",
                     "rm/model.safetensors", "rm/summary.json", "ppo/model.safetensors", "ppo/summary.json",
                     "eval/eval.json", "eval/report.md"):  # fmt: skip
            assert (round_dir / path).is_file(), f"round-{k}/{path}"
        counts[k] = json.loads((round_dir / "data" / "summary.json").read_text())["rows per round"]
        pairs = [json.loads(line) for line in (round_dir / "label" / "preferences.jsonl").read_text().splitlines()]
        assert counts[k][str(k)] == len(pairs) >= 10  # the graded rule orders most of the 32 prompts' candidates
        report = json.loads((round_dir / "label" / "label_report.json").read_text())
        assert report["rule"]["pairs decided"] == len(pairs) and report["labeller"] == "rule"
        for pair in pairs:  # each pair prefers the better answer under the rule
            chosen, rejected = graded_answer([pair["prompt"]] * 2, [pair["chosen"][-1]["content"],
                                                                    pair["rejected"][-1]["content"]])  # fmt: skip
            assert chosen > rejected, pair
        assert yaml.safe_load((round_dir / "rm" / "recipe.yaml").read_text())["data"]["train"]["path"] == \
            str(round_dir / "data" / "preferences.jsonl")
    assert counts[1]["0"] == SEED_PAIRS and {key: n for key, n in counts[2].items() if key != "2"} == counts[1]
    assert yaml.safe_load((out / "round-2" / "ppo" / "recipe.yaml").read_text())["model"]["name_or_path"] == \
        str(out / "round-1" / "ppo")
    assert "accumulated" in rows[1]["key metrics"] and "win-rate vs reference" in rows[-1]["key metrics"]
    state = json.loads((out / "pipeline.json").read_text())
    assert list(state) == names and all(entry["status"] == "done" for entry in state.values())

    run_iterative(out)
    assert {row["this run"] for row in json.loads((out / "summary.json").read_text())} == {"skipped (unchanged)"}
    assert json.loads((out / "pipeline.json").read_text()) == state


# ---------------------------------------------------------------- small rounds end to end (each well under 2 min)


def tiny_changes(names=("sft", "label", "rm", "ppo", "eval"), labeller=None, prompts=4, responses=2) -> dict:
    """Stage sections cut down so that a round trains in seconds: 32 demonstrations, 2 PPO steps, 8 eval prompts."""
    def data(name, limit):
        return {**copy.deepcopy(SECTIONS[name]["data"]),
                "train": {**SECTIONS[name]["data"]["train"], "limit": limit}}  # fmt: skip

    label = {**copy.deepcopy(SECTIONS["label"]["label"]), "num_prompts": prompts, "num_responses": responses,
             "max_new_tokens": 8, **({"labeller": labeller} if labeller else {})}  # fmt: skip
    changes = {
        "sft": {"data": data("sft", 32), "training": {**SECTIONS["sft"]["training"], "num_train_epochs": 1}},
        "label": {"label": label},
        "rm": {"data": data("rm", 32), "training": {**SECTIONS["rm"]["training"], "num_train_epochs": 1}},
        "ppo": {"training": {**SECTIONS["ppo"]["training"], "steps": 2, "rollout_batch_size": 8, "mini_batch_size": 8,
                             "sample_every": 2, "save_steps": 2}},  # fmt: skip
        "dpo": {"data": data("rm", 32), "training": {"num_train_epochs": 1, "per_device_train_batch_size": 16}},
        "eval": {"eval": {**SECTIONS["eval"]["eval"], "prompts": {**SECTIONS["eval"]["eval"]["prompts"], "limit": 8},
                          "preferences": {**SECTIONS["eval"]["eval"]["preferences"], "limit": 16},
                          "max_new_tokens": 8}},  # fmt: skip
    }
    return {name: section for name, section in changes.items() if name in names}


def run_pipeline(recipe: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([*RLHF, "pipeline", recipe, *args], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, f"pipeline failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
@pytest.mark.extended
def test_a_human_labeller_pauses_the_round_at_a_terminal_and_the_same_command_goes_on(tmp_path):
    names = ("sft", "label", "rm", "ppo")  # no eval: the round goes on once it is labelled, that is all we check
    recipe = write_rounds(tmp_path, names=names, rounds=1,
                          changes=tiny_changes(names, labeller={"type": "human"}, prompts=3))  # fmt: skip
    out = tmp_path / "out"
    command = [*RLHF, "pipeline", recipe, "--annotator", "ana"]
    code, screen = at_a_terminal(command, [b"1\n", b"q\n"])
    assert code == 0, screen[-3000:]  # a pause is not a failure
    assert "[1/3] answer>" in screen and "[2/3] answer>" in screen
    assert "paused (2 questions open)" in screen and "Pipeline paused at round-1.label" in screen
    state = json.loads((out / "pipeline.json").read_text())
    assert state["sft"]["status"] == "done" and state["round-1.label"]["status"] == "started"
    assert list(state) == ["sft", "round-1.label"] and not (out / "round-1" / "data").exists()

    code, screen = at_a_terminal(command, [b"2\n", b"t\n"])
    assert code == 0, screen[-3000:]
    assert "answer>" in screen and "paused" not in screen
    state = json.loads((out / "pipeline.json").read_text())
    assert list(state) == ["sft", "round-1.label", "round-1.rm", "round-1.ppo"]
    assert all(entry["status"] == "done" for entry in state.values())
    rows = {row["stage"]: row["this run"] for row in json.loads((out / "summary.json").read_text())}
    assert rows == {"sft": "skipped (unchanged)", "round-1.label": "resumed", "round-1.rm": "ran", "round-1.ppo": "ran"}
    assert (out / "round-1" / "ppo" / "model.safetensors").is_file()
    answers = [json.loads(line) for line in (out / "round-1" / "label" / "answers.jsonl").read_text().splitlines()]
    assert len({row["item_id"] for row in answers[1:]}) == len(answers) - 1 == 3  # each once, across both sessions
    counts = json.loads((out / "round-1" / "data" / "summary.json").read_text())["rows per round"]
    assert counts == {"0": 32, "1": 2}  # the rm stage's 32 seed rows (data.train.limit); the tie is left out


@pytest.mark.slow
@pytest.mark.extended
def test_rounds_that_continue_the_reward_model_end_to_end(tmp_path):
    names = ("sft", "label", "rm", "ppo")
    recipe = write_rounds(tmp_path, names=names, rounds={"count": 2, "reward_model": "continue"},
                          changes=tiny_changes(names))  # fmt: skip
    out = tmp_path / "out"
    assert "sft -> 2 rounds of (label -> rm -> ppo)" in run_pipeline(recipe).stdout
    state = json.loads((out / "pipeline.json").read_text())
    assert list(state) == ["sft", *(f"round-{k}.{kind}" for k in (1, 2) for kind in ("label", "rm", "ppo"))]
    assert all(entry["status"] == "done" for entry in state.values())

    def recipe_of(stage):
        return yaml.safe_load((out / stage / "recipe.yaml").read_text())

    assert recipe_of("round-1/rm")["model"]["name_or_path"] == str(out / "sft")
    assert recipe_of("round-2/rm")["model"]["name_or_path"] == str(out / "round-1" / "rm")  # continued
    assert recipe_of("round-2/rm")["data"]["train"]["path"] == str(out / "round-2" / "data" / "preferences.jsonl")
    assert recipe_of("round-2/ppo")["ppo"]["reward"]["model"] == str(out / "round-2" / "rm")
    assert (out / "round-2" / "rm" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.extended
def test_rounds_on_the_dpo_route_end_to_end(tmp_path):
    names = ("sft", "label", "dpo")
    recipe = write_rounds(tmp_path, names=names, changes=tiny_changes(names))
    out = tmp_path / "out"
    assert "sft -> 2 rounds of (label -> dpo)" in run_pipeline(recipe).stdout
    state = json.loads((out / "pipeline.json").read_text())
    assert list(state) == ["sft", *(f"round-{k}.{kind}" for k in (1, 2) for kind in ("label", "dpo"))]
    assert all(entry["status"] == "done" for entry in state.values())
    for k, policy_before in ((1, out / "sft"), (2, out / "round-1" / "dpo")):
        label = yaml.safe_load((out / f"round-{k}" / "label" / "recipe.yaml").read_text())
        dpo = yaml.safe_load((out / f"round-{k}" / "dpo" / "recipe.yaml").read_text())
        assert label["model"]["name_or_path"] == str(policy_before)  # the round samples from its policy
        assert dpo["model"]["name_or_path"] == str(policy_before) and dpo["dpo"]["ref_model"] == str(out / "sft")
        assert dpo["data"]["train"]["path"] == str(out / f"round-{k}" / "data" / "preferences.jsonl")
        assert (out / f"round-{k}" / "dpo" / "model.safetensors").is_file()
        counts = json.loads((out / f"round-{k}" / "data" / "summary.json").read_text())["rows per round"]
        labelled = len((out / f"round-{k}" / "label" / "preferences.jsonl").read_text().splitlines())
        assert counts["0"] == 32 and counts.get(str(k), 0) == labelled  # the dpo stage's seed rows, then the round's
    run_pipeline(recipe)  # finished rounds are skipped
    assert {row["this run"] for row in json.loads((out / "summary.json").read_text())} == {"skipped (unchanged)"}


def test_the_graded_rule_puts_a_right_answer_first_then_a_near_miss_then_manners():
    from rlhf_cli.demo import build_demo_rows, correct_answer

    question = "What is the capital of Peru?"
    answers = ["Sure! The capital of Peru is Lima. I hope that helps.", "The capital of Peru is Lima. Whatever.",
               "Sure! The capital of Peru is Oslo. I hope that helps.", "The capital of Peru is Oslo.",
               "Happy to help.", "Figure it out yourself."]  # fmt: skip
    scores = graded_answer([question] * len(answers), answers)
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)
    assert min(scores[:2]) > max(scores[2:])  # every right answer beats every wrong one, as under correct_answer
    assert graded_answer(["What sound does a cow make?"] * 2, ["A cow moos.", "A cow barks."]) == [1.1, 0.4]
    rows = build_demo_rows(0)["preference"]
    for row in rows:  # the demo's seed pairs (polite and correct over rude, wrong or bare) agree with it
        chosen, rejected = graded_answer([row["prompt"]] * 2, [row["chosen"][0]["content"],
                                                              row["rejected"][0]["content"]])  # fmt: skip
        assert chosen > rejected
    prompts = [row["prompt"] for row in rows for _ in (0, 1)]
    texts = [row[side][0]["content"] for row in rows for side in ("chosen", "rejected")]
    right = correct_answer(prompts, texts)
    graded = graded_answer(prompts, texts)
    assert all((g >= 0.8) == (r == 1.0) for g, r in zip(graded, right))


def test_a_dry_run_of_the_iterative_recipe_plans_every_round_and_writes_nothing(tmp_path):
    from typer.testing import CliRunner

    from rlhf_cli.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["pipeline", ITERATIVE, "--dry-run", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "round-1/data/preferences.jsonl does not exist yet" in " ".join(result.output.split())
    assert str(out / "round-2" / "eval") in result.output and "Dry run: nothing was started or written." in result.output
    assert not out.exists()
