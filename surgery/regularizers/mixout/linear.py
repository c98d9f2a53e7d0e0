"""Mixout's Linear family: which ``nn.Linear`` / ``Conv1D`` layers (and PEFT LoRA adapters) are mixed.

Every ``nn.Linear`` and transformers ``Conv1D`` that ``include``/``exclude`` select becomes a
:class:`~surgery.layers.mixout.MixLinear` sharing its Parameters and mixing toward a frozen copy
of its current (pretrained) weight; the ``lora_A`` of a trainable PEFT LoRA adapter becomes a
:class:`~surgery.layers.mixout.LoraMixout` (:mod:`.lora`). A selected layer
is left alone, and listed with the reason in the record's ``skipped``, when:

* it is a Linear subclass (its owner may read ``.weight`` directly, or its forward differs);
* another plan freezes its weight (the layers a layer-weighted MSD head bypasses);
* its weight is frozen (Mixout would not change it);
* it is the task head and ``mixout_head=False``;
* its weight is tied to another parameter and ``mixout_tied=False``;
* the same module is registered under several names.
"""

from __future__ import annotations

from torch import nn

from ...layers.mixout import is_conv1d
from ...layers.swap import MixoutLayer
from ...record import Skip
from .family import Swap, refuse_unswappable
from .lora import lora_role, tuner_layers

__all__ = ["plan_linear"]

FROZEN = "weight frozen, requires_grad=False: Mixout would not change it"


def plan_linear(ctx, sel, taken: set[str]) -> tuple[list[Swap], list[Skip]]:
    """The swaps of the Linear layers and LoRA adapters ``sel`` selects (``taken``: modules the experts
    family mixes), and what is left alone, with the reason.

    Raises:
        SurgeryError: a layer whose swap could not be exact, or a PEFT adapter Mixout cannot mix.
    """
    tuners = tuner_layers(ctx.view, sel, taken)  # PEFT layers; refuses adapters Mixout cannot mix (lora.py)
    swaps: list[Swap] = []
    skipped = list(tuners.skipped)  # adapters left alone, with the reason
    for name, m in ctx.view.modules.items():
        if name in taken or not sel.selected(name):
            continue
        if isinstance(m, MixoutLayer) or isinstance(m, nn.Linear) or is_conv1d(m):
            refuse_unswappable(name, m)
        if not (type(m) is nn.Linear or is_conv1d(m)):
            if isinstance(m, nn.Linear):
                skipped.append(Skip(name=name, reason=f"{type(m).__name__} is a Linear subclass whose forward may "
                                                      "not be nn.Linear's (its owner may read .weight directly)"))
            continue
        role = lora_role(tuners, name, m)  # PEFT LoRA adapters: see lora.py
        if role == "part":
            continue
        why = _skip(ctx, sel, name, m, role)
        if why:
            skipped.append(Skip(name=name, reason=why))
            continue
        swaps.append(Swap(name, m, "lora" if role == "lora" else "linear"))
    return swaps, skipped


def _skip(ctx, sel, name: str, m: nn.Module, role) -> str | None:
    """Why the selected layer ``name`` is left alone, or None to mix it."""
    weight = f"{name}.weight"
    if weight in sel.freezes:
        return sel.freezes[weight]
    if role is None and not m.weight.requires_grad:
        return FROZEN
    if sel.under_head(name):
        return "task head (mixout_head=False)"
    others = ctx.view.tied(weight)
    if others and not ctx.opts.mixout_tied:
        return f"weight tied to {others[0]}; mixout_tied=True mixes it, keeping the tie"
    if len(ctx.view.names[id(m)]) > 1:
        return "the same module is registered under several names"
    return None
