"""The answers file of a labelling session: append-only JSON lines, each one written and fsync'd before the next
question is shown, so a crash, a kill or Ctrl-C loses no answer and the same command resumes where it stopped.

    {"event": 0, "header": "rlhf label answers", "version": 1, "fingerprint": F, "time": T, ...meta}
    {"event": 1, "item_id": "p3", "annotator": "ana", "time": T, "question": "pair 0 1", "answer": "a",
     "labels": [PairLabel.to_dict()]}                                 an answer to one pair (shown A = a, B = b)
    {"event": 2, ..., "question": "rank", "answer": "2 1=3", "ranks": [2, 1, 2], "labels": [...]}
                                                                      a ranking of all K (rank per candidate)
    {"event": 3, "undo": 2, "annotator": "ana", "time": T}          takes answer 2 back; written by hand,
                                                                      "undo": "p3" takes back ana's last answer on p3
    a header again                                                    where --append adds answers under another
                                                                      recipe's fingerprint (F: prompts, candidates
                                                                      and labeller settings, hashed by the stage)

One process writes a file at a time (an flock; the OS drops it however the process ends). A crash in the middle of
a write leaves an incomplete last line: reading drops it and says so, and the next writer cuts it off before
appending. Anything else that is not an event is damage, reported, never skipped silently.
"""

from __future__ import annotations

import dataclasses
import json
import os
from datetime import datetime, timezone
from pathlib import Path

from rlhf_cli.errors import UserError
from rlhf_cli.labelling.records import PairLabel

HEADER = "rlhf label answers"
VERSION = 1
RANK_QUESTION = "rank"
_HEADER_START = b'{"event": 0, "header"'  # how every header line written here begins (a crash may cut the rest)
_LABEL_FIELDS = {field.name for field in dataclasses.fields(PairLabel)}


def fingerprint(*parts) -> str:
    """A recipe's fingerprint for the header: sha256 of its parts as JSON (e.g. the prompts file's bytes as hex,
    the candidates, the labeller settings), so any change to what is asked changes it."""
    import hashlib

    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def pair_question(i: int, j: int) -> str:
    """The question of a pair, the same whichever side each candidate was shown on."""
    return f"pair {min(i, j)} {max(i, j)}"


class AnswerState:
    """What a file's events add up to: the live answers (those not undone), in the order given."""

    def __init__(self, path: Path):
        self.path = path
        self.fingerprints: list[str] = []  # of every header, oldest first
        self.answers: dict[int, dict] = {}  # live answer events by event number, in file order
        self.undone = 0  # answers taken back
        self.dropped_lines = 0  # an incomplete last line left by a crash
        self.notes: list[str] = []  # what a reader should be told (a dropped line, an undo that matched nothing)
        self.next_event = 0
        self._numbers: set[int] = set()

    @property
    def labels(self) -> list[PairLabel]:
        """Every live answer's labels, in the order given."""
        return [PairLabel(**{k: v for k, v in label.items() if k in _LABEL_FIELDS})
                for event in self.answers.values() for label in event["labels"]]  # fmt: skip

    def annotators(self) -> list[str]:
        return sorted({event["annotator"] for event in self.answers.values()})

    def answered(self, annotator: str) -> set[tuple[str, str]]:
        """(item_id, question) of this annotator's live answers, skips included: what a resumed session leaves out."""
        return {(e["item_id"], e["question"]) for e in self.answers.values() if e["annotator"] == annotator}

    def takers(self) -> dict[str, set[str]]:
        """{item_id: annotators who answered a question of it}; a skip leaves the item to the others."""
        taken: dict[str, set[str]] = {}
        for event in self.answers.values():
            if event["answer"] != "skip":
                taken.setdefault(event["item_id"], set()).add(event["annotator"])
        return taken

    def last_answer(self, annotator: str) -> dict | None:
        for event in reversed(self.answers.values()):
            if event["annotator"] == annotator:
                return event
        return None

    def apply(self, event: dict, line: int | None = None) -> None:
        """Add one event (`line`: its line in the file, for messages)."""
        number = event["event"]
        where = f"Line {line}" if line else f"Event {number}"
        if number in self._numbers:
            raise UserError(f"{where} of {self.path} repeats event number {number}: the file was edited or "
                            "joined from two files; event numbers must be unique (undo refers to them).")  # fmt: skip
        self._numbers.add(number)
        self.next_event = max(self.next_event, number + 1)
        if "header" in event:
            self.fingerprints.append(str(event.get("fingerprint", "")))
        elif "undo" in event:
            target = self._undo_target(event)
            if target is None:
                self.notes.append(f"{where}: an undo of {event['undo']!r} by {event.get('annotator')!r} matches "
                                  "no live answer of theirs; ignored.")  # fmt: skip
            else:
                del self.answers[target]
                self.undone += 1
        else:
            self.answers[number] = event

    def _undo_target(self, event: dict) -> int | None:
        target, who = event["undo"], event.get("annotator")
        if isinstance(target, int) and not isinstance(target, bool):
            live = self.answers.get(target)
            return target if live is not None and live["annotator"] == who else None
        for number in reversed(self.answers):
            if self.answers[number]["annotator"] == who and self.answers[number]["item_id"] == str(target):
                return number
        return None


def load(path: str | Path) -> AnswerState:
    """Replay an answers file (read only, no lock: `rlhf label --report` while a session runs)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"There is no answers file at {path}.") from None
    except OSError as exc:
        raise UserError(f"Cannot read the answers file {path}: {exc.strerror or exc}.") from None
    state, _, tail = _replay(path, data)
    if tail:
        state.notes.insert(0, f"The last line of {path} is incomplete ({tail} bytes, a write cut short by a crash): "
                              "it is not counted, and the next session on this file removes it.")  # fmt: skip
    return state


class AnswerStore:
    """The one writer of an answers file.

        with AnswerStore.open(path, fingerprint) as store:
            store.state.answered("ana")                      # what to leave out when resuming
            store.answer(item_id=..., annotator=..., question=..., answer=..., labels=[...])
            store.undo_last("ana")
    """

    def __init__(self, path: Path, fd: int, state: AnswerState):
        self.path, self._fd, self.state = path, fd, state

    @classmethod
    def open(cls, path: str | Path, fingerprint: str, *, append: bool = False, meta: dict | None = None):
        """Open (or create) `path` for appending, locked. A file whose headers do not include `fingerprint` belongs
        to another recipe: a UserError, unless `append` (then a new header marks where this recipe's answers
        start). `meta` goes into the header (e.g. the recipe path, the labeller)."""
        import fcntl

        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            raise UserError(f"Cannot open the answers file {path}: {exc.strerror or exc}.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UserError(
                f"The answers file {path} is being written by another process (a labelling session on the same "
                "recipe and output). One session writes a file at a time: wait for it to end or stop it."
            ) from None
        store = None
        try:
            data = _read_all(fd)
            state, good_length, tail = _replay(path, data)
            if tail:
                os.ftruncate(fd, good_length)
                os.fsync(fd)
                state.notes.append(f"Removed the incomplete last line of {path} ({tail} bytes): a write cut short by "
                                   "a crash, before its answer was confirmed.")  # fmt: skip
            elif data and not data.endswith(b"\n"):
                _write(fd, b"\n")  # a complete last event whose newline never reached the disk
            store = cls(path, fd, state)
            if fingerprint not in state.fingerprints:
                if state.fingerprints and not append:
                    raise UserError(
                        f"The answers file {path} belongs to a different recipe: it was started with recipe "
                        f"fingerprint {state.fingerprints[-1][:12]}, this recipe's is {fingerprint[:12]} (the prompts, "
                        "candidates or labeller settings differ), so its answers may be to other questions. Use "
                        "another --output-dir, or pass --append to add to it anyway."
                    )
                store._header(fingerprint, meta)
            elif state.fingerprints[-1] != fingerprint:
                store._header(fingerprint, meta)  # back to an earlier recipe of this file: mark where
            return store
        except BaseException:
            os.close(fd)
            raise

    def answer(self, *, item_id: str, annotator: str, question: str, answer: str, labels: list[PairLabel],
               ranks: list[float] | None = None) -> dict:  # fmt: skip
        """Append one answer (all the labels it gives: one pair, or the pairs of a ranking) and fsync it."""
        event = {"event": self.state.next_event, "item_id": item_id, "annotator": annotator, "time": _now(),
                 "question": question, "answer": answer, "labels": [label.to_dict() for label in labels]}  # fmt: skip
        if ranks is not None:
            event["ranks"] = list(ranks)
        self._append(event)
        return event

    def undo_last(self, annotator: str) -> dict | None:
        """Take back this annotator's last live answer (of this session or an earlier one); returns it, or None
        when they have none."""
        last = self.state.last_answer(annotator)
        if last is None:
            return None
        self._append({"event": self.state.next_event, "undo": last["event"], "annotator": annotator, "time": _now()})
        return last

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _header(self, fingerprint: str, meta: dict | None) -> None:
        self._append({"event": self.state.next_event, "header": HEADER, "version": VERSION,
                      "fingerprint": fingerprint, "time": _now(), **(meta or {})})  # fmt: skip

    def _append(self, event: dict) -> None:
        if self._fd is None:
            raise ValueError(f"the answers file {self.path} is closed")
        line = json.dumps(event, ensure_ascii=False) + "\n"
        _write(self._fd, line.encode("utf-8"))
        self.state.apply(event)


def _replay(path: Path, data: bytes) -> tuple[AnswerState, int, int]:
    """The state of a file's bytes, the length of its complete lines, and the bytes of an incomplete last line
    (0 when there is none or when it holds a whole event that only lacks its newline)."""
    state = AnswerState(path)
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    good_length = len(data) - len(tail)
    events = [(number, raw) for number, raw in enumerate(lines, start=1) if raw.strip()]
    dropped = 0
    if tail.strip():
        if _event(tail) is None:
            if not events and not tail.startswith(_HEADER_START):
                raise UserError(f"{path} is not an rlhf label answers file: its first line is not the header. "
                                "Choose another --output-dir, or move the file away.")  # fmt: skip
            dropped = len(tail)
            state.dropped_lines = 1
        else:
            events.append((len(lines) + 1, tail))
            good_length = len(data)
    for number, raw in events:
        event = _event(raw)
        if not state.fingerprints and (event is None or "header" not in event):
            raise UserError(f"{path} is not an rlhf label answers file: its first line is not the header. Choose "
                            "another --output-dir, or move the file away.")  # fmt: skip
        if event is None:
            raise UserError(f"Line {number} of {path} is not an answers event (not one JSON object with an event "
                            "number, item and labels, an undo or a header): the file is damaged. Mend or remove "
                            "that line; the lines around it are intact.")  # fmt: skip
        state.apply(event, number)
    return state, good_length, dropped


def _event(raw: bytes) -> dict | None:
    try:
        event = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(event, dict) or not isinstance(event.get("event"), int):
        return None
    if "header" in event:
        return event if event["header"] == HEADER else None
    if "undo" in event:
        return event if isinstance(event["undo"], (int, str)) else None
    fields = {"item_id": str, "annotator": str, "question": str, "answer": str, "labels": list}
    if not all(isinstance(event.get(key), kind) for key, kind in fields.items()):
        return None
    needed = {"item_id", "a", "b", "outcome"}
    return event if all(isinstance(label, dict) and needed <= label.keys() for label in event["labels"]) else None


def _read_all(fd: int) -> bytes:
    chunks, offset = [], 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _write(fd: int, data: bytes) -> None:
    """All of `data` at the end of the file (O_APPEND), then fsync: on disk before the next question is shown."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
