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

The rules of the Linear family (:mod:`.linear`) apply (``include``/``exclude``, frozen weights, the
task head with ``mixout_head=False``, tied weights, modules registered twice), and so do its refusals of
a swap that could not be exact (a module compiled on its own, a forward replaced on the instance, a
parametrized Parameter, a Mixout swap-in no live surgery owns). Under PEFT's ``ParamWrapper`` (LoRA on
``target_parameters``) the frozen expert tensors are mixed as their LoRA layer's effective weight
``W0 + delta`` toward ``W0`` (see :mod:`surgery.layers.experts`) when an adapter trains or is inactive
(``set_adapter`` would make it train), and this family takes the wrappers' ``lora_A``/``lora_B`` from the
Linear family; a merged adapter, or a base tensor that trains beside its adapter, is refused naming the
layer.

Record entries (:class:`~surgery.regularizers.mixout.MixoutEntry`): ``kind`` ``"experts"`` / ``"router"``,
``params`` (the mixed Parameter names), the target at ``<name>.mixout_target``; under PEFT ``"kind": "lora"``
with ``params`` and no target.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...errors import SurgeryError
from ...record import Skip
from ...wrappers import loaded_class
from .family import Swap, refuse_unswappable

__all__ = ["classify", "Found", "param_wrappers", "plan_experts", "UNDECLARED"]

FLAGS = ("has_gate", "is_transposed", "has_bias")  # transformers' experts interface (use_experts_implementation)
UNDECLARED = ("fused experts whose layout the module does not declare (no is_transposed/has_gate flags of "
              "transformers' experts interface): which dim holds the input neurons is unknown, so Mixout cannot mix "
              "them exactly")
FROZEN = "weight frozen, requires_grad=False: Mixout would not change it"


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


def param_wrappers(view) -> dict[int, list[tuple[str, nn.Module]]]:
    """PEFT ``ParamWrapper`` layers (LoRA on ``target_parameters``) by ``id`` of the module they wrap."""
    cls = loaded_class("peft.tuners.lora.layer", "ParamWrapper")
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
    train): mixed, as :mod:`.lora` mixes every such LoRA adapter."""
    try:
        inactive = adapter not in wrapper.active_adapters
    except (AttributeError, TypeError):
        inactive = False
    return inactive or _trains(wrapper.lora_A[adapter]) or (adapter in wrapper.lora_B and _trains(wrapper.lora_B[adapter]))


@dataclass
class _Module:
    """One fused-experts module or router being planned: what it is, where, what wraps it."""

    name: str
    module: nn.Module
    found: Found
    wrapped: list[tuple[str, nn.Module]]


def plan_experts(ctx, sel, wrappers) -> tuple[list[Swap], list[Skip], list[str]]:
    """The swaps of the fused-experts modules and routers ``sel`` selects, what is left alone (with the
    reason), and the modules taken from the Linear family (the ``lora_A``/``lora_B`` of the PEFT
    ``ParamWrapper`` layers whose expert tensors are mixed here).

    Raises:
        SurgeryError: a module whose swap could not be exact, a merged adapter, or a base tensor that
            trains beside its adapter, naming ``exclude=[...]``.
    """
    swaps: list[Swap] = []
    skipped: list[Skip] = []
    taken: list[str] = []
    for name, m in ctx.view.modules.items():
        found = classify(m) if name else None
        if found is None or not sel.selected(name):
            continue
        swap = _plan_one(ctx, sel, _Module(name, m, found, wrappers.get(id(m), [])), skipped, taken)
        if swap is not None:
            swaps.append(swap)
    return swaps, skipped, taken


def _plan_one(ctx, sel, it: _Module, skipped: list[Skip], taken: list[str]) -> Swap | None:
    """The swap for one module (recording in ``skipped`` what is left alone), or None."""
    name, f, params = it.name, it.found, it.module._parameters
    if f.layout is None:
        if any(params[k].requires_grad for k in f.unmixable):
            skipped.append(Skip(name=name, reason=UNDECLARED))
        return None
    if [k for k in f.unmixable if params[k].requires_grad]:
        skipped.append(Skip(name=name, reason=f"its expert tensors {', '.join(f.unmixable)} are not among the "
                            "projections transformers' experts interface declares, so Mixout cannot mix them exactly"))
    lora = {w.parameter_name: (wname, w) for wname, w in it.wrapped if w.parameter_name in dict(f.layout)
            and any(_wants(w, a) for a in w.lora_A)}
    why = None
    if sel.under_head(name):
        why = "task head (mixout_head=False)"
    elif len(ctx.view.names[id(it.module)]) > 1:
        why = "the same module is registered under several names"
    if why:
        skipped.append(Skip(name=name, reason=why))
        return None
    if lora:
        refuse_unswappable(name, it.module, "Parameters")
        return _lora_swap(it, lora, taken)
    layout = []
    for k, axes in f.layout:
        full = f"{name}.{k}"
        others = ctx.view.tied(full)
        if full in sel.freezes:
            skipped.append(Skip(name=full, reason=sel.freezes[full]))
        elif not params[k].requires_grad:
            continue
        elif others and not ctx.opts.mixout_tied:
            skipped.append(Skip(name=full, reason=f"weight tied to {others[0]}; mixout_tied=True mixes it, keeping "
                                                  "the tie"))
        else:
            layout.append((k, axes))
    if not layout:
        if not any(params[k].requires_grad for k, _ in f.layout):
            skipped.append(Skip(name=name, reason=FROZEN))
        return None
    refuse_unswappable(name, it.module, "Parameters")
    return Swap(name, it.module, f.kind, tuple(layout), f.transposed)


def _lora_swap(it: _Module, lora: dict, taken: list[str]) -> Swap:
    """Expert tensors under PEFT ParamWrappers: the effective weight mixed toward the frozen base."""
    f = it.found
    for k, (wname, w) in lora.items():
        why = None
        if getattr(w, "merged", False):
            why = "its adapters are merged into the base weight (call unmerge_adapter() before apply)"
        elif any(it.module._parameters[j].requires_grad for j, _ in f.layout):
            why = "its base layer trains too (freeze it, as get_peft_model does)"
        if why:
            raise SurgeryError(f"mixout cannot mix LoRA layer {wname!r} (on {it.name}.{k}): {why}; Mixout is defined "
                               "here for unmerged LoRA adapters on a frozen base. Pass "
                               f"exclude=[{wname!r}] to leave it alone")
        taken += [f"{wname}.{part}.{a}" for a in w.lora_A for part in ("lora_A", "lora_B")]
    layout = tuple((k, axes) for k, axes in f.layout if k in lora)
    return Swap(it.name, it.module, "lora experts", layout, f.transposed)
