"""Dropout control planned, installed and undone: what the model holds of each kind (:mod:`.kinds`), found
in three places:

1. dropout modules (``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``, ... -- any
   ``_DropoutNd``): their ``p``; other dropping modules
   (timm's ``DropBlock2d`` and ``PatchDropout``, DeBERTa's ``StableDropout``, ``DropPath`` /
   ``StochasticDepth`` modules of timm, torchvision and transformers): their rate (``drop_prob``,
   ``prob``, ``p``, ...);
2. plain numbers stored on other modules and read at call time (transformers: ``self.dropout``,
   ``self.attention_dropout``, ``dropout_p``, ``layerdrop``, a MoE block's ``jitter_noise``; timm:
   ``self.drop_rate`` passed to ``F.dropout``);
3. fields of the model's (transformers) config, some of which are read during forward.

A module that draws in every training forward with no number to turn it off (PhiMoE's router
samples its experts) is recorded as left on with kind ``"sampling"``: ``describe`` names it.

``surgery.train_noise`` checks the result by what the forward does; the tests check that the two
agree on every zoo model and on real timm models.

Each change becomes a record entry (``dropout`` for attributes, ``config`` for config fields;
stochastic-depth and router-noise entries carry ``"kind": "drop_path"`` / ``"router_noise"``),
undone by revert, export and convert. ``r`` replaces every rate: a linear depth schedule
(0 .. drop_path_rate) becomes ``r`` everywhere, and blocks built without DropPath (rate 0 gives
``nn.Identity``) stay without it. The rates of a kind whose option was not given are recorded as
``left_on``, so ``describe`` can say what randomness training still has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from ...configs import restore_config, set_path
from ...errors import SurgeryError
from .. import Plan, Undo
from . import DROP_PATH, DROPOUT, KINDS, ROUTER_NOISE, SAMPLING, AttrChange, ConfigChange, LeftOn
from .kinds import LAYERDROP_NAME, is_prob, module_probs, named_probs, prob_kind, sampled, samplers

__all__ = ["plan", "RatesPlan", "RatesUndo", "layerdrop_sources"]

_WHAT = {DROPOUT: "dropout (no nn.Dropout module, dropout attribute or config field)",
         ROUTER_NOISE: "router noise (no jitter_noise/jitter_eps attribute or config field)"}


def _find(view, kind: str) -> tuple[list[tuple[str, str, float]], list[tuple[str, list[str], float]]]:
    attrs = list(module_probs(view.modules, kind))
    cfgs = [(mod, path + [f], v) for mod, path, c in view.configs() for f, v in named_probs(c, kind)]
    return attrs, cfgs


def layerdrop_sources(modules: dict, configs: list, title: str) -> list[tuple[str, Callable[[], float]]]:
    """``(where, the rate now)`` of every LayerDrop rate (a whole layer dropped per forward) that ``modules``
    (name -> module) or ``configs`` (``(module name, path, config)``, as :meth:`surgery.view.View.configs`
    lists them) hold, whatever its value now (a rate that is not a probability reads 0).

    DropPath draws per example and is left out: R-Drop's ``[x; x]`` halves stay independent.
    """
    def rate(owner: Any, attr: str) -> Callable[[], float]:
        return lambda: (lambda v: v if is_prob(v) else 0)(vars(owner).get(attr))

    def layerdrop(owner: Any) -> list[str]:
        return [a for a in vars(owner) if not a.startswith("_") and LAYERDROP_NAME.search(a)
                and prob_kind(a, owner) == DROP_PATH]

    out = [(f"{name or title}.{a}", rate(m, a)) for name, m in modules.items()
           if not isinstance(m, nn.modules.dropout._DropoutNd) for a in layerdrop(m)]
    out += [(f"config.{'.'.join(path + [a])}", rate(c, a)) for _, path, c in configs for a in layerdrop(c)]
    return out


def _check_changes_something(kind: str, value: float, attrs, cfgs) -> None:
    """Refuse a rate > 0 that the model would never read in forward (the call would change nothing)."""
    if value == 0 or attrs:
        return
    if kind in _WHAT and not cfgs:
        raise SurgeryError(f"{kind}={value}: the model has no {_WHAT[kind]}, so nothing would change; leave "
                           f"{kind}=None" + (" or add the dropout layers to the model" if kind == DROPOUT else ""))
    if kind == DROP_PATH and not any(LAYERDROP_NAME.search(path[-1]) for _, path, _ in cfgs):
        fields = ", ".join(f"{'.'.join(p)}={v}" for _, p, v in cfgs[:3]) or "none"
        raise SurgeryError(f"drop_path={value}: the model reads no stochastic-depth rate in forward (no DropPath "
                           f"module, no LayerDrop rate; config fields: {fields}, read only when the model is "
                           "built, and blocks built with rate 0 hold no DropPath), so nothing would change; build "
                           f"the model with drop_path_rate={value} (or layerdrop) instead")


class RatesUndo(Undo):
    """The recorded attributes and config fields set back to their old values."""

    def check(self, view, rec) -> None:
        for ch in rec.dropout:  # every module the record changed is still there
            try:
                view.root.get_submodule(ch.module)
            except AttributeError:
                raise SurgeryError(f"cannot revert: module {ch.module!r}, whose {ch.attr} apply changed, is "
                                   "missing since apply; nothing was changed") from None

    def undo(self, view, rec) -> None:
        root = view.root
        for ch in rec.dropout:
            setattr(root.get_submodule(ch.module), ch.attr, ch.old)
        for module in dict.fromkeys(ch.module for ch in rec.config):
            restore_config(root.get_submodule(module).config, rec, module)


@dataclass
class RatesPlan(Plan):
    attrs: list[AttrChange] = field(default_factory=list)
    fields: list[ConfigChange] = field(default_factory=list)
    left_on: list[LeftOn] = field(default_factory=list)

    def install(self, ctx, rec) -> RatesUndo:
        for ch in self.attrs:
            setattr(ctx.module(ch.module), ch.attr, ch.new)
        for ch in self.fields:
            set_path(ctx.module(ch.module).config, ch.path, ch.new)
        rec.dropout += self.attrs
        rec.config += self.fields
        rec.left_on += self.left_on
        return RatesUndo()


def plan(unit, ctx) -> RatesPlan:
    """Every rate of each kind whose option is given, set; what stays on of the others, recorded for
    ``describe``. (A plan even when nothing is asked: its ``left_on`` says what training still draws.)

    Raises:
        SurgeryError: a rate > 0 the model never reads in forward.
    """
    view, opts = ctx.view, ctx.opts
    out = RatesPlan()
    for kind in KINDS:  # each kind is also the name of its option
        value = getattr(opts, kind)
        attrs, cfgs = _find(view, kind)
        if value is None:  # not asked about: what stays on is recorded for describe
            on_attrs, on_cfgs = [(n, v) for n, _, v in attrs if v > 0], [v for _, _, v in cfgs if v > 0]
            if on_attrs or on_cfgs:
                out.left_on.append(LeftOn(kind=kind, values=sorted({v for _, v in on_attrs} | set(on_cfgs)),
                                          modules=len({n for n, _ in on_attrs}), config=len(on_cfgs)))
            continue
        _check_changes_something(kind, value, attrs, cfgs)
        tag = None if kind == DROPOUT else kind
        out.attrs += [AttrChange(module=n, attr=a, old=v, new=value, kind=tag) for n, a, v in attrs]
        out.fields += [ConfigChange(module=m, path=p, old=v, new=value, kind=tag) for m, p, v in cfgs]
    found = samplers(view.modules.values())
    if found:
        out.left_on.append(LeftOn(kind=SAMPLING, values=[], modules=len(found), config=0, what=sampled(found)))
    out.changes = sorted({ch.module for ch in out.attrs})
    return out
