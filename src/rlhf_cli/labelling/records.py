"""What a labeller produces and how it becomes training data.

Every labeller (a person, a judge model, a reward model, a rule) answers questions about an `Item`: one prompt and
K >= 2 candidate responses. Its answers are `PairLabel`s, one per compared pair of candidates (a person who ranks
all K at once gives the pairs of that ranking, `ranking_pairs`). `pair_rows` and `kto_rows` turn the labels of a
run into the rows `rlhf train-rm`, `rlhf dpo` and `rlhf kto` read with no conversion step.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Outcome = Literal["a", "b", "tie", "skip"]  # a: candidate a is better; skip: no answer (the labeller passed)


@dataclass(frozen=True)
class Item:
    """One prompt and its candidate responses. `item_id` is stable across runs (prompt index + source), so a
    resumed session finds what it already answered."""

    item_id: str
    prompt: Any  # text, or a list of {"role", "content"} messages
    candidates: tuple[str, ...]
    source: str = ""  # the policy the candidates were sampled from ("file" for a candidates file)


@dataclass(frozen=True)
class PairLabel:
    """One answer: which of candidates a and b (indices into the item's candidates) is better."""

    item_id: str
    a: int
    b: int
    outcome: Outcome
    labeller: str  # human | judge | reward_model | rule
    annotator: str = ""  # who: a person's --annotator name, the judge / reward model path, the rule
    confidence: float | None = None  # the judge's probability of its verdict, a score margin; None for people
    details: dict = field(default_factory=dict, compare=False)  # e.g. the judge's two orders' probabilities

    def to_dict(self) -> dict:
        return asdict(self)


def ranking_pairs(ranks: list[float], how: Literal["all", "best_vs_worst"] = "all") -> list[tuple[int, int]]:
    """(better, worse) candidate indices from one ranking; lower rank = better, equal ranks are ties and give no pair.

    all            every pair with different ranks: K distinct ranks give K(K-1)/2 pairs (InstructGPT)
    best_vs_worst  one pair, a best against a worst candidate (the first listed among equals); none when all tie
    """
    order = sorted(range(len(ranks)), key=lambda i: (ranks[i], i))
    if how == "best_vs_worst":
        best, worst = order[0], max(order, key=lambda i: (ranks[i], -i))
        return [(best, worst)] if ranks[best] < ranks[worst] else []
    return [(i, j) for n, i in enumerate(order) for j in order[n + 1 :] if ranks[i] < ranks[j]]


def copeland_ranks(num_candidates: int, labels: list[PairLabel]) -> list[float]:
    """Ranks from pairwise verdicts (Copeland: wins minus losses; more is better): rank = -(wins - losses), so
    `ranking_pairs` can turn a judge's all-pairs verdicts into one best-vs-worst pair. Ties and skips count 0."""
    score = [0.0] * num_candidates
    for label in labels:
        if label.outcome == "a":
            score[label.a] += 1
            score[label.b] -= 1
        elif label.outcome == "b":
            score[label.b] += 1
            score[label.a] -= 1
    return [-value for value in score]


def majority(outcomes: list[Outcome]) -> Outcome | None:
    """The verdict of several annotators on one pair: the most frequent of a / b / tie (skips do not vote); None
    when there is no vote or the top two are level."""
    votes = Counter(outcome for outcome in outcomes if outcome != "skip").most_common()
    if not votes or (len(votes) > 1 and votes[0][1] == votes[1][1]):
        return None
    return votes[0][0]


def oriented(label: PairLabel) -> tuple[int, int, Outcome]:
    """The pair in a canonical order (lower index first), the outcome flipped to match."""
    if label.a < label.b:
        return label.a, label.b, label.outcome
    flipped = {"a": "b", "b": "a"}.get(label.outcome, label.outcome)
    return label.b, label.a, flipped  # type: ignore[return-value]


def pair_rows(items: dict[str, Item], labels: list[PairLabel]) -> tuple[list[dict], Counter]:
    """Preference rows {prompt, chosen, rejected, labeller, confidence, annotator, source_policy, item_id} from
    the labels, and the counts of what was left out (ties, skips, disagreements).

    Several labels of one pair (several annotators, the judge's two orders merged upstream) are decided by
    `majority`; confidence is the mean of the agreeing labels' confidences (None when none has one)."""
    grouped: dict[tuple[str, int, int], list[tuple[Outcome, PairLabel]]] = defaultdict(list)
    for label in labels:
        a, b, outcome = oriented(label)
        grouped[label.item_id, a, b].append((outcome, label))
    rows, left_out = [], Counter()
    for (item_id, a, b), votes in grouped.items():
        verdict = majority([outcome for outcome, _ in votes])
        if verdict is None:
            reason = "skipped" if all(outcome == "skip" for outcome, _ in votes) else "annotators disagree"
            left_out[reason] += 1
            continue
        if verdict == "tie":
            left_out["ties"] += 1
            continue
        agreeing = [label for outcome, label in votes if outcome == verdict]
        item = items[item_id]
        chosen, rejected = (a, b) if verdict == "a" else (b, a)
        confidences = [label.confidence for label in agreeing if label.confidence is not None]
        rows.append({
            "prompt": item.prompt,
            "chosen": _response(item, chosen),
            "rejected": _response(item, rejected),
            "labeller": agreeing[0].labeller,
            "confidence": sum(confidences) / len(confidences) if confidences else None,
            "annotator": ",".join(sorted({label.annotator for label in agreeing if label.annotator})),
            "source_policy": item.source,
            "item_id": item_id,
        })  # fmt: skip
    return rows, left_out


def kto_rows(items: dict[str, Item], pairs: list[dict]) -> tuple[list[dict], Counter]:
    """Unpaired rows {prompt, completion, label, ...} from preference rows: a candidate that won more of its pairs
    than it lost is desirable (True), one that lost more undesirable (False); level ones are left out (counted)."""
    tally: dict[tuple[str, str], int] = defaultdict(int)
    first: dict[tuple[str, str], dict] = {}
    for row in pairs:
        for key, sign in (("chosen", 1), ("rejected", -1)):
            text = row[key] if isinstance(row[key], str) else row[key][-1]["content"]
            slot = (row["item_id"], text)
            tally[slot] += sign
            first.setdefault(slot, {**row, "completion": row[key]})
    rows, left_out = [], Counter()
    for slot, balance in tally.items():
        if balance == 0:
            left_out["as many wins as losses"] += 1
            continue
        row = first[slot]
        rows.append({"prompt": row["prompt"], "completion": row["completion"], "label": balance > 0,
                     "labeller": row["labeller"], "annotator": row["annotator"],
                     "source_policy": row["source_policy"], "item_id": row["item_id"]})  # fmt: skip
    return rows, left_out


def _response(item: Item, index: int):
    """A candidate in the prompt's style: text for a text prompt, an assistant message for a conversation."""
    text = item.candidates[index]
    return [{"role": "assistant", "content": text}] if isinstance(item.prompt, list) else text


def longer_won_rate(items: dict[str, Item], labels: list[PairLabel]) -> float | None:
    """Among decided pairs of candidates with different lengths (characters), the share won by the longer one: the
    length bias these labels will teach a reward model (0.5 = none)."""
    longer_wins = decided = 0
    for label in labels:
        if label.outcome not in ("a", "b"):
            continue
        item = items[label.item_id]
        len_a, len_b = len(item.candidates[label.a]), len(item.candidates[label.b])
        if len_a == len_b:
            continue
        winner_len = len_a if label.outcome == "a" else len_b
        decided += 1
        longer_wins += winner_len == max(len_a, len_b)
    return longer_wins / decided if decided else None
