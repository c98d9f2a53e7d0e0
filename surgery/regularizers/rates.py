"""Dropout control (``apply(dropout=q)``), stochastic-depth control (``apply(drop_path=r)``) and
router-noise control (``apply(router_noise=e)``).

Three places hold these probabilities in practice:

1. modules of the ``nn.Dropout`` family (any ``_DropoutNd``): their ``p``; other dropping modules
   (timm's ``DropBlock2d`` and ``PatchDropout``, DeBERTa's ``StableDropout``, ``DropPath`` /
   ``StochasticDepth`` modules of timm, torchvision and transformers): their rate (``drop_prob``,
   ``prob``, ``p``, ...);
2. plain numbers stored on other modules and read at call time (transformers: ``self.dropout``,
   ``self.attention_dropout``, ``dropout_p``, ``layerdrop``, a MoE block's ``jitter_noise``; timm:
   ``self.drop_rate`` passed to ``F.dropout``);
3. fields of the model's (transformers) config, some of which are read during forward.

:func:`prob_kind` is the one rule that tells the kinds apart, by the name of the number and the
class of the module holding it:

* **stochastic depth** (``drop_path``): names like ``layerdrop``, ``drop_path(_rate)``,
  ``drop_connect_rate``, ``stochastic_depth``, and the rate of a DropPath/StochasticDepth module
  (a whole residual branch or layer is dropped);
* **dropout** (``dropout``): names containing ``dropout``, ``pdrop`` or ``drop_prob``, ending in
  ``drop_rate``/``droprate``, or whose last ``_``-separated word is ``drop``; and the rate (a number
  named ``p``, ``*prob*``, ``*rate*`` or ``*drop*``) of any other module whose class is a dropping
  layer (a class name containing ``Drop``): timm's ``PatchDropout`` (its ``prob`` drops tokens) and
  ``DropBlock2d`` (its ``drop_prob`` drops blocks of activations) are dropout: they zero parts of
  one example's activations, as ``nn.Dropout`` does, and keep every layer;
* **router noise** (``router_noise``): names containing ``jitter_noise`` or ``jitter_eps``: the
  train-time multiplicative noise U(1-e, 1+e) on a mixture-of-experts router's input (Mixtral,
  MiniMax, Switch Transformers: ``router_jitter_noise`` copied to the block's ``jitter_noise``;
  DBRX: ``ffn_config.moe_jitter_eps``; PhiMoE: ``input_jitter_noise``). A number so named that the
  model also reads in eval is not noise and is never changed: PhiMoE's ``router_jitter_noise`` is
  the masking threshold of its expert choice (``sparsemixer``), in eval as in training.

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

import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from torch import nn

from ..configs import restore_config, set_path
from ..errors import SurgeryError
from ..record import DROP_PATH, DROPOUT, ROUTER_NOISE
from .base import Plan, Regularizer

__all__ = ["Rates", "prob_kind", "find_probs", "layerdrop_rates", "DROPOUT_NAME", "DROP_PATH_NAME"]

DROPOUT_NAME = re.compile(r"dropout|pdrop|drop_prob|drop_?rate$|(?:^|_)drop$", re.IGNORECASE)
DROP_PATH_NAME = re.compile(r"layer_?drop|drop_?path|path_?drop|stochastic_depth|drop_connect", re.IGNORECASE)
LAYERDROP_NAME = re.compile(r"layer_?drop", re.IGNORECASE)  # rates read in forward (a whole layer per forward)
NOISE_NAME = re.compile(r"jitter_?(?:noise|eps)", re.IGNORECASE)
_DROP_PATH_CLASS = re.compile(r"DropPath|StochasticDepth", re.IGNORECASE)
_DROP_CLASS = re.compile(r"Drop")  # a dropping layer: Dropout, DropBlock2d, PatchDropout, StableDropout, DropPath
_PROB_NAME = re.compile(r"^p$|prob|rate|drop", re.IGNORECASE)  # a dropping module's rate: drop_prob, prob, p, ...
# numbers named like noise that the model reads in eval too (owner class name -> names): never touched
_READ_IN_EVAL = {"PhimoeTopKRouter": {"router_jitter_noise"}, "PhimoeConfig": {"router_jitter_noise"}}
# modules that draw in every training forward with no number to turn it off (owner class name -> what they draw):
# recorded as left on, so describe names them
_SAMPLES = {"PhimoeTopKRouter": "expert choice sampled in training (sparsemixer's Gumbel draws)"}
SAMPLING = "sampling"  # the left-on kind no option of apply controls
OPTIONS = {DROPOUT: "dropout", DROP_PATH: "drop_path", ROUTER_NOISE: "router_noise"}  # kind -> apply's option
_WHAT = {DROPOUT: "dropout (no nn.Dropout module, dropout attribute or config field)",
         ROUTER_NOISE: "router noise (no jitter_noise/jitter_eps attribute or config field)"}


def _is_prob(v: Any) -> bool:
    return type(v) in (int, float) and 0.0 <= v <= 1.0


def _class_is(owner: Any, pattern: re.Pattern) -> bool:
    return any(pattern.search(c.__name__) for c in type(owner).__mro__)


def is_drop_path_module(mod: Any) -> bool:
    """A DropPath / StochasticDepth module (timm, torchvision, transformers' ``*DropPath``)."""
    return _class_is(mod, _DROP_PATH_CLASS)


def _read_in_eval(attr: str, owner: Any) -> bool:
    return any(attr in _READ_IN_EVAL.get(c.__name__, ()) for c in type(owner).__mro__)


def prob_kind(attr: str, owner: Any = None) -> str | None:
    """``"drop_path"``, ``"dropout"``, ``"router_noise"`` or None for a probability named ``attr`` held
    by ``owner`` (a module or a config): the rule of this module's docstring."""
    rate = _PROB_NAME.search(attr) is not None
    if DROP_PATH_NAME.search(attr) or (rate and is_drop_path_module(owner)):
        return DROP_PATH
    if DROPOUT_NAME.search(attr) or (rate and _class_is(owner, _DROP_CLASS)):
        return DROPOUT
    if NOISE_NAME.search(attr) and not _read_in_eval(attr, owner):
        return ROUTER_NOISE
    return None


def _named_probs(obj: Any, kind: str) -> Iterator[tuple[str, float]]:
    """``(attribute, value)`` of ``obj``: public probabilities in [0, 1] of ``kind``."""
    for attr, v in list(vars(obj).items()):
        if not attr.startswith("_") and _is_prob(v) and prob_kind(attr, obj) == kind:
            yield attr, v


def find_probs(model: nn.Module, kind: str) -> Iterator[tuple[str, str, float]]:
    """``(module name, attribute, value)`` for every probability of ``kind`` held by a module of ``model``."""
    return _module_probs(dict(model.named_modules()), kind)


def _module_probs(modules: dict[str, nn.Module], kind: str) -> Iterator[tuple[str, str, float]]:
    for name, mod in modules.items():
        if isinstance(mod, nn.modules.dropout._DropoutNd):
            if kind == DROPOUT:
                yield name, "p", mod.p
            continue
        yield from ((name, attr, v) for attr, v in _named_probs(mod, kind))


def _find(view, kind: str) -> tuple[list[tuple[str, str, float]], list[tuple[str, list[str], float]]]:
    attrs = list(_module_probs(view.modules, kind))
    cfgs = [(mod, path + [f], v) for mod, path, c in view.configs() for f, v in _named_probs(c, kind)]
    return attrs, cfgs


def layerdrop_rates(view) -> list[str]:
    """Non-zero LayerDrop rates (a whole layer dropped per forward) on modules or configs.

    DropPath draws per example and is left out: R-Drop's ``[x; x]`` halves stay independent.
    """
    attrs, cfgs = _find(view, DROP_PATH)
    found = [f"{name or view.title}.{attr}={v}" for name, attr, v in attrs if v > 0 and LAYERDROP_NAME.search(attr)]
    found += [f"config.{'.'.join(path)}={v}" for _, path, v in cfgs if v > 0 and LAYERDROP_NAME.search(path[-1])]
    return sorted(set(found))


def _check_changes_something(kind: str, value: float, attrs, cfgs) -> None:
    """Refuse a rate > 0 that the model would never read in forward (the call would change nothing)."""
    if value == 0 or attrs:
        return
    if kind in _WHAT and not cfgs:
        option = OPTIONS[kind]
        raise SurgeryError(f"{option}={value}: the model has no {_WHAT[kind]}, so nothing would change; leave "
                           f"{option}=None" + (" or add the dropout layers to the model" if kind == DROPOUT else ""))
    if kind == DROP_PATH and not any(LAYERDROP_NAME.search(path[-1]) for _, path, _ in cfgs):
        fields = ", ".join(f"{'.'.join(p)}={v}" for _, p, v in cfgs[:3]) or "none"
        raise SurgeryError(f"drop_path={value}: the model reads no stochastic-depth rate in forward (no DropPath "
                           f"module, no LayerDrop rate; config fields: {fields}, read only when the model is "
                           "built, and blocks built with rate 0 hold no DropPath), so nothing would change; build "
                           f"the model with drop_path_rate={value} (or layerdrop) instead")


@dataclass
class RatesPlan(Plan):
    attrs: list[dict[str, Any]] = field(default_factory=list)  # record "dropout" entries
    fields: list[dict[str, Any]] = field(default_factory=list)  # record "config" entries
    left_on: list[dict[str, Any]] = field(default_factory=list)

    def install(self, view, rec) -> None:
        for ch in self.attrs:
            setattr(view.modules[ch["module"]], ch["attr"], ch["new"])
        for ch in self.fields:
            set_path(view.modules[ch["module"]].config, ch["path"], ch["new"])
        rec.dropout += self.attrs
        rec.config += self.fields
        rec.left_on += self.left_on


class Rates(Regularizer):
    """Every dropout probability (``dropout=``), stochastic-depth rate (``drop_path=``) and router-noise
    level (``router_noise=``), set."""

    name = "rates"

    def plan(self, view, opts, earlier: Sequence[Plan]) -> RatesPlan:
        plan = RatesPlan()
        for kind, option in OPTIONS.items():
            value = getattr(opts, option)
            attrs, cfgs = _find(view, kind)
            if value is None:  # not asked about: what stays on is recorded for describe
                on_attrs, on_cfgs = [(n, v) for n, _, v in attrs if v > 0], [v for _, _, v in cfgs if v > 0]
                if on_attrs or on_cfgs:
                    plan.left_on.append({"kind": kind, "values": sorted({v for _, v in on_attrs} | set(on_cfgs)),
                                         "modules": len({n for n, _ in on_attrs}), "config": len(on_cfgs)})
                continue
            _check_changes_something(kind, value, attrs, cfgs)
            tag = {} if kind == DROPOUT else {"kind": kind}
            plan.attrs += [{"module": n, "attr": a, "old": v, "new": value, **tag} for n, a, v in attrs]
            plan.fields += [{"module": m, "path": p, "old": v, "new": value, **tag} for m, p, v in cfgs]
        samplers = [c for m in view.modules.values() for c in (c.__name__ for c in type(m).__mro__) if c in _SAMPLES]
        if samplers:
            plan.left_on.append({"kind": SAMPLING, "values": [], "modules": len(samplers), "config": 0,
                                 "what": "; ".join(f"{c}: {_SAMPLES[c]}" for c in sorted(set(samplers)))})
        plan.claims = sorted({ch["module"] for ch in plan.attrs})
        return plan

    def revert(self, root, rec):
        for ch in rec.dropout:  # every module the record changed is still there
            try:
                root.get_submodule(ch["module"])
            except AttributeError:
                raise SurgeryError(f"cannot revert: module {ch['module']!r}, whose {ch['attr']} apply changed, is "
                                   "missing since apply; nothing was changed") from None

        def undo():
            for ch in rec.dropout:
                setattr(root.get_submodule(ch["module"]), ch["attr"], ch["old"])
            for module in dict.fromkeys(ch["module"] for ch in rec.config):
                restore_config(root.get_submodule(module).config, rec, module)
        return undo

