"""The evaluation report: `eval.json` (every number, for machines) and `report.md` (tables, for people).

`write_report(out_dir, results, samples)` takes the `results` dict below. Every top-level section is optional:
a reward-model-only evaluation passes just `reward_model`, a policy evaluation leaves it out. The section dicts
are exactly what the functions in `rlhf_cli.evaluation.metrics` return, so a stage assembles them directly.

    results = {
        "meta": {str: str | int | float},        # free-form run facts: policy, reference, reward_model, dataset ...
        "reward_model": {                        # metrics.reward_model_metrics(...)
            "num_pairs": int,
            "accuracy": float | None,            # pairwise accuracy over the pairs not tied (None: all tied)
            "pairs_decided": int, "wins": int, "losses": int,
            "ties": int, "tie_rate": float,      # pairs scored equal (within tie_tolerance), and their share
            "accuracy_ties_as_half": float,      # the older figure: (wins + ties / 2) / num_pairs
            "tie_tolerance": float,              # metrics.TIE_TOLERANCE
            "mean_margin": float,                # mean of s_chosen - s_rejected
            "calibration": [{"low": float, "high": float, "count": int, "ties": int, "accuracy": float | None}, ...],
            "length_bias": float | None,         # P(RM prefers the longer response), untied pairs of unequal length
            "accuracy_shorter_chosen": float | None,
        },
        "policy": {                              # policy against the reference, scored by the reward model
            "win_rate": {"win_rate", "wins", "ties", "losses", "n", "ci_low", "ci_high", "confidence"},
                                                 # metrics.win_rate(...)
            "policy_score": {"mean", "std", "min", "max", "count"},      # metrics.summarize(...)
            "reference_score": {"mean", "std", "min", "max", "count"},
            "kl": {"kl": float, "stderr": float | None, "count": int},  # metrics.sampled_kl(...)
        },
        "diversity": {                           # one entry per model label, e.g. "policy", "reference"
            label: {"distinct_1", "distinct_2", "repetition_rate", "eos_rate", "mean_length"},
        },                                       # metrics.diversity_metrics(...)
        "perplexity": {label: float},            # metrics.perplexity(...) per model label
        "judge": {                               # an independent judge scoring the same responses
            "name": str,
            "win_rate": {...as in policy...}, "policy_score": {...}, "reference_score": {...},
            "proxy_correlation": float,          # metrics.pearson(reward-model scores, judge scores)
        },
        "implicit_reward": {                     # metrics.implicit_reward_metrics(...) of the policy on the pairs
            "num_pairs", "beta", "accuracy", "accuracy_strict", "wins", "ties", "losses", "tie_tolerance",
            "mean_margin", "chosen_reward", "rejected_reward",
            "logps": {"policy": {"chosen", "rejected"}, "reference": {...}, "change": {...}},
            "likelihood_displacement": bool,
            "beta_source": str, "max_length": int, "max_length_source": str, "pairs_cut": int,
        },
        "overoptimisation": {                    # eval.curve: PPO snapshots on the same prompts, same seeds
            "run": str, "gold": str, "proxy": str,
            "points": [{"step", "kl", "kl_stderr", "sqrt_kl", "proxy_mean", "gold_mean", "n"}, ...],
                                                 # metrics.curve_point(...) per snapshot, step 0 = the reference
            "gold_peak": {"step", "sqrt_kl", "gold_mean"}, "gold_peaks_before_end": bool,
            "gold_drop_after_peak": float,       # metrics.gold_peak(points)
        },
        "warnings": [str, ...],                  # likelihood displacement, ...; absent when there is none
        "policies": {                            # with eval.compare: every policy, `model:` first (eval.name)
            name: {"path": str, "prompts": int,
                   "score": {...summarize}, "win_rate": {...vs reference}, "judge_score": {...},
                   "judge_win_rate": {...}, "kl": {...}, "diversity": {...}, "perplexity": float,
                   "implicit_reward": {...as above...}},   # each key only when its part ran for that policy
        },
        "head_to_head": [                        # with eval.compare: every pair of policies once, per scorer
            {"a": str, "b": str, "scorer": "reward_model" | "judge", **metrics.win_rate(scores of a, scores of b)},
        ],
    }

Within `policy` and `judge` each key is optional too. `samples` is a list of dicts with `prompt`,
`policy_response`, `policy_score` and optionally `reference_response`, `reference_score`; they appear as a table
in report.md. `eval.json` holds `results` as given (numpy numbers become Python numbers; a non-finite float
becomes null, which JSON cannot otherwise represent). report.md links the figures of `rlhf_cli.evaluation.plots`
that exist in `out_dir`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

EVAL_JSON = "eval.json"
REPORT_MD = "report.md"

# Figures written by rlhf_cli.evaluation.plots under these names, in report order, with their captions.
FIGURES = {
    "reward_distribution.png": "Reward-model scores of policy and reference responses",
    "reward_vs_length.png": "Reward against response length",
    "training_curves.png": "PPO training curves",
    "overoptimisation.png": "Proxy (reward-model) score against KL from the reference, one point per PPO step, "
    "with the judge score when the PPO run logged one",
    "overoptimisation_curve.png": "Over-optimisation curve: proxy and gold score of each PPO snapshot against "
    "sqrt(KL to the reference), the gold peak starred",
}


def write_report(out_dir, results: dict, samples: list[dict]) -> None:
    """Write `eval.json` and `report.md` for `results` (schema in the module docstring) into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clean = _jsonable(results)
    (out_dir / EVAL_JSON).write_text(json.dumps(clean, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    (out_dir / REPORT_MD).write_text(render_markdown(clean, samples, out_dir), encoding="utf-8")


def _jsonable(value):
    """Plain JSON types: numpy scalars and arrays to Python, tuples to lists, NaN and infinities to None."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(item) for item in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


# ---------------------------------------------------------------- markdown


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return _cell(str(value))


def _cell(text: str) -> str:
    """Text made safe for one markdown table cell: pipes escaped, line breaks as <br>."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>")


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(_fmt(value) for value in row) + " |" for row in rows]
    return lines + [""]


def _win_rate_line(win: dict) -> str:
    confidence = round(100 * win.get("confidence", 0.95))
    return (
        f"Win rate: **{_fmt(win.get('win_rate'))}** ({confidence}% Wilson interval {_fmt(win.get('ci_low'))} to "
        f"{_fmt(win.get('ci_high'))}; wins {win.get('wins', 0)}, ties {win.get('ties', 0)}, "
        f"losses {win.get('losses', 0)}, n = {win.get('n', 0)}; a tie counts as half a win)."
    )


def _score_rows(section: dict) -> list[list]:
    rows = []
    for label, key in (("policy", "policy_score"), ("reference", "reference_score")):
        if key in section:
            stats = section[key]
            rows.append([label, stats.get("mean"), stats.get("std"), stats.get("min"), stats.get("max"),
                         stats.get("count")])  # fmt: skip
    return rows


def _scores_and_wins(section: dict) -> list[str]:
    lines = []
    if "win_rate" in section:
        lines += [_win_rate_line(section["win_rate"]), ""]
    rows = _score_rows(section)
    if rows:
        lines += _table(["model", "mean score", "std", "min", "max", "n"], rows)
    return lines


def _reward_model_section(rm: dict) -> list[str]:
    lines = ["## Reward model", ""]
    tie_rate = rm.get("tie_rate")
    ties = f"{rm.get('ties')} ({_fmt(tie_rate)})" if "ties" in rm else None
    lines += _table(
        ["pairs", "accuracy (ties left out)", "ties (rate)", "mean margin", "length bias",
         "accuracy when shorter chosen", "accuracy, ties as half"],
        [[rm.get("num_pairs"), rm.get("accuracy"), ties, rm.get("mean_margin"), rm.get("length_bias"),
          rm.get("accuracy_shorter_chosen"), rm.get("accuracy_ties_as_half")]],
    )  # fmt: skip
    tolerance = rm.get("tie_tolerance")
    within = f" (|s_chosen - s_rejected| <= {tolerance:g} x max(1, |s|))" if tolerance is not None else ""
    legend = (
        f"A tie is a pair whose two responses score the same{within}. Accuracy, length bias and accuracy when "
        "shorter chosen are over the pairs that are not tied; the last column is the older figure, a tie counting "
        "as half a win. Length bias is the fraction of unequal-length pairs where the reward model prefers the "
        "longer response (0.5 = indifferent to length)."
    )
    lines += [legend, ""]
    if rm.get("calibration"):
        lines += ["### Calibration: accuracy by score gap |s_chosen - s_rejected|", ""]
        lines += _table(
            ["gap from", "gap to", "pairs", "ties", "accuracy (ties left out)"],
            [[b.get("low"), b.get("high"), b.get("count"), b.get("ties", 0), b.get("accuracy")]
             for b in rm["calibration"]],
        )  # fmt: skip
    return lines


def _policy_section(policy: dict) -> list[str]:
    lines = ["## Policy vs reference", ""] + _scores_and_wins(policy)
    if "kl" in policy:
        kl = policy["kl"]
        stderr = "" if kl.get("stderr") is None else f" ± {_fmt(kl['stderr'])} (standard error)"
        sentence = (
            f"KL(policy ‖ reference) per response: **{_fmt(kl.get('kl'))}**{stderr} over "
            f"{kl.get('count', 'n/a')} sampled responses."
        )
        lines += [sentence, ""]
    return lines


def _diversity_section(diversity: dict) -> list[str]:
    columns = ["distinct_1", "distinct_2", "repetition_rate", "eos_rate", "mean_length"]
    rows = [[label] + [stats.get(column) for column in columns] for label, stats in diversity.items()]
    return ["## Diversity", ""] + _table(
        ["model", "distinct-1", "distinct-2", "3-gram repetition rate", "EOS rate", "mean length (tokens)"], rows
    )


def _perplexity_section(perplexity: dict) -> list[str]:
    return ["## Perplexity", ""] + _table(
        ["model", "perplexity"], [[label, value] for label, value in perplexity.items()]
    )


def _judge_section(judge: dict) -> list[str]:
    title = f"## Judge: {_cell(judge['name'])}" if judge.get("name") else "## Judge"
    lines = [title, ""] + _scores_and_wins(judge)
    if judge.get("proxy_correlation") is not None:
        lines += [f"Proxy vs judge: Pearson r between reward-model and judge scores over every scored response "
                  f"= **{_fmt(judge['proxy_correlation'])}**.", ""]  # fmt: skip
    return lines


def _warnings_section(warnings: list[str]) -> list[str]:
    return ["## Warnings", ""] + [f"- **Warning**: {_cell(line)}" for line in warnings] + [""]


def _implicit_reward_table(sections: dict[str, dict]) -> list[str]:
    rows = []
    for name, ir in sections.items():
        ties = f"{ir.get('ties')} ({_fmt(ir['ties'] / ir['num_pairs'] if ir.get('num_pairs') else None)})"
        rows.append([name, ir.get("num_pairs"), ir.get("beta"), ir.get("accuracy"), ties, ir.get("accuracy_strict"),
                     ir.get("mean_margin"), ir.get("chosen_reward"), ir.get("rejected_reward")])  # fmt: skip
    return _table(["policy", "pairs", "beta", "accuracy (ties as half)", "ties (rate)", "accuracy (ties as wrong)",
                   "mean margin", "mean r_chosen", "mean r_rejected"], rows)  # fmt: skip


def _logps_table(sections: dict[str, dict]) -> list[str]:
    rows = []
    for name, ir in sections.items():
        logps = ir.get("logps") or {}
        for side in ("chosen", "rejected"):
            rows.append([name, side, (logps.get("policy") or {}).get(side), (logps.get("reference") or {}).get(side),
                         (logps.get("change") or {}).get(side)])  # fmt: skip
    return _table(["policy", "response", "mean log p, policy", "mean log p, reference", "change"], rows)


def _implicit_reward_section(sections: dict[str, dict]) -> list[str]:
    lines = ["## Implicit reward on preference pairs", ""]
    lines += _implicit_reward_table(sections)
    lines += ["r(x, y) = beta · (log π(y|x) − log π_ref(y|x)), each log-probability summed over the response's "
              "tokens. Accuracy is the share of pairs with r_chosen > r_rejected, a tie (equal log-ratios within "
              "the tie tolerance) counting as half; the strict figure counts a tie as wrong, as TRL's "
              "rewards/accuracies does. Neither depends on beta; the margin and the rewards scale with it.", ""]
    lines += ["### Log-probabilities of the held-out responses", ""] + _logps_table(sections)
    lines += ["A negative change of the chosen responses is likelihood displacement: the policy finds them less "
              "likely than the reference does, the margin notwithstanding.", ""]
    for name, ir in sections.items():
        beta = ir.get("beta")
        detail = (f"beta {beta:g} ({_cell(str(ir.get('beta_source')))}); pairs cut at "
                  f"{ir.get('max_length')} tokens ({_cell(str(ir.get('max_length_source')))}): "
                  f"{ir.get('pairs_cut')} of {ir.get('num_pairs')} cut")  # fmt: skip
        lines += [f"- **{_cell(name)}**: {detail}"]
    return lines + [""]


def _win_cell(win: dict | None) -> str | None:
    if not win:
        return None
    return f"{_fmt(win.get('win_rate'))} [{_fmt(win.get('ci_low'))}, {_fmt(win.get('ci_high'))}]"


def _policies_section(policies: dict[str, dict], head_to_head: list[dict]) -> list[str]:
    lines = ["## Policies compared", ""]
    rows = []
    for name, entry in policies.items():
        diversity = entry.get("diversity") or {}
        implicit = entry.get("implicit_reward") or {}
        rows.append([name, (entry.get("score") or {}).get("mean"), _win_cell(entry.get("win_rate")),
                     (entry.get("judge_score") or {}).get("mean"), _win_cell(entry.get("judge_win_rate")),
                     (entry.get("kl") or {}).get("kl"), diversity.get("mean_length"), diversity.get("eos_rate"),
                     diversity.get("distinct_2"), entry.get("perplexity"), implicit.get("accuracy")])  # fmt: skip
    header = ["policy", "mean score", "win rate vs reference [95% CI]", "judge mean", "judge win rate [95% CI]",
              "KL to reference", "mean length", "EOS rate", "distinct-2", "perplexity", "implicit-reward accuracy"]
    shown = [0] + [i for i in range(1, len(header)) if any(row[i] is not None for row in rows)]  # parts that ran
    lines += _table([header[i] for i in shown], [[row[i] for i in shown] for row in rows])
    lines += [f"- **{_cell(name)}**: {_cell(str(entry.get('path', '')))}" for name, entry in policies.items()] + [""]
    if head_to_head:
        lines += ["### Head to head", ""]
        lines += _table(["policy a", "policy b", "scored by", "win rate of a over b", "95% Wilson interval", "wins",
                         "ties", "losses", "n"],
                        [[h.get("a"), h.get("b"), "reward model" if h.get("scorer") == "reward_model" else "judge",
                          h.get("win_rate"), f"{_fmt(h.get('ci_low'))} to {_fmt(h.get('ci_high'))}", h.get("wins"),
                          h.get("ties"), h.get("losses"), h.get("n")] for h in head_to_head])  # fmt: skip
        lines += ["Every policy answered the same prompts with the same sampling seeds; a tie counts as half a win.",
                  ""]  # fmt: skip
    return lines


def _overoptimisation_section(curve: dict) -> list[str]:
    peak = curve["gold_peak"]
    verdict = (f"the gold score peaks at step {peak['step']} (sqrt(KL) {_fmt(peak['sqrt_kl'])}, gold "
               f"{_fmt(peak['gold_mean'])}) and falls by {_fmt(curve['gold_drop_after_peak'])} by the last snapshot"
               if curve["gold_peaks_before_end"] else
               f"the gold score is still at its highest at the end (step {peak['step']}, gold "
               f"{_fmt(peak['gold_mean'])}): no over-optimisation within this run")  # fmt: skip
    lines = ["## Over-optimisation curve", "",
             f"Snapshots of {_cell(curve['run'])}, each answering the same prompts with the same seeds; proxy "
             f"{_cell(curve['proxy'])} and gold {_cell(curve['gold'])} score the same responses. {verdict}.", ""]
    rows = [[point["step"], _fmt(point["kl"]), _fmt(point["sqrt_kl"]), _fmt(point["proxy_mean"]),
             _fmt(point["gold_mean"]), point["n"]] for point in curve["points"]]  # fmt: skip
    return lines + _table(["step", "KL", "sqrt(KL)", "proxy mean", "gold mean", "n"], rows) + [""]


def _samples_section(samples: list[dict]) -> list[str]:
    with_reference = any("reference_response" in sample for sample in samples)
    header = ["#", "prompt", "policy response", "policy score"]
    if with_reference:
        header += ["reference response", "reference score"]
    rows = []
    for index, sample in enumerate(samples, start=1):
        row = [index, str(sample.get("prompt", "")), str(sample.get("policy_response", "")),
               sample.get("policy_score")]  # fmt: skip
        if with_reference:
            row += [str(sample.get("reference_response", "")), sample.get("reference_score")]
        rows.append(row)
    return ["## Samples", ""] + _table(header, rows)


def _figures_section(out_dir: Path) -> list[str]:
    present = [name for name in FIGURES if (out_dir / name).is_file()]
    others = sorted(path.name for path in out_dir.glob("*.png") if path.name not in FIGURES)
    if not present and not others:
        return []
    lines = ["## Figures", ""]
    for name in present + others:
        caption = FIGURES.get(name, Path(name).stem.replace("_", " "))
        lines += [f"![{caption}]({name})", ""]
    return lines


def render_markdown(results: dict, samples: list[dict], out_dir: Path | None = None) -> str:
    """report.md as a string: one section per part of `results` present, then samples and figures."""
    lines = ["# Evaluation report", ""]
    meta = results.get("meta") or {}
    if meta:
        lines += [f"- **{_cell(key)}**: {_fmt(value)}" for key, value in meta.items()] + [""]
    if results.get("warnings"):
        lines += _warnings_section(results["warnings"])
    if results.get("reward_model"):
        lines += _reward_model_section(results["reward_model"])
    implicit = {name: entry["implicit_reward"] for name, entry in (results.get("policies") or {}).items()
                if entry.get("implicit_reward")}  # fmt: skip
    if not implicit and results.get("implicit_reward"):
        implicit = {"policy": results["implicit_reward"]}
    if implicit:
        lines += _implicit_reward_section(implicit)
    if results.get("policy"):
        lines += _policy_section(results["policy"])
    if results.get("diversity"):
        lines += _diversity_section(results["diversity"])
    if results.get("perplexity"):
        lines += _perplexity_section(results["perplexity"])
    if results.get("judge"):
        lines += _judge_section(results["judge"])
    if results.get("overoptimisation"):
        lines += _overoptimisation_section(results["overoptimisation"])
    if results.get("policies"):
        lines += _policies_section(results["policies"], results.get("head_to_head") or [])
    if samples:
        lines += _samples_section(samples)
    if out_dir is not None:
        lines += _figures_section(Path(out_dir))
    return "\n".join(lines).rstrip() + "\n"
