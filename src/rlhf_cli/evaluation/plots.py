"""PNG figures for the evaluation report, drawn with matplotlib's Agg (file-only) renderer.

matplotlib is imported inside each function, so importing this module costs nothing. Figures are built as
`matplotlib.figure.Figure` objects on an Agg canvas rather than through pyplot: nothing is registered in pyplot's
global figure list, no display backend is touched, and each figure is freed once the function returns.
Every function writes one PNG at `path` (parent folders created) and returns that path; the file names the
report links are listed in `rlhf_cli.evaluation.report.FIGURES`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rlhf_cli.evaluation.metrics import finite_or_none, pearson

DPI = 100
POLICY_COLOR, REFERENCE_COLOR, JUDGE_COLOR = "tab:blue", "tab:orange", "tab:green"


def _figure(ncols: int = 1, width_per_plot: float = 6.0, height: float = 4.0, suptitle: str | None = None):
    """A figure with `ncols` side-by-side axes on an Agg canvas, and an overall title when `suptitle` is given.

    Margins are fixed in inches instead of using matplotlib's constrained/tight layout, which triples the time
    to draw a small figure; they leave room for tick labels, axis labels, titles and a suptitle.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width = width_per_plot * ncols
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    top_margin = 0.75 if suptitle else 0.4  # inches: the axes' own titles, plus the suptitle when there is one
    figure.subplots_adjust(left=0.75 / width, right=1 - 0.25 / width, bottom=0.6 / height,
                           top=1 - top_margin / height, wspace=0.35)  # fmt: skip
    if suptitle:
        figure.suptitle(suptitle)
    axes = figure.subplots(1, ncols, squeeze=False)[0]
    return figure, list(axes)


def _save(figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, format="png")
    figure.clear()  # drop artists now rather than at garbage collection
    return path


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that carry a finite number for `key`; the record index stands in for a
    missing step."""
    steps, values = [], []
    for index, record in enumerate(records):
        value = finite_or_none(record.get(key))
        if value is not None:
            steps.append(record.get("step", index))
            values.append(value)
    return steps, values


def reward_distribution(policy_scores, reference_scores, path, *, bins: int = 30) -> Path:
    """Overlaid histograms of reward-model scores of policy and reference responses, on shared bins.

    `reference_scores` may be None for a policy-only plot.
    """
    policy = np.asarray(policy_scores, dtype=float)
    reference = None if reference_scores is None else np.asarray(reference_scores, dtype=float)
    if policy.size == 0 or (reference is not None and reference.size == 0):
        raise ValueError("reward_distribution needs at least one policy score (and one reference score if given).")
    pooled = policy if reference is None else np.concatenate([policy, reference])
    edges = np.histogram_bin_edges(pooled, bins=bins)  # shared bins so the two shapes compare bar for bar
    figure, (axes,) = _figure()
    axes.hist(policy, bins=edges, alpha=0.6, color=POLICY_COLOR, label=f"policy (mean {policy.mean():.3f})")
    if reference is not None:
        axes.hist(reference, bins=edges, alpha=0.6, color=REFERENCE_COLOR,
                  label=f"reference (mean {reference.mean():.3f})")  # fmt: skip
    axes.set_xlabel("reward-model score")
    axes.set_ylabel("responses")
    axes.set_title("Reward distribution")
    axes.legend()
    return _save(figure, path)


def reward_vs_length(scores, lengths, path, label: str = "policy", *, reference_scores=None,
                     reference_lengths=None) -> Path:  # fmt: skip
    """Scatter of reward-model score against response length (tokens), with Pearson r in the legend.

    Pass `reference_scores` and `reference_lengths` to overlay the reference model's responses on the same axes.
    A strong positive r means the reward model pays for length.
    """
    figure, (axes,) = _figure()
    series = [(label, scores, lengths, POLICY_COLOR)]
    if reference_scores is not None and reference_lengths is not None:
        series.append(("reference", reference_scores, reference_lengths, REFERENCE_COLOR))
    for name, ys, xs, color in series:
        xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
        if xs.shape != ys.shape:
            raise ValueError(f"{name}: {ys.size} scores but {xs.size} lengths.")
        axes.scatter(xs, ys, s=14, alpha=0.6, color=color, label=f"{name} (r = {pearson(xs, ys):.2f})")
    axes.set_xlabel("response length (tokens)")
    axes.set_ylabel("reward-model score")
    axes.set_title("Reward vs response length")
    axes.legend()
    return _save(figure, path)


def training_curves(records: list[dict], path) -> Path:
    """Score, KL and (when logged) judge score against PPO step, one subplot each, from metrics.jsonl records."""
    panels = [("score", "reward-model score", POLICY_COLOR), ("kl", "KL(policy || reference)", REFERENCE_COLOR)]
    if _series(records, "judge_score")[1]:
        panels.append(("judge_score", "judge score", JUDGE_COLOR))
    figure, axes_list = _figure(ncols=len(panels), width_per_plot=4.5, suptitle="PPO training curves")
    for axes, (key, title, color) in zip(axes_list, panels):
        steps, values = _series(records, key)
        axes.plot(steps, values, marker="o", markersize=3, color=color)
        axes.set_xlabel("step")
        axes.set_ylabel(key)
        axes.set_title(title)
        axes.grid(alpha=0.3)
    return _save(figure, path)


def _points_vs_kl(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(kl, value) of the records that carry finite numbers for both `kl` and `key`."""
    kls, values = [], []
    for record in records:
        kl, value = finite_or_none(record.get("kl")), finite_or_none(record.get(key))
        if kl is not None and value is not None:
            kls.append(kl)
            values.append(value)
    return kls, values


def overoptimisation_figure(records: list[dict]):
    """The figure of `overoptimisation`, not yet saved: one axes, one scatter per score (one point per logged step
    at the KL logged with it), the legend saying which score and how many steps.

    The proxy is the reward-model score PPO optimised (`score`; GRPO/RLOO's `reward`); the judge score
    (`judge_score`, logged when the PPO recipe sets `ppo.judge`) is drawn on the same axes when at least one step
    logged it. Gao et al. 2022: as KL grows the proxy keeps rising while a gold/judge score peaks and falls.
    """
    proxy = _points_vs_kl(records, "score")
    judge = _points_vs_kl(records, "judge_score")
    figure, (axes,) = _figure(width_per_plot=6.5)
    series = [(proxy, "proxy: reward-model score", POLICY_COLOR, "o")]
    if judge[0]:
        series.append((judge, "judge score", JUDGE_COLOR, "^"))
    for (kls, values), label, color, marker in series:
        if kls:
            axes.scatter(kls, values, s=18, alpha=0.75, color=color, marker=marker,
                         label=f"{label} ({len(kls)} steps)")  # fmt: skip
    if proxy[0] or judge[0]:
        axes.legend(title="one point per PPO step")
    else:
        axes.text(0.5, 0.5, "no step logged both kl and score", transform=axes.transAxes, ha="center", va="center")
    axes.set_xlabel("KL(policy || reference) at the step")
    axes.set_ylabel("mean score of the step's rollouts")
    axes.set_title("Proxy and judge score vs KL" if judge[0] else "Proxy score vs KL (no judge_score logged)")
    axes.grid(alpha=0.3)
    return figure


def overoptimisation(records: list[dict], path) -> Path:
    """Scatter of the proxy (reward-model) score against KL from the reference, one point per logged PPO step, with
    the judge score on the same axes when the run logged `judge_score` (see `overoptimisation_figure`)."""
    return _save(overoptimisation_figure(records), path)


def overoptimisation_curve(points: list[dict], peak: dict, path) -> Path:
    """The over-optimisation curve of eval.curve: proxy (reward model, left axis) and gold (right axis) mean score
    against sqrt(KL(policy || reference)), one point per evaluated snapshot (labelled with its PPO step; step 0 is
    the reference), the gold peak marked with a star. Two y-axes, raw scores: the proxy's scale is arbitrary (a
    Bradley-Terry logit) and the gold's is its own (a rule's 0..1), so neither is standardised."""
    figure, (axes,) = _figure(width_per_plot=7.0, height=4.5)
    figure.subplots_adjust(right=1 - 0.8 / 7.0)
    x = [point["sqrt_kl"] for point in points]
    proxy = [point["proxy_mean"] for point in points]
    gold = [point["gold_mean"] for point in points]
    axes.plot(x, proxy, "o-", color=POLICY_COLOR, label="proxy (reward model)")
    axes.set_xlabel("sqrt(KL(policy || reference)), KL in nats per response")
    axes.set_ylabel("proxy: mean reward-model score", color=POLICY_COLOR)
    gold_axes = axes.twinx()
    gold_axes.plot(x, gold, "^-", color=JUDGE_COLOR, label="gold")
    gold_axes.set_ylabel("gold: mean score", color=JUDGE_COLOR)
    best = peak["gold_peak"]
    gold_axes.plot([best["sqrt_kl"]], [best["gold_mean"]], "*", markersize=16, color="tab:red",
                   label=f"gold peak (step {best['step']})")  # fmt: skip
    for point, value in zip(points, proxy):
        axes.annotate(str(point["step"]), (point["sqrt_kl"], value), textcoords="offset points", xytext=(3, 4),
                      fontsize=7, color=POLICY_COLOR)  # fmt: skip
    handles = axes.get_legend_handles_labels()[0] + gold_axes.get_legend_handles_labels()[0]
    labels = axes.get_legend_handles_labels()[1] + gold_axes.get_legend_handles_labels()[1]
    axes.legend(handles, labels, loc="best", fontsize=8, title="numbers: PPO step")
    verdict = "gold peaks before the end" if peak["gold_peaks_before_end"] else "gold still at its peak at the end"
    axes.set_title(f"Over-optimisation: proxy and gold vs sqrt(KL) ({verdict})")
    axes.grid(alpha=0.3)
    return _save(figure, path)
