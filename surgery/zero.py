"""DeepSpeed ZeRO: what surgery does with parameters DeepSpeed partitions (never imports deepspeed itself
unless such a parameter exists, so the core install does not need it).

* **ZeRO-1/2** partition the optimizer state (and gradients), never the parameters: every rank holds
  the full model, Mixout targets included (a full target per rank, as under DDP). The targets are frozen,
  so they get no gradient, enter no reduction and DeepSpeed's optimizer keeps no state for them (it
  takes the parameters that require grad).
* **ZeRO-3** partitions every parameter, frozen ones included (``ds_id``, ``ds_shape``, ``ds_tensor``):
  a Mixout target is a Parameter of its layer, so DeepSpeed partitions it like the weight and gathers
  it with the weight before the layer's forward (and backward). Each rank holds about 1/world of
  the targets.
* ``apply`` on a model whose weights are already partitioned (``from_pretrained`` under ``zero.Init``,
  what the HF Trainer does with a ZeRO-3 config): :func:`gathered` makes the weights whole while
  ``apply`` reads them, and :func:`partition_new` partitions what ``apply`` added (the targets, a
  layer-weighted head's weights) as the weights are, before anything else runs.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:  # torch-free at import: ``describe`` (which reads records without torch) asks is_zero3
    import torch
    from torch import nn

__all__ = ["is_zero3", "is_partitioned", "zero3_params", "gathered", "partition_new", "full_state_dict"]


def is_zero3(t) -> bool:
    """A parameter DeepSpeed ZeRO-3 manages (gathered now or not)."""
    return hasattr(t, "ds_id")


def is_partitioned(t) -> bool:
    """A ZeRO-3 parameter that is not gathered now (its local data is a shard, not the full tensor)."""
    return is_zero3(t) and tuple(t.shape) != tuple(t.ds_shape)


def zero3_params(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The ZeRO-3 parameters among ``params`` (each once)."""
    seen, out = set(), []
    for p in params:
        if is_zero3(p) and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor]):
    """Every ZeRO-3 parameter among ``params`` whole on every rank for the duration (a collective: all
    ranks enter it), partitioned again on exit without writing back (nothing in it changes them)."""
    zp = zero3_params(params)
    if not zp:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(zp, modifier_rank=None):
        yield


def partition_new(model: nn.Module, before: Iterable[torch.Tensor]) -> int:
    """Partition the parameters of ``model`` that are not ZeRO-3 parameters when ``before`` (the model's
    parameters before ``apply``) held some: they are what ``apply`` added, and are partitioned as the
    weights are. Returns how many."""
    before = list(before)
    zp = zero3_params(before)
    if not zp:
        return 0
    old = {id(p) for p in before}
    new = [p for p in model.parameters() if id(p) not in old and not is_zero3(p)]
    if new:
        zp[0].convert_to_zero_parameters(new)
    return len(new)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every ZeRO-3 parameter gathered, copied to CPU, module by module (one
    module's parameters whole at a time; a collective: every rank calls it)."""
    out: dict[str, torch.Tensor] = {}
    copies: dict[int, torch.Tensor] = {}  # a tied parameter is one copy under each of its names
    for prefix, module in model.named_modules(remove_duplicate=False):
        own = list(module.parameters(recurse=False))
        with gathered(own):
            for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if t is not None and name not in module._non_persistent_buffers_set:
                    if id(t) not in copies:
                        copies[id(t)] = t.detach().to("cpu", copy=True)
                    out[f"{prefix}.{name}" if prefix else name] = copies[id(t)]
    return {k: out[k] for k in model.state_dict() if k in out}  # the state_dict's order, ties kept once each
