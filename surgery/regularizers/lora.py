"""Mixout on PEFT LoRA adapters.

A LoRA layer computes ``y = W0 x + s B A x``: ``W0`` the frozen base (pretrained) weight,
``A`` (r, in) and ``B`` (out, r) the adapter, ``s`` its scaling. Mixout as the paper defines
it acts on the layer's effective weight ``W = W0 + s B A`` and mixes it toward the
pretrained weight ``W0``, one Bernoulli value per input neuron::

    W_mix = W0 + (W - W0) diag(M / (1 - p)) = W0 + s B A diag(M / (1 - p)),   M ~ Bernoulli(1 - p)

that is, the LoRA layer with its adapter's input scaled by ``M / (1 - p)``:
``y = W0 x + s B A (x * M / (1 - p))`` (after PEFT's ``lora_dropout``, which acts on the same
input). ``apply`` does exactly that: the adapter's ``lora_A.<adapter>`` Linear becomes a
:class:`~surgery.layers.mixout.LoraMixout` sharing its Parameters that scales its input by one mask per forward,
shared by the whole batch (as :class:`surgery.MixLinear` draws it). So ``E[W_mix] = W``; the
gradients of ``A`` and ``B`` are the exact Mixout gradients (autograd through the scaled
input); no target copy is stored, since the target is the frozen base weight (the
pretrained one, whatever the adapter held at apply time); in eval the layer is the plain
LoRA layer bitwise; ``p = 1`` gives ``W0`` alone. Several active adapters are mixed
independently, one mask each.

Supported: PEFT's LoRA ``Linear`` layers, vanilla LoRA (no DoRA or other variant), not
merged, with a frozen base layer. A trainable Linear inside any other PEFT layer is refused
with an error naming the layer to exclude.
"""

from __future__ import annotations

from torch import nn

from ..errors import SurgeryError
from ..patterns import ancestors
from ..wrappers import _cls, peft_tuner_layer_type

__all__ = ["tuner_layers", "lora_role"]


def tuner_layers(modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Every PEFT tuner layer (LoRA, IA3, ...) among ``modules`` by dotted name; empty without peft."""
    base = peft_tuner_layer_type()
    if base is None:
        return {}
    return {n: m for n, m in modules.items() if isinstance(m, base)}


def _trains(linear) -> bool:
    return linear is not None and linear.weight.requires_grad


def lora_role(tuners: dict[str, nn.Module], name: str, linear: nn.Linear) -> str | None:
    """How ``apply`` treats the Linear ``name`` when Mixout selects it.

    Returns None for a layer outside PEFT tuner layers, or one whose adapter does not train
    (the ordinary rules apply: a frozen weight is left alone); ``"lora"`` for the ``lora_A``
    of a LoRA adapter that trains (mixed with :class:`LoraMixout`); ``"part"`` for its
    ``lora_B`` (covered by the ``lora_A`` entry).

    Raises:
        SurgeryError: a trainable Linear inside a PEFT layer whose Mixout is not defined
            here (DoRA or another LoRA variant, a merged adapter, a trainable base layer under
            an adapter, a non-LoRA tuner), naming the layer to exclude.
    """
    owner = next((a for a in ancestors(name)[1:] if a in tuners), None)
    if owner is None:
        return None
    layer, rel = tuners[owner], name[len(owner) + 1:]
    kind, _, adapter = rel.partition(".")
    is_lora = type(layer) is _cls("peft.tuners.lora.layer", "Linear")
    if is_lora and kind in ("lora_A", "lora_B") and adapter in layer.lora_A and adapter in layer.lora_B:
        if not (_trains(layer.lora_A[adapter]) or _trains(layer.lora_B[adapter])):
            return None
        if kind == "lora_B":
            return "part"
        why = None
        variant = getattr(layer, "lora_variant", {}).get(adapter)
        if variant is not None or getattr(layer, "use_dora", {}).get(adapter):
            why = f"its adapter {adapter!r} uses a LoRA variant ({type(variant).__name__ if variant else 'DoRA'})"
        elif getattr(layer, "merged", False):
            why = "its adapters are merged into the base weight (call unmerge_adapter() before apply)"
        elif _trains(layer.get_base_layer()):
            why = "its base layer trains too (freeze it, as get_peft_model does)"
        if why is None:
            return "lora"
        raise SurgeryError(f"mixout cannot mix LoRA layer {owner!r}: {why}; Mixout is defined here for vanilla, "
                           f"unmerged LoRA adapters on a frozen base layer. Pass exclude=[{owner!r}] to leave it alone")
    if not _trains(linear):
        return None
    raise SurgeryError(f"mixout cannot mix {name!r}: it trains inside PEFT layer {owner!r} "
                       f"({type(layer).__module__}.{type(layer).__qualname__}), "
                       "for which Mixout is not defined (surgery mixes plain layers and vanilla LoRA adapters of "
                       f"Linear layers). Pass exclude=[{owner!r}] to leave it alone")

