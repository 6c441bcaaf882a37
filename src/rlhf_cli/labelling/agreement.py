"""How far several annotators agree on the same pairs: raw agreement, Cohen's kappa (two annotators), Fleiss' kappa
(three or more), and who is far from the rest.

A unit of agreement is one pair of candidates of one item, in canonical orientation (`records.oriented`: lower
index first), so "candidate 0 is better" reads the same whichever side the annotator saw it on. The categories are
its outcomes a / b / tie; skips are no answer and are left out. An annotator who answered one pair twice (a file
extended with --append) counts with the last answer. Every number comes with the count it rests on.

    raw agreement   of all the times two annotators answered the same pair, the share with the same answer:
                    sum over pairs of (agreeing annotator pairs) / sum over pairs of n(n-1)/2
    Cohen's kappa   kappa = (p_o - p_e) / (1 - p_e) over the pairs both annotators answered, with p_o the share they
                    agree on and p_e = sum_k p1_k * p2_k the agreement expected by chance from each one's own
                    marginals p1_k, p2_k (the share of their answers in category k)
    Fleiss' kappa   kappa = (P_bar - P_e) / (1 - P_e) over pairs answered by the same number n >= 2 of annotators,
                    with P_i = (sum_j n_ij^2 - n) / (n(n-1)), P_bar the mean of P_i, p_j the share of all answers in
                    category j and P_e = sum_j p_j^2

When p_e (or P_e) is 1 every annotator gave one and the same answer everywhere: kappa is 0/0, undefined, reported
as None with a note; the raw agreement still says how often they agreed.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict

from rlhf_cli.labelling.records import PairLabel, majority, oriented

CATEGORIES = ("a", "b", "tie")
FLAG_MARGIN = 0.15  # an annotator this far below the median agreement with the others is flagged
MIN_COMPARED = 5  # fewer pairs compared with the others than this: too few to flag anyone


def cohen_kappa(table: list[list[int]]) -> dict:
    """Cohen's kappa from a square confusion table, table[i][j] = units the first annotator put in category i and
    the second in category j.

        N = sum_ij table[i][j]     p_o = sum_i table[i][i] / N
        p1_k = row_k / N           p2_k = column_k / N          p_e = sum_k p1_k * p2_k
        kappa = (p_o - p_e) / (1 - p_e)       (None when N = 0 or p_e = 1)
    """
    n = sum(sum(row) for row in table)
    if n == 0:
        return {"kappa": None, "p_o": None, "p_e": None, "pairs": 0}
    size = len(table)
    p_o = sum(table[i][i] for i in range(size)) / n
    rows = [sum(table[i]) / n for i in range(size)]
    columns = [sum(table[i][j] for i in range(size)) / n for j in range(size)]
    p_e = sum(rows[k] * columns[k] for k in range(size))
    kappa = None if _is_one(p_e) else (p_o - p_e) / (1 - p_e)
    return {"kappa": kappa, "p_o": p_o, "p_e": p_e, "pairs": n}


def fleiss_kappa(counts: list[list[int]]) -> dict:
    """Fleiss' kappa from counts[i][j] = annotators who put unit i in category j; every unit has the same number
    n >= 2 of answers.

        P_i = (sum_j n_ij^2 - n) / (n (n - 1))      P_bar = mean_i P_i
        p_j = sum_i n_ij / (N n)                    P_e = sum_j p_j^2
        kappa = (P_bar - P_e) / (1 - P_e)           (None when N = 0 or P_e = 1)
    """
    if not counts:
        return {"kappa": None, "P_bar": None, "P_e": None, "pairs": 0, "raters_per_pair": None}
    n = sum(counts[0])
    if n < 2 or any(sum(row) != n for row in counts):
        sizes = sorted({sum(row) for row in counts})
        raise ValueError(f"Fleiss' kappa needs the same number (>= 2) of answers per unit; got {sizes}")
    units = len(counts)
    p_bar = sum((sum(c * c for c in row) - n) / (n * (n - 1)) for row in counts) / units
    shares = [sum(row[j] for row in counts) / (units * n) for j in range(len(counts[0]))]
    p_e = sum(p * p for p in shares)
    kappa = None if _is_one(p_e) else (p_bar - p_e) / (1 - p_e)
    return {"kappa": kappa, "P_bar": p_bar, "P_e": p_e, "pairs": units, "raters_per_pair": n}


def annotator_of(label: PairLabel) -> str:
    """Who gave a label: the --annotator name, else the kind of labeller (judge, reward_model, rule)."""
    return label.annotator or label.labeller


def answers_by_pair(labels: list[PairLabel]) -> dict[tuple[str, int, int], dict[str, str]]:
    """{(item_id, a, b) in canonical orientation: {annotator: outcome}}, skips left out, the last answer of an
    annotator on a pair counting."""
    units: dict[tuple[str, int, int], dict[str, str]] = defaultdict(dict)
    for label in labels:
        a, b, outcome = oriented(label)
        who = annotator_of(label)
        if outcome == "skip":
            units[label.item_id, a, b].pop(who, None)
            continue
        units[label.item_id, a, b][who] = outcome
    return {unit: answers for unit, answers in units.items() if answers}


def raw_agreement(units: dict[tuple[str, int, int], dict[str, str]]) -> dict:
    """Of all the times two annotators answered the same pair, the share with the same answer (pairs answered by
    one annotator do not count): sum_i sum_j n_ij (n_ij - 1) / 2  over  sum_i n_i (n_i - 1) / 2."""
    agreeing = compared = pairs = 0
    for answers in units.values():
        n = len(answers)
        if n < 2:
            continue
        pairs += 1
        compared += n * (n - 1) // 2
        agreeing += sum(c * (c - 1) // 2 for c in Counter(answers.values()).values())
    return {"value": agreeing / compared if compared else None, "pairs": pairs, "comparisons": compared}


def agreement_report(
    labels: list[PairLabel], *, flag_margin: float = FLAG_MARGIN, min_compared: int = MIN_COMPARED
) -> dict:
    """Agreement of the annotators of `labels` (a person's answers, or several labellers' verdicts), as a dict:

        annotators      {name: {"answers": non-skip answers, "skips": skips}}
        shared_pairs    pairs answered by two or more annotators; shared_items: the items those pairs belong to
        raw_agreement   {"value", "pairs", "comparisons"}
        cohen           two annotators: {"kappa", "p_o", "p_e", "pairs", "annotators"}; otherwise None
        fleiss          three or more: {"kappa", "P_bar", "P_e", "pairs", "raters_per_pair", "left_out"}; otherwise
                        None. Pairs answered by a number of annotators other than the most common one (n >= 2; the
                        larger n when two are as common) are left out, counted.
        per_annotator   {name: {"agreement", "pairs", "no_majority"}}: on the pairs the annotator shares with
                        others, the share where their answer equals the majority (`records.majority`) of the OTHER
                        annotators' answers; pairs where the others are level are left out (no_majority)
        flagged         [{"annotator", "agreement", "median", "pairs"}]: needs three or more annotators judged
                        (each compared on >= min_compared pairs); flagged when the agreement is more than
                        flag_margin below the median of the judged annotators' agreements
        notes           sentences about what could not be computed and why
    """
    units = answers_by_pair(labels)
    names = sorted({annotator_of(label) for label in labels})
    annotators = {name: {"answers": 0, "skips": 0} for name in names}
    for label in labels:
        annotators[annotator_of(label)]["skips" if label.outcome == "skip" else "answers"] += 1
    shared = {unit: answers for unit, answers in units.items() if len(answers) >= 2}
    notes: list[str] = []
    report = {
        "annotators": annotators,
        "shared_pairs": len(shared),
        "shared_items": len({item_id for item_id, _, _ in shared}),
        "raw_agreement": raw_agreement(units),
        "cohen": None,
        "fleiss": None,
        "per_annotator": {},
        "flagged": [],
        "flag_margin": flag_margin,
        "notes": notes,
    }
    if len(names) < 2:
        notes.append(f"{len(names)} annotator{'s' if len(names) != 1 else ''}: agreement needs two or more.")
        return report
    if not shared:
        notes.append("No pair was answered by two annotators (give some items to every annotator: the overlap).")
        return report

    if len(names) == 2:
        index = {category: k for k, category in enumerate(CATEGORIES)}
        table = [[0] * len(CATEGORIES) for _ in CATEGORIES]
        for answers in shared.values():
            table[index[answers[names[0]]]][index[answers[names[1]]]] += 1
        report["cohen"] = {**cohen_kappa(table), "annotators": names}
        if report["cohen"]["kappa"] is None:
            notes.append(_undefined("Cohen's"))
    else:
        sizes = Counter(len(answers) for answers in shared.values())
        n = max(sizes, key=lambda size: (sizes[size], size))
        tallies = [Counter(answers.values()) for answers in shared.values() if len(answers) == n]
        counts = [[tally[category] for category in CATEGORIES] for tally in tallies]
        report["fleiss"] = {**fleiss_kappa(counts), "left_out": len(shared) - len(counts)}
        if report["fleiss"]["left_out"]:
            notes.append(
                f"Fleiss' kappa uses the {len(counts)} pairs answered by {n} annotators; "
                f"{report['fleiss']['left_out']} pairs answered by another number of annotators are left out."
            )
        if report["fleiss"]["kappa"] is None:
            notes.append(_undefined("Fleiss'"))

    per_annotator = report["per_annotator"]
    for name in names:
        agree = compared = level = 0
        for answers in shared.values():
            if name not in answers:
                continue
            verdict = majority([outcome for who, outcome in answers.items() if who != name])
            if verdict is None:
                level += 1
                continue
            compared += 1
            agree += answers[name] == verdict
        per_annotator[name] = {"agreement": agree / compared if compared else None, "pairs": compared,
                               "no_majority": level}  # fmt: skip

    if len(names) == 2:
        notes.append("Two annotators: a disagreement cannot be pinned on either, so nobody is flagged (that needs 3+).")
        return report
    judged = {
        name: row
        for name, row in per_annotator.items()
        if row["agreement"] is not None and row["pairs"] >= min_compared
    }
    if len(judged) < 3:
        notes.append(
            f"Nobody is flagged: {len(judged)} annotator(s) share {min_compared}+ pairs with the others; it takes 3."
        )
        return report
    median = statistics.median(row["agreement"] for row in judged.values())
    for name, row in judged.items():
        if row["agreement"] < median - flag_margin - 1e-12:
            report["flagged"].append({"annotator": name, "agreement": row["agreement"], "median": median,
                                      "pairs": row["pairs"]})  # fmt: skip
    return report


def describe(report: dict) -> list[str]:
    """The report as plain lines for a terminal or a log."""
    lines = []
    who = ", ".join(
        f"{name} ({row['answers']} answers, {row['skips']} skips)" for name, row in report["annotators"].items()
    )
    lines.append(f"Annotators: {who or 'none'}")
    lines.append(f"Pairs answered by two or more: {report['shared_pairs']} (of {report['shared_items']} items)")
    raw = report["raw_agreement"]
    if raw["value"] is not None:
        lines.append(f"Raw agreement: {raw['value']:.3f} ({raw['comparisons']} comparisons on {raw['pairs']} pairs)")
    if report["cohen"]:
        cohen = report["cohen"]
        lines.append(f"Cohen's kappa ({' vs '.join(cohen['annotators'])}): {_number(cohen['kappa'])} "
                     f"(p_o {cohen['p_o']:.3f}, p_e {cohen['p_e']:.3f}, {cohen['pairs']} pairs)")  # fmt: skip
    if report["fleiss"]:
        fleiss = report["fleiss"]
        lines.append(f"Fleiss' kappa: {_number(fleiss['kappa'])} (P_bar {fleiss['P_bar']:.3f}, "
                     f"P_e {fleiss['P_e']:.3f}, {fleiss['pairs']} pairs with {fleiss['raters_per_pair']} "
                     "annotators each)")  # fmt: skip
    for name, row in report["per_annotator"].items():
        extra = f", {row['no_majority']} with the others level" if row["no_majority"] else ""
        lines.append(f"  {name}: agrees with the others' majority {_number(row['agreement'])} "
                     f"({row['pairs']} pairs{extra})")  # fmt: skip
    for flag in report["flagged"]:
        lines.append(f"Flagged: {flag['annotator']} agrees with the others {flag['agreement']:.3f}, more than "
                     f"{report['flag_margin']:.2f} below the median {flag['median']:.3f} "
                     f"({flag['pairs']} pairs)")  # fmt: skip
    lines.extend(report["notes"])
    return lines


def _undefined(which: str) -> str:
    return (f"{which} kappa is undefined: every annotator gave the same answer on every shared pair (chance agreement "
            "is 1, so kappa is 0/0); see the raw agreement.")  # fmt: skip


def _number(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.3f}"


def _is_one(value: float) -> bool:
    return abs(1.0 - value) < 1e-12
