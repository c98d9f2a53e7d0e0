"""Mixout on fused mixture-of-experts tensors and on routers (``apply(mixout=p)``, with the Linear layers).

Which modules, found by what they are (no list of class names):

* **fused experts**: a module holding Parameters of 3 or more dims whose leading dim is its integer
  ``num_experts`` attribute. Their layout is *declared* when the module carries the flags of
  transformers' experts interface (``has_gate``, ``is_transposed``, ``has_bias``, set by
  ``use_experts_implementation``, which every fused-experts class of transformers 5 uses and which
  every experts forward it dispatches to, eager loop, ``batched_mm``, ``grouped_mm``, hub kernels,
  reads): ``gate_up_proj`` (or ``up_proj`` without a gate) and ``down_proj``, stored
  ``(E, out, in)``, or ``(E, in, out)`` when ``is_transposed``. Those are mixed per expert and input
  neuron; the expert biases stay plain, as a Linear's bias does. Fused experts that declare no layout
  (Llama 4, JetMoE, remote code), and any other 3-D tensor of a declared module, cannot be mixed
  exactly (which dim holds the input neurons is unknown): they are left plain and listed in the
  record's ``skipped`` with that reason (``describe`` names them).
* **routers**: a module that is not an ``nn.Linear`` holding a 2-D ``weight`` whose leading dim is its
  integer ``num_experts`` attribute, and no other Parameter of 2 or more dims: the router logits
  ``F.linear(x, weight)`` of every transformers 5 router. The paper's rule covers it (a pretrained
  matmul weight), so it is mixed per input neuron, its bias left plain; ``exclude=["gate"]`` (or
  ``"router"``) leaves routers alone. Routers that are ``nn.Linear`` modules are Linear layers.

The rules of :mod:`surgery.regularizers.mixout` apply (``include``/``exclude``, frozen weights, the
task head with ``mixout_head=False``, tied weights, modules registered twice), and so do its refusals of
a swap that could not be exact (a module compiled on its own, a forward replaced on the instance, a
parametrized Parameter, a Mixout swap-in no live surgery owns). Under PEFT's ``ParamWrapper`` (LoRA on
``target_parameters``) the frozen expert tensors are mixed as their LoRA layer's effective weight
``W0 + delta`` toward ``W0`` (see :mod:`surgery.layers.experts`) when an adapter trains or is inactive
(``set_adapter`` would make it train), and this plan takes the wrappers' ``lora_A``/``lora_B`` from the
Linear rule; a merged adapter, or a base tensor that trains beside its adapter, is refused naming the
layer.

Record entries (in ``mixout``): ``{"name", "p", "orig", "kind": "experts" | "router", "params":
[mixed Parameter names], "transposed"}``, the target at ``<name>.mixout_target``; under PEFT
``"kind": "lora"`` with ``"params"`` and no target.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from torch import nn
from torch.nn.utils import parametrize

from ..errors import SurgeryError
from ..layers.experts import MixoutParams
from ..layers.mixout import rebindable
from ..wrappers import _cls, find_layers
from .base import Plan, Regularizer
from .selection import select

__all__ = ["ExpertsMixout", "classify"]

FLAGS = ("has_gate", "is_transposed", "has_bias")  # transformers' experts interface (use_experts_implementation)
UNDECLARED = ("fused experts whose layout the module does not declare (no is_transposed/has_gate flags of "
              "transformers' experts interface): which dim holds the input neurons is unknown, so Mixout cannot mix "
              "them exactly")


def _num_experts(m: nn.Module) -> int | None:
    n = vars(m).get("num_experts")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


@dataclass(frozen=True)
class Found:
    """What :func:`classify` found: ``kind`` ("experts" | "router"), the ``(name, axes)`` layout it can mix
    (None when undeclared), and the expert tensors it cannot mix."""

    kind: str
    layout: tuple[tuple[str, tuple[int, ...]], ...] | None
    unmixable: tuple[str, ...] = ()
    transposed: bool = False


def classify(m: nn.Module) -> Found | None:
    """Fused experts or a router (see the module doc), or None for any other module."""
    n = _num_experts(m)
    if n is None or isinstance(m, nn.Linear):
        return None
    params = {k: p for k, p in m._parameters.items() if p is not None}
    fused = [k for k, p in params.items() if p.dim() >= 3 and p.shape[0] == n]
    if fused:
        flags = vars(m)
        if not all(isinstance(flags.get(f), bool) for f in FLAGS):
            return Found("experts", None, tuple(fused))
        axes = (0, 1) if flags["is_transposed"] else (0, 2)
        names = ("gate_up_proj" if flags["has_gate"] else "up_proj", "down_proj")
        layout = tuple((k, axes) for k in names if k in fused and params[k].dim() == 3)
        return Found("experts", layout, tuple(k for k in fused if k not in dict(layout)), flags["is_transposed"])
    w = params.get("weight")
    if w is not None and w.dim() == 2 and w.shape[0] == n and all(p.dim() < 2 for k, p in params.items() if k != "weight"):
        return Found("router", (("weight", (1,)),))
    return None


def _unswappable(name: str, m: nn.Module) -> None:
    """Refuse a module whose swap could not be exact (the Linear rule's checks, for these modules).

    Raises:
        SurgeryError: a module that is already a Mixout swap-in no live surgery owns, whose Parameters
            are parametrized, that was compiled on its own, or whose forward is replaced on the instance.
    """
    if isinstance(m, MixoutParams):
        raise SurgeryError(f"{name!r} is already a Mixout layer ({type(m).__name__}) that no live surgery of this "
                           "model owns (a copy of a surgered model's module?); build the model from plain modules, "
                           f"or pass exclude=[{name!r}]")
    why = None
    if parametrize.is_parametrized(m):
        why = ("its Parameters are parametrized (torch.nn.utils.parametrize), recomputed from other tensors at every "
               "forward", "remove the parametrization first")
    elif vars(m).get("_compiled_call_impl") is not None:
        why = ("it was compiled on its own with module.compile(), whose compiled call runs the module being replaced",
               "apply surgery first, then compile (or compile the whole model)")
    elif vars(m).get("forward") is not None and not rebindable(vars(m)["forward"], m):
        why = ("its forward is replaced on the instance by code that surgery cannot point at the new module",
               "remove that override before apply")
    if why:
        raise SurgeryError(f"mixout cannot mix {name!r}: {why[0]}. Pass exclude=[{name!r}] to leave it alone, or "
                           f"{why[1]}")


def _qualname(m: Any) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def _param_wrappers(view) -> dict[int, list[tuple[str, nn.Module]]]:
    """PEFT ``ParamWrapper`` layers (LoRA on ``target_parameters``) by ``id`` of the module they wrap."""
    cls = _cls("peft.tuners.lora.layer", "ParamWrapper")
    out: dict[int, list[tuple[str, nn.Module]]] = {}
    if isinstance(cls, type):
        for name, m in view.modules.items():
            if isinstance(m, cls):
                out.setdefault(id(m.get_base_layer()), []).append((name, m))
    return out


def _trains(linear) -> bool:
    return linear is not None and linear.weight.requires_grad


def _wants(wrapper: nn.Module, adapter: str) -> bool:
    """An adapter of a PEFT ``ParamWrapper`` that trains, or is inactive (``set_adapter`` would make it
    train): mixed, as :mod:`surgery.regularizers.lora` mixes every such LoRA adapter."""
    try:
        inactive = adapter not in wrapper.active_adapters
    except (AttributeError, TypeError):
        inactive = False
    return inactive or _trains(wrapper.lora_A[adapter]) or (adapter in wrapper.lora_B and _trains(wrapper.lora_B[adapter]))


@dataclass
class ExpertsPlan(Plan):
    p: float = 0.0
    target_dtype: Any = None
    low_memory: bool = False
    swaps: list[tuple[str, nn.Module, tuple, str, bool, bool]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    takes: list[str] = field(default_factory=list)  # modules the Linear rule leaves to this plan
    targets: list[Any] = field(default_factory=list)

    def build(self) -> None:
        """The targets, allocated (the step that can run out of memory)."""
        self.targets = [None if base else MixoutParams.make_target(m, layout, self.target_dtype)
                        for _, m, layout, _, base, _ in self.swaps]

    def install(self, view, rec) -> None:
        frozen_warning: dict = {}
        for (name, old, layout, kind, base, transposed), target in zip(self.swaps, self.targets):
            # built now, not in build(): the module's attributes as apply leaves them (its config copy)
            layer = MixoutParams.from_module(old, self.p, layout, target=target, base=base, low_memory=self.low_memory)
            parent, _, child = name.rpartition(".")
            setattr(view.root.get_submodule(parent), child, layer)
            rec.mixout.append({"name": name, "p": self.p, "orig": _qualname(old), "kind": "lora" if base else kind,
                               "params": [k for k, _ in layout], "transposed": transposed})
            vars(layer).update(_frozen_warning=frozen_warning, _record_name=name)
        rec.skipped += self.skipped


class ExpertsMixout(Regularizer):
    """Mixout on fused expert tensors and routers; planned before the Linear rule, which leaves them here."""

    name = "mixout_experts"

    def plan(self, view, opts, earlier: Sequence[Plan]) -> ExpertsPlan | None:
        if opts.mixout == 0.0:
            return None
        found = {name: f for name, m in view.modules.items() if name and (f := classify(m)) is not None}
        if not found:
            return None
        sel = select(view, opts, earlier)
        inc, exc, under_head, freezes = sel.inc, sel.exc, sel.under_head, sel.freezes
        wrappers = _param_wrappers(view)
        plan = ExpertsPlan(p=opts.mixout, target_dtype=opts.target_dtype, low_memory=opts.low_memory)
        for name, f in found.items():
            if (inc and not inc(name)) or (exc and exc(name)):
                continue
            m = view.modules[name]
            swap = self._swap(view, name, m, f, wrappers.get(id(m), []), freezes, under_head, opts, plan)
            if swap is not None:
                plan.swaps.append(swap)
        if not plan.swaps and not plan.skipped:
            return None
        plan.claims = [s[0] for s in plan.swaps] + plan.takes
        return plan

    @staticmethod
    def _swap(view, name, m, f: Found, wrapped, freezes, under_head, opts, plan):
        """The swap for ``m`` (recording what is left alone in ``plan``), or None."""
        params = m._parameters
        if f.layout is None:
            if any(params[k].requires_grad for k in f.unmixable):
                plan.skipped.append({"name": name, "reason": UNDECLARED})
            return None
        if [k for k in f.unmixable if params[k].requires_grad]:
            plan.skipped.append({"name": name, "reason": f"its expert tensors {', '.join(f.unmixable)} are not among "
                                 "the projections transformers' experts interface declares, so Mixout cannot mix them "
                                 "exactly"})
        lora = {w.parameter_name: (wname, w) for wname, w in wrapped if w.parameter_name in dict(f.layout)
                and any(_wants(w, a) for a in w.lora_A)}
        why = None
        if under_head and under_head(name):
            why = "task head (mixout_head=False)"
        elif len(view.names[id(m)]) > 1:
            why = "the same module is registered under several names"
        if why:
            plan.skipped.append({"name": name, "reason": why})
            return None
        if lora:
            _unswappable(name, m)
            return ExpertsMixout._lora_swap(name, m, f, lora, plan)
        layout = []
        for k, axes in f.layout:
            full = f"{name}.{k}"
            others = view.tied(full)
            if full in freezes:
                plan.skipped.append({"name": full, "reason": freezes[full]})
            elif not params[k].requires_grad:
                continue
            elif others and not opts.mixout_tied:
                plan.skipped.append({"name": full, "reason": f"weight tied to {others[0]}; mixout_tied=True mixes it, "
                                                              "keeping the tie"})
            else:
                layout.append((k, axes))
        if not layout:
            if not any(params[k].requires_grad for k, _ in f.layout):
                plan.skipped.append({"name": name, "reason": "weight frozen, requires_grad=False: Mixout would not "
                                                             "change it"})
            return None
        _unswappable(name, m)
        return name, m, tuple(layout), f.kind, False, f.transposed

    @staticmethod
    def _lora_swap(name, m, f: Found, lora, plan):
        """Expert tensors under PEFT ParamWrappers: the effective weight mixed toward the frozen base."""
        for k, (wname, w) in lora.items():
            why = None
            if getattr(w, "merged", False):
                why = "its adapters are merged into the base weight (call unmerge_adapter() before apply)"
            elif any(m._parameters[j].requires_grad for j, _ in f.layout):
                why = "its base layer trains too (freeze it, as get_peft_model does)"
            if why:
                raise SurgeryError(f"mixout cannot mix LoRA layer {wname!r} (on {name}.{k}): {why}; Mixout is defined "
                                   "here for unmerged LoRA adapters on a frozen base. Pass "
                                   f"exclude=[{wname!r}] to leave it alone")
            plan.takes += [f"{wname}.{part}.{a}" for a in w.lora_A for part in ("lora_A", "lora_B")]
        layout = tuple((k, axes) for k, axes in f.layout if k in lora)
        return name, m, layout, f.kind, True, f.transposed

    def revert(self, root, rec):
        layers = {}
        for m in rec.mixout:
            if "params" not in m:  # a Linear layer or LoRA adapter: surgery.regularizers.mixout
                continue
            found, here = find_layers(root, m["name"], (MixoutParams,))
            if not found and m.get("kind") != "lora":  # a LoRA adapter merged and unloaded leaves a plain layer
                raise SurgeryError(f"cannot revert: Mixout layer {m['name']!r} is missing or was replaced after apply "
                                   f"(found {type(here).__name__}); nothing was changed")
            for name, layer in found:
                have = [k for k, _ in layer.mixout_layout]
                if (layer.orig, have) != (m["orig"], list(m["params"])):
                    raise SurgeryError(f"cannot revert: Mixout layer {name!r} was replaced after apply (recorded "
                                       f"{m['orig']} mixing {m['params']}; found {layer.orig} mixing {have}); "
                                       "nothing was changed")
            layers.update({id(layer): (name, layer) for name, layer in found})

        def undo():
            for name, layer in layers.values():
                parent, _, child = name.rpartition(".")
                setattr(root.get_submodule(parent), child, layer.to_module())
        return undo
