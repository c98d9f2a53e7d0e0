"""The one figure of ``surgery compare`` (matplotlib, drawn without pyplot): per method the score of
every seed with the mean and its 95% interval; the paired differences to baseline with theirs; the
validation curves (mean over seeds)."""

from __future__ import annotations

import math
import statistics

__all__ = ["draw"]


def draw(path, summary: list[dict], runs: list[dict], info: dict) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global state, no display, whatever backend is set
    from scipy import stats

    metric = info["metric_title"]
    labels = [r["method"] for r in summary]
    fig = Figure(figsize=(16, 0.35 * len(labels) + 4.2))
    ax1, ax2, ax3 = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 1.2]})
    ys = range(len(labels))
    for y, r in zip(ys, summary):
        vals = [v["last"] for v in r["per_seed"].values()]
        ax1.scatter(vals, [y] * len(vals), s=18, alpha=0.6, color="C0")
        if len(vals) > 1:
            half = stats.t.ppf(0.975, len(vals) - 1) * statistics.stdev(vals) / math.sqrt(len(vals))
            ax1.errorbar([statistics.fmean(vals)], [y], xerr=[half], fmt="D", color="black", capsize=4, ms=5)
        else:
            ax1.plot([vals[0]], [y], "D", color="black", ms=5)
    const = info["constant"]
    lo, hi = ax1.get_xlim()
    if lo - (hi - lo) <= const <= hi + (hi - lo):  # on the scale: show it; else say it in the title
        ax1.axvline(const, color="C3", ls="--", lw=1, label=f"constant predictor {const:.3g}")
        ax1.legend(loc="best", fontsize=8)
        title = f"{metric} at the last evaluation"
    else:
        title = f"{metric} at the last evaluation\n(constant predictor {const:.3g}, off the scale)"
    ax1.set_yticks(list(ys), labels)
    ax1.invert_yaxis()
    ax1.set_title(title, fontsize=10)
    ax1.set_xlabel(f"{metric} ({'higher' if info['higher_is_better'] else 'lower'} is better); "
                   "points: seeds, bars: 95% interval", fontsize=8)
    for y, r in zip(ys, summary):
        iv = r["diff_last"]
        if iv is None:
            continue
        base = summary[0]["per_seed"]
        d = [r["per_seed"][s]["last"] - base[s]["last"] for s in r["per_seed"] if s in base]
        ax2.scatter(d, [y] * len(d), s=18, alpha=0.6, color="C1")
        if iv["low"] is not None:
            ax2.errorbar([iv["mean"]], [y], xerr=[[iv["mean"] - iv["low"]], [iv["high"] - iv["mean"]]], fmt="D",
                         color="black", capsize=4, ms=5)
    ax2.axvline(0, color="gray", lw=1)
    ax2.set_yticks(list(ys), labels)
    ax2.invert_yaxis()
    ax2.set_title("difference to baseline, paired by seed", fontsize=10)
    ax2.set_xlabel(f"method - baseline ({metric}); bars: 95% t interval", fontsize=8)
    for i, r in enumerate(summary):
        curves: dict[int, list[float]] = {}
        for run in runs:
            if run["method"] == r["method"]:
                for e in run["evals"]:
                    curves.setdefault(e["step"], []).append(e["value"])
        steps = sorted(curves)
        ax3.plot(steps, [statistics.fmean(curves[s]) for s in steps], marker="o", ms=3, label=r["method"],
                 color=f"C{i % 10}")
    ax3.set_title(f"validation {metric} during training (mean over seeds)", fontsize=10)
    ax3.set_xlabel("optimizer step", fontsize=8)
    ax3.grid(alpha=0.3)
    ax3.legend(fontsize=7)
    fig.suptitle(info["title"], fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
