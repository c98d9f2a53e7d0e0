"""R-Drop's two passes (:func:`rdrop_forward`): one forward on the concatenated batch ``[x; x]``
when that gives the two halves independent noise, two forwards when a regularizer draws its noise
once per forward (:func:`rdrop_strategy`). The loss on the two outputs: :func:`surgery.rdrop_loss`.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..errors import SurgeryError, SurgeryTypeError
from ..layers.experts import MixoutParams
from ..layers.mixout import LoraMixout, MixLinear
from ..outputs import map_tensors
from ..record import unwrap
from ..regularizers.rates import layerdrop_rates
from ..view import View

__all__ = ["rdrop_forward", "rdrop_strategy", "STRATEGIES", "call"]

STRATEGIES = ("auto", "concat", "separate")


def rdrop_strategy(model: nn.Module) -> tuple[str, str]:
    """``("concat" | "separate", reason)``: how :func:`rdrop_forward` runs ``model`` now.

    One forward on ``[x; x]`` gives the two halves independent noise only when every
    source of randomness draws per element or per row: ``nn.Dropout`` and attention dropout
    (per element) and multi-sample dropout heads (per row) do. A training-mode Mixout layer
    with ``p > 0`` draws one mask per layer per forward for the whole batch, LayerDrop drops
    a whole layer per forward, and BatchNorm couples the rows of a batch: with any of those
    the halves would share noise (or statistics), so the two passes are two forwards.
    """
    view = View(unwrap(model))
    shared = []
    for name, mod in view.modules.items():
        if mod.training and (isinstance(mod, (MixLinear, LoraMixout)) and mod.p > 0
                             or isinstance(mod, MixoutParams) and mod.mixout_p > 0):  # fused experts, routers
            shared.append(f"Mixout {name}")
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training:
            shared.append(f"BatchNorm {name}")
    if view.root.training:
        shared += [f"LayerDrop {s}" for s in layerdrop_rates(view)]
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
