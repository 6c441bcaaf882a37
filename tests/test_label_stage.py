"""`rlhf label` end to end on the tiny task: the reward-model, rule, judge, human and revise labellers through the
CLI, their outputs trained on by `rlhf train-rm` and `rlhf dpo` as they are, a scripted human killed half way and
resumed, and bad inputs (exit 2, one paragraph, nothing written)."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, RLHF, TINY, assert_clean_failure, rlhf



def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    runs = tmp_path_factory.mktemp("runs")
    rlhf("sft", str(TINY / "sft.yaml"), "-o", str(runs / "sft"), "--set", "training.num_train_epochs=2")
    rlhf("train-rm", str(TINY / "rm.yaml"), "-o", str(runs / "rm"), "--set", "training.num_train_epochs=2")
    return {"sft": runs / "sft", "rm": runs / "rm"}


@pytest.mark.slow
def test_reward_model_labels_train_a_reward_model_and_dpo_as_they_are(tiny, tmp_path):
    out = tmp_path / "labels"
    rlhf("label", str(TINY / "label-rm.yaml"), "-o", str(out), "--set", f"model.name_or_path={tiny['sft']}",
         "--set", f"label.labeller.models=[{tiny['rm']}]", "--set", "label.num_prompts=16")
    candidates = read_jsonl(out / "candidates.jsonl")
    assert candidates[0]["items"] == 16 and all(len(row["candidates"]) == 4 for row in candidates[1:])
    rows = read_jsonl(out / "preferences.jsonl")
    report = json.loads((out / "label_report.json").read_text())
    # 16 prompts x 4 candidates ranked = 16 x 6 pairs, each decided, a tie (score gap < 0.1) or identical
    assert report["labels"] == 16 * 6 and len(rows) == report["outcomes"].get("a", 0) + report["outcomes"].get("b", 0)
    assert rows and {"prompt", "chosen", "rejected", "labeller", "confidence", "annotator", "source_policy"} <= set(rows[0])
    assert all(row["labeller"] == "reward_model" and 0.5 <= row["confidence"] <= 1 for row in rows)
    assert 0 <= report["longer response won (share of decided pairs)"] <= 1
    # the file is train-rm and dpo data with no conversion step
    rlhf("train-rm", str(TINY / "rm.yaml"), "-o", str(tmp_path / "rm2"), "--set", f"data.train.path={out / 'preferences.jsonl'}",
         "--set", "training.max_steps=2", "--set", "data.eval_split=0")
    rlhf("dpo", str(TINY / "dpo.yaml"), "-o", str(tmp_path / "dpo2"), "--set", f"model.name_or_path={tiny['sft']}",
         "--set", f"data.train.path={out / 'preferences.jsonl'}", "--set", "training.max_steps=2",
         "--set", "data.eval_split=0")
    assert json.loads((tmp_path / "dpo2" / "summary.json").read_text())["rows kept"] == len(rows)


def test_rule_labels_of_a_candidates_file_as_kto_rows(tmp_path):
    data = tmp_path / "cands.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in [
        {"question": "What is 2 plus 2?", "outputs": ["2 plus 2 is 4.", "2 plus 2 is 5.", "2 plus 2 is 4. Enjoy!"]},
        {"question": "What is 1 plus 1?", "outputs": ["1 plus 1 is 3.", "1 plus 1 is 2."]},
    ]))
    recipe = tmp_path / "label.yaml"
    recipe.write_text(f"""stage: label
label:
  candidates: {{path: {data}, columns: {{prompt: question, responses: outputs}}}}
  labeller: {{type: rule, function: "rlhf_cli.demo:correct_answer"}}
  format: kto
output_dir: {tmp_path / 'out'}
""")
    rlhf("label", str(recipe))
    rows = read_jsonl(tmp_path / "out" / "kto.jsonl")
    verdicts = {(row["prompt"], row["completion"]): row["label"] for row in rows}
    # right answers won every pair they were in, wrong ones lost every one; the two right answers tie (equal scores)
    assert verdicts == {("What is 2 plus 2?", "2 plus 2 is 4."): True, ("What is 2 plus 2?", "2 plus 2 is 5."): False,
                        ("What is 2 plus 2?", "2 plus 2 is 4. Enjoy!"): True,
                        ("What is 1 plus 1?", "1 plus 1 is 2."): True, ("What is 1 plus 1?", "1 plus 1 is 3."): False}
    report = json.loads((tmp_path / "out" / "label_report.json").read_text())
    assert report["outcomes"] == {"a": 2, "b": 1, "tie": 1} or sum(report["outcomes"].values()) == 4


@pytest.mark.slow
def test_judge_reports_position_bias_and_revise_writes_sft_rows(tiny, tmp_path):
    out = tmp_path / "judge"
    rlhf("label", str(TINY / "label-judge.yaml"), "-o", str(out), "--set", f"model.name_or_path={tiny['sft']}",
         "--set", f"label.labeller.model={tiny['sft']}", "--set", "label.num_prompts=6")
    judge = json.loads((out / "label_report.json").read_text())["judge"]
    assert judge["pairs judged (both orders)"] == 6
    assert judge["consistent"] + judge["inconsistent"] == 6
    assert 0 <= judge["position-bias rate"] <= 1
    out = tmp_path / "revise"
    rlhf("label", str(TINY / "label-revise.yaml"), "-o", str(out), "--set", f"model.name_or_path={tiny['sft']}",
         "--set", "label.num_prompts=3")
    rows = read_jsonl(out / "revisions.jsonl")
    assert len(rows) == 3 and all({"prompt", "completion", "original", "critique", "principle"} <= set(r) for r in rows)
    assert {row["principle"] for row in rows} <= {"The answer is right.", "The answer is polite."}


@pytest.mark.slow
def test_a_scripted_human_killed_half_way_resumes_with_nothing_lost_or_repeated(tiny, tmp_path):
    out = tmp_path / "human"
    args = [*RLHF, "label", str(TINY / "label-human.yaml"), "-o", str(out), "--annotator", "ana",
            "--set", f"model.name_or_path={tiny['sft']}"]
    process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, cwd=REPO)
    for answer in ("1", "2", "t"):
        process.stdin.write(answer + "\n")
    process.stdin.flush()
    deadline = time.time() + 300
    answers = out / "answers.jsonl"
    while time.time() < deadline:  # three answers on disk, then the session dies without a word
        if answers.exists() and sum('"answer"' in line for line in answers.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert sum('"answer"' in line for line in answers.read_text().splitlines()) == 3
    result = rlhf("label", str(TINY / "label-human.yaml"), "-o", str(out), "--annotator", "ana",
                  "--set", f"model.name_or_path={tiny['sft']}", input="2\n1\n1\n2\n2\n")
    assert "3 of 8 questions answered" in result.stdout  # it knew what was done
    events = [row for row in read_jsonl(answers) if "answer" in row]
    items = [row["item_id"] for row in events]
    assert len(items) == 8 and len(set(items)) == 8  # every item once: nothing lost, nothing asked twice
    first = [row["answer"] for row in events][:3]
    assert first == ["a", "b", "tie"]  # as typed (A, B, tie); which candidate was shown as A is shuffled
    rows = read_jsonl(out / "preferences.jsonl")
    assert len(rows) == 7  # 8 answers, one tie
    assert all(row["annotator"] == "ana" and row["labeller"] == "human" for row in rows)


@pytest.mark.slow
@pytest.mark.extended
def test_two_annotators_share_the_overlap_and_report_agreement(tiny, tmp_path):
    out = tmp_path / "two"
    common = ["-o", str(out), "--set", f"model.name_or_path={tiny['sft']}", "--set", "label.labeller.overlap=1.0",
              "--set", "label.num_prompts=4"]
    rlhf("label", str(TINY / "label-human.yaml"), *common, "--annotator", "ana", input="1\n1\n2\n2\n")
    rlhf("label", str(TINY / "label-human.yaml"), *common, "--annotator", "bo", input="1\n1\n2\n1\n")
    rlhf("label", str(TINY / "label-human.yaml"), *common, "--report")
    agreement = json.loads((out / "label_report.json").read_text())["agreement"]
    # each annotator sees the candidates in their own shuffled order, so "1" is not the same candidate for both:
    # compute the expected agreement from what was recorded
    from rlhf_cli.labelling.records import PairLabel, oriented

    verdicts: dict[str, dict[str, str]] = {}
    for event in read_jsonl(out / "answers.jsonl"):
        if "answer" in event:  # the answer as shown; its label in the candidates' own numbering
            (label,) = [PairLabel(**row) for row in event["labels"]]
            verdicts.setdefault(event["item_id"], {})[event["annotator"]] = oriented(label)
    assert len(verdicts) == 4 and all(len(by) == 2 for by in verdicts.values())
    same = sum(by["ana"] == by["bo"] for by in verdicts.values())
    assert agreement["raw_agreement"]["value"] == pytest.approx(same / 4)
    assert agreement["cohen"] is not None and agreement["cohen"]["pairs"] == 4


# ---------------------------------------------------------------- bad input


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "label.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("label,fragments", [
    ("prompts: {path: PROMPTS}\n  num_responses: 1\n  labeller: {type: rule, function: 'rlhf_cli.demo:correct_answer'}",
     ["num_responses", "greater than or equal to 2"]),
    ("prompts: {path: PROMPTS}\n  labeller: {type: judge}", ["judge labeller needs model"]),
    ("prompts: {path: PROMPTS}\n  labeller: {type: reward_model, function: 'a:b'}", ["function", "not a key of the "
                                                                                       "reward_model labeller"]),
    ("prompts: {path: PROMPTS}\n  candidates: {path: PROMPTS}\n  labeller: {type: human}", ["exactly one of prompts"]),
    ("prompts: {path: PROMPTS}", ["needs a labeller"]),
], ids=["k-below-2", "judge-without-model", "stray-key", "prompts-and-candidates", "no-labeller"])
def test_bad_label_recipes_are_refused(tmp_path, label, fragments):
    recipe = _recipe(tmp_path, f"stage: label\nmodel: {{name_or_path: builtin:tiny-gpt2}}\nlabel:\n  "
                               f"{label.replace('PROMPTS', str(TINY / 'data' / 'prompts.jsonl'))}\n"
                               f"output_dir: {tmp_path / 'out'}\n")
    assert_clean_failure(["label", str(recipe)], *fragments, out=tmp_path / "out")


def test_empty_prompts_empty_constitution_and_missing_annotator(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.md").write_text("# Only a heading\n\n<!-- and a comment -->\n")
    base = f"stage: label\nmodel: {{name_or_path: builtin:tiny-gpt2}}\noutput_dir: {tmp_path / 'out'}\nlabel:\n"
    recipe = _recipe(tmp_path, base + f"  prompts: {{path: {tmp_path / 'empty.jsonl'}}}\n"
                                      "  labeller: {type: rule, function: 'rlhf_cli.demo:correct_answer'}\n")
    assert_clean_failure(["label", str(recipe)], "empty", out=tmp_path / "out")
    recipe = _recipe(tmp_path, base + f"  prompts: {{path: {TINY / 'data' / 'prompts.jsonl'}}}\n  mode: revise\n"
                                      f"  labeller: {{type: judge, constitution: {tmp_path / 'blank.md'}}}\n")
    assert_clean_failure(["label", str(recipe)], "principle", out=tmp_path / "out")
    recipe = _recipe(tmp_path, base + f"  prompts: {{path: {TINY / 'data' / 'prompts.jsonl'}}}\n"
                                      "  labeller: {type: human}\n")
    assert_clean_failure(["label", str(recipe)], "--annotator", out=tmp_path / "out")


def test_a_judge_without_a_chat_template_is_refused(tmp_path):
    from rlhf_cli.models import build_builtin_tokenizer

    judge = tmp_path / "judge"
    tokenizer = build_builtin_tokenizer(512)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(judge)
    (judge / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                                                   "vocab_size": 512, "n_positions": 64, "n_embd": 16,
                                                   "n_layer": 1, "n_head": 2}))
    data = tmp_path / "cands.jsonl"
    data.write_text(json.dumps({"prompt": "What is 1 plus 1?", "responses": ["2", "3"]}) + "\n")
    recipe = _recipe(tmp_path, f"stage: label\noutput_dir: {tmp_path / 'out'}\nlabel:\n"
                               f"  candidates: {{path: {data}}}\n  labeller: {{type: judge, model: {judge}}}\n")
    assert_clean_failure(["label", str(recipe)], "chat template", out=tmp_path / "out")


def test_a_session_of_another_recipe_is_not_mixed_in_unless_appended(tmp_path):
    data = tmp_path / "cands.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {n} plus 1?", "responses": [f"{n + 1}", "0"]}) + "\n"
                            for n in range(1, 4)))
    recipe = _recipe(tmp_path, f"stage: label\noutput_dir: {tmp_path / 'out'}\nlabel:\n  candidates: {{path: {data}}}\n"
                               "  labeller: {type: rule, function: 'rlhf_cli.demo:correct_answer'}\n")
    rlhf("label", str(recipe))
    before = (tmp_path / "out" / "preferences.jsonl").read_text()
    result = rlhf("label", str(recipe), "--set", "label.pairs=best_vs_worst", check=False)
    assert result.returncode == 2 and "different recipe" in result.stderr and "--append" in result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / "out" / "preferences.jsonl").read_text() == before
    rlhf("label", str(recipe))  # the same recipe continues its own session
