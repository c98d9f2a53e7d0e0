"""The statistics of ``surgery compare``: per method the mean and spread over seeds at the best and at the
last evaluation, the paired difference to baseline (same seed: same split, data order and head) with
its 95% t interval (``scipy.stats.t``), a verdict in words, and the costs.

With k folds a seed's score is the mean over its folds; seeds are the independent repetitions.
"""

from __future__ import annotations

import math
import statistics

__all__ = ["spread", "paired_interval", "verdict", "summarize", "LEVEL"]

LEVEL = 0.95


def spread(values) -> dict:
    """``{"n", "mean", "sd"}`` (sample standard deviation; 0 for one value)."""
    values = list(values)
    return {"n": len(values), "mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def paired_interval(differences, level: float = LEVEL) -> dict:
    """The mean of paired ``differences`` and its two-sided ``level`` t interval.

    ``{"n", "mean", "sd", "df", "t_crit", "low", "high"}``; with one difference there is no interval
    (``df`` 0, bounds None).
    """
    from scipy import stats

    d = list(differences)
    s = spread(d)
    out = {**s, "df": len(d) - 1, "t_crit": None, "low": None, "high": None}
    if len(d) < 2:
        return out
    t_crit = float(stats.t.ppf(0.5 + level / 2, len(d) - 1))
    half = t_crit * s["sd"] / math.sqrt(len(d))
    out.update(t_crit=t_crit, low=s["mean"] - half, high=s["mean"] + half)
    return out


def verdict(iv: dict, higher_is_better: bool) -> str:
    """``"better"``, ``"worse"`` or ``"no difference measurable with N seeds"`` from a paired interval of
    (method - baseline)."""
    if iv["low"] is None:
        return "one seed: no interval (use --seeds 2 or more)"
    if iv["low"] > 0 or iv["high"] < 0:
        up = iv["low"] > 0
        return "better" if up == higher_is_better else "worse"
    return f"no difference measurable with {iv['n']} seeds"


def _per_seed(runs: list[dict], label: str, folds: int) -> dict[int, dict]:
    """``seed -> {"last", "best"}`` (means over the folds) for the seeds with every fold finished."""
    by_seed: dict[int, list[dict]] = {}
    for r in runs:
        if r["method"] == label:
            by_seed.setdefault(r["seed"], []).append(r)
    return {s: {"last": statistics.fmean(r["last"] for r in rs), "best": statistics.fmean(r["best"] for r in rs)}
            for s, rs in sorted(by_seed.items()) if len(rs) == folds}


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _clock(runs: list[dict]) -> str:
    """The time per step the costs compare: the process's CPU time where every run has it (a CPU device:
    the other work of a shared machine inflates wall time, not this), else the wall time (a GPU, with the
    device synchronised)."""
    return "step_cpu_seconds" if runs and all(r.get("step_cpu_seconds") for r in runs) else "step_seconds"


def summarize(runs: list[dict], methods, metric, constant: float, folds: int) -> list[dict]:
    """One summary per method (baseline first): scores, the paired difference and verdict, the costs."""
    base_label = methods[0].label
    base = _per_seed(runs, base_label, folds)
    base_runs = {(r["seed"], r["fold"]): r for r in runs if r["method"] == base_label}
    out = []
    for m in methods:
        seeds = _per_seed(runs, m.label, folds)
        if not seeds:
            continue
        mine = [r for r in runs if r["method"] == m.label]
        row = {"method": m.label, "knobs": m.knobs, "seeds": sorted(seeds), "per_seed": seeds,
               "last": spread(v["last"] for v in seeds.values()), "best": spread(v["best"] for v in seeds.values())}
        for which in ("last", "best"):
            common = [s for s in seeds if s in base]
            if m.label == base_label or not common:
                row[f"diff_{which}"] = None
                continue
            iv = paired_interval([seeds[s][which] - base[s][which] for s in common])
            ref = statistics.fmean(base[s][which] for s in common)
            iv["relative"] = iv["mean"] / abs(ref) if ref else None
            iv["verdict"] = verdict(iv, metric.higher_is_better)
            row[f"diff_{which}"] = iv
        mean_last = row["last"]["mean"]
        row["beats_constant"] = mean_last > constant if metric.higher_is_better else mean_last < constant
        clock = _clock(runs)
        ratios = [r[clock] / base_runs[(r["seed"], r["fold"])][clock] for r in mine
                  if (r["seed"], r["fold"]) in base_runs and base_runs[(r["seed"], r["fold"])][clock] > 0]
        export = next((r for r in mine if r.get("export_bytes") is not None), None)
        row["cost"] = {
            "clock": clock,
            "step_seconds": _median(r[clock] for r in mine),
            "step_wall_seconds": _median(r["step_seconds"] for r in mine),
            "step_ratio": _median(ratios),
            "peak_memory": _median(r.get("peak_memory") for r in mine),
            "memory_kind": mine[0].get("memory_kind"),
            "export_bytes": export["export_bytes"] if export else None,
            "export_form": export["export_form"] if export else None,
            "run_seconds": _median(r["seconds"] for r in mine),
        }
        out.append(row)
    return out
