"""R-Drop's two passes (:func:`rdrop_forward`): one forward on the concatenated batch ``[x; x]``
when that gives the two halves independent noise, two forwards when a regularizer draws its noise
once per forward (:func:`rdrop_strategy`). The loss on the two outputs: :func:`surgery.rdrop_loss`.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

from .. import regularizers
from ..configs import is_config, nested
from ..errors import SurgeryError, SurgeryTypeError
from ..outputs import map_tensors
from ..record import ATTR, unwrap
from ..regularizers.rates.plan import layerdrop_sources

__all__ = ["rdrop_forward", "rdrop_strategy", "STRATEGIES", "call"]

STRATEGIES = ("auto", "concat", "separate")


class _Sources:
    """What in a model can draw noise once per forward for the whole batch, found by one walk and kept per
    model until its module tree changes: each source with the test of whether it draws now (a training
    Mixout layer with p > 0, a training BatchNorm, a LayerDrop rate > 0 while the model trains)."""

    def __init__(self, root: nn.Module):
        units = regularizers.units()
        self.modules: list[tuple[str, Callable[[], bool]]] = []
        modules = {}
        for name, mod in root.named_modules():
            modules[name] = mod
            found = next((f for u in units if (f := u.noise(mod)) is not None), None)
            if found is not None:
                self.modules.append((f"{found[0]} {name}", found[1]))
            elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
                self.modules.append((f"BatchNorm {name}", lambda m=mod: m.training))
        configs, seen = [], set()  # every distinct config a module holds as .config, nested ones included
        for name, mod in modules.items():
            cfg = vars(mod).get("config")
            for path, c in nested(cfg) if is_config(cfg) else ():
                if id(c) not in seen:
                    seen.add(id(c))
                    configs.append((name, path, c))
        self.layerdrop = layerdrop_sources(modules, configs, type(root).__name__)

    def shared(self, root: nn.Module) -> list[str]:
        """The sources that draw now: modules in walk order, then LayerDrop rates (sorted)."""
        out = [what for what, draws in self.modules if draws()]
        if root.training:
            out += sorted({f"LayerDrop {where}={v}" for where, rate in self.layerdrop if (v := rate()) > 0})
        return out


_SOURCES: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, _Sources]]" = weakref.WeakKeyDictionary()
_CHANGES = [0]  # modules registered anywhere (assigned as submodules) since import: a module tree changed


def _changed(module, name, submodule):
    _CHANGES[0] += 1


register_module_module_registration_hook(_changed)


def _sources(root: nn.Module) -> _Sources:
    """The noise sources of ``root``, walked again only when a module was registered anywhere since (a swap,
    ``apply``, ``revert``, PEFT wrapping a layer) or the model's surgery changed."""
    key = (_CHANGES[0], id(vars(root).get(ATTR)))
    cached = _SOURCES.get(root)
    if cached is None or cached[0] != key:
        cached = (key, _Sources(root))
        _SOURCES[root] = cached
    return cached[1]


def rdrop_strategy(model: nn.Module) -> tuple[str, str]:
    """``("concat" | "separate", reason)``: how :func:`rdrop_forward` runs ``model`` now.

    One forward on ``[x; x]`` gives the two halves independent noise only when every
    source of randomness draws per element or per row: ``nn.Dropout`` and attention dropout
    (per element) and multi-sample dropout heads (per row) do. A training-mode Mixout layer
    with ``p > 0`` draws one mask per layer per forward for the whole batch, LayerDrop drops
    a whole layer per forward, and BatchNorm couples the rows of a batch: with any of those
    the halves would share noise (or statistics), so the two passes are two forwards.

    Which modules can do that is found by one walk of the model, kept until its module tree changes;
    every call then reads only their training flags and rates (no walk per training step).
    """
    root = unwrap(model)
    shared = _sources(root).shared(root)
    if shared:
        more = f" and {len(shared) - 1} more" if len(shared) > 1 else ""
        return "separate", f"{shared[0]}{more} draw noise once per forward for the whole batch"
    return "concat", "all noise is drawn per element or per row, so the halves of [x; x] are independent"


def _batch_size(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else None
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim():
            return v.shape[0]
    return None


def _double(batch: Any, n: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return torch.cat([batch, batch]) if batch.dim() and batch.shape[0] == n else batch
    if isinstance(batch, Mapping):
        return {k: _double(v, n) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_double(v, n) for v in batch)
    return batch


def _half(n: int, i: int):
    """Half ``i`` of a tensor with ``2 n`` rows; other tensors are shared by both halves."""
    return lambda t: t[i * n:(i + 1) * n] if t.dim() and t.shape[0] == 2 * n else t


def call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def rdrop_forward(model: nn.Module, batch: Any, *, strategy: str = "auto") -> tuple[Any, Any]:
    """The two R-Drop passes of ``model`` over ``batch``: ``(out1, out2)``.

    ``batch`` is what the model is called with: a dict (``model(**batch)``), a tuple/list
    (``model(*batch)``) or a tensor (``model(batch)``).

    Strategies: ``"concat"`` runs one forward on ``[x; x]`` (every tensor whose first
    dimension is the batch size is repeated) and splits the outputs; ``"separate"`` runs
    two forwards; ``"auto"`` (default) picks concat unless a regularizer would share its
    noise between the halves (:func:`rdrop_strategy`: Mixout, LayerDrop, BatchNorm).
    Concat is faster (one larger forward: better use of the hardware, one Python dispatch).

    In concat mode a ``loss`` the model computes (``labels`` in ``batch``) is the loss of
    the concatenated batch, present in both outputs; for the mean-reduced losses of
    transformers this equals the mean of the two passes' losses, so
    ``(out1.loss + out2.loss) / 2`` is right in both modes.

    Raises:
        SurgeryError: the model is in eval mode (the two passes would be identical), an
            unknown strategy, or concat on a batch with no batched tensor.
    """
    if strategy not in STRATEGIES:
        raise SurgeryError(f"unknown strategy {strategy!r}; use one of {', '.join(map(repr, STRATEGIES))}")
    if not isinstance(model, nn.Module):
        raise SurgeryTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not model.training:
        raise SurgeryError("model is in eval mode, where the two R-Drop passes are identical; call model.train() first")
    if strategy == "auto":
        strategy = rdrop_strategy(model)[0]
    if strategy == "separate":
        return call(model, batch), call(model, batch)
    n = _batch_size(batch)
    if n is None:
        raise SurgeryError("strategy='concat' needs a batch with at least one batched tensor (first dimension = batch size)")
    out = call(model, _double(batch, n))
    return map_tensors(out, _half(n, 0)), map_tensors(out, _half(n, 1))
