"""Small phrases ``describe`` builds its lines from (no torch: records are described without it)."""

from __future__ import annotations

__all__ = ["count", "values", "pct", "mib"]


def count(n: int, what: str) -> str:
    """``1 module``, ``3 modules``."""
    return f"{n} {what}{'' if n == 1 else 's'}"


def values(vals: list[float]) -> str:
    """Up to three distinct values, else their range: ``0.1, 0.2`` / ``0.1..0.5``."""
    vals = sorted(set(vals))
    return ", ".join(f"{v:g}" for v in vals) if len(vals) <= 3 else f"{vals[0]:g}..{vals[-1]:g}"


def pct(n: int, total: int) -> str:
    """``n`` as a share of ``total``: ``46.0%``, ``<0.1%`` for a small non-zero share."""
    share = 100 * n / total if total else 0.0
    return f"{share:.1f}%" if share >= 0.1 or not n else "<0.1%"


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
