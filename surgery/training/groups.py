"""Optimizer parameter groups read from the change record: the backbone at one learning rate, the
multi-sample-dropout head (and a layer-weighted head's layer weights) at another, each group with
its own optimizer options if asked.

The QUEST 2nd-place solution (the layer-weighted head) trains with
``AdamW([{backbone, lr}, {classifier + layer weights, 500 * lr}], weight_decay=0)``: no weight
decay anywhere, the layer weights with the head. Its form here::

    torch.optim.AdamW(surgery.param_groups(model, lr=2e-5, head_lr=500 * 2e-5, weight_decay=0.0))

Weight decay on the backbone but not on the layer weights (their gradient is small, so decay alone
moves them toward 0, i.e. toward equal weights)::

    surgery.param_groups(model, lr=2e-5, head_lr=1e-2, weight_decay=0.01,
                         layer_weight_options={"weight_decay": 0.0})
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import SurgeryError, SurgeryTypeError
from ..record import get_record, unwrap

__all__ = ["param_groups"]


def _optimizer_options() -> set[str]:
    """Every option name a loaded optimizer class takes (torch.optim's and any other subclass of
    ``torch.optim.Optimizer`` imported so far, e.g. transformers' Adafactor, bitsandbytes')."""
    names: set[str] = set()
    todo = [torch.optim.Optimizer]
    seen = set()
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        todo += cls.__subclasses__()
        try:
            params = inspect.signature(cls.__init__).parameters.values()
        except (TypeError, ValueError):  # pragma: no cover - a C-defined __init__
            continue
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names - {"self", "params", "defaults"}


def _check_options(options: Any, where: str, known: set[str], *, lr_ok: bool) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise SurgeryTypeError(f"{where} must be a dict of optimizer options, e.g. {{'weight_decay': 0.0}}, got "
                               f"{type(options).__name__}")
    for key in options:
        if key == "params":
            raise SurgeryError(f"{where} sets 'params'; param_groups fills each group's parameters from the record")
        if key == "lr" and not lr_ok:
            raise SurgeryError(f"{where} sets 'lr'; pass the learning rates as lr=... (backbone) and head_lr=... "
                               "(head)")
        if not isinstance(key, str) or key not in known:
            raise SurgeryError(f"{where}: unknown optimizer option {key!r} (no optimizer class loaded takes it); "
                               f"known options include {', '.join(sorted(known & _COMMON))}")
    return dict(options)


_COMMON = {"weight_decay", "betas", "eps", "momentum", "amsgrad", "foreach", "fused", "maximize", "nesterov"}


def param_groups(model: nn.Module, *, lr: float, head_lr: float, head_options: Mapping[str, Any] | None = None,
                 layer_weight_options: Mapping[str, Any] | None = None, **group_options) -> list[dict[str, Any]]:
    """Optimiser parameter groups read from the change record: the backbone at ``lr``, the MSD head
    (and the learned layer weights of a layer-weighted head) at ``head_lr``.

    ``torch.optim.AdamW(surgery.param_groups(model, lr=2e-5, head_lr=500 * 2e-5, weight_decay=0.0))``
    is the QUEST solution's optimizer (500x, no weight decay). Only parameters that require a
    gradient are listed (bypassed, frozen ones are not); each parameter is in exactly one group.

    Args:
        lr: learning rate of the backbone group (every trainable parameter outside the head).
        head_lr: learning rate of the head group.
        head_options: optimizer options of the head group only (e.g. ``{"weight_decay": 0.0}``),
            over ``group_options``.
        layer_weight_options: the layer weights of a layer-weighted head get a third group with these
            options (over the head group's; ``"lr"`` allowed, default ``head_lr``). Without it they
            are in the head group.
        group_options: optimizer options of every group (e.g. ``weight_decay=0.0``).

    Returns:
        ``[backbone, head]``, or ``[backbone, head, layer weights]`` with ``layer_weight_options``.

    Raises:
        NotSurgeredError: the model has no surgery; SurgeryError: no MSD head in the record,
            ``layer_weight_options`` without a layer-weighted head, an option no loaded optimizer
            class takes (a typo would otherwise sit in the group unread), ``params`` or (outside
            ``layer_weight_options``) ``lr`` in the options;
        SurgeryTypeError: per-group options that are not a dict;
        ValueError: a learning rate that is not a positive number.
    """
    for name, v in (("lr", lr), ("head_lr", head_lr)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v != v or v == float("inf"):
            raise ValueError(f"{name} must be a positive number, got {v!r}")
    known = _optimizer_options()
    common = _check_options(group_options, "param_groups' keyword arguments", known, lr_ok=False)
    head_opts = _check_options(head_options, "head_options", known, lr_ok=False)
    layer_opts = _check_options(layer_weight_options, "layer_weight_options", known, lr_ok=True)
    root = unwrap(model)
    rec = get_record(root)
    if not rec.msd:
        raise SurgeryError("param_groups separates the MSD head from the backbone and the record has no MSD head; "
                           "call surgery.apply(model, msd=K, ...) first, or build one group yourself")
    ids: set[int] = set()
    layer_ids: set[int] = set()
    for h in rec.msd:
        ids |= {id(p) for p in root.get_submodule(h.name).parameters()}
        if h.layers is not None:
            layer_ids.add(id(root.get_parameter(h.layers.param)))
    if layer_weight_options is not None and not layer_ids:
        raise SurgeryError("layer_weight_options configures the layer weights of a layer-weighted MSD head and this "
                           "model has none (apply(..., msd_layers=True)); drop layer_weight_options")
    split = layer_weight_options is not None
    if not split:
        ids |= layer_ids
    head, rest, layers, seen = [], [], [], set()
    for p in root.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (layers if split and id(p) in layer_ids else head if id(p) in ids else rest).append(p)
    groups = [dict(common, params=rest, lr=lr), dict(common, **head_opts, params=head, lr=head_lr)]
    if split:
        groups.append({**common, **head_opts, "lr": head_lr, **layer_opts, "params": layers})
    return groups
