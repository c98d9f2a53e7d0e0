"""Dropout control (``apply(dropout=q)``) and stochastic-depth control (``apply(drop_path=r)``).

Three places hold these probabilities in practice:

1. modules of the ``nn.Dropout`` family (any ``_DropoutNd``): their ``p``; DropPath /
   StochasticDepth modules (timm, torchvision, transformers' ``*DropPath``): their rate
   (``drop_prob``, ``p``, ...);
2. plain numbers stored on other modules and read at call time (transformers: ``self.dropout``,
   ``self.attention_dropout``, ``dropout_p``, ``layerdrop``; timm: ``self.drop_rate`` passed to
   ``F.dropout``);
3. fields of the model's (transformers) config, some of which are read during forward.

:func:`prob_kind` is the one rule that tells the kinds apart, by name: an int/float in [0, 1]
whose name contains ``dropout``, ``pdrop`` or ``drop_prob``, ends in ``drop_rate``/``droprate``,
or whose last ``_``-separated word is ``drop`` is dropout; names like ``layerdrop``,
``drop_path(_rate)``, ``drop_connect_rate``, ``stochastic_depth`` and every rate of a DropPath
module are stochastic depth. ``surgery.train_noise`` checks the result by what the forward does.

Each change becomes a record entry (``dropout`` for attributes, ``config`` for config fields;
stochastic-depth entries carry ``"kind": "drop_path"``), undone by revert, export and convert.
``r`` replaces every rate: a linear depth schedule (0 .. drop_path_rate) becomes ``r``
everywhere, and blocks built without DropPath (rate 0 gives ``nn.Identity``) stay without it.
The rates of a kind whose option was not given are recorded as ``left_on``, so ``describe``
can say what randomness training still has.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from torch import nn

from ..configs import restore_config, set_path
from ..errors import SurgeryError
from ..record import DROP_PATH, DROPOUT
from .base import Plan, Regularizer

__all__ = ["Rates", "prob_kind", "find_probs", "layerdrop_rates", "DROPOUT_NAME", "DROP_PATH_NAME"]

DROPOUT_NAME = re.compile(r"dropout|pdrop|drop_prob|drop_?rate$|(?:^|_)drop$", re.IGNORECASE)
DROP_PATH_NAME = re.compile(r"layer_?drop|drop_?path|path_?drop|stochastic_depth|drop_connect", re.IGNORECASE)
LAYERDROP_NAME = re.compile(r"layer_?drop", re.IGNORECASE)  # rates read in forward (a whole layer per forward)
_DROP_PATH_CLASS = re.compile(r"DropPath|StochasticDepth", re.IGNORECASE)
_PROB_NAME = re.compile(r"^p$|prob|rate|drop", re.IGNORECASE)  # a DropPath module's rate: drop_prob, p, ...
OPTIONS = {DROPOUT: "dropout", DROP_PATH: "drop_path"}  # kind -> apply's option


def _is_prob(v: Any) -> bool:
    return type(v) in (int, float) and 0.0 <= v <= 1.0


def is_drop_path_module(mod: Any) -> bool:
    """A DropPath / StochasticDepth module (timm, torchvision, transformers' ``*DropPath``)."""
    return any(_DROP_PATH_CLASS.search(c.__name__) for c in type(mod).__mro__)


def prob_kind(attr: str, owner: Any = None) -> str | None:
    """``"drop_path"``, ``"dropout"`` or None for a probability named ``attr`` held by ``owner``
    (a module or a config)."""
    if DROP_PATH_NAME.search(attr) or (_PROB_NAME.search(attr) and is_drop_path_module(owner)):
        return DROP_PATH
    return DROPOUT if DROPOUT_NAME.search(attr) else None


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
    if kind == DROPOUT and not cfgs:
        raise SurgeryError(f"dropout={value}: the model has no dropout (no nn.Dropout module, dropout attribute or "
                           "config field), so nothing would change; leave dropout=None or add the dropout layers "
                           "to the model")
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
    """Every dropout probability (``dropout=``) and stochastic-depth rate (``drop_path=``), set."""

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

