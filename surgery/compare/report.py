"""The report of ``surgery compare``: a table for the terminal, ``results.json`` (everything), ``results.csv``
(one row per run) and ``report.md`` (the tables, what each method does, every seed, how to read it).
"""

from __future__ import annotations

import csv
import io
import json

__all__ = ["terminal_table", "cost_table", "markdown", "write_csv", "write_json", "fmt_bytes", "fmt_diff"]


def fmt_bytes(n) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def fmt_value(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3f}" if abs(v) < 100 else f"{v:.4g}"


def _pm(s: dict) -> str:
    return fmt_value(s["mean"]) + (f" ± {fmt_value(s['sd'])}" if s["n"] > 1 else "")


def fmt_diff(iv: dict | None) -> str:
    """``-0.109 [-0.222, +0.004] (-10.6%)``: the mean paired difference and its 95% interval."""
    if iv is None:
        return "—"
    rel = f" ({iv['relative']:+.1%})" if iv.get("relative") is not None else ""
    if iv["low"] is None:
        return f"{iv['mean']:+.3f}{rel}"
    return f"{iv['mean']:+.3f} [{iv['low']:+.3f}, {iv['high']:+.3f}]{rel}"


def _verdict(row: dict) -> str:
    text = row["diff_last"]["verdict"] if row["diff_last"] else "reference"
    if not row["beats_constant"]:
        text += "; no better than the constant predictor"
    return text


def _columns(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _df(summary: list[dict]) -> str:
    dfs = sorted({r["diff_last"]["df"] for r in summary if r["diff_last"] and r["diff_last"]["low"] is not None})
    return f"95% t interval, df={'/'.join(map(str, dfs))}" if dfs else "no interval with one seed"


def header_lines(info: dict) -> list[str]:
    return [f"{k}: {v}" for k, v in info["header"]]


def terminal_table(summary: list[dict], info: dict) -> str:
    """The results for the terminal: the score at the last and best evaluation, the paired difference to
    baseline with its interval and verdict, the costs."""
    metric = info["metric_title"]
    rows = [["method", f"{metric} last", f"{metric} best", f"last - baseline [{_df(summary)}]", "verdict",
             "time/step", "peak memory", "checkpoint"]]
    for r in summary:
        c = r["cost"]
        ratio = f"{c['step_ratio']:.2f}x" if c["step_ratio"] is not None else "n/a"
        rows.append([r["method"], _pm(r["last"]), _pm(r["best"]), fmt_diff(r["diff_last"]), _verdict(r), ratio,
                     fmt_bytes(c["peak_memory"]), _checkpoint(c).replace(": no plain form", "")])
    return _columns(rows)


def _checkpoint(c: dict) -> str:
    form = "" if c["export_form"] in (None, "plain") else f" ({c['export_form']})"
    return fmt_bytes(c["export_bytes"]) + form


def cost_table(summary: list[dict], device: str) -> str:
    """The costs as a markdown table: time per step (and relative to baseline), peak memory, checkpoint."""
    base = summary[0]["cost"]
    lines = [f"| method | time per step | relative to baseline | peak memory | vs baseline | checkpoint after export |",
             "|---|---|---|---|---|---|"]
    for r in summary:
        c = r["cost"]
        mem = c["peak_memory"]
        dmem = ("—" if r is summary[0] else
                f"{'+' if mem >= base['peak_memory'] else '-'}{fmt_bytes(abs(mem - base['peak_memory']))}"
                if mem is not None and base["peak_memory"] is not None else "n/a")
        step = f"{c['step_seconds'] * 1000:.0f} ms" if c["step_seconds"] is not None else "n/a"
        ratio = f"{c['step_ratio']:.2f}x" if c["step_ratio"] is not None else "n/a"
        lines.append(f"| {r['method']} | {step} | {ratio} | {fmt_bytes(mem)} | {dmem} | {_checkpoint(c)} |")
    return "\n".join(lines)


def results_table(summary: list[dict], info: dict) -> str:
    metric = info["metric_title"]
    lines = [f"| method | {metric} at the last evaluation | {metric} at the best evaluation | "
             f"last - baseline [{_df(summary)}] | best - baseline | verdict (last) |", "|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['method']} | {_pm(r['last'])} | {_pm(r['best'])} | {fmt_diff(r['diff_last'])} | "
                     f"{fmt_diff(r['diff_best'])} | {_verdict(r)} |")
    return "\n".join(lines)


def markdown(summary: list[dict], info: dict, methods) -> str:
    """``report.md``."""
    seeds = sorted({s for r in summary for s in r["seeds"]})
    out = ["# surgery compare", ""]
    if info.get("command"):
        out += ["```", info["command"], "```", ""]
    out += [f"- {k}: {v}" for k, v in info["header"]] + [""]
    out += ["## Results", "", results_table(summary, info), ""]
    out += [f"Mean ± standard deviation over {len(seeds)} seed{'s' * (len(seeds) != 1)}. The difference is paired by "
            "seed (the same split, head initialisation and data order for every method): its mean and 95% "
            "t interval; \"better\" or \"worse\" only where the interval excludes 0. The best evaluation is picked "
            "on the validation data itself, so it flatters every method alike; the verdict reads the last one.", ""]
    out += ["## Costs", "", cost_table(summary, info["device"]), ""]
    clock = ("the process's CPU time (all its threads), which other work on a shared CPU does not inflate the way "
             "it does the wall time" if summary[0]["cost"].get("clock") == "step_cpu_seconds" else "wall time")
    out += [f"Time per step: forward, backward and optimizer step, {clock} (the median step of a run, the median over "
            f"runs); relative: the median of each run's ratio to the baseline run of the same seed. {info['load']}"
            f"Peak memory: {summary[0]['cost']['memory_kind']} during a run, median over runs. Checkpoint: the files "
            "`surgery.export` writes (what you ship); a model with no plain form (the layer-weighted head) is saved "
            "surgered with `save_pretrained`.", ""]
    out += ["## Methods", "", "| method | what it runs |", "|---|---|"]
    out += [f"| {m.label} | {m.describe(last_token=info['last_token'], head=info.get('head'))} |"
            for m in methods] + [""]
    out += ["## Every seed", "", f"{info['metric_title']} at the last evaluation.", "",
            "| method | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for r in summary:
        out.append(f"| {r['method']} | " + " | ".join(fmt_value(r["per_seed"][s]["last"]) if s in r["per_seed"]
                                                     else "—" for s in seeds) + " |")
    out += ["", "![per-seed scores, differences to baseline and validation curves](figure.png)", ""]
    return "\n".join(out)


CSV_FIELDS = ("method", "seed", "fold", "last", "best", "best_step", "steps", "train_loss", "step_seconds",
              "seconds", "peak_memory", "export_bytes")


def write_csv(path, runs: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in sorted(runs, key=lambda r: (r["seed"], r["fold"], r["method"])):
        w.writerow({k: r.get(k) for k in CSV_FIELDS})
    path.write_text(buf.getvalue(), encoding="utf-8")


def write_json(path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, default=str) + "\n", encoding="utf-8")
