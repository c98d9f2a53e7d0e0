"""Mixout planned, installed and undone: every layer family through one swap mechanism.

The families, selected by one rule (:mod:`.selection`): fused experts and routers (:mod:`.experts`),
planned first because they take the adapters of PEFT ``ParamWrapper`` layers from the Linear family, then
``nn.Linear`` / ``Conv1D`` layers and LoRA adapters (:mod:`.linear`, :mod:`.lora`). Each planned
:class:`~.family.Swap` builds a Mixout layer (:mod:`surgery.layers.swap`) that takes the module's place;
:class:`MixoutUndo` finds each recorded layer again (inside a PEFT wrapper put there since, or where an
unwrapped wrapper was) and gives the original module back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...errors import SurgeryError
from ...layers.experts import MixoutParams
from ...layers.mixout import LoraMixout, MixLinear
from ...layers.swap import MixoutLayer
from ...record import Skip
from ...wrappers import find_layers
from .. import Plan, Undo
from . import MixoutEntry
from .copies import refuse_copies_made_before
from .coverage import covered, left_plain
from .experts import param_wrappers, plan_experts
from .family import Swap
from .linear import plan_linear
from .placement import Placement
from .selection import select

__all__ = ["plan", "noise", "MixoutPlan", "MixoutUndo"]


@dataclass
class MixoutPlan(Plan):
    p: float = 0.0
    target_dtype: Any = None
    low_memory: bool = False
    swaps: list[Swap] = field(default_factory=list)  # the experts family first, then the Linear family
    skipped: list[Skip] = field(default_factory=list)
    wrappers: dict = field(default_factory=dict)  # PEFT ParamWrappers by the module they wrap, before any swap
    built: list[Any] = field(default_factory=list)

    def build(self) -> None:
        """The Linear layers and every target, allocated (the step that can run out of memory)."""
        self.built = [s.build(self.p, self.target_dtype, self.low_memory) for s in self.swaps]

    def install(self, ctx, rec) -> "MixoutUndo":
        frozen_warning: dict = {}  # one warning per apply when Mixout layers get frozen later (see MixoutLayer)
        placed = []  # (name, layer, classes): checked at every training forward (Placement)
        for swap, built in zip(self.swaps, self.built):
            layer = swap.layer(built, self.p, self.low_memory)
            parent, _, child = swap.name.rpartition(".")
            setattr(ctx.module(parent), child, layer)
            rec.mixout.append(swap.entry(self.p, layer))
            vars(layer).update(_frozen_warning=frozen_warning, _record_name=swap.name)
            placed.append((swap.name, layer, _family_classes(rec.mixout[-1])))
        rec.skipped += self.skipped
        placed = [p for p, e in zip(placed, rec.mixout[len(rec.mixout) - len(placed):]) if e.has_target]
        return MixoutUndo(ctx.root.register_forward_pre_hook(Placement(ctx.root, placed)) if placed else None)

    def coverage(self, ctx, rec, trainable, first) -> dict[str, Any]:
        if not rec.mixout:
            return {}
        mixed = {first[n] for n in covered(ctx.view, rec.mixout, self.wrappers) if n in first} & trainable.keys()
        return {"mixout": sum(trainable[n] for n in mixed), "left": left_plain(ctx.view, trainable, mixed)}


def plan(unit, ctx) -> MixoutPlan | None:
    """The plan for ``mixout=p`` (None when it is 0).

    Raises:
        SurgeryError: no layer selected, or a module Mixout cannot mix exactly (naming ``exclude=[...]``).
    """
    opts = ctx.opts
    if opts.mixout == 0.0:
        return None
    refuse_copies_made_before(ctx.root)  # the targets would shift a copy's pairs
    sel = select(ctx)
    wrappers = param_wrappers(ctx.view)
    experts, skipped, taken = plan_experts(ctx, sel, wrappers)
    linear, linear_skipped = plan_linear(ctx, sel, set(taken))
    if not experts and not linear:
        names = ", ".join(s.name for s in linear_skipped[:5])
        raise SurgeryError(f"mixout={opts.mixout} selected no nn.Linear/Conv1D layer"
                           + (f" (skipped: {names})" if names else "") + "; check include/exclude")
    return MixoutPlan(replaces=[s.name for s in experts + linear], changes=taken, p=opts.mixout,
                      target_dtype=opts.target_dtype, low_memory=opts.low_memory, swaps=experts + linear,
                      skipped=skipped + linear_skipped, wrappers=wrappers)


def _family_classes(entry: MixoutEntry) -> tuple[type, ...]:
    return (MixoutParams,) if entry.params is not None else (MixLinear, LoraMixout)


def _replaced(entry: MixoutEntry, layer: MixoutLayer) -> str | None:
    """How the layer found for ``entry`` differs from what apply recorded, or None."""
    if entry.params is not None:
        have = [k for k, _ in layer.mixout_layout]
        if (layer.orig, have) != (entry.orig, list(entry.params)):
            return f"recorded {entry.orig} mixing {entry.params}; found {layer.orig} mixing {have}"
    elif isinstance(layer, MixLinear) and (layer.orig, layer.transposed) != (entry.orig, entry.transposed):
        return (f"recorded {entry.orig}, transposed={entry.transposed}; found {layer.orig}, "
                f"transposed={layer.transposed}")
    return None


class MixoutUndo(Undo):
    """Every recorded Mixout layer, found again and checked, swapped back for the module it replaced."""

    def __init__(self, placement: Any = None):
        self._found: dict[int, tuple[str, MixoutLayer]] = {}
        self.placement = placement  # the handle of the Placement hook on the model

    def check(self, view, rec) -> None:
        found: dict[int, tuple[str, MixoutLayer]] = {}
        for e in rec.mixout:  # at its name, inside a PEFT wrapper put there, or where an unwrapped wrapper was
            layers, here = find_layers(view.root, e.name, _family_classes(e))
            if not layers and e.has_target:  # a LoRA adapter merged and unloaded leaves a plain layer
                raise SurgeryError(f"cannot revert: Mixout layer {e.name!r} is missing or was replaced after apply "
                                   f"(found {type(here).__name__}); nothing was changed")
            for name, layer in layers:  # the class and layout the record says it replaced
                why = _replaced(e, layer)
                if why:
                    raise SurgeryError(f"cannot revert: Mixout layer {name!r} was replaced after apply ({why}); "
                                       "nothing was changed")
            found.update({id(layer): (name, layer) for name, layer in layers})
        self._found = found

    def undo(self, view, rec) -> None:
        if self.placement is not None:
            self.placement.remove()
        for name, layer in self._found.values():
            parent, _, child = name.rpartition(".")
            setattr(view.root.get_submodule(parent), child, layer.to_module())
        self._found = {}


def noise(unit, module) -> tuple[str, Any] | None:
    """A Mixout layer draws one mask per training forward for the whole batch."""
    if isinstance(module, MixoutLayer):
        return "Mixout", lambda: module.training and module.mixout_p > 0
    return None
