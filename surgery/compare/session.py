"""``compare``: the whole comparison, from the files to the report.

:func:`~surgery.compare.plan.prepare` checks everything before the first run; then the runs go in
order, each saved as it ends; then the statistics, the tables, the files and the figure.
"""

from __future__ import annotations

import os
import platform
import sys
import time

from .. import interrupts
from .settings import Settings

__all__ = ["compare"]


def compare(settings: Settings | None = None, **options) -> dict:
    """Compare regularizers on your model and data; see :func:`surgery.compare.compare`.

    Raises:
        CompareError: bad input (before any run starts), or an output folder that holds another comparison.
        KeyboardInterrupt: passed on after the finished runs are saved; the same call resumes.
    """
    import transformers

    from .plan import prepare

    started = time.perf_counter()
    s = settings if settings is not None else Settings(**options)
    verbosity = transformers.logging.get_verbosity()
    try:
        c = prepare(s)
        c.started = started
        _announce(c)
        runs = _run_all(c)
        return _finish(c, runs)
    finally:
        transformers.logging.set_verbosity(verbosity)


def _announce(c) -> None:
    s, todo = c.settings, sum(p.key not in c.done for p in c.plans)
    print("surgery compare: " + c.info["title"])
    for k, v in c.info["header"]:
        print(f"  {k}: {v}")
    print(f"  runs: {len(c.plans)} ({len(c.methods)} methods x {s.seeds} seed{'s' * (s.seeds != 1)}"
          + (f" x {c.folds} folds" if c.folds > 1 else "") + f"), output in {c.store.out}"
          + (f"; {len(c.plans) - todo} already done there, resuming" if todo < len(c.plans) else ""), flush=True)


def _run_all(c) -> list[dict]:
    """Every run not done yet, each saved as it ends; the records of all runs."""
    from .running import run_one

    runs = [c.done[p.key] for p in c.plans if p.key in c.done]
    todo = [p for p in c.plans if p.key not in c.done]
    measured = {r["method"] for r in runs if r.get("export_bytes") is not None}
    bar = _progress(c.settings, sum(p.steps for p in todo))
    try:
        for i, p in enumerate(todo, len(c.plans) - len(todo) + 1):
            where = f"seed {p.seed}" + (f" fold {p.fold}" if c.folds > 1 else "")
            if bar is not None:
                bar.set_description(f"run {i}/{len(c.plans)}: {p.method.label}, {where}")
            train, val, _ = c.parts[p.fold]
            rec = run_one(p, c.backbone, train, val, c.metric, c.settings, c.device,
                          measure_export=p.method.label not in measured,
                          on_step=bar.update if bar is not None else (lambda n: None))
            measured.add(p.method.label)
            c.store.save(p.key, rec)
            interrupts.test_hook("compare-saved")  # the signal tests interrupt here, a run saved, the next to come
            runs.append({"key": p.key, **rec})
            line = (f"  run {i}/{len(c.plans)} {p.method.label}, {where}: {c.metric.title} last {rec['last']:#.4g}, "
                    f"best {rec['best']:#.4g} (step {rec['best_step']}); {rec['seconds']:.0f} s")
            bar.write(line, file=sys.stdout) if bar is not None else print(line, flush=True)
    finally:
        if bar is not None:
            bar.close()
    return runs


def _finish(c, runs: list[dict]) -> dict:
    """The statistics, ``results.json``/``.csv``, ``report.md``, ``figure.png`` and the table; the results."""
    import transformers

    from .figure import draw
    from .report import markdown, terminal_table, write_csv, write_json
    from .stats import summarize
    from .store import OUTPUTS

    summary = summarize(runs, c.methods, c.metric, c.info["constant"], c.folds)
    c.info["load"] = _load_note(runs, c.device)
    elapsed = time.perf_counter() - c.started
    results = {
        "settings": dict(c.store.identity), "info": c.info,
        "methods": [{"method": m.label, "runs": m.describe(last_token=c.backbone.last_token, head=c.backbone.head)}
                    for m in c.methods],
        "summary": summary, "runs": sorted(runs, key=lambda r: (r["seed"], r["fold"], r["method"])),
        "environment": {"python": platform.python_version(), "torch": _version("torch"),
                        "transformers": transformers.__version__, "surgery": _version("surgery")},
        "seconds_this_call": elapsed,
    }
    out = c.store.out
    write_json(out / "results.json", results)
    write_csv(out / "results.csv", results["runs"])
    (out / "report.md").write_text(markdown(summary, c.info, c.methods), encoding="utf-8")
    draw(out / "figure.png", summary, results["runs"], c.info)
    print()
    print(terminal_table(summary, c.info))
    clock = "CPU time" if summary[0]["cost"]["clock"] == "step_cpu_seconds" else "wall time"
    print(f"\n{c.metric.title}: mean ± sd over seeds; last - baseline: paired by seed, mean [95% interval] "
          f"(relative); time/step: {clock} relative to baseline; peak memory: " + summary[0]["cost"]["memory_kind"]
          + "; checkpoint: the exported model's files")
    print(f"wrote {', '.join(str(out / n) for n in OUTPUTS)} in {elapsed:.0f} s")
    return results


def _load_note(runs: list[dict], device: str) -> str:
    """What the machine's load was while the runs trained: timings on a shared CPU are not idle ones."""
    loads = [v for r in runs for v in r.get("load_average") or []]
    if device != "cpu" or not loads:
        return ""
    cores = os.cpu_count() or 0
    busy = max(loads) > 0.75 * cores
    return (f"Load average (1 minute) while the runs trained: {min(loads):.1f}-{max(loads):.1f} on {cores} cores"
            + (": other work shared the CPU; the CPU time per step feels that less than the wall time does, but "
               "not nothing (shared caches, memory bandwidth). " if busy else ". "))


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version("finetune-surgery" if name == "surgery" else name)
    except Exception:
        return "?"


def _progress(s: Settings, total: int):
    """One tqdm bar for the whole comparison (steps of every run left), or None."""
    if total == 0 or s.progress is False:
        return None
    if s.progress is None and not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="step", dynamic_ncols=True, leave=False)
