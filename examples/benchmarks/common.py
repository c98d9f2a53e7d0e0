"""Shared helpers of the benchmarks: machine line, interleaved timing, saved-tensor bytes.

Timing protocol: every variant runs once per round, in a rotating order, for ``rounds``
rounds after ``warmup`` untimed rounds; a variant's time is the median over rounds and
its ratio is the median of its per-round ratios to the reference variant of the same
round. Interleaving keeps ratios meaningful on a machine shared with other jobs (slow
periods hit every variant of a round alike); absolute times are only for orientation.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name"):
                    return ln.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    try:
        load = "load avg %.2f" % os.getloadavg()[0]
    except OSError:
        load = "load avg n/a"
    return (f"machine: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}, python {platform.python_version()}, {load}")


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


def interleaved(variants: dict[str, Callable[[], None]], *, rounds: int, warmup: int = 1,
                reference: str | None = None, min_time: float = 0.0) -> dict[str, dict]:
    """Time each zero-argument callable once per round, rotating the order.

    With ``min_time`` > 0 each timing repeats a callable enough times (the same count for
    every variant) for the reference to take at least that long; times are per call.
    Returns ``{name: {"median_s", "min_s", "ratio", "ratio_q1", "ratio_q3", "inner"}}``;
    ratios are medians of per-round ratios to ``reference`` (default: the first variant).
    """
    names = list(variants)
    reference = reference or names[0]
    inner = 1
    if min_time > 0:
        variants[reference]()
        t0 = time.perf_counter()
        variants[reference]()
        inner = max(1, math.ceil(min_time / max(time.perf_counter() - t0, 1e-6)))
        if inner > 1:
            variants = {n: (lambda f: lambda: [f() for _ in range(inner)])(f) for n, f in variants.items()}
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            gc.collect()
            t0 = time.perf_counter()
            variants[n]()
            dt = (time.perf_counter() - t0) / inner
            if r >= warmup:
                times[n].append(dt)
    out = {}
    for n in names:
        ratios = sorted(a / b for a, b in zip(times[n], times[reference]))
        q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
        out[n] = {"median_s": statistics.median(times[n]), "min_s": min(times[n]),
                  "ratio": statistics.median(ratios), "ratio_q1": q[0], "ratio_q3": q[2], "inner": inner}
    return out


@contextmanager
def saved_bytes(exclude: tuple[torch.Tensor, ...] = ()):
    """Count the unique storages autograd saves for backward inside the block.

    Yields a dict filled on exit: ``total`` bytes of all unique saved storages and
    ``extra`` bytes of those that are not in ``exclude`` (parameters, buffers, inputs:
    tensors that are alive anyway).
    """
    seen: dict[int, int] = {}
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    result = {"total": 0, "extra": 0}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result
    result["total"] = sum(seen.values())
    result["extra"] = sum(v for k, v in seen.items() if k not in skip)


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def table(rows: list[list[str]], header: list[str]) -> str:
    """A GitHub markdown table."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda r: "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in rows])
