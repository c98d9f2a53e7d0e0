"""``apply`` and ``revert``: check, walk once, plan, validate, carry out, record.

``apply`` checks its arguments, walks the model once (:class:`~surgery.view.View`), lets each
regularizer (:data:`surgery.regularizers.REGULARIZERS`) plan from that view, builds what can fail,
and only then changes the model and writes one change record. A failed call leaves the model as
it was. ``revert`` checks every record entry first, then undoes exactly what the record lists.
"""

from __future__ import annotations

import torch
from torch import nn

from . import configs, distributed
from .arguments import Options
from .describing import describe
from .errors import AlreadySurgeredError, SurgeryError, SurgeryTypeError
from .patterns import Pattern, find_head
from .record import ATTR, Record, claim, claimant, get_record, no_plain_form, release
from .regularizers import REGULARIZERS
from .view import View
from .wrappers import chain, check_swappable

__all__ = ["apply", "revert", "describe", "is_surgered"]


def is_surgered(model: nn.Module) -> bool:
    """True when ``model`` (or the module inside its DDP/compile/PEFT wrapper) carries surgery."""
    return get_record(model, required=False) is not None


def _root(model) -> tuple[nn.Module, list[nn.Module]]:
    if not isinstance(model, nn.Module):
        raise SurgeryTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    wrappers = chain(model)
    return wrappers[-1], wrappers


def _check_unsurgered(view: View) -> None:
    """Refuse a model that carries surgery, holds a sub-model that does, or reaches a module or
    parameter that a live surgery of another model (or of a model enclosing this one) changed."""
    if get_record(view.root, required=False) is not None:
        raise AlreadySurgeredError(
            "model already has surgery applied; call surgery.revert(model) before applying it again "
            "(a second apply does not compose with the first)")
    for name, m in view.modules.items():
        if name and ATTR in vars(m):
            raise AlreadySurgeredError(
                f"its module {name!r} ({type(m).__name__}) already has surgery applied to it; surgeries do not "
                f"compose: call surgery.revert(model.{name}) first, then apply to the whole model")
    for name, obj in [*view.modules.items(), *view.params.items()]:
        owner = claimant(obj)
        if owner is not None:
            other, there = owner
            raise AlreadySurgeredError(
                f"{'parameter' if name in view.params else 'module'} {name or view.title!r} was changed by the "
                f"surgery applied to {type(other).__name__} (where it is {there or 'the model itself'!r}); "
                "surgeries do not compose: surgery.revert that model first")
    configs.check_no_record(view.held)  # at any depth: a (sub-)model loaded from a surgered checkpoint


def _claims(view: View, plans) -> list[tuple[str, object]]:
    """What the installed plans changed: each claimed module (before and after a swap), each frozen parameter."""
    out = []
    for plan in plans:
        for name in plan.claims:
            out += [(name, view.modules[name]), (name, view.root.get_submodule(name) if name else view.root)]
        out += [(name, view.params[name]) for name in plan.freezes]
    return out


def apply(
    model: nn.Module,
    *,
    mixout: float = 0.0,
    dropout: float | None = None,
    drop_path: float | None = None,
    router_noise: float | None = None,
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
            :class:`~surgery.layers.mixout.MixLinear` mixing toward a frozen copy of its current
            weight. A layer whose weight does not require grad is left alone (``describe`` lists
            it). In a PEFT LoRA layer the adapter is mixed on the layer's effective weight toward
            the frozen base weight (:mod:`surgery.regularizers.lora`).
        dropout: when not None, every dropout probability in the model (dropout modules,
            dropout attributes read at call time, config fields) is set to this value.
            Stochastic depth is not dropout: see ``drop_path``.
        drop_path: when not None, every stochastic-depth rate (DropPath modules, LayerDrop
            and drop-path attributes read at call time, config fields such as
            ``drop_path_rate``, ``layerdrop``, ``encoder_layerdrop``) is set to this value.
        router_noise: when not None, every train-time noise level of a mixture-of-experts router
            (the multiplicative jitter U(1-e, 1+e) on the router's input: Mixtral's and MiniMax's
            ``router_jitter_noise``, DBRX's ``moe_jitter_eps``, PhiMoE's ``input_jitter_noise``, as
            module attributes and config fields) is set to this value. It is neither dropout nor
            stochastic depth; ``dropout=0.0, drop_path=0.0, router_noise=0.0`` makes a training
            forward deterministic.
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
            head, see :mod:`surgery.regularizers.layer_msd`); the head must be an ``nn.Linear``.
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
        SurgeryError: an option with nothing to act on, or a model inside an engine surgery
            cannot work through (``surgery.distributed``).
    """
    opts = Options.check(mixout=mixout, dropout=dropout, drop_path=drop_path, msd=msd, msd_p=msd_p, head=head,
                         include=include, exclude=exclude, mixout_head=mixout_head, mixout_tied=mixout_tied,
                         target_dtype=target_dtype, low_memory=low_memory, msd_layers=msd_layers,
                         msd_layer_p=msd_layer_p, msd_pool=msd_pool, router_noise=router_noise)
    root, wrappers = _root(model)
    view = View(root)  # the one walk of the module tree
    check_swappable([*wrappers, *view.modules.values()], "apply")
    distributed.check_apply(model, view)  # fully_shard already applied, DTensor weights, DeepSpeed
    _check_unsurgered(view)
    plans = []
    for regularizer in REGULARIZERS:  # each plans from the view and the plans before it; nothing changes yet
        plan = regularizer.plan(view, opts, plans)
        if plan is not None:
            plans.append(plan)
    head = next((p.head for p in plans if p.head is not None), None)
    if head is None:
        head = find_head(view.modules, view.title, opts.head, required=False)
    rec = Record(args=opts.record_args(head))
    copies = configs.plan_copies(view.held, view.title)  # the model's own configs: a shared one stays as it is
    for plan in plans:
        plan.build()  # allocations that can fail, before the first change
    copies.take()
    rec.handles.append(copies)  # revert hands the original config objects back (after the values are restored)
    for plan in plans:
        plan.install(view, rec)
    vars(root)[ATTR] = rec
    claim(root, _claims(view, plans))  # a later apply reaching what this one changed is refused
    configs.attach(copies, rec)  # the record, and each sub-model's part of it, into the configs
    return model


def revert(model: nn.Module, *, drop_layer_weights: bool = False) -> nn.Module:
    """Undo ``apply``: original module classes holding the current (trained) Parameters,
    original dropout values and config, no leftover parameters, hooks or attributes.

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
            without ``drop_layer_weights=True``; a model sharded with ``fully_shard``.
    """
    root, wrappers = _root(model)
    view = View(root)
    check_swappable([*wrappers, *view.modules.values()], "revert")
    distributed.check_revert(view)  # FSDP2 gathers into the Mixout layers: export instead
    rec = get_record(root)
    why = no_plain_form(rec, "revert")
    if why and not drop_layer_weights:
        raise SurgeryError(why)
    undos = [regularizer.revert(root, rec) for regularizer in REGULARIZERS]  # every check before any change
    for undo in reversed(undos):
        if undo is not None:
            undo()
    configs.detach(view.held)
    for h in rec.handles:  # hooks, the layer pool, then the original config objects
        if hasattr(h, "remove"):
            h.remove()
    release(root)
    del vars(root)[ATTR]
    return model
