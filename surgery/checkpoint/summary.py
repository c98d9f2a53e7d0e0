"""``inspect``: what surgery a checkpoint holds, without the model class."""

from __future__ import annotations

import math
import os
from typing import Any

from .common import fmt_bytes, is_target_key, printable
from .conversion import restore_config
from .layout import open_checkpoint

__all__ = ["inspect", "format_inspect", "json_safe"]


def inspect(src: str | os.PathLike, *, follow_external_symlinks: bool = False,
            allow_external_hard_links: bool = False) -> dict[str, Any]:
    """What surgery a checkpoint holds, as a JSON-ready dict (``surgery inspect --json``).

    Raises:
        CheckpointError: see :func:`open_checkpoint`.
    """
    ck = open_checkpoint(src, follow_external_symlinks=follow_external_symlinks,
                         allow_external_hard_links=allow_external_hard_links)
    try:
        record, where = ck.record()
        dtypes: dict[str, int] = {}
        total = n = 0
        largest = ("", 0)
        targets: dict[str, int] = {}
        for _, name, (dtype, _, nb) in ck.tensors():
            n += 1
            total += nb
            dtypes[dtype] = dtypes.get(dtype, 0) + 1
            if nb > largest[1]:
                largest = (name, nb)
            if is_target_key(name):
                targets[name] = nb
        _, changes = restore_config(ck.config, record) if ck.config is not None else (None, [])
        return {
            "path": str(ck.path), "layout": ck.describe(), "trainer_checkpoint": ck.trainer,
            "files": [s.path.name for s in ck.sources], "surgered": record is not None or bool(targets),
            "tensors": n, "bytes": total, "dtypes": dtypes, "largest_tensor": {"name": largest[0], "bytes": largest[1]},
            "mixout_targets": {"count": len(targets), "bytes": sum(targets.values()), "keys": sorted(targets)},
            "plain": {"tensors": n - len(targets), "bytes": total - sum(targets.values())},
            "record_source": where, "record": record.to_dict() if record else None,
            "config_restore": [{"path": p, "saved": json_safe(a), "restored": b} for p, a, b in changes],
            "warnings": ck.warnings,
        }
    finally:
        ck.close()


def json_safe(v: Any) -> Any:
    """``v`` with NaN and infinities as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``:
    ``config.json`` may hold them (Python's JSON writes them), strict JSON cannot, and
    ``inspect --json`` prints strict JSON (``jq`` reads it). Nesting is bounded by the
    64 levels ``config.json`` may have."""
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if v != v else ("Infinity" if v > 0 else "-Infinity")
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, list):
        return [json_safe(x) for x in v]
    return v


def format_inspect(info: dict[str, Any]) -> str:
    """The human-readable form of :func:`inspect`'s dict (torch-free, the record too,
    through ``surgery.describe``)."""
    t = info["mixout_targets"]
    lines = [f"{info['path']}: {info['layout']}",
             f"  tensors: {info['tensors']} ({fmt_bytes(info['bytes'])}; "
             + ", ".join(f"{k} x{v}" for k, v in sorted(info["dtypes"].items())) + ")",
             f"  largest tensor: {info['largest_tensor']['name']} ({fmt_bytes(info['largest_tensor']['bytes'])})"]
    if not info["surgered"]:
        lines.append("  no surgery: no change record and no Mixout targets (a plain checkpoint)")
        lines += [f"  warning: {w}" for w in info["warnings"]]
        return "\n".join(map(printable, lines))
    lines.append(f"  Mixout targets: {t['count']} ({fmt_bytes(t['bytes'])}); plain after convert: "
                 f"{info['plain']['tensors']} tensors ({fmt_bytes(info['plain']['bytes'])})")
    if info["record"] is None:
        lines.append("  record: none found (Mixout p, dropout and MSD settings unknown; convert still drops "
                     "the targets)")
    else:
        from ..describing import describe

        lines.append(f"  record ({info['record_source']}):")
        lines += ["  " + ln for ln in describe(info["record"]).splitlines()[1:]]
    for c in info["config_restore"]:
        lines.append(f"  config.json {c['path']}: saved {c['saved']}, original {c['restored']}")
    lines += [f"  warning: {w}" for w in info["warnings"]]
    return "\n".join(map(printable, lines))  # every line escaped: names in it come from SRC
