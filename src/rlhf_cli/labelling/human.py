"""People as labellers: a terminal session that shows a prompt and its candidates and records each answer at once
in the answers file (store.py: one fsync'd line per answer), so Ctrl-C, a crash or a kill loses nothing and the
same command resumes at the first unanswered question.

Answers are typed and ended with Enter; the same grammar is read one line per question when stdin is not a
terminal (a script, a test, `< answers.txt`), where end of input means quit:

    pairs mode    1 or a: A is better    2 or b: B is better    t: tie
    rank mode     the candidates' numbers best first: `2 1 3`; `=` joins a tie: `2=1 3`; up to 9 candidates the
                  spaces may go: `213`, `2=13`
    both          s: skip    u: undo the last answer (and ask it again)    g: the guidelines    ?: the keys
                  q: quit (every answer so far is kept)

Which questions an annotator gets: those they have not answered (a skip is an answer: it is not asked again;
undo brings it back) of the items in the overlap set (asked of everyone, for agreement) and of the items no other
annotator has answered yet (so several people split the rest of the work).
"""

from __future__ import annotations

import itertools
import random
import re
import sys
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, TextIO

from rlhf_cli.labelling.records import Item, PairLabel, ranking_pairs
from rlhf_cli.labelling.store import RANK_QUESTION, AnswerStore, pair_question

LABELLER = "human"
PAIR_ANSWERS = {"1": "a", "a": "a", "2": "b", "b": "b", "t": "tie", "tie": "tie", "=": "tie"}
COMMANDS = {"s": "skip", "skip": "skip", "u": "undo", "undo": "undo", "q": "quit", "quit": "quit",
            "g": "guidelines", "guidelines": "guidelines", "?": "help", "h": "help", "help": "help"}  # fmt: skip
PAIR_HINT = "1 or a: A is better, 2 or b: B is better, t: tie, s: skip, u: undo, g: guidelines, q: quit"
RANK_HINT = "the numbers best first, e.g. `2 1 3` (`2=1 3`: a tie), s: skip, u: undo, g: guidelines, q: quit"


@dataclass(frozen=True)
class Question:
    """One thing to ask about an item: a pair (shown = (A, B), candidate indices) or a ranking of all its
    candidates (shown = the candidates in the order numbered 1..K)."""

    item: Item
    key: str  # the store's question: "pair i j" or "rank"
    shown: tuple[int, ...]


@dataclass
class SessionResult:
    answered: int  # answers given in this session (skips not counted; an answer undone later still counts here)
    skipped: int
    undone: int
    quit_early: bool  # q or end of input with questions left
    remaining: int  # questions still open for this annotator
    total: int  # questions this annotator is asked in all, answered before or now or still open


def all_pairs(item: Item) -> list[tuple[int, int]]:
    """Every pair of the item's candidates: K(K-1)/2 questions."""
    return list(itertools.combinations(range(len(item.candidates)), 2))


def questions(
    items: Iterable[Item],
    mode: Literal["pairs", "rank"],
    *,
    pairs_for_item: Callable[[Item], list[tuple[int, int]]] | None = None,
    annotator: str = "",
    shuffle_seed: int | None = None,
) -> list[Question]:
    """The questions of the items in order. With `shuffle_seed` each annotator sees each pair's sides and each
    ranking's numbering in an order of its own (fixed by seed, item and annotator, so a resumed session shows the
    same), against a bias for the first position; without it the candidates keep their order."""
    asked = []
    for item in items:
        rng = random.Random(f"{shuffle_seed}:{item.item_id}:{annotator}") if shuffle_seed is not None else None
        if mode == "rank":
            shown = list(range(len(item.candidates)))
            if rng:
                rng.shuffle(shown)
            asked.append(Question(item, RANK_QUESTION, tuple(shown)))
            continue
        for i, j in (pairs_for_item or all_pairs)(item):
            if rng and rng.random() < 0.5:
                i, j = j, i
            asked.append(Question(item, pair_question(i, j), (i, j)))
    return asked


def parse_ranking(text: str, k: int) -> list[int]:
    """Ranks per shown position (1 = best, equal = tie) from an order typed best first: `2 1 3`, `2=1 3`; with
    k <= 9 every digit is one candidate, so `213` and `2=13` work too. ValueError (a one-line hint) otherwise."""
    if not text or not re.fullmatch(r"[\d\s,>=]+", text):
        raise ValueError(f"type {RANK_HINT}")
    tokens = re.findall(r"\d|=" if k <= 9 else r"\d+|=", text)
    groups: list[list[int]] = []
    join = False
    for token in tokens:
        if token == "=":
            if not groups or join:
                raise ValueError("`=` goes between two numbers, e.g. `2=1 3`")
            join = True
            continue
        if join:
            groups[-1].append(int(token))
        else:
            groups.append([int(token)])
        join = False
    if join:
        raise ValueError("`=` goes between two numbers, e.g. `2=1 3`")
    seen = [n for group in groups for n in group]
    if sorted(seen) != list(range(1, k + 1)):
        missing = sorted(set(range(1, k + 1)) - set(seen))
        extra = sorted({n for n in seen if seen.count(n) > 1 or not 1 <= n <= k})
        problems = ([f"missing {' '.join(map(str, missing))}"] if missing else []) + (
            [f"not once each or out of range: {' '.join(map(str, extra))}"] if extra else []
        )
        raise ValueError(f"give each of 1..{k} exactly once, best first ({'; '.join(problems)})")
    ranks = [0] * k
    for rank, group in enumerate(groups, start=1):
        for position in group:
            ranks[position - 1] = rank
    return ranks


def rank_labels(item_id: str, ranks: list[float], policy: Literal["all", "best_vs_worst"], annotator: str):
    """The PairLabels of one ranking (ranks per candidate index). all: every pair, equal ranks a tie;
    best_vs_worst: `records.ranking_pairs`' one pair (none when every candidate ties)."""
    if policy == "best_vs_worst":
        return [PairLabel(item_id, better, worse, "a", LABELLER, annotator)
                for better, worse in ranking_pairs(ranks, "best_vs_worst")]  # fmt: skip
    labels = []
    for i, j in itertools.combinations(range(len(ranks)), 2):
        outcome = "tie" if ranks[i] == ranks[j] else ("a" if ranks[i] < ranks[j] else "b")
        labels.append(PairLabel(item_id, i, j, outcome, LABELLER, annotator))
    return labels


def run_session(
    items: list[Item],
    store: AnswerStore,
    *,
    annotator: str,
    mode: Literal["pairs", "rank"] = "pairs",
    pairs_for_item: Callable[[Item], list[tuple[int, int]]] | None = None,
    rank_policy: Literal["all", "best_vs_worst"] = "all",
    guidelines: str | None = None,
    console=None,
    stdin: TextIO | None = None,
    overlap_items: Iterable[str] = (),
    shuffle_seed: int | None = None,
) -> SessionResult:
    """Ask `annotator` the questions still open for them (module docstring) and append every answer to `store`.

    pairs_for_item  pairs mode: which pairs of an item to ask (default every pair)
    rank_policy     rank mode: which pairs a ranking gives (`rank_labels`)
    guidelines      markdown shown with `g`
    Returns the counts; a KeyboardInterrupt (Ctrl-C) propagates, with every answer before it already on disk."""
    from rlhf_cli.console import make_console

    if mode not in ("pairs", "rank"):
        raise ValueError(f"mode is 'pairs' or 'rank', not {mode!r}")
    console = console or make_console()
    stdin = stdin if stdin is not None else sys.stdin
    terminal = bool(getattr(stdin, "isatty", lambda: False)())
    overlap = set(overlap_items)
    state = store.state
    answered, takers = state.answered(annotator), state.takers()
    visible = [item for item in items if item.item_id in overlap or takers.get(item.item_id, set()) <= {annotator}]
    asked = questions(visible, mode, pairs_for_item=pairs_for_item, annotator=annotator, shuffle_seed=shuffle_seed)
    by_key = {(q.item.item_id, q.key): q for q in asked}
    queue = deque(q for q in asked if (q.item.item_id, q.key) not in answered)
    total, done = len(asked), len(asked) - len(queue)
    hidden = len(items) - len(visible)
    _say(console, f"{annotator}: {done} of {total} questions answered, {len(queue)} to go"
         + (f" (not shown: {hidden} items another annotator answered)" if hidden else ""))  # fmt: skip
    result = SessionResult(answered=0, skipped=0, undone=0, quit_early=False, remaining=len(queue), total=total)
    redraw = True
    while queue:
        question = queue[0]
        if terminal and redraw:
            _show(console, question, done, total, mode)
        redraw = False
        try:
            text = _read(stdin, console, terminal, f"[{done + 1}/{total}] {'order' if mode == 'rank' else 'answer'}> ")
        except EOFError:
            break
        word = text.strip().lower()
        command = COMMANDS.get(word)
        if command == "quit":
            break
        if command == "help":
            _say(console, f"Keys: {RANK_HINT if mode == 'rank' else PAIR_HINT} (then Enter)")
            continue
        if command == "guidelines":
            _guidelines(console, guidelines)
            continue
        if command == "undo":
            event = store.undo_last(annotator)
            if event is None:
                _say(console, "Nothing to undo: no answer of yours is recorded yet.")
                continue
            result.undone += 1
            again = by_key.get((event["item_id"], event["question"]))
            if again is None:
                _say(console, f"Undid your answer {event['answer']!r} on {event['item_id']} ({event['question']}), "
                              "a question not asked in this session.")  # fmt: skip
                continue
            queue.appendleft(again)
            done -= 1
            _say(console, f"Undid {event['answer']!r} on {event['item_id']} ({event['question']}); asking it again.")
            redraw = True
            continue
        try:
            answer, labels, ranks = _answer(question, mode, word, command, annotator, rank_policy)
        except ValueError as exc:
            _say(console, f"{text.strip()!r} is not an answer: {exc}")
            continue
        store.answer(item_id=question.item.item_id, annotator=annotator, question=question.key, answer=answer,
                     labels=labels, ranks=ranks)  # fmt: skip
        queue.popleft()
        done += 1
        if answer == "skip":
            result.skipped += 1
        else:
            result.answered += 1
        if not terminal:
            _say(console, f"[{done}/{total}] {question.item.item_id} {_shown(question, mode)}: {answer}")
        redraw = True
    result.remaining = len(queue)
    result.quit_early = bool(queue)
    if queue:
        _say(console, f"{annotator}: stopped with {done} of {total} answered; run the same command to go on.")
    else:
        _say(console, f"{annotator}: all {total} questions answered.")
    return result


def _answer(question: Question, mode: str, word: str, command: str | None, annotator: str, rank_policy: str):
    """(the answer as recorded, its labels, the ranks per candidate or None) or ValueError with a hint."""
    item_id = question.item.item_id
    if mode == "rank":
        if command == "skip":
            return "skip", [], None
        by_position = parse_ranking(word, len(question.shown))
        ranks = [0] * len(question.shown)
        for position, candidate in enumerate(question.shown):
            ranks[candidate] = by_position[position]
        return _canonical_order(by_position), rank_labels(item_id, ranks, rank_policy, annotator), ranks
    outcome = "skip" if command == "skip" else PAIR_ANSWERS.get(word)
    if outcome is None:
        raise ValueError(f"type {PAIR_HINT}")
    shown_a, shown_b = question.shown
    return outcome, [PairLabel(item_id, shown_a, shown_b, outcome, LABELLER, annotator)], None


def _canonical_order(ranks_by_position: list[int]) -> str:
    """`2=1 3` for ranks [1, 1, 2] by shown position: the order as typed, normalised."""
    groups: dict[int, list[int]] = {}
    for position, rank in enumerate(ranks_by_position, start=1):
        groups.setdefault(rank, []).append(position)
    return " ".join("=".join(map(str, groups[rank])) for rank in sorted(groups))


def _shown(question: Question, mode: str) -> str:
    if mode == "rank":
        return "rank (" + ", ".join(f"{n}=candidate {c}" for n, c in enumerate(question.shown, start=1)) + ")"
    return f"A=candidate {question.shown[0]} B=candidate {question.shown[1]}"


def _read(stdin, console, terminal: bool, prompt: str) -> str:
    """One line; EOFError at the end of input."""
    if terminal and stdin is sys.stdin:
        from rich.text import Text

        return console.input(Text(prompt))  # the line editing of input()
    if terminal:
        console.print(prompt, end="", markup=False, highlight=False)
    line = stdin.readline()
    if not line:
        raise EOFError
    return line


def _say(console, text: str) -> None:
    console.print(text, markup=False, highlight=False)


def _guidelines(console, guidelines: str | None) -> None:
    if not guidelines:
        _say(console, "No guidelines were given for this labelling.")
        return
    from rich.markdown import Markdown

    console.print(Markdown(guidelines))


def _show(console, question: Question, done: int, total: int, mode: str) -> None:
    """The prompt (a conversation message by message) and the candidates, then the keys."""
    from rich.panel import Panel
    from rich.text import Text

    item = question.item
    console.rule(Text(f"{done + 1} of {total} · {item.item_id}"))
    if isinstance(item.prompt, list):
        for message in item.prompt:
            role = message.get("role", "?") if isinstance(message, dict) else "?"
            content = message.get("content", "") if isinstance(message, dict) else message
            console.print(Panel(Text(str(content)), title=Text(role), title_align="left"))
    else:
        console.print(Panel(Text(str(item.prompt)), title="prompt", title_align="left"))
    names = [str(n) for n in range(1, len(question.shown) + 1)] if mode == "rank" else ["A", "B"]
    for name, candidate in zip(names, question.shown):
        console.print(Panel(Text(item.candidates[candidate]), title=Text(name), title_align="left",
                            border_style="cyan"))  # fmt: skip
    console.print(Text(f"Keys: {RANK_HINT if mode == 'rank' else PAIR_HINT} (then Enter)", style="dim"))
