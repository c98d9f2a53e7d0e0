"""Dropout control: find every dropout probability a model reads and set it.

Three places hold dropout probabilities in practice:

1. modules of the ``nn.Dropout`` family (Dropout, Dropout1d/2d/3d, AlphaDropout,
   FeatureAlphaDropout and any other ``_DropoutNd`` subclass): their ``p``;
2. plain numbers stored on other modules and passed to functional dropout or to
   attention kernels at call time (transformers: ``self.dropout``,
   ``self.attention_dropout``, ``self.activation_dropout``, ``dropout_p`` ...);
3. fields of the model's (transformers) config, some of which are read during forward.

An attribute counts when it is an int/float in [0, 1] whose name contains ``dropout``,
``pdrop`` or ``drop_prob``, or whose last ``_``-separated word is ``drop`` (``drop``,
``attn_drop``, ``proj_drop``: X-CLIP's prompt attention reads ``self.attn_drop`` at call
time). LayerDrop and drop-path rates (``layerdrop``, ``drop_path_rate``) are structured
regularizers of another kind and are left alone.
"""

from __future__ import annotations

import re
import sys
from typing import Any, Iterator

from torch import nn

__all__ = ["DROPOUT_NAME", "find_dropout", "find_configs", "set_path", "get_path"]

DROPOUT_NAME = re.compile(r"dropout|pdrop|drop_prob|(?:^|_)drop$", re.IGNORECASE)


def _is_prob(v: Any) -> bool:
    return type(v) in (int, float) and 0.0 <= v <= 1.0


def _is_config(obj: Any) -> bool:
    tf = sys.modules.get("transformers")
    return tf is not None and isinstance(obj, tf.PretrainedConfig)


def _named_probs(obj: Any, pattern: re.Pattern) -> Iterator[tuple[str, float]]:
    """``(attribute, value)`` of ``obj`` whose public name matches ``pattern`` and whose value is in [0, 1]."""
    for attr, v in list(vars(obj).items()):
        if not attr.startswith("_") and pattern.search(attr) and _is_prob(v):
            yield attr, v


def find_dropout(model: nn.Module, pattern: re.Pattern = DROPOUT_NAME) -> Iterator[tuple[str, str, float]]:
    """Yield ``(module_name, attribute, value)`` for every dropout probability on a module.

    ``pattern`` selects other probability attributes the same way (R-Drop looks for LayerDrop).
    """
    for name, mod in model.named_modules():
        if pattern is DROPOUT_NAME and isinstance(mod, nn.modules.dropout._DropoutNd):
            yield name, "p", mod.p
            continue
        for attr, v in _named_probs(mod, pattern):
            yield name, attr, v


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


def config_dropout(cfg, pattern: re.Pattern = DROPOUT_NAME) -> Iterator[tuple[str, float]]:
    """``(field, value)`` for the dropout probabilities in one config (not recursing)."""
    yield from _named_probs(cfg, pattern)


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
