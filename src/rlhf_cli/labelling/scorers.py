"""Reward-model and rule labellers: score every candidate, rank each item's candidates by score, label the pairs.

The score of candidate i of a prompt x, from one scorer r or an ensemble r_1..r_m:

    mean:  s_i = (1/m) * sum_k r_k(x, y_i)
    min:   s_i = min_k r_k(x, y_i)            (pessimistic: a candidate is as good as its harshest scorer says)

Candidates are ranked by s (higher is better) and `records.ranking_pairs` gives the pairs (all K(K-1)/2, or best vs
worst). A pair whose gap s_better - s_worse is below `min_margin` is a tie (counted, not trained on); candidates with
equal scores are ties too. The confidence of a decided pair is the Bradley-Terry probability

    P(better preferred) = sigmoid(s_better - s_worse) = 1 / (1 + exp(-(s_better - s_worse)))

which is what a reward model trained with the Bradley-Terry loss (`rlhf train-rm`) means by a score difference; for a
rule it is the same formula in the rule's own units. Reward models and rules score through `inference.score`, so a
reward model reads the text exactly as `rlhf eval` has it read (its rendering.json, its max_length).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

from rlhf_cli import rewards
from rlhf_cli.errors import UserError
from rlhf_cli.labelling.records import Item, PairLabel, ranking_pairs

if TYPE_CHECKING:
    from rlhf_cli.recipe import ModelSpec, RewardSpec
    from rlhf_cli.inference import Responses, Scorer

Combine = Literal["mean", "min"]
PairsHow = Literal["all", "best_vs_worst"]


# ---------------------------------------------------------------- pure pieces


def combine_scores(per_scorer: Sequence[Sequence[float]], how: Combine = "mean") -> list[float]:
    """One score per candidate from every scorer's scores of the same candidates: their mean or their minimum
    (`rlhf_cli.rewards.combine_scores`, shared with PPO's and generate's reward-model ensembles)."""
    if how not in ("mean", "min"):
        raise ValueError(f"combine must be 'mean' or 'min', not {how!r}")
    return rewards.combine_scores(per_scorer, how)


def bradley_terry(gap: float) -> float:
    """sigmoid(gap): the Bradley-Terry probability that a response scoring `gap` more is preferred."""
    if gap >= 0:
        return 1.0 / (1.0 + math.exp(-gap))
    return math.exp(gap) / (1.0 + math.exp(gap))


def score_pairs(scores: Sequence[float], how: PairsHow = "all", min_margin: float = 0.0,
                ) -> list[tuple[int, int, Literal["a", "tie"], float]]:  # fmt: skip
    """(a, b, outcome, gap) for one item's candidate scores: a is the better-scored candidate (outcome "a") with
    gap = s_a - s_b >= min_margin, else the pair is a "tie" (a < b when the scores are equal).

    all            the pairs of `ranking_pairs` (every pair with different scores), then each pair of equal scores
    best_vs_worst  one pair, a best against a worst candidate; all scores equal: the first and last candidate, a tie
    """
    if min_margin < 0:
        raise ValueError(f"min_margin must be >= 0, got {min_margin}")
    ranks = [-score for score in scores]
    ordered = ranking_pairs(ranks, how)
    if how == "best_vs_worst" and not ordered and len(scores) >= 2:
        ordered = [(0, len(scores) - 1)]
    out = []
    for better, worse in ordered:
        gap = scores[better] - scores[worse]
        out.append((better, worse, "a" if gap > 0 and gap >= min_margin else "tie", gap))
    if how == "all":
        n = len(scores)
        out += [(i, j, "tie", 0.0) for i in range(n) for j in range(i + 1, n) if scores[i] == scores[j]]
    return out  # type: ignore[return-value]


def label_scores(item_id: str, scores: Sequence[float], per_scorer: dict[str, Sequence[float]], *,
                 how: PairsHow = "all", min_margin: float = 0.0, labeller: str = "reward_model",
                 annotator: str = "") -> list[PairLabel]:  # fmt: skip
    """The PairLabels of one item from its combined `scores` (and each scorer's, kept in the details)."""
    labels = []
    for a, b, outcome, gap in score_pairs(scores, how, min_margin):
        details = {"scores": {name: [values[a], values[b]] for name, values in per_scorer.items()},
                   "combined": [scores[a], scores[b]], "gap": gap}  # fmt: skip
        if outcome == "tie":
            details["reason"] = "equal scores" if gap == 0 else f"score gap {gap:.4g} below min_margin {min_margin}"
        confidence = bradley_terry(gap) if outcome == "a" else None
        labels.append(PairLabel(item_id, a, b, outcome, labeller, annotator, confidence, details))
    return labels


# ---------------------------------------------------------------- scoring the candidates


def load_scorers(specs: Sequence[RewardSpec], what: str, policy_spec: ModelSpec | None, policy_tokenizer, *,
                 conversational: bool) -> list[Scorer]:  # fmt: skip
    """`inference.load_scorer` for each reward (a reward model or a rule); several are named `what[i]` in messages."""
    from rlhf_cli.inference import load_scorer

    if not specs:
        raise UserError(f"{what} names no reward model or rule.")
    return [load_scorer(spec, what if len(specs) == 1 else f"{what}[{index}]", policy_spec, policy_tokenizer,
                        conversational=conversational) for index, spec in enumerate(specs)]  # fmt: skip


def label_by_scores(items: Sequence[Item], scorers: Sequence[Scorer], *, combine: Combine = "mean",
                    pairs: PairsHow = "all", min_margin: float = 0.0, responses: Responses | None = None,
                    max_prompt_length: int = 512, batch_size: int = 16, progress=None,
                    ) -> tuple[list[PairLabel], dict[str, Any]]:  # fmt: skip
    """Score every candidate of every item with every scorer, combine, rank, and label the pairs (module docstring).

    `responses`: the sampled Responses of the candidates, in order (item by item, candidate by candidate), so a
    reward model without rendering.json that shares the policy's tokenizer reads the sampled token ids as `rlhf eval`
    does. Without it (candidates from a file) every candidate is scored as text, taken as a finished response.
    The labeller is "rule" when every scorer is a rule, else "reward_model"; the annotator names the scorers.
    """
    from rlhf_cli.inference import Responses, score

    if not scorers:
        raise ValueError("no scorers")
    prompts = [item.prompt for item in items for _ in item.candidates]
    texts = [text for item in items for text in item.candidates]
    if responses is None:
        responses = Responses(texts=texts, finished=[True] * len(texts))
        scorers = [replace(scorer, reads_policy_ids=False) for scorer in scorers]  # no sampled ids to read
    elif list(responses.texts) != texts:
        raise ValueError("responses must be the items' candidates, in order")
    names = _unique([scorer.name for scorer in scorers])
    flat: dict[str, list[float]] = {}
    for name, scorer in zip(names, scorers):
        values = score(scorer, prompts, responses, max_prompt_length=max_prompt_length, batch_size=batch_size,
                       progress=progress, label=f"scoring ({_short(name)})")  # fmt: skip
        bad = sum(not math.isfinite(value) for value in values)
        if bad:
            raise UserError(f"{scorer.what} {scorer.name!r} gave {bad} of {len(values)} candidates a score that is "
                            f"not a finite number (nan or inf); they cannot be ranked.")  # fmt: skip
        flat[name] = values

    labeller = "rule" if all(scorer.rule is not None for scorer in scorers) else "reward_model"
    annotator = ",".join(names)
    labels: list[PairLabel] = []
    start = 0
    for item in items:
        rows = slice(start, start + len(item.candidates))
        start = rows.stop
        per_scorer = {name: values[rows] for name, values in flat.items()}
        combined = combine_scores(list(per_scorer.values()), combine)
        labels += label_scores(item.item_id, combined, per_scorer, how=pairs, min_margin=min_margin,
                               labeller=labeller, annotator=annotator)  # fmt: skip
    return labels, score_report(labels, flat, combine=combine, pairs=pairs, min_margin=min_margin, items=len(items))


def score_report(labels: Sequence[PairLabel], flat: dict[str, list[float]], *, combine: Combine, pairs: PairsHow,
                 min_margin: float, items: int) -> dict[str, Any]:  # fmt: skip
    """Counts for the stage's report: pairs decided and tied, mean scores, and (an ensemble) how often every scorer
    orders a decided pair as the combined score does."""
    decided = [label for label in labels if label.outcome == "a"]
    ties = [label for label in labels if label.outcome == "tie"]
    equal = sum(label.details.get("gap") == 0 for label in ties)
    report: dict[str, Any] = {
        "items": items,
        "candidates scored": len(next(iter(flat.values()))) if flat else 0,
        "pairs": pairs,
        "pairs decided": len(decided),
        "ties (equal scores)": equal,
        f"ties (score gap below min_margin {min_margin})": len(ties) - equal,
        "mean confidence (Bradley-Terry)": (sum(label.confidence for label in decided) / len(decided)
                                            if decided else None),  # fmt: skip
    }
    for name, values in flat.items():
        report[f"mean score ({name})"] = sum(values) / len(values) if values else None
    if len(flat) > 1:
        report["combined by"] = combine
        agree = sum(all(a > b for a, b in label.details["scores"].values()) for label in decided)
        report["scorers all order the decided pair alike"] = agree / len(decided) if decided else None
    return report


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


def _short(name: str) -> str:
    return name if len(name) <= 24 else "..." + name[-21:]
