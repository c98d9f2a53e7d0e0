"""Stochastic depth as its own knob: ``apply(drop_path=r)`` sets every DropPath and LayerDrop rate.

Stochastic depth drops whole residual branches (DropPath: per example; LayerDrop: a whole
layer per forward) instead of single activations, and is not touched by ``dropout=``. What
``drop_path=r`` sets (found by ``dropout.prob_kind``, the one rule that tells the two kinds
apart):

- DropPath / StochasticDepth modules: their ``drop_prob`` (timm, transformers'
  ``SwinDropPath``, ``ConvNextDropPath`` ...) or ``p`` (torchvision);
- attributes read at call time: ``layerdrop`` (BART, Whisper, wav2vec2's adapter ...),
  ``drop_path``/``drop_path_rate`` floats passed to a functional ``drop_path``;
- config fields: ``layerdrop`` (wav2vec2 reads ``config.layerdrop`` in forward),
  ``encoder_layerdrop``/``decoder_layerdrop``, ``drop_path_rate``, ``drop_connect_rate``.

Each change is an entry of the record's ``dropout``/``config`` lists with ``"kind":
"drop_path"``, so revert, export and convert undo it like a dropout change. ``r`` replaces
every rate: a linear depth schedule (0 .. drop_path_rate) becomes ``r`` everywhere, and
blocks built without DropPath (rate 0 gives ``nn.Identity``) stay without it.

The record also lists the train-mode randomness apply was not asked to touch (``left_on``),
so ``describe`` can say "drop-path 0.1 on 12 modules left on: pass drop_path=0.0".
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from .dropout import DROP_PATH, DROPOUT, config_probs, find_configs, find_probs
from .errors import SurgeryError

__all__ = ["plan", "layerdrop_rates", "left_on"]

LAYERDROP_NAME = re.compile(r"layer_?drop", re.IGNORECASE)  # rates read in forward (a whole layer per forward)
_OPTION = {DROPOUT: "dropout", DROP_PATH: "drop_path"}


def _find(root: nn.Module, kind: str) -> tuple[list[tuple[str, str, float]], list[tuple[str, list[str], float]]]:
    attrs = list(find_probs(root, kind))
    cfgs = [(mod, path + [f], v) for mod, path, c in find_configs(root) for f, v in config_probs(c, kind)]
    return attrs, cfgs


def plan(root: nn.Module, kind: str, value: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The record entries (attributes, config fields) that set every probability of ``kind`` to ``value``.

    Raises:
        SurgeryError: ``value`` > 0 and the model reads no probability of that kind in forward
            (the call would change nothing).
    """
    attrs, cfgs = _find(root, kind)
    tag = {} if kind == DROPOUT else {"kind": kind}
    if value > 0 and not attrs:
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
    return ([{"module": n, "attr": a, "old": v, "new": value, **tag} for n, a, v in attrs],
            [{"module": m, "path": p, "old": v, "new": value, **tag} for m, p, v in cfgs])


def layerdrop_rates(model: nn.Module) -> list[str]:
    """Non-zero LayerDrop rates (a whole layer dropped per forward) on modules or configs.

    DropPath draws per example and is left out: R-Drop's ``[x; x]`` halves stay independent.
    """
    attrs, cfgs = _find(model, DROP_PATH)
    found = [f"{name or type(model).__name__}.{attr}={v}" for name, attr, v in attrs
             if v > 0 and LAYERDROP_NAME.search(attr)]
    found += [f"config.{'.'.join(path)}={v}" for _, path, v in cfgs if v > 0 and LAYERDROP_NAME.search(path[-1])]
    return sorted(set(found))


def left_on(root: nn.Module, **options: float | None) -> list[dict[str, Any]]:
    """Train-mode randomness of each kind whose option (``dropout=``, ``drop_path=``) is None:
    ``[{"kind", "values", "modules", "config"}]``: the non-zero rates, the modules holding them and
    the config fields (for the record)."""
    out = []
    for kind, option in _OPTION.items():
        if options.get(option) is not None:
            continue
        attrs, cfgs = _find(root, kind)
        on_attrs, on_cfgs = [(n, v) for n, _, v in attrs if v > 0], [v for _, _, v in cfgs if v > 0]
        if on_attrs or on_cfgs:
            out.append({"kind": kind, "values": sorted({v for _, v in on_attrs} | set(on_cfgs)),
                        "modules": len({n for n, _ in on_attrs}), "config": len(on_cfgs)})
    return out
