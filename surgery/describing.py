"""``describe``: what surgery changed, in a few lines, read from the change record alone.

It imports no torch for a record (``surgery inspect`` prints one without loading torch); for
a live model, torch is already loaded and the targets' sizes are measured on the model.
"""

from __future__ import annotations

import sys
from typing import Any

from .record import DROP_PATH, DROPOUT, ROUTER_NOISE, TARGET_SUFFIX, Record, get_record, unwrap

__all__ = ["describe", "group_names", "target_bytes"]

# a record's "kind" is also the name of apply's option
_LABEL = {DROPOUT: "dropout", DROP_PATH: "drop-path", ROUTER_NOISE: "router noise"}
_NONE = {DROP_PATH: "the model has no stochastic depth", ROUTER_NOISE: "the model has no router noise"}


def _ranges(values: list[int]) -> str:
    values = sorted(set(values))
    out, start = [], values[0]
    for a, b in zip(values, values[1:] + [None]):
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return out[0] if len(out) == 1 and "-" not in out[0] else "{" + ",".join(out) + "}"


def _is_index(part: str) -> bool:
    """A layer index as ``named_modules`` writes one: ASCII digits, no leading zero, at most 18
    of them (``²``, ``٣``, ``007`` or a 5000-digit number stay text, printed as they are)."""
    return part.isascii() and part.isdigit() and len(part) <= 18 and (part == "0" or part[0] != "0")


def group_names(names: list[str]) -> list[str]:
    """``a.0.q, a.1.q, a.2.q`` -> ``a.{0-2}.q (x3)``: one line per layer pattern."""
    groups: dict[tuple, list[list[int]]] = {}
    for n in names:
        parts = n.split(".")
        key = tuple("#" if _is_index(p) else p for p in parts)
        groups.setdefault(key, []).append([int(p) for p in parts if _is_index(p)])
    lines = []
    for key, idx in groups.items():
        parts, slot = [], 0
        for p in key:
            if p == "#":
                parts.append(_ranges([i[slot] for i in idx]))
                slot += 1
            else:
                parts.append(p)
        lines.append(".".join(parts) + (f"  (x{len(idx)})" if len(idx) > 1 else ""))
    return lines


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _values(values: list[float]) -> str:
    values = sorted(set(values))
    return ", ".join(f"{v:g}" for v in values) if len(values) <= 3 else f"{values[0]:g}..{values[-1]:g}"


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _drop_path_lines(rec: Record) -> list[str]:
    """Stochastic depth and router noise, and train-mode randomness left on."""
    lines = []
    for kind in (DROP_PATH, ROUTER_NOISE):
        changed = [c for c in rec.dropout if c.get("kind") == kind]
        fields = [c for c in rec.config if c.get("kind") == kind]
        new = rec.args.get(kind)
        if new is None:
            continue
        if changed or fields:
            lines.append(f"  {_LABEL[kind]} -> {new}: {_count(len(changed), 'module attribute')}, "
                         f"{_count(len(fields), 'config field')} (were {_values([c['old'] for c in changed + fields])})")
        else:
            lines.append(f"  {_LABEL[kind]} -> {new}: {_NONE[kind]}")
    for on in rec.left_on:
        where = [_count(on["modules"], "module")] if on["modules"] else []
        where += [_count(on["config"], "config field")] if on["config"] else []
        if on["kind"] not in _LABEL:  # randomness no option of apply controls (a router that samples)
            lines.append(f"  left on in training: {on.get('what', on['kind'])}, on {', '.join(where)}: no option "
                         "turns it off")
            continue
        lines.append(f"  left on in training: {_LABEL.get(on['kind'], on['kind'])} {_values(on['values'])} on "
                     f"{', '.join(where)}: pass {on['kind']}=0.0 to turn it off")
    return lines


def _experts_lines(rec: Record) -> list[str]:
    """Fused experts and routers among the Mixout layers (``surgery.regularizers.experts``)."""
    kinds: dict[str, int] = {}
    for m in rec.mixout:
        if isinstance(m.get("params"), list):
            kinds[m.get("kind")] = kinds.get(m.get("kind"), 0) + 1
    lines = []
    if kinds.get("experts") or kinds.get("router"):
        lines.append(f"  experts: {_count(kinds.get('experts', 0), 'fused-experts module')} mixed per expert and "
                     f"input neuron, {_count(kinds.get('router', 0), 'router')} per input neuron (biases plain)")
    if kinds.get("lora"):
        lines.append(f"  LoRA on experts: {_count(kinds['lora'], 'module')} mix their W0 + delta toward the frozen "
                     "base W0, per expert and input neuron (no target copy)")
    return lines


def _layer_msd_lines(h: dict) -> list[str]:
    L = h["layers"]
    where = "position 0" if L["pool"] == "first" else "the last non-padding token"
    lines = [f"  layer-weighted multi-sample dropout: head {h['name']!r}, K={h['k']} samples, p={h['p']}, on "
             f"softmax({L['param']}) over the {L['n']} hidden states of {L['backbone']!r} at {where} "
             f"(dropout p={L['p']} per layer)"]
    if L["frozen"]:
        lines.append("    bypassed, frozen while installed: "
                     + ", ".join(group_names(sorted({n.rsplit(".", 1)[0] for n in L["frozen"]}))))
    return lines


def _pct(n: int, total: int) -> str:
    share = 100 * n / total if total else 0.0
    return f"{share:.1f}%" if share >= 0.1 or not n else "<0.1%"


def _coverage_lines(rec: Record) -> list[str]:
    """One line (two when long): the share of the trainable weights each regularizer covers, and the kinds
    of trainable weights Mixout leaves plain (the record's ``coverage``, written by
    ``surgery.regularizers.coverage``, which also names them; nothing for a record without one, or with
    one that is not what apply writes)."""
    cov = rec.coverage
    num = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
    if not isinstance(cov, dict) or not num(cov.get("trainable")):
        return []
    total = cov["trainable"]
    covers = [f"{label} {_pct(cov[key], total)}" for key, label in (("mixout", "mixout"),
              ("msd", "multi-sample dropout (the head)")) if num(cov.get(key))]
    if not covers:
        return []
    first = f"  coverage of the {total:,} trainable weights: " + ", ".join(covers)
    left = cov.get("left")
    if not (isinstance(left, list) and left and all(
            isinstance(e, dict) and isinstance(e.get("kind"), str) and num(e.get("weights")) for e in left)):
        return [first]
    rest = "left plain by mixout: " + ", ".join(f"{e['kind']} {_pct(e['weights'], total)}" for e in left)
    return [f"{first}; {rest}"] if len(first) + len(rest) < 150 else [first, f"    {rest}"]


def target_bytes(model) -> tuple[int, int | None]:
    """Bytes of all Mixout targets of a live model, and the bytes this rank holds when they are
    sharded (FSDP2 ``DTensor`` targets), else None."""
    tensor_mod = sys.modules.get("torch.distributed.tensor")
    total, local, sharded = 0, 0, False
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] != TARGET_SUFFIX:
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

    Accepts a surgered model, a :class:`Record` or a record dict (as stored on disk).

    Raises:
        NotSurgeredError: a model that carries no surgery.
    """
    total_bytes = local_bytes = None
    if _is_module(model_or_record):
        root = unwrap(model_or_record)
        rec = get_record(root)
        title = type(root).__name__
        total_bytes, local_bytes = target_bytes(root)
    else:
        rec = model_or_record if isinstance(model_or_record, Record) else Record.from_dict(model_or_record)
        title = "checkpoint"
    lines = [f"{title}: surgery (record v{rec.version})"
             + (f", the part inside module {rec.scope!r} of the model it was applied to" if rec.scope else "")]
    if rec.mixout:
        ps = sorted({m["p"] for m in rec.mixout})
        extra = f", targets {_mib(total_bytes)}" if total_bytes is not None else ""
        extra += f" (sharded: {_mib(local_bytes)} on this rank)" if local_bytes is not None else ""
        lines.append(f"  mixout p={'/'.join(map(str, ps))} on {len(rec.mixout)} layers{extra}:")
        lines += [f"    {g}" for g in group_names([m["name"] for m in rec.mixout])]
        n_lora = sum(m.get("kind") == "lora" and "params" not in m for m in rec.mixout)
        if n_lora:
            lines.append(f"  LoRA: {n_lora} lora_A layers mix their layer's W0 + s*B@A toward the frozen base weight "
                         "W0 (no target copy)")
        lines += _experts_lines(rec)
    lines += _coverage_lines(rec)
    drop = [c for c in rec.dropout if c.get("kind", DROPOUT) == DROPOUT]
    fields = [c for c in rec.config if c.get("kind", DROPOUT) == DROPOUT]
    if drop or fields:
        new = rec.args.get("dropout")
        olds = sorted({c["old"] for c in drop + fields})
        mods = sum(1 for c in drop if c["attr"] == "p")
        lines.append(f"  dropout -> {new}: {mods} dropout modules, {len(drop) - mods} attributes, "
                     f"{len(fields)} config fields (were {', '.join(map(str, olds))})")
    elif rec.args.get("dropout") is not None:
        lines.append(f"  dropout -> {rec.args['dropout']}: the model has no dropout")
    lines += _drop_path_lines(rec)
    for h in rec.msd:
        if h.get("layers"):
            lines += _layer_msd_lines(h)
            continue
        lines.append(f"  multi-sample dropout: head {h['name']!r}, K={h['k']} samples, p={h['p']}")
    by_reason: dict[str, list[str]] = {}  # one line per reason and layer pattern, not per layer
    for s in rec.skipped:
        by_reason.setdefault(s["reason"], []).append(s["name"])
    for reason, names in by_reason.items():
        groups = group_names(names)
        if len(groups) == 1:
            lines.append(f"  left alone: {groups[0]} ({reason})")
        else:
            lines.append(f"  left alone ({reason}):")
            lines += [f"    {g}" for g in groups]
    if len(lines) == 1:
        lines.append("  nothing changed")
    return "\n".join(lines)
