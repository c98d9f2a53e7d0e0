"""Which numbers of a model are dropout probabilities, stochastic-depth rates or router-noise levels.

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
"""

from __future__ import annotations

import re
from typing import Any, Iterator

from torch import nn

from . import DROP_PATH, DROPOUT, ROUTER_NOISE

__all__ = ["prob_kind", "is_prob", "find_probs", "module_probs", "named_probs", "is_drop_path_module", "samplers", "sampled",
           "DROPOUT_NAME", "DROP_PATH_NAME", "LAYERDROP_NAME"]

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


def is_prob(v: Any) -> bool:
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


def named_probs(obj: Any, kind: str) -> Iterator[tuple[str, float]]:
    """``(attribute, value)`` of ``obj``: public probabilities in [0, 1] of ``kind``."""
    for attr, v in list(vars(obj).items()):
        if not attr.startswith("_") and is_prob(v) and prob_kind(attr, obj) == kind:
            yield attr, v


def find_probs(model: nn.Module, kind: str) -> Iterator[tuple[str, str, float]]:
    """``(module name, attribute, value)`` for every probability of ``kind`` held by a module of ``model``."""
    return module_probs(dict(model.named_modules()), kind)


def module_probs(modules: dict[str, nn.Module], kind: str) -> Iterator[tuple[str, str, float]]:
    for name, mod in modules.items():
        if isinstance(mod, nn.modules.dropout._DropoutNd):
            if kind == DROPOUT:
                yield name, "p", mod.p
            continue
        yield from ((name, attr, v) for attr, v in named_probs(mod, kind))




def samplers(modules) -> list[str]:
    """The class names of the ``modules`` that draw in every training forward with no number to turn it off
    (one per module)."""
    return [c for m in modules for c in (c.__name__ for c in type(m).__mro__) if c in _SAMPLES]


def sampled(classes: list[str]) -> str:
    """What those classes draw, in words."""
    return "; ".join(f"{c}: {_SAMPLES[c]}" for c in sorted(set(classes)))
