"""Dropout control: find every dropout probability a model reads and set it.

Three places hold dropout probabilities in practice:

1. modules of the ``nn.Dropout`` family (Dropout, Dropout1d/2d/3d, AlphaDropout,
   FeatureAlphaDropout and any other ``_DropoutNd`` subclass): their ``p``;
2. plain numbers stored on other modules and passed to functional dropout or to
   attention kernels at call time (transformers: ``self.dropout``,
   ``self.attention_dropout``, ``self.activation_dropout``, ``dropout_p`` ...; timm:
   ``self.drop_rate`` passed to ``F.dropout`` by classifier heads);
3. fields of the model's (transformers) config, some of which are read during forward.

An attribute counts when it is an int/float in [0, 1] whose name contains ``dropout``,
``pdrop`` or ``drop_prob``, ends in ``drop_rate``/``droprate``, or whose last
``_``-separated word is ``drop`` (``drop``, ``attn_drop``, ``proj_drop``: X-CLIP's prompt
attention reads ``self.attn_drop`` at call time).

Stochastic depth is another regularizer with its own knob (``apply(drop_path=r)``, see
``droppath.py``) and never counts as dropout: attributes named like ``layerdrop``,
``encoder_layerdrop``, ``drop_path``, ``drop_path_rate``, ``drop_connect_rate``, and every
probability held by a DropPath / StochasticDepth module (``drop_prob`` of timm's and
transformers' ``*DropPath``). :func:`prob_kind` is the one rule that tells them apart; the
walks below serve both kinds.

Names are a heuristic; ``noise.train_noise`` checks the result by what the forward really
does (every dropout-family call and random draw of one training forward).
"""

from __future__ import annotations

import re
import sys
from typing import Any, Iterator

from torch import nn

from .record import DROP_PATH, DROPOUT  # the two kinds of probability (record vocabulary)

__all__ = ["DROPOUT_NAME", "DROP_PATH_NAME", "prob_kind", "find_probs", "config_probs", "find_dropout",
           "config_dropout", "find_configs", "set_path", "get_path"]

DROPOUT_NAME = re.compile(r"dropout|pdrop|drop_prob|drop_?rate$|(?:^|_)drop$", re.IGNORECASE)
DROP_PATH_NAME = re.compile(r"layer_?drop|drop_?path|path_?drop|stochastic_depth|drop_connect", re.IGNORECASE)
_DROP_PATH_CLASS = re.compile(r"DropPath|StochasticDepth", re.IGNORECASE)
_PROB_NAME = re.compile(r"^p$|prob|rate|drop", re.IGNORECASE)  # a DropPath module's rate: drop_prob, p, ...


def _is_prob(v: Any) -> bool:
    return type(v) in (int, float) and 0.0 <= v <= 1.0


def _is_config(obj: Any) -> bool:
    tf = sys.modules.get("transformers")
    return tf is not None and isinstance(obj, tf.PretrainedConfig)


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
    """Yield ``(module_name, attribute, value)`` for every probability of ``kind`` on a module."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.dropout._DropoutNd):
            if kind == DROPOUT:
                yield name, "p", mod.p
            continue
        yield from ((name, attr, v) for attr, v in _named_probs(mod, kind))


def find_dropout(model: nn.Module) -> Iterator[tuple[str, str, float]]:
    """Yield ``(module_name, attribute, value)`` for every dropout probability on a module."""
    return find_probs(model, DROPOUT)


def find_configs(model: nn.Module) -> Iterator[tuple[str, list[str], Any]]:
    """Yield ``(module_name, path, config)`` for every distinct transformers config.

    ``path`` leads from ``<module>.config`` to a nested sub-config (``[]`` for the config
    itself), so entries with ``module_name == ""`` map onto the saved ``config.json``.
    """
    seen: set[int] = set()

    def walk(mod_name, path, cfg):
        if id(cfg) in seen:
            return
        seen.add(id(cfg))
        yield mod_name, path, cfg
        for k, v in list(vars(cfg).items()):
            if _is_config(v):
                yield from walk(mod_name, path + [k], v)

    for name, mod in model.named_modules():
        cfg = vars(mod).get("config")
        if _is_config(cfg):
            yield from walk(name, [], cfg)


def config_probs(cfg, kind: str) -> Iterator[tuple[str, float]]:
    """``(field, value)`` for the probabilities of ``kind`` in one config (not recursing)."""
    yield from _named_probs(cfg, kind)


def config_dropout(cfg) -> Iterator[tuple[str, float]]:
    """``(field, value)`` for the dropout probabilities in one config (not recursing)."""
    return config_probs(cfg, DROPOUT)


def get_path(d: Any, path: list[str]) -> Any:
    for k in path:
        d = d[k] if isinstance(d, dict) else getattr(d, k)
    return d


def set_path(d: Any, path: list[str], value: Any) -> None:
    parent = get_path(d, path[:-1])
    if isinstance(parent, dict):
        parent[path[-1]] = value
    else:
        setattr(parent, path[-1], value)
