"""Mixout (``apply(mixout=p)``): which layers are mixed, how each is swapped, and how it is undone.

Every ``nn.Linear`` and transformers ``Conv1D`` that ``include``/``exclude`` select becomes a
:class:`~surgery.layers.mixout.MixLinear` sharing its Parameters and mixing toward a frozen copy
of its current (pretrained) weight; the ``lora_A`` of a trainable PEFT LoRA adapter becomes a
:class:`~surgery.layers.mixout.LoraMixout` (:mod:`surgery.regularizers.lora`). A selected layer
is left alone, and listed with the reason in the record's ``skipped``, when:

* it is a Linear subclass (its owner may read ``.weight`` directly, or its forward differs);
* another plan freezes its weight (the layers a layer-weighted MSD head bypasses);
* its weight is frozen (Mixout would not change it);
* it is the task head and ``mixout_head=False``;
* its weight is tied to another parameter and ``mixout_tied=False``;
* the same module is registered under several names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from torch import nn
from torch.nn.utils import parametrize

from ..errors import SurgeryError
from ..layers.mixout import LoraMixout, MixLinear, is_conv1d, rebindable
from ..wrappers import find_layers
from .base import Plan, Regularizer
from .lora import lora_role, tuner_layers
from .selection import select

__all__ = ["Mixout", "LAYERS"]

LAYERS = (MixLinear, LoraMixout)  # what a Mixout record entry names


def _qualname(m: Any) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def _unswappable(m: nn.Module) -> tuple[str, str] | None:
    """``(why, what to do)`` when swapping the layer ``m`` for a Mixout layer could not be exact."""
    if parametrize.is_parametrized(m):
        return ("its weight is parametrized (torch.nn.utils.parametrize: parametrizations.weight_norm, "
                "spectral_norm, orthogonal ...), recomputed from other tensors at every forward",
                "remove the parametrization first (parametrize.remove_parametrizations(layer, 'weight'))")
    if "weight" not in m._parameters:
        return ("its weight is not a Parameter of the layer but a tensor recomputed before every forward "
                "(torch.nn.utils.prune: weight_orig * weight_mask, or the old torch.nn.utils.weight_norm: "
                "weight_g, weight_v)", "make the pruning or weight norm permanent first (prune.remove(layer, "
                "'weight'), torch.nn.utils.remove_weight_norm(layer))")
    if vars(m).get("_compiled_call_impl") is not None:
        return ("it was compiled on its own with layer.compile(), whose compiled call runs the layer being "
                "replaced", "apply surgery first, then compile (or compile the whole model)")
    forward = vars(m).get("forward")
    if forward is not None and not rebindable(forward, m):
        return (f"its forward is replaced on the instance ({type(forward).__name__} {getattr(forward, '__name__', '')!s}) "
                "by code that surgery cannot point at the new layer", "remove that override before apply")
    return None


@dataclass
class MixoutPlan(Plan):
    p: float = 0.0
    swaps: list[tuple[str, nn.Module, str | None]] = field(default_factory=list)  # (name, layer, role)
    skipped: list[dict[str, str]] = field(default_factory=list)
    target_dtype: Any = None
    low_memory: bool = False
    built: list[nn.Module] = field(default_factory=list)

    def build(self) -> None:
        """The Mixout layers, their targets allocated (the step that can run out of memory)."""
        self.built = [LoraMixout.from_linear(m, self.p) if role == "lora" else
                      MixLinear.from_linear(m, self.p, target_dtype=self.target_dtype, low_memory=self.low_memory)
                      for _, m, role in self.swaps]

    def install(self, view, rec) -> None:
        frozen_warning: dict = {}  # one warning per apply when Mixout layers get frozen later (see MixLinear)
        for (name, old, role), layer in zip(self.swaps, self.built):
            parent, _, child = name.rpartition(".")
            setattr(view.root.get_submodule(parent), child, layer)
            entry = {"name": name, "p": self.p, "orig": _qualname(old), "transposed": layer.transposed}
            rec.mixout.append({**entry, "kind": "lora"} if role == "lora" else entry)
            vars(layer).update(_frozen_warning=frozen_warning, _record_name=name)
        rec.skipped += self.skipped


class Mixout(Regularizer):
    """Mixout on every selected ``nn.Linear``/``Conv1D`` and trainable LoRA adapter."""

    name = "mixout"

    def plan(self, view, opts, earlier: Sequence[Plan]) -> MixoutPlan | None:
        if opts.mixout == 0.0:
            return None
        sel = select(view, opts, earlier)
        inc, exc, head, under_head, freezes = sel.inc, sel.exc, sel.head, sel.under_head, sel.freezes
        taken = {n for p in earlier for n in getattr(p, "takes", ())}  # fused experts, PEFT ParamWrapper adapters
        tuners = tuner_layers(view, inc, exc, taken)  # PEFT layers; refuses adapters Mixout cannot mix (lora.py)
        plan = MixoutPlan(p=opts.mixout, head=head, target_dtype=opts.target_dtype, low_memory=opts.low_memory)
        plan.skipped += tuners.skipped  # adapters left alone, with the reason
        for name, m in view.modules.items():
            if not name or name in taken or (inc and not inc(name)) or (exc and exc(name)):
                continue
            if isinstance(m, LAYERS):
                raise SurgeryError(f"{name!r} is already a Mixout layer ({type(m).__name__}) that no live surgery "
                                   "of this model owns (a copy of a surgered model's module?); build the model from "
                                   f"plain modules, or pass exclude=[{name!r}]")
            if isinstance(m, nn.Linear) or is_conv1d(m):
                unswappable = _unswappable(m)
                if unswappable is not None:
                    raise SurgeryError(f"mixout cannot mix {name!r}: {unswappable[0]}. Pass exclude=[{name!r}] to "
                                       f"leave it alone, or {unswappable[1]}")
            if not (type(m) is nn.Linear or is_conv1d(m)):
                if isinstance(m, nn.Linear):
                    plan.skipped.append({"name": name, "reason": f"{type(m).__name__} is a Linear subclass whose "
                                         "forward may not be nn.Linear's (its owner may read .weight directly)"})
                continue
            role = lora_role(tuners, name, m)  # PEFT LoRA adapters: see surgery/regularizers/lora.py
            why = self._skip(view, name, m, role, freezes, under_head, opts)
            if role == "part":
                continue
            if why:
                plan.skipped.append({"name": name, "reason": why})
                continue
            plan.swaps.append((name, m, role))
        if not plan.swaps and not any(getattr(p, "takes", None) is not None and p.claims for p in earlier):
            skipped = ", ".join(s["name"] for s in plan.skipped[:5])
            raise SurgeryError(f"mixout={opts.mixout} selected no nn.Linear/Conv1D layer"
                               + (f" (skipped: {skipped})" if skipped else "") + "; check include/exclude")
        plan.claims = [name for name, _, _ in plan.swaps]
        return plan

    @staticmethod
    def _skip(view, name: str, m: nn.Module, role, freezes, under_head, opts) -> str | None:
        """Why the selected layer ``name`` is left alone, or None to mix it."""
        weight = f"{name}.weight"
        if weight in freezes:
            return freezes[weight]
        if role is None and not m.weight.requires_grad:
            return "weight frozen, requires_grad=False: Mixout would not change it"
        if under_head and under_head(name):
            return "task head (mixout_head=False)"
        others = view.tied(weight)
        if others and not opts.mixout_tied:
            return f"weight tied to {others[0]}; mixout_tied=True mixes it, keeping the tie"
        if len(view.names[id(m)]) > 1:
            return "the same module is registered under several names"
        return None

    def revert(self, root, rec):
        layers = {}
        for m in rec.mixout:  # at its name, inside a PEFT wrapper put there, or where an unwrapped wrapper was
            if "params" in m:  # fused experts and routers: surgery.regularizers.experts
                continue
            found, here = find_layers(root, m["name"], LAYERS)
            if not found and m.get("kind") != "lora":  # a LoRA adapter merged and unloaded leaves nothing to undo
                raise SurgeryError(f"cannot revert: Mixout layer {m['name']!r} is missing or was replaced after apply "
                                   f"(found {type(here).__name__}); nothing was changed")
            for name, layer in found:  # the class and layout the record says it replaced
                if isinstance(layer, MixLinear) and (layer.orig, layer.transposed) != (m["orig"], m["transposed"]):
                    raise SurgeryError(f"cannot revert: Mixout layer {name!r} was replaced after apply (recorded "
                                       f"{m['orig']}, transposed={m['transposed']}; found {layer.orig}, "
                                       f"transposed={layer.transposed}); nothing was changed")
            layers.update({id(layer): (name, layer) for name, layer in found})

        def undo():
            for name, layer in layers.values():
                parent, _, child = name.rpartition(".")
                setattr(root.get_submodule(parent), child, layer.to_linear())
        return undo
