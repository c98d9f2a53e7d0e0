"""What every Mixout rule (Linear layers, fused experts, LoRA adapters) selects from: the options'
``include``/``exclude`` patterns, the task head, what earlier plans freeze, weights that hold data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from ..arguments import check_materialised
from ..errors import HeadError, SurgeryError
from ..patterns import compile_pattern, find_head
from .base import Plan

__all__ = ["Selection", "select"]


@dataclass
class Selection:
    inc: Callable[[str], bool] | None
    exc: Callable[[str], bool] | None
    head: str | None
    under_head: Callable[[str], bool] | None  # inside the task head that mixout_head=False leaves plain
    freezes: dict[str, str]  # parameter name -> why an earlier plan freezes it

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


def select(view, opts, earlier: Sequence[Plan]) -> Selection:
    """The selection for ``opts`` (with ``mixout > 0``).

    Raises:
        SurgeryError: weights that hold no data (meta, offloaded by accelerate, lazy, fake).
        PatternError: ``include``/``exclude`` match no module.
        HeadError: ``mixout_head=False`` and no task head is found.
    """
    _offloaded(view)
    check_materialised(view.tensors())
    names = list(view.modules)
    inc = compile_pattern(opts.include, names, "include")
    exc = compile_pattern(opts.exclude, names, "exclude")
    head = next((p.head for p in earlier if p.head is not None), None)
    if head is None:
        head = find_head(view.modules, view.title, opts.head, required=False)
    if not opts.mixout_head and head is None:
        try:
            find_head(view.modules, view.title, None)
        except HeadError as e:
            raise HeadError(f"mixout_head=False leaves the task head a plain layer, but {e}") from None
    under_head = compile_pattern([head], names, "head") if head and not opts.mixout_head else None
    freezes = {n: why for p in earlier for n, why in p.freezes.items()}
    return Selection(inc, exc, head, under_head, freezes)
