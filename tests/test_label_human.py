"""The people side of rlhf label: the fsync'd answers file (store.py) and the session (human.py), driven through a
fake stdin, and a session killed with SIGKILL half way and resumed without losing or repeating an answer."""

import io
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import at_a_terminal
from rich.console import Console

from rlhf_cli.errors import UserError
from rlhf_cli.labelling import store as store_module
from rlhf_cli.labelling.human import parse_ranking, questions, run_session
from rlhf_cli.labelling.records import Item, PairLabel
from rlhf_cli.labelling.store import AnswerStore, fingerprint, load, pair_question

FINGERPRINT = "recipe-fingerprint-1"


def items(n=3, k=2, conversation=False):
    prompt = (lambda i: [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"question {i}"}]) if (
        conversation
    ) else (lambda i: f"question {i}")
    return [Item(f"p{i}", prompt(i), tuple(f"answer {i}.{c}" for c in range(k))) for i in range(n)]


def console():
    return Console(file=io.StringIO(), width=200, color_system=None)


def session(path, answers, *, annotator="ana", fingerprint=FINGERPRINT, the_items=None, **kwargs):
    """Run a session on `path` reading `answers` (lines); returns (result, printed text)."""
    out = kwargs.pop("console", None) or console()
    with AnswerStore.open(path, fingerprint) as store:
        result = run_session(the_items or items(), store, annotator=annotator, console=out,
                             stdin=kwargs.pop("stdin", None) or io.StringIO("".join(a + "\n" for a in answers)),
                             **kwargs)  # fmt: skip
    return result, out.file.getvalue()


def outcomes(path, annotator=None):
    """{(item_id, a, b): outcome} of the live labels."""
    return {(l.item_id, l.a, l.b): l.outcome for l in load(path).labels if annotator in (None, l.annotator)}


# ---- the answers file ------------------------------------------------------------------------------------------


def test_every_event_is_fsynced_as_it_is_written(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(store_module.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    path = tmp_path / "answers.jsonl"
    with AnswerStore.open(path, FINGERPRINT, meta={"recipe": "label.yaml"}) as store:
        assert len(synced) == 1  # the header
        store.answer(item_id="p0", annotator="ana", question=pair_question(0, 1), answer="a",
                     labels=[PairLabel("p0", 0, 1, "a", "human", "ana")])  # fmt: skip
        assert len(synced) == 2
        # Another reader sees it at once, while the writer still holds the file.
        assert outcomes(path) == {("p0", 0, 1): "a"}
        store.undo_last("ana")
        assert len(synced) == 3
        assert load(path).labels == []
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["header"] == "rlhf label answers" and lines[0]["fingerprint"] == FINGERPRINT
    assert lines[0]["recipe"] == "label.yaml"
    assert lines[1]["annotator"] == "ana" and lines[1]["time"] and lines[1]["labels"][0]["outcome"] == "a"
    assert lines[2] == {"event": 2, "undo": 1, "annotator": "ana", "time": lines[2]["time"]}


def test_undo_takes_back_only_the_annotators_own_last_answer(tmp_path):
    path = tmp_path / "answers.jsonl"
    with AnswerStore.open(path, FINGERPRINT) as store:
        for item, who in (("p0", "ana"), ("p1", "ana"), ("p2", "ben")):
            store.answer(item_id=item, annotator=who, question=pair_question(0, 1), answer="b",
                         labels=[PairLabel(item, 0, 1, "b", "human", who)])  # fmt: skip
        assert store.undo_last("ana")["item_id"] == "p1"
        assert store.undo_last("ana")["item_id"] == "p0"
        assert store.undo_last("ana") is None
        assert store.state.undone == 2
    state = load(path)
    assert [l.item_id for l in state.labels] == ["p2"]
    assert state.undone == 2
    assert state.answered("ben") == {("p2", "pair 0 1")} and state.answered("ana") == set()
    # Undos written by hand: by item id (ben's last answer on p2) works; one naming another's answer is ignored, said.
    with path.open("a") as handle:
        handle.write(json.dumps({"event": 9, "undo": 3, "annotator": "ana"}) + "\n")
        handle.write(json.dumps({"event": 10, "undo": "p2", "annotator": "ben"}) + "\n")
    state = load(path)
    assert state.labels == [] and state.undone == 3
    assert any("matches no live answer" in note for note in state.notes)


def test_an_incomplete_last_line_is_dropped_said_and_cut_off_by_the_next_writer(tmp_path):
    path = tmp_path / "answers.jsonl"
    session(path, ["a", "b", "q"])
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"event": 3, "item_id": "p2", "annot')  # the crash hit during a write
    state = load(path)
    assert len(state.labels) == 2 and state.dropped_lines == 1
    assert "incomplete" in state.notes[0]
    with AnswerStore.open(path, FINGERPRINT) as store:
        assert any("Removed the incomplete last line" in note for note in store.state.notes)
        assert path.read_bytes() == whole
    result, _ = session(path, ["t"])
    assert result.answered == 1
    assert outcomes(path) == {("p0", 0, 1): "a", ("p1", 0, 1): "b", ("p2", 0, 1): "tie"}
    assert load(path).dropped_lines == 0
    # A crash while the very first line (the header) was written: the file starts afresh.
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(b'{"event": 0, "header": "rlhf la')
    with AnswerStore.open(cut, FINGERPRINT) as store:
        assert store.state.fingerprints == [FINGERPRINT]
    assert json.loads(cut.read_text())["event"] == 0


def test_a_whole_last_event_missing_only_its_newline_is_kept(tmp_path):
    path = tmp_path / "answers.jsonl"
    session(path, ["a", "b", "q"])
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    assert len(load(path).labels) == 2
    session(path, ["t"])
    assert len(load(path).labels) == 3
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_damage_in_the_middle_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "answers.jsonl"
    session(path, ["a", "b", "q"])
    lines = path.read_text().splitlines()
    lines[1] = "not json"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"Line 2 of .*answers.jsonl is not an answers event"):
        load(path)
    other = tmp_path / "other.jsonl"
    other.write_text('{"prompt": "hello"}\n')
    with pytest.raises(UserError, match="not an rlhf label answers file"):
        AnswerStore.open(other, FINGERPRINT)
    assert other.read_text() == '{"prompt": "hello"}\n'  # not touched
    other.write_text('{"prompt": "hello"}')  # no newline: not mistaken for a header cut short by a crash
    with pytest.raises(UserError, match="not an rlhf label answers file"):
        AnswerStore.open(other, FINGERPRINT)
    assert other.read_text() == '{"prompt": "hello"}'
    with pytest.raises(UserError, match="no answers file"):
        load(tmp_path / "missing.jsonl")


def test_fingerprint_changes_with_what_is_asked():
    base = fingerprint("prompts-sha", [["a", "b"]], {"mode": "pairs"})
    assert base == fingerprint("prompts-sha", [["a", "b"]], {"mode": "pairs"}) and len(base) == 64
    assert base != fingerprint("prompts-sha", [["a", "c"]], {"mode": "pairs"})
    assert base != fingerprint("prompts-sha", [["a", "b"]], {"mode": "rank"})


def test_another_recipes_file_is_refused_unless_appending(tmp_path):
    path = tmp_path / "answers.jsonl"
    session(path, ["a", "q"])
    before = path.read_bytes()
    with pytest.raises(UserError, match="different recipe") as error:
        AnswerStore.open(path, "recipe-fingerprint-2")
    assert "--append" in str(error.value)
    assert path.read_bytes() == before
    with AnswerStore.open(path, "recipe-fingerprint-2", append=True) as store:
        assert store.state.fingerprints == [FINGERPRINT, "recipe-fingerprint-2"]
        assert len(store.state.labels) == 1  # the earlier answers stay and count
    # Either recipe may now go on without --append; going back to the first marks where its answers start again.
    with AnswerStore.open(path, "recipe-fingerprint-2"):
        pass
    with AnswerStore.open(path, FINGERPRINT) as store:
        assert store.state.fingerprints == [FINGERPRINT, "recipe-fingerprint-2", FINGERPRINT]


def test_a_second_writer_is_refused_while_the_first_holds_the_file(tmp_path):
    path = tmp_path / "answers.jsonl"
    first = AnswerStore.open(path, FINGERPRINT)
    try:
        with pytest.raises(UserError, match=r"answers.jsonl is being written by another process"):
            AnswerStore.open(path, FINGERPRINT)
        assert load(path).fingerprints == [FINGERPRINT]  # reading (rlhf label --report) still works
    finally:
        first.close()
    with AnswerStore.open(path, FINGERPRINT):
        pass


# ---- the session over a scripted stdin -------------------------------------------------------------------------


def test_pairs_mode_pick_tie_skip_and_a_log_line_per_item(tmp_path):
    path = tmp_path / "answers.jsonl"
    result, text = session(path, ["1", "B", "t"], the_items=items(4))
    assert (result.answered, result.skipped, result.undone, result.quit_early) == (3, 0, 0, True)
    assert (result.remaining, result.total) == (1, 4)
    assert outcomes(path) == {("p0", 0, 1): "a", ("p1", 0, 1): "b", ("p2", 0, 1): "tie"}
    assert "[1/4] p0 A=candidate 0 B=candidate 1: a" in text
    assert "[3/4] p2 A=candidate 0 B=candidate 1: tie" in text
    assert "stopped with 3 of 4 answered" in text
    result, text = session(path, ["s"], the_items=items(4))
    assert (result.answered, result.skipped, result.quit_early) == (0, 1, False)
    assert "3 of 4 questions answered, 1 to go" in text
    assert outcomes(path)[("p3", 0, 1)] == "skip"
    # A skip is an answer of this annotator: not asked again. Nothing left.
    result, text = session(path, [], the_items=items(4))
    assert (result.total, result.remaining) == (4, 0) and "all 4 questions answered" in text


def test_every_pair_of_k_candidates_is_asked(tmp_path):
    path = tmp_path / "answers.jsonl"
    result, _ = session(path, ["a", "b", "t"], the_items=items(1, k=3))
    assert (result.total, result.answered) == (3, 3)
    assert outcomes(path) == {("p0", 0, 1): "a", ("p0", 0, 2): "b", ("p0", 1, 2): "tie"}
    path2 = tmp_path / "answers2.jsonl"
    result, _ = session(path2, ["b"], the_items=items(1, k=3), pairs_for_item=lambda item: [(2, 0)])
    assert result.total == 1 and outcomes(path2) == {("p0", 2, 0): "b"}


def test_a_bad_answer_is_asked_again_with_a_hint(tmp_path):
    path = tmp_path / "answers.jsonl"
    result, text = session(path, ["x", "3", "", "a", "q"])
    assert result.answered == 1
    assert outcomes(path) == {("p0", 0, 1): "a"}
    assert text.count("is not an answer: type 1 or a: A is better, 2 or b") == 3
    assert len(load(path).answers) == 1


def test_undo_takes_back_the_last_answer_and_asks_it_again(tmp_path):
    path = tmp_path / "answers.jsonl"
    result, text = session(path, ["a", "b", "u", "t", "u", "u", "b", "a", "q"])
    # p0 a, p1 b; undo p1; p1 tie; undo p1; undo p0; p0 b, p1 a
    assert (result.answered, result.undone) == (5, 3)
    assert outcomes(path) == {("p0", 0, 1): "b", ("p1", 0, 1): "a"}
    assert "Undid 'b' on p1 (pair 0 1); asking it again." in text
    # In a new session, undo reaches back to the last answer of the previous one.
    result, text = session(path, ["u", "t", "b"])
    assert "1 of 3 questions answered" not in text and "2 of 3 questions answered" in text
    assert outcomes(path) == {("p0", 0, 1): "b", ("p1", 0, 1): "tie", ("p2", 0, 1): "b"}
    assert result.remaining == 0
    result, text = session(tmp_path / "ben.jsonl", ["u", "u", "a"], annotator="ben")
    assert text.count("Nothing to undo") == 2 and result.answered == 1


def test_quit_and_end_of_input_keep_every_answer(tmp_path):
    path = tmp_path / "answers.jsonl"
    stdin = io.StringIO("a\nq\nb\n")
    result, _ = session(path, [], stdin=stdin)
    assert result.quit_early and result.answered == 1
    assert stdin.readline() == "b\n"  # nothing read after q
    result, _ = session(path, ["b"])
    assert result.quit_early and result.remaining == 1  # input ended: a quit
    assert outcomes(path) == {("p0", 0, 1): "a", ("p1", 0, 1): "b"}


def test_ctrl_c_propagates_with_the_answers_before_it_on_disk(tmp_path):
    class CtrlC(io.StringIO):
        def readline(self, *args):
            line = super().readline(*args)
            if not line:
                raise KeyboardInterrupt
            return line

    path = tmp_path / "answers.jsonl"
    with pytest.raises(KeyboardInterrupt):
        session(path, [], stdin=CtrlC("a\nb\n"))
    assert outcomes(path) == {("p0", 0, 1): "a", ("p1", 0, 1): "b"}
    with AnswerStore.open(path, FINGERPRINT):  # the lock went with the with-block
        pass


def test_rank_mode_orders_ties_and_bad_orders(tmp_path):
    path = tmp_path / "answers.jsonl"
    result, text = session(path, ["2 1 3", "1 1 2", "12", "4 1 2", "=1 2 3", "2=13", "s"], mode="rank",
                           the_items=items(3, k=3))  # fmt: skip
    assert (result.answered, result.skipped, result.remaining) == (2, 1, 0)
    events = list(load(path).answers.values())
    assert [e["answer"] for e in events] == ["2 1 3", "1=2 3", "skip"]
    assert events[0]["ranks"] == [2, 1, 3] and events[1]["ranks"] == [1, 1, 2]
    assert outcomes(path) == {
        ("p0", 0, 1): "b", ("p0", 0, 2): "a", ("p0", 1, 2): "a",  # 2 > 1 > 3
        ("p1", 0, 1): "tie", ("p1", 0, 2): "a", ("p1", 1, 2): "a",  # 2 = 1 > 3
    }  # fmt: skip
    assert text.count("is not an answer") == 4
    assert "not once each or out of range: 1" in text and "missing 3" in text
    assert "`=` goes between two numbers" in text


def test_rank_mode_best_vs_worst_gives_one_pair(tmp_path):
    path = tmp_path / "answers.jsonl"
    session(path, ["3 1 2", "1=2=3"], mode="rank", rank_policy="best_vs_worst", the_items=items(2, k=3))
    assert outcomes(path) == {("p0", 2, 1): "a"}  # best 3 (candidate 2) over worst 2 (candidate 1)
    assert [e["ranks"] for e in load(path).answers.values()] == [[2, 3, 1], [1, 1, 1]]  # the all-tie kept as ranks


def test_parse_ranking():
    assert parse_ranking("2 1 3", 3) == [2, 1, 3]
    assert parse_ranking("213", 3) == [2, 1, 3]
    assert parse_ranking("2 = 1, 3", 3) == [1, 1, 2]
    assert parse_ranking("3>1>2", 3) == [2, 3, 1]
    assert parse_ranking("10 1 2 3 4 5 6 7 8 9=11", 11) == [2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 10]
    for bad in ("", "a b", "1 2", "1 2 3 4", "1==2 3", "1 2 3=", "0 1 2"):
        with pytest.raises(ValueError):
            parse_ranking(bad, 3)


def test_shuffled_sides_are_fixed_per_annotator_and_map_back_to_candidates(tmp_path):
    many = items(12)
    shown = [q.shown for q in questions(many, "pairs", annotator="ana", shuffle_seed=7)]
    assert shown == [q.shown for q in questions(many, "pairs", annotator="ana", shuffle_seed=7)]
    assert {(0, 1), (1, 0)} == set(shown)
    assert [q.shown for q in questions(many, "pairs")] == [(0, 1)] * 12
    path = tmp_path / "answers.jsonl"
    session(path, ["1"] * 12, the_items=many, shuffle_seed=7)
    # "1" picks whichever candidate was shown as A: the label names that candidate as the better one.
    assert [(l.a, l.b, l.outcome) for l in load(path).labels] == [(a, b, "a") for a, b in shown]
    ranks = [q.shown for q in questions(many, "rank", annotator="ana", shuffle_seed=7)]
    assert len(set(ranks)) == 2 and all(sorted(r) == [0, 1] for r in ranks)


def test_overlap_items_go_to_everyone_the_rest_to_whoever_comes_first(tmp_path):
    path = tmp_path / "answers.jsonl"
    many = items(6)
    overlap = {"p0", "p1"}
    # ana answers p0, p1 (overlap) and p2, skips p3, then stops.
    result, _ = session(path, ["a", "a", "b", "s", "q"], the_items=many, overlap_items=overlap)
    assert result.total == 6
    # ben gets the overlap, the item ana skipped and those nobody answered; not p2.
    result, text = session(path, ["b"] * 5, annotator="ben", the_items=many, overlap_items=overlap)
    assert (result.total, result.answered) == (5, 5)
    assert "(not shown: 1 items another annotator answered)" in text
    asked = [l.item_id for l in load(path).labels if l.annotator == "ben"]
    assert asked == ["p0", "p1", "p3", "p4", "p5"]
    # ana resumes: p3 (which she skipped), p4 and p5 are ben's now; nothing left for her.
    result, _ = session(path, [], the_items=many, overlap_items=overlap)
    assert (result.total, result.remaining) == (3, 0)


def test_terminal_mode_draws_the_conversation_candidates_keys_and_guidelines(tmp_path):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    path = tmp_path / "answers.jsonl"
    screen = Console(file=io.StringIO(), width=100, force_terminal=True, color_system=None)
    result, text = session(path, ["g", "?", "2", "q"], stdin=Terminal("g\n?\n2\nq\n"), console=screen,
                           the_items=items(2, conversation=True),
                           guidelines="# Labelling guide\n\nPrefer the **honest** answer.")  # fmt: skip
    assert result.answered == 1
    for shown in ("system", "Be brief.", "user", "question 0", "─ A ", "answer 0.0", "─ B ", "answer 0.1",
                  "Labelling guide", "Prefer the honest answer.", "[1/2] answer> ", "1 or a: A is better"):
        assert shown in text, shown
    assert "question 1" in text  # the next item drawn after the answer
    assert outcomes(path) == {("p0", 0, 1): "b"}
    _, text = session(path, ["g", "q"], stdin=Terminal("g\nq\n"), the_items=items(2, conversation=True))
    assert "No guidelines were given" in text


@pytest.mark.slow
def test_a_real_terminal_session(tmp_path):
    """The session on a pseudo-terminal: sys.stdin is a tty, answers are read with line editing (input())."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    path = tmp_path / "answers.jsonl"
    code, text = at_a_terminal([sys.executable, str(driver), str(path)], [b"2\n", b"x\n", b"t\n", b"q\n"],
                               timeout_s=30.0, columns=100)  # fmt: skip
    assert code == 0, text[-3000:]
    assert "question 0" in text and "answer 0.1" in text and "[2/10] answer> " in text
    assert "is not an answer" in text and "answered 2 remaining 8" in text
    assert outcomes(path) == {("p0", 0, 1): "b", ("p1", 0, 1): "tie"}


# ---- a kill -9 half way, then the same command again -----------------------------------------------------------

DRIVER = """
import sys
from rlhf_cli.labelling.human import run_session
from rlhf_cli.labelling.records import Item
from rlhf_cli.labelling.store import AnswerStore

items = [Item(f"p{i}", f"question {i}", (f"answer {i}.0", f"answer {i}.1")) for i in range(10)]
with AnswerStore.open(sys.argv[1], "fingerprint") as store:
    result = run_session(items, store, annotator="ana", stdin=sys.stdin)
print("answered", result.answered, "remaining", result.remaining, flush=True)
"""


def wait_for(path, live, deadline_s=30.0):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if path.exists() and len(load(path).answers) >= live:
            return load(path)
        time.sleep(0.05)
    raise AssertionError(f"{path} did not reach {live} answers in {deadline_s} s")


@pytest.mark.slow
def test_killed_half_way_and_resumed_nothing_lost_nothing_twice(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    path = tmp_path / "answers.jsonl"
    expected = {f"p{i}": "ab"[i % 3 == 0] for i in range(10)}  # what ana means to answer, item by item
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([sys.executable, str(driver), str(path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        # p0, then p1 answered wrong and undone, p1 again, p2, p3: four live answers.
        first.stdin.write("".join(f"{line}\n" for line in [expected["p0"], "t", "u", expected["p1"],
                                                             expected["p2"], expected["p3"]]))  # fmt: skip
        first.stdin.flush()
        state = wait_for(path, 4)
        first.kill()  # SIGKILL: no clean-up of any kind, while it waits for the fifth answer
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == -9
    assert state.undone == 1 and len(load(path).answers) == 4

    done = {event["item_id"] for event in load(path).answers.values()}
    rest = [f"p{i}" for i in range(10) if f"p{i}" not in done]
    assert rest == [f"p{i}" for i in range(4, 10)]
    second = subprocess.run([sys.executable, str(driver), str(path)], input="".join(expected[i] + "\n" for i in rest),
                            capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert second.returncode == 0, second.stderr
    assert "ana: 4 of 10 questions answered, 6 to go" in second.stdout
    assert "answered 6 remaining 0" in second.stdout

    final = load(path)
    live = [(event["item_id"], event["labels"][0]["outcome"]) for event in final.answers.values()]
    assert sorted(item for item, _ in live) == sorted(expected)  # each item exactly once
    assert dict(live) == expected  # and with the answer given
    assert final.undone == 1 and final.dropped_lines == 0
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(events) == 1 + 5 + 1 + 6  # header, five answers and an undo, six answers
    assert [e["event"] for e in events] == list(range(len(events)))
