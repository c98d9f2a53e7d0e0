"""``describe``: what surgery changed, in a few lines, read from the change record alone.

Each registered regularizer describes its own part of the record
(:meth:`surgery.regularizers.Regularizer.describe`); the record's own fields (the share of the trainable
weights each covers, what was left alone) are described here. It imports no torch for a record
(``surgery inspect`` prints one without loading torch); for a live model, torch is already loaded and the
targets' sizes are measured on the model.
"""

from __future__ import annotations

import sys
from typing import Any

from . import regularizers
from .patterns import group_names
from .record import TARGET_SUFFIX, Record, get_record, unwrap
from .wording import pct
from .zero import is_zero3

__all__ = ["describe", "target_bytes"]


def _coverage_lines(rec: Record) -> list[str]:
    """One line (two when long): the share of the trainable weights each regularizer covers, and the kinds
    of trainable weights Mixout leaves plain (the record's ``coverage``, written by ``surgery/coverage.py``,
    which also names them; nothing for a record without one, or with one that is not what apply writes)."""
    cov = rec.coverage
    num = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
    if not isinstance(cov, dict) or not num(cov.get("trainable")):
        return []
    total = cov["trainable"]
    covers = [f"{u.coverage_label} {pct(cov[u.name], total)}" for u in regularizers.units()
              if u.coverage_label and num(cov.get(u.name))]
    if not covers:
        return []
    first = f"  coverage of the {total:,} trainable weights: " + ", ".join(covers)
    left = cov.get("left")
    if not (isinstance(left, list) and left and all(
            isinstance(e, dict) and isinstance(e.get("kind"), str) and num(e.get("weights")) for e in left)):
        return [first]
    rest = "left plain by mixout: " + ", ".join(f"{e['kind']} {pct(e['weights'], total)}" for e in left)
    return [f"{first}; {rest}"] if len(first) + len(rest) < 150 else [first, f"    {rest}"]


def _left_alone_lines(rec: Record) -> list[str]:
    """What the regularizers left alone: one line per reason and layer pattern, not per layer."""
    by_reason: dict[str, list[str]] = {}
    for s in rec.skipped:
        by_reason.setdefault(s.reason, []).append(s.name)
    lines = []
    for reason, names in by_reason.items():
        groups = group_names(names)
        if len(groups) == 1:
            lines.append(f"  left alone: {groups[0]} ({reason})")
        else:
            lines.append(f"  left alone ({reason}):")
            lines += [f"    {g}" for g in groups]
    return lines


def target_bytes(model) -> tuple[int, int | None]:
    """Bytes of all Mixout targets of a live model, and the bytes this rank holds when they are
    sharded (FSDP2 ``DTensor`` targets, DeepSpeed ZeRO-3 partitions), else None."""
    tensor_mod = sys.modules.get("torch.distributed.tensor")
    total, local, sharded = 0, 0, False
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] != TARGET_SUFFIX:
            continue
        if is_zero3(p):  # DeepSpeed's full size and this rank's partition, whether gathered now or not
            sharded = True
            total += p.ds_numel * p.element_size()
            local += p.ds_tensor.numel() * p.element_size()
            continue
        total += p.numel() * p.element_size()
        if tensor_mod is not None and isinstance(p, tensor_mod.DTensor):
            sharded = True
            p = p.to_local()
        local += p.numel() * p.element_size()
    return total, (local if sharded else None)


def _is_module(obj: Any) -> bool:
    torch = sys.modules.get("torch")  # a module cannot exist without torch loaded
    return torch is not None and isinstance(obj, torch.nn.Module)


def describe(model_or_record: Any) -> str:
    """A few human-readable lines: what surgery changed, layer pattern by layer pattern.

    Accepts a surgered model, a :class:`Record` or a record dict (as stored on disk). The lines of each
    registered regularizer in registration order, the coverage line after the first one's (Mixout's:
    coverage says what "Mixout on the model" covers), what was left alone last.

    Raises:
        NotSurgeredError: a model that carries no surgery.
    """
    measured: dict[str, Any] = {}
    if _is_module(model_or_record):
        root = unwrap(model_or_record)
        rec = get_record(root)
        title = type(root).__name__
        measured["target_bytes"] = target_bytes(root)
    else:
        rec = model_or_record if isinstance(model_or_record, Record) else Record.from_dict(model_or_record)
        title = "checkpoint"
    lines = [f"{title}: surgery (record v{rec.version})"
             + (f", the part inside module {rec.scope!r} of the model it was applied to" if rec.scope else "")]
    for i, unit in enumerate(regularizers.units()):
        lines += unit.describe(rec, measured)
        if i == 0:
            lines += _coverage_lines(rec)
    lines += _left_alone_lines(rec)
    if len(lines) == 1:
        lines.append("  nothing changed")
    return "\n".join(lines)
