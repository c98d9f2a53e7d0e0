"""``apply`` and ``revert``: check, walk once, plan, validate, carry out, record.

``apply`` checks its keyword arguments against the registered regularizers' options
(:func:`surgery.regularizers.check_options`), walks the model once (:class:`~surgery.view.View`), lets
each registered regularizer plan from that walk (:mod:`surgery.regularizers.unit`), checks the plans'
claims together, builds what can fail, and only then changes the model and writes one change record.
A failed call leaves the model as it was. ``revert`` runs every installed plan's undo check first,
then the undos, in reverse install order.
"""

from __future__ import annotations

import inspect
import textwrap

from torch import nn

from . import configs, distributed, regularizers, zero
from .coverage import coverage
from .describing import describe
from .errors import AlreadySurgeredError, SurgeryError, SurgeryTypeError
from .record import ATTR, Record, claim, claimant, get_record, no_plain_form, release
from .regularizers.context import Context
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


def _plan(ctx: Context) -> list:
    """Every unit's plan, in planning order (a unit after those it reads): ``[(unit, plan)]``; nothing
    changes yet."""
    plans = []
    for unit in regularizers.plan_order():
        plan = unit.plan(ctx)
        if plan is not None:
            plans.append((unit, plan))
            ctx.freezes.update(plan.freezes)
    return plans


def _install_order(plans: list) -> list:
    """The plans that replace modules first, the others after (each group in planning order), after checking
    that no module is replaced by two plans.

    Raises:
        SurgeryError: two regularizers replace one module.
    """
    owner: dict[str, str] = {}
    for unit, plan in plans:
        for name in plan.replaces:
            if name in owner:
                raise SurgeryError(f"regularizers {owner[name]!r} and {unit.name!r} both replace module {name!r}; "
                                   "a module is replaced by one of them at most: exclude it from one")
            owner[name] = unit.name
    return [p for p in plans if p[1].replaces] + [p for p in plans if not p[1].replaces]


def _claims(view: View, plans: list) -> list[tuple[str, object]]:
    """What the installed plans changed: each module (before and after a swap), each frozen parameter."""
    out = []
    for _, plan in plans:
        for name in [*plan.replaces, *plan.changes]:
            out += [(name, view.modules[name]), (name, view.root.get_submodule(name) if name else view.root)]
        out += [(name, view.params[name]) for name in plan.freezes]
    return out


def apply(model: nn.Module, /, **options) -> nn.Module:
    """Apply the registered regularizers (Mixout, dropout control, multi-sample dropout, ...) to ``model``
    in place.

    ``model`` is any ``nn.Module`` (transformers models are handled first-class). Each keyword is an option
    of a registered regularizer (``surgery.regularizers.units()``), listed below; what is not given stays
    off. Probabilities are real numbers in [0, 1] (numpy scalars and 0-d tensors too), flags real bools;
    an option that only matters with another one is refused without it.

    Options:
{options}

    Returns:
        ``model``, the same object.

    Raises:
        SurgeryTypeError: ``model`` is not an ``nn.Module``, an unknown keyword, or a pattern/dtype/flag
            of the wrong type.
        ValueError: a probability outside [0, 1], NaN or not a number; ``msd`` not an int >= 0.
        AlreadySurgeredError: the model already carries surgery (``revert`` it first), or
            it was loaded from a checkpoint saved with surgery applied.
        PatternError: ``include``/``exclude`` match no module, or select no layer.
        HeadError: ``msd`` > 0 and no head, an ambiguous head, or ``head`` names no module.
        SurgeryError: an option with nothing to act on, or a model inside an engine surgery
            cannot work through (``surgery.distributed``).
    """
    opts = regularizers.check_options(options)  # every keyword, checked by the option that declares it
    root, wrappers = _root(model)
    view = View(root)  # the one walk of the module tree
    check_swappable([*wrappers, *view.modules.values()], "apply")
    distributed.check_apply(model, view)  # fully_shard already applied, DTensor weights, a DeepSpeed engine
    _check_unsurgered(view)
    with zero.gathered(view.params.values()):  # ZeRO-3 partitioned weights (zero.Init): whole while apply reads them
        ctx = Context(view, opts)
        plans = _install_order(_plan(ctx))
        rec = Record(args=regularizers.record_args(opts, ctx.task_head()))
        copies = configs.plan_copies(view.held, view.title)  # the model's own configs: a shared one stays as it is
        for _, plan in plans:
            plan.build()  # allocations that can fail, before the first change
        copies.take()
        rec.undos.append(copies)  # the last undo: revert hands the original config objects back
        for _, plan in plans:
            rec.undos.append(plan.install(ctx, rec))
        rec.coverage = coverage(ctx, rec, [p for _, p in plans])
    zero.partition_new(root, view.params.values())  # what apply added (targets, layer weights), as the weights are
    vars(root)[ATTR] = rec
    claim(root, _claims(view, plans))  # a later apply reaching what this one changed is refused
    rec.undos.append(configs.attach(copies, rec))  # the record, and each sub-model's part of it, into the configs
    return model


def _options_doc() -> str:
    """``apply``'s options, each in the words of the regularizer that declares it."""
    def item(o, indent: str) -> list[str]:
        return textwrap.wrap(f"{o.name} (default {o.default!r}): {o.doc}", 110, initial_indent=indent,
                             subsequent_indent=indent + "    ")

    lines = []
    for unit in regularizers.units():
        lines.append(f"        {unit.name}:")
        lines += [line for o in unit.options for line in item(o, " " * 12)]
    return "\n".join(lines + item(regularizers.registry.HEAD, " " * 8))


apply.__doc__ = apply.__doc__.format(options=_options_doc())
apply.__signature__ = inspect.Signature(  # the registered options, keyword-only (as registered at import)
    [inspect.Parameter("model", inspect.Parameter.POSITIONAL_ONLY, annotation=nn.Module)]
    + [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default)
       for o in regularizers.all_options()], return_annotation=nn.Module)


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
    for undo in rec.undos:  # every check before any change
        undo.check(view, rec)
    for undo in reversed(rec.undos):  # the record out of the configs, each plan, the original config objects
        undo.undo(view, rec)
    release(root)
    del vars(root)[ATTR]
    return model
