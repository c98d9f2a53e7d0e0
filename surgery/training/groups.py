"""Optimizer parameter groups read from the change record: the backbone at one learning rate, the
multi-sample-dropout head (and a layer-weighted head's layer weights) at another."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import SurgeryError
from ..record import get_record, unwrap

__all__ = ["param_groups"]


def param_groups(model: nn.Module, *, lr: float, head_lr: float, **group_options) -> list[dict[str, Any]]:
    """Two optimiser parameter groups read from the change record: the backbone at ``lr``, the
    MSD head (and the learned layer weights of a layer-weighted head) at ``head_lr``.

    ``torch.optim.AdamW(surgery.param_groups(model, lr=2e-5, head_lr=1e-2))`` gives the
    QUEST solution's 500x. Only parameters that require a gradient are listed (bypassed, frozen ones
    are not); each parameter is in exactly one group. ``group_options`` (e.g.
    ``weight_decay=0.0``) go into both groups.

    Raises:
        NotSurgeredError: the model has no surgery; SurgeryError: no MSD head in the record;
        ValueError: a learning rate that is not a positive number.
    """
    for name, v in (("lr", lr), ("head_lr", head_lr)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v != v or v == float("inf"):
            raise ValueError(f"{name} must be a positive number, got {v!r}")
    root = unwrap(model)
    rec = get_record(root)
    if not rec.msd:
        raise SurgeryError("param_groups separates the MSD head from the backbone and the record has no MSD head; "
                           "call surgery.apply(model, msd=K, ...) first, or build one group yourself")
    ids: set[int] = set()
    for h in rec.msd:
        ids |= {id(p) for p in root.get_submodule(h["name"]).parameters()}
        if h.get("layers"):
            ids.add(id(root.get_parameter(h["layers"]["param"])))
    head, rest, seen = [], [], set()
    for p in root.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (head if id(p) in ids else rest).append(p)
    return [dict(group_options, params=rest, lr=lr), dict(group_options, params=head, lr=head_lr)]
