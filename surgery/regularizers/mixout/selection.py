"""What every Mixout layer family selects from: the ``include``/``exclude`` patterns, the task head that
``mixout_head=False`` leaves plain, what earlier plans freeze; and the refusal of weights that hold no
data (Mixout copies the pretrained weights as its targets)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ...errors import HeadError, SurgeryError
from ...patterns import compile_pattern

__all__ = ["Selection", "select", "check_materialised"]


@dataclass
class Selection:
    """``selected(name)``: the module ``name`` is selected by ``include``/``exclude``;
    ``under_head(name)``: it is (inside) the task head that ``mixout_head=False`` leaves plain;
    ``freezes``: parameter name -> why an earlier plan freezes it."""

    inc: Callable[[str], bool] | None
    exc: Callable[[str], bool] | None
    head: str | None
    under_head: Callable[[str], bool]
    freezes: dict[str, str]

    def selected(self, name: str) -> bool:
        return bool(name) and not (self.inc and not self.inc(name)) and not (self.exc and self.exc(name))


def _offloaded(view) -> None:
    for name, m in view.modules.items():  # accelerate's offload keeps the weights out of memory, on meta
        hook = vars(m).get("_hf_hook")
        if any(getattr(h, "offload", False) for h in [hook, *getattr(hook, "hooks", ())]):
            raise SurgeryError(f"module {name or view.title!r} is offloaded by accelerate (device_map with "
                               "'cpu' or 'disk' offload): its weights are loaded only for each forward, so Mixout "
                               "has no pretrained weights to copy as targets. Load the model without offloading "
                               "(device_map on devices that hold it), then apply")


def _never(name: str) -> bool:
    return False


def select(ctx) -> Selection:
    """The selection for ``ctx.opts`` (with ``mixout > 0``).

    Raises:
        SurgeryError: weights that hold no data (meta, offloaded by accelerate, lazy, fake).
        PatternError: ``include``/``exclude`` match no module.
        HeadError: ``mixout_head=False`` and no task head is found.
    """
    view, opts = ctx.view, ctx.opts
    _offloaded(view)
    check_materialised(view.tensors())
    names = list(view.modules)
    inc = compile_pattern(opts.include, names, "include")
    exc = compile_pattern(opts.exclude, names, "exclude")
    head = ctx.task_head()
    if not opts.mixout_head and head is None:
        try:
            ctx.task_head(required=True)
        except HeadError as e:
            raise HeadError(f"mixout_head=False leaves the task head a plain layer, but {e}") from None
    under_head = compile_pattern([head], names, "head") if head and not opts.mixout_head else _never
    return Selection(inc, exc, head, under_head, dict(ctx.freezes))


_LOAD = "load the pretrained weights first (from_pretrained, or load_state_dict(state_dict, assign=True) on a model "\
        "built on the meta device), then call surgery.apply"


def _unmaterialised(t: torch.Tensor) -> tuple[str, str] | None:
    """``(what it is, the fix)`` for a tensor that holds no data, else None."""
    if isinstance(t, nn.parameter.UninitializedTensorMixin):
        return "uninitialized (a lazy module before its first forward)", \
            "run one forward to materialise the lazy modules and " + _LOAD
    fake = getattr(getattr(torch, "_subclasses", None), "FakeTensor", None)
    if fake is not None and isinstance(t, fake):
        return "a fake tensor (FakeTensorMode)", "apply surgery to the real model, outside FakeTensorMode"
    if t.is_meta:
        return "on the meta device", _LOAD
    return None


def check_materialised(tensors) -> None:
    """Refuse Mixout on a model whose weights hold no data: its targets would copy nothing.

    ``tensors`` yields ``(kind, name, tensor)``. Dropout control and multi-sample dropout touch no
    tensor data, so they work on a meta model whose weights are loaded afterwards.

    Raises:
        SurgeryError: a parameter or buffer is on the meta device, a fake tensor or uninitialized.
    """
    for kind, name, t in tensors:
        found = _unmaterialised(t)
        if found is not None:
            raise SurgeryError(f"{kind} {name!r} is {found[0]}, so it holds no weights: Mixout copies the "
                               f"pretrained weights as its targets; {found[1]}")
