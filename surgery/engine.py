"""``apply``, ``revert`` and ``describe``: one walk over the module tree, one change record.

``apply`` plans every change and validates it before it mutates anything, so a failed call
leaves the model as it was. ``revert`` undoes exactly what the record lists.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn

from . import configs, distributed, droppath, layer_msd
from .arguments import MSD_P_DEFAULT, check_bool, check_count, check_dependent, check_materialised, recorded_pattern
from .dropout import DROP_PATH, DROPOUT, set_path
from .describing import describe
from .errors import AlreadySurgeredError, HeadError, SurgeryError, SurgeryTypeError
from .lora import LoraMixout, lora_role, tuner_layers
from .mixout import MixLinear, check_p, is_conv1d
from .msd import MultiSampleDropout
from .record import ATTR, Record, get_record, unwrap
from .select import Pattern, check_msd_head, compile_pattern, find_head
from .wrappers import check_swappable, find_layers

__all__ = ["apply", "revert", "describe", "is_surgered"]


def _check_model(model, action: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise SurgeryTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_swappable(model, action)
    return unwrap(model)


def is_surgered(model: nn.Module) -> bool:
    """True when ``model`` (or the module inside its DDP/compile wrapper) carries surgery."""
    return get_record(model, required=False) is not None


def _tied_names(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = defaultdict(list)
    for n, prm in model.named_parameters(remove_duplicate=False):
        names[id(prm)].append(n)
    return names


def apply(
    model: nn.Module,
    *,
    mixout: float = 0.0,
    dropout: float | None = None,
    drop_path: float | None = None,
    msd: int = 0,
    msd_p: float | None = None,
    head: str | None = None,
    include: Pattern = None,
    exclude: Pattern = None,
    mixout_head: bool = True,
    mixout_tied: bool = False,
    target_dtype: torch.dtype | None = None,
    low_memory: bool = False,
    msd_layers: bool = False,
    msd_layer_p: float = 0.2,
    msd_pool: str = "first",
) -> nn.Module:
    """Apply Mixout, dropout control and multi-sample dropout to ``model`` in place.

    Args:
        model: any ``nn.Module``; transformers models are handled first-class.
        mixout: Mixout probability p in [0, 1]; 0 turns Mixout off. Every ``nn.Linear``
            and transformers ``Conv1D`` (selected by ``include``/``exclude``) becomes a
            :class:`MixLinear` mixing toward a frozen copy of its current weight. A layer
            whose weight does not require grad is left alone (``describe`` lists it). In a
            PEFT LoRA layer the adapter is mixed on the layer's effective weight toward the
            frozen base weight (:mod:`surgery.lora`).
        dropout: when not None, every dropout probability in the model (dropout modules,
            dropout attributes read at call time, config fields) is set to this value.
            Stochastic depth is not dropout: see ``drop_path``.
        drop_path: when not None, every stochastic-depth rate (DropPath modules, LayerDrop
            and drop-path attributes read at call time, config fields such as
            ``drop_path_rate``, ``layerdrop``, ``encoder_layerdrop``) is set to this value.
        msd: K > 0 turns the task head into a multi-sample-dropout head with K samples.
        msd_p: dropout probability of each MSD sample (default 0.2; only with ``msd``).
        head: dotted name of the task head; found automatically (``classifier``,
            ``score``, ``classification_head``, ``qa_outputs``) when None.
        include: Mixout layers to select: a regex (full match on dotted names) or a
            list of names / dotted suffixes. A layer is selected when it or a module
            containing it matches. Default: all.
        exclude: Mixout layers to leave alone, same forms as ``include``.
        mixout_head: also mix the task head, toward its (random) initial weights, as the
            paper and its reference code do. False leaves the head a plain layer.
        mixout_tied: also mix layers whose weight is tied to another parameter (an LM head
            tied to the embeddings). The tie is kept either way; default False leaves them
            alone and ``describe`` says so.
        target_dtype: keep Mixout targets in this dtype (e.g. ``torch.bfloat16``) to save
            memory; they are cast to the weight's dtype in forward. Default: the weight's.
        low_memory: Mixout layers recompute the mixed weight in backward instead of
            keeping it (one weight-sized tensor less per layer alive during backward).
        msd_layers: the MSD head reads a learned, softmax-weighted mix of the summary token
            of every hidden state of the backbone instead of its usual input (the Kaggle
            head, see :mod:`surgery.layer_msd`); the head must be an ``nn.Linear``.
        msd_layer_p: dropout probability of each layer's summary vector (``msd_layers``).
        msd_pool: the summary token: ``"first"`` (position 0) or ``"last"`` (the last
            non-padding token of ``attention_mask``, for decoder-only backbones).

    Returns:
        ``model``, the same object.

    Raises:
        SurgeryTypeError: ``model`` is not an ``nn.Module``, or a pattern/dtype has the wrong type.
        ValueError: a probability outside [0, 1], NaN or not a number; ``msd`` not an int >= 0.
        AlreadySurgeredError: the model already carries surgery (``revert`` it first), or
            it was loaded from a checkpoint saved with surgery applied.
        PatternError: ``include``/``exclude`` match no module, or select no layer.
        HeadError: ``msd`` > 0 and no head, an ambiguous head, or ``head`` names no module.
    """
    root = _check_model(model, "apply")
    distributed.check_apply(model)  # fully_shard already applied, DTensor weights, DeepSpeed: refused here
    # ---- validate arguments --------------------------------------------------------
    mixout = check_p(mixout, "mixout")
    if dropout is not None:
        dropout = check_p(dropout, "dropout")
    if drop_path is not None:
        drop_path = check_p(drop_path, "drop_path")
    msd = check_count(msd, "msd")
    if msd_p is not None:
        msd_p = check_p(msd_p, "msd_p")
    for flag, value in (("mixout_head", mixout_head), ("mixout_tied", mixout_tied), ("low_memory", low_memory)):
        check_bool(value, flag)
    msd_layer_p, msd_pool = layer_msd.check_layer_args(msd, msd_layers, msd_layer_p, msd_pool)
    if target_dtype is not None and not (isinstance(target_dtype, torch.dtype) and target_dtype.is_floating_point):
        raise SurgeryTypeError(f"target_dtype must be a floating torch.dtype such as torch.bfloat16, got {target_dtype!r}")
    if get_record(root, required=False) is not None:
        raise AlreadySurgeredError(
            "model already has surgery applied; call surgery.revert(model) before applying it again "
            "(a second apply does not compose with the first)"
        )
    configs.check_no_record(root)  # at any depth: a (sub-)model loaded from a surgered checkpoint
    if (include is not None or exclude is not None) and mixout == 0.0:
        raise SurgeryError("include/exclude select Mixout layers; they need mixout > 0")
    check_dependent(mixout=mixout, msd=msd, msd_p=msd_p, head=head, mixout_head=mixout_head,
                    mixout_tied=mixout_tied, target_dtype=target_dtype, low_memory=low_memory)
    msd_p = MSD_P_DEFAULT if msd_p is None else msd_p
    if mixout > 0.0:
        check_materialised(root)

    # ---- plan ------------------------------------------------------------------------
    all_names = [n for n, _ in root.named_modules()]
    inc = compile_pattern(include, all_names, "include")
    exc = compile_pattern(exclude, all_names, "exclude")
    head_name = find_head(root, head, required=msd > 0)
    if mixout > 0.0 and not mixout_head and head_name is None:
        try:
            find_head(root, None)
        except HeadError as e:
            raise HeadError(f"mixout_head=False leaves the task head a plain layer, but {e}") from None
    if msd > 0:
        check_msd_head(root.get_submodule(head_name), head_name)
    layered = layer_msd.plan_layers(root, head_name, head is not None, msd_layer_p, msd_pool) if msd_layers else None
    head_name = layered.head if layered else head_name
    rec = Record(args=dict(mixout=mixout, dropout=dropout, drop_path=drop_path, msd=msd, msd_p=msd_p, head=head_name,
                           include=recorded_pattern(include), exclude=recorded_pattern(exclude),
                           mixout_head=mixout_head, mixout_tied=mixout_tied,
                           target_dtype=str(target_dtype).replace("torch.", "") if target_dtype else None,
                           low_memory=low_memory, **(layered.args if layered else {})))

    swaps: list[tuple[str, nn.Module]] = []
    if mixout > 0.0:
        occurrences: dict[int, int] = defaultdict(int)
        for _, m in root.named_modules(remove_duplicate=False):
            occurrences[id(m)] += 1
        tied = _tied_names(root)
        under_head = compile_pattern([head_name], all_names, "head") if head_name else None
        tuners = tuner_layers(root)
        for name, m in root.named_modules():
            if not name or (inc and not inc(name)) or (exc and exc(name)):
                continue
            if not (type(m) is nn.Linear or is_conv1d(m)):
                if isinstance(m, nn.Linear) and not isinstance(m, MixLinear):
                    rec.skipped.append({"name": name, "reason": f"{type(m).__name__} is a Linear subclass whose "
                                        "forward may not be nn.Linear's (its owner may read .weight directly)"})
                continue
            role = lora_role(tuners, name, m)  # PEFT LoRA adapters: see surgery/lora.py
            if role == "part":
                continue
            if layered and f"{name}.weight" in layered.frozen:
                rec.skipped.append({"name": name, "reason": "bypassed by the layer-weighted MSD head, frozen"})
                continue
            if role is None and not m.weight.requires_grad:
                rec.skipped.append({"name": name, "reason": "weight frozen, requires_grad=False: Mixout would not "
                                    "change it"})
                continue
            if under_head and under_head(name) and not mixout_head:
                rec.skipped.append({"name": name, "reason": "task head (mixout_head=False)"})
                continue
            others = [n for n in tied[id(m.weight)] if n != f"{name}.weight"]
            if others and not mixout_tied:
                rec.skipped.append({"name": name, "reason": f"weight tied to {others[0]}; mixout_tied=True mixes it, keeping the tie"})
                continue
            if occurrences[id(m)] > 1:
                rec.skipped.append({"name": name, "reason": "the same module is registered under several names"})
                continue
            swaps.append((name, m, role))
        if not swaps:
            raise SurgeryError(f"mixout={mixout} selected no nn.Linear/Conv1D layer"
                               + (f" (skipped: {', '.join(s['name'] for s in rec.skipped[:5])})" if rec.skipped else "")
                               + "; check include/exclude")

    dropout_changes: list[dict[str, Any]] = []
    config_changes: list[dict[str, Any]] = []
    for kind, value in ((DROPOUT, dropout), (DROP_PATH, drop_path)):  # drop-path entries carry "kind"
        if value is not None:
            attrs, fields = droppath.plan(root, kind, value)
            dropout_changes += attrs
            config_changes += fields
    rec.left_on = droppath.left_on(root, dropout=dropout, drop_path=drop_path)

    # ---- build (allocations that can fail) before the first mutation ------------------
    own_configs = configs.plan_copies(root)  # the model's own configs: a shared one (teacher) stays as it is
    new_layers = [(name, m, LoraMixout.from_linear(m, mixout) if role == "lora" else
                   MixLinear.from_linear(m, mixout, target_dtype=target_dtype, low_memory=low_memory))
                  for name, m, role in swaps]
    frozen_warning: dict = {}  # one warning per apply when Mixout layers get frozen later (see MixLinear)

    # ---- mutate ------------------------------------------------------------------------
    own_configs.take()
    for name, old, layer in new_layers:
        parent, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent), child, layer)
        rec.mixout.append({"name": name, "p": mixout, "orig": f"{type(old).__module__}.{type(old).__qualname__}",
                           "transposed": layer.transposed})
        if isinstance(layer, LoraMixout):
            rec.mixout[-1]["kind"] = "lora"
        vars(layer).update(_frozen_warning=frozen_warning, _record_name=name)
    for ch in dropout_changes:
        setattr(root.get_submodule(ch["module"]), ch["attr"], ch["new"])
    for ch in config_changes:
        set_path(root.get_submodule(ch["module"]).config, ch["path"], ch["new"])
    rec.dropout, rec.config = dropout_changes, config_changes
    if msd > 0 and layered:
        layer_msd.install_layers(root, layered, msd, msd_p, rec)
    elif msd > 0:
        state = MultiSampleDropout(msd, msd_p)
        rec.handles += [state] + state.install(root.get_submodule(head_name))
        rec.msd.append({"name": head_name, "k": msd, "p": msd_p})
    vars(root)[ATTR] = rec
    configs.attach(own_configs, rec)  # the record, and each sub-model's part of it, into the configs
    return model


def revert(model: nn.Module, *, drop_layer_weights: bool = False) -> nn.Module:
    """Undo ``apply``: original module classes holding the current (trained) Parameters,
    original dropout values and config, no leftover buffers, hooks or attributes.

    A layer-weighted MSD head (``msd_layers=True``) changes what the model computes in a way
    plain modules cannot hold: revert refuses it unless ``drop_layer_weights=True``.

    Returns:
        ``model``, the same object.

    Raises:
        SurgeryTypeError: ``model`` is not an ``nn.Module``.
        NotSurgeredError: the model carries no surgery.
        SurgeryError: a recorded Mixout layer is missing or was replaced since ``apply``
            (one inside a PEFT wrapper put there since, or that took the place of the PEFT
            wrapper it was recorded in, is found and restored); a layer-weighted MSD head
            without ``drop_layer_weights=True``.
    """
    root = _check_model(model, "revert")
    distributed.check_revert(model)  # FSDP2 gathers into the Mixout layers: export instead
    rec = get_record(root)
    layer_msd.check_revert(rec, drop_layer_weights)
    layers = {}
    for m in rec.mixout:  # at its name, inside a PEFT wrapper put there, or where an unwrapped wrapper was
        found, here = find_layers(root, m["name"], (MixLinear, LoraMixout))
        if not found and m.get("kind") != "lora":  # a LoRA adapter merged and unloaded leaves nothing to undo
            raise SurgeryError(f"cannot revert: Mixout layer {m['name']!r} is missing or was replaced after apply "
                               f"(found {type(here).__name__}); nothing was changed")
        for name, layer in found:  # the class and layout the record says it replaced
            if isinstance(layer, MixLinear) and (layer.orig, layer.transposed) != (m["orig"], m["transposed"]):
                raise SurgeryError(f"cannot revert: Mixout layer {name!r} was replaced after apply (recorded "
                                   f"{m['orig']}, transposed={m['transposed']}; found {layer.orig}, "
                                   f"transposed={layer.transposed}); nothing was changed")
        layers.update({id(layer): (name, layer) for name, layer in found})
    for name, layer in layers.values():
        parent, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent), child, layer.to_linear())
    for ch in rec.dropout:
        setattr(root.get_submodule(ch["module"]), ch["attr"], ch["old"])
    for module in dict.fromkeys(ch["module"] for ch in rec.config):
        configs.restore_config(root.get_submodule(module).config, rec, module)
    for h in rec.handles:
        if hasattr(h, "remove"):
            h.remove()
    configs.detach(root)
    del vars(root)[ATTR]
    return model
