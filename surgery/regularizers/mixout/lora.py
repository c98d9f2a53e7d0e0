"""Mixout on PEFT adapters: what is mixed, what is refused, what is left alone.

A LoRA layer computes ``y = W0 x + s B A x``: ``W0`` the frozen base (pretrained) weight,
``A`` (r, in) and ``B`` (out, r) the adapter, ``s`` its scaling. Mixout as the paper defines
it acts on the layer's effective weight ``W = W0 + s B A`` and mixes it toward the
pretrained weight ``W0``, one Bernoulli value per input neuron::

    W_mix = W0 + (W - W0) diag(M / (1 - p)) = W0 + s B A diag(M / (1 - p)),   M ~ Bernoulli(1 - p)

that is, the LoRA layer with its adapter's input scaled by ``M / (1 - p)``:
``y = W0 x + s B A (x * M / (1 - p))`` (after PEFT's ``lora_dropout``, which acts on the same
input). ``apply`` does exactly that: the adapter's ``lora_A.<adapter>`` Linear becomes a
:class:`~surgery.layers.mixout.LoraMixout` sharing its Parameters that scales its input by one mask per forward,
shared by the whole batch (as :class:`~surgery.layers.mixout.MixLinear` draws it). So ``E[W_mix] = W``; the
gradients of ``A`` and ``B`` are the exact Mixout gradients (autograd through the scaled
input); no target copy is stored, since the target is the frozen base weight (the
pretrained one, whatever the adapter held at apply time); in eval the layer is the plain
LoRA layer bitwise; ``p = 1`` gives ``W0`` alone. Several active adapters are mixed
independently, one mask each.

**Every adapter.** PEFT trains the active adapter and freezes the others; ``set_adapter(name)``
makes ``name`` trainable. So every adapter that trains now *or is inactive* is mixed: its
``lora_A`` becomes a ``LoraMixout`` (an inactive adapter's is simply not called) and its
``modules_to_save`` copy of the head a ``MixLinear``. An active adapter whose weights are frozen
(loaded for inference) is left alone, as every frozen weight is. Adapters added after ``apply``
are not mixed: add them first.

**Other tuners.** Mixout is defined here for vanilla LoRA adapters of ``Linear`` layers (no DoRA
or other variant, not merged, on a frozen base layer). Any other PEFT adapter that trains or is
inactive (AdaLoRA's ``lora_A``/``lora_E``/``lora_B``, IA3's ``ia3_l``, LoHa, LoKr, VeRA, LoRA on
an embedding, trainable tokens ...: parameters held in a ``ParameterDict`` or layers that are not
a LoRA ``Linear`` pair) is refused, naming the layer and ``exclude=[...]``. An excluded or
unselected one is listed in the record's ``skipped`` with the reason, so ``describe`` names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ...errors import SurgeryError
from ...patterns import ancestors
from ...wrappers import is_layer_wrapper, loaded_class, peft_tuner_layer_type
from ...record import Skip

__all__ = ["PeftLayers", "tuner_layers", "lora_role"]

_LORA_LINEAR = ("peft.tuners.lora.layer", "Linear")
_LORA_PAIR = ("lora_A", "lora_B")
_VARIANT_PARTS = ("lora_magnitude_vector",)  # DoRA: lora_role refuses the adapter with its variant named


@dataclass
class PeftLayers:
    """The PEFT layer wrappers of a model (tuner layers and ``modules_to_save`` wrappers) by dotted
    name, and the adapters Mixout leaves alone (record ``skipped`` entries)."""

    layers: dict[str, nn.Module] = field(default_factory=dict)
    skipped: list[Skip] = field(default_factory=list)


def _is_lora_linear(layer: nn.Module) -> bool:
    return type(layer) is loaded_class(*_LORA_LINEAR)


def _active(layer: nn.Module) -> list[str]:
    try:
        return list(layer.active_adapters)
    except (AttributeError, TypeError):
        return []


def _kind(layer: nn.Module) -> str:
    return f"{type(layer).__module__}.{type(layer).__qualname__}"


def tuner_layers(view, sel, taken=frozenset()) -> PeftLayers:
    """Every PEFT layer wrapper in ``view`` (empty without peft), after checking the adapters that no
    Linear holds.

    ``sel``: the Mixout selection (:mod:`.selection`); ``taken`` names modules another Mixout family
    mixes (the adapters of PEFT ``ParamWrapper`` layers on fused experts: :mod:`.experts`). Each
    adapter of a PEFT tuner layer other than a vanilla LoRA ``lora_A``/``lora_B`` pair (those are
    walked as Linear layers, see :func:`lora_role`) is grouped by layer and adapter name:

    * it trains, or is inactive (``set_adapter`` would make it train), and is selected: refused;
    * it trains or is inactive but is not selected: a ``skipped`` entry (excluded);
    * it is active and frozen: a ``skipped`` entry (frozen).

    Raises:
        SurgeryError: a selected adapter that trains (or can) and that Mixout cannot mix, naming
            its layers and ``exclude=[...]``.
    """
    if peft_tuner_layer_type() is None:
        return PeftLayers()
    layers = {n: m for n, m in view.modules.items() if is_layer_wrapper(m)}
    tuners = {n: m for n, m in layers.items() if isinstance(m, peft_tuner_layer_type())}
    groups: dict[tuple[str, str], dict] = {}  # (layer name, adapter) -> what the adapter holds
    for pname, prm in view.params.items():
        owner = next((a for a in ancestors(pname)[1:] if a in tuners), None)
        if owner is None or any(a in taken for a in ancestors(pname)[1:]):
            continue
        layer, rel = tuners[owner], pname[len(owner) + 1:]
        attr, _, rest = rel.partition(".")
        if attr == "base_layer" or not rest:  # the wrapped layer (walked as a layer), or a plain attribute
            continue
        if _is_lora_linear(layer) and attr in _LORA_PAIR + _VARIANT_PARTS:
            continue
        adapter = rest.split(".")[0]
        g = groups.setdefault((owner, adapter), {"trains": [], "module": f"{owner}.{attr}"})
        if prm.requires_grad and attr not in g["trains"]:
            g["trains"].append(attr)
    refused, skipped = [], []
    for (owner, adapter), g in groups.items():
        layer = tuners[owner]
        inactive = adapter not in _active(layer)
        what = f"PEFT adapter {adapter!r} ({_kind(layer)}{', trainable ' + ', '.join(g['trains']) if g['trains'] else ''})"
        if not (g["trains"] or inactive):
            skipped.append(Skip(name=owner, reason=f"{what}: frozen, requires_grad=False: Mixout would not change it"))
            continue
        if not sel.selected(g["module"]):
            skipped.append(Skip(name=owner, reason=f"{what}: not selected by include/exclude; Mixout is not "
                                                   "defined for this adapter type"))
            continue
        refused.append((owner, what, inactive and not g["trains"]))
    if refused:
        owner, what, inactive = refused[0]
        owners = list(dict.fromkeys(o for o, _, _ in refused))
        more = f" (and {len(owners) - 1} more PEFT layers like it)" if len(owners) > 1 else ""
        when = "is inactive and would train after set_adapter()" if inactive else "trains"
        them = "them" if len(owners) > 1 else "it"
        raise SurgeryError(
            f"mixout cannot mix {what} of layer {owner!r}{more}: it {when}, but Mixout is defined here only for "
            "plain layers and vanilla LoRA adapters (lora_A/lora_B Linear layers), which this adapter is not. Pass "
            f"exclude={_exclude_hint(owners, view.modules)!r} to leave {them} alone (describe then lists {them})")
    return PeftLayers(layers, skipped)


def _exclude_hint(owners: list[str], names) -> list[str]:
    """The shortest ``exclude`` list selecting exactly ``owners``: their last name parts (as PEFT's own
    ``target_modules`` name them), as few as match no other module, else the full names."""
    for k in range(1, max(o.count(".") for o in owners) + 1):
        suffixes = list(dict.fromkeys(".".join(o.split(".")[-k:]) for o in owners))
        if {n for n in names if any(n == x or n.endswith("." + x) for x in suffixes)} == set(owners):
            return suffixes
    return owners


def _trains(linear) -> bool:
    return linear is not None and linear.weight.requires_grad


def lora_role(tuners: PeftLayers, name: str, linear: nn.Linear) -> str | None:
    """How ``apply`` treats the Linear ``name`` when Mixout selects it.

    Returns None for a layer outside PEFT layers, or one whose adapter is active and does not
    train (the ordinary rules apply: a frozen weight is left alone); ``"lora"`` for the
    ``lora_A`` of a LoRA adapter that trains or is inactive (mixed with :class:`LoraMixout`);
    ``"part"`` for its ``lora_B`` (covered by the ``lora_A`` entry); ``"copy"`` for the
    ``modules_to_save`` copy of an inactive adapter (a ``MixLinear``, though frozen until
    ``set_adapter`` activates it).

    Raises:
        SurgeryError: a trainable Linear inside a PEFT layer whose Mixout is not defined
            here (DoRA or another LoRA variant, a merged adapter, a trainable base layer under
            an adapter, a non-LoRA tuner), naming the layer to exclude.
    """
    owner = next((a for a in ancestors(name)[1:] if a in tuners.layers), None)
    if owner is None:
        return None
    layer, rel = tuners.layers[owner], name[len(owner) + 1:]
    kind, _, adapter = rel.partition(".")
    if not isinstance(layer, peft_tuner_layer_type()):  # a modules_to_save wrapper: the original and a copy per adapter
        inactive = kind == "modules_to_save" and adapter.split(".")[0] not in _active(layer)
        return "copy" if inactive else None
    is_lora = _is_lora_linear(layer)
    if is_lora and kind in _LORA_PAIR and adapter in layer.lora_A and adapter in layer.lora_B:
        if not (_trains(layer.lora_A[adapter]) or _trains(layer.lora_B[adapter]) or adapter not in _active(layer)):
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
