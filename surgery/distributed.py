"""Mixout targets under distributed engines: what works, and one clear error for the rest.

A Mixout target (``<layer>.mixout_target``) is a frozen ``nn.Parameter``
(``requires_grad=False``), not a buffer, so the engines treat it like the weight it belongs to:

* **DDP** broadcasts rank 0's parameters and buffers once, at construction (so a head that each
  rank initialised differently gets rank 0's weight *and* target), and afterwards only buffers
  (``broadcast_buffers=True``) and gradients. A target is neither: a training step sends no target
  bytes, while BatchNorm statistics (real buffers) keep syncing.
* **FSDP2** (``torch.distributed.fsdp.fully_shard``) shards every parameter of the modules it
  wraps, frozen ones included, and all-gathers them together before the module's forward (and
  backward): each rank holds about 1/world of the targets, a layer's full target exists only
  while that layer computes. A ``target_dtype`` different from the weight's is fine (FSDP2 needs
  one dtype among *trainable* parameters only and gathers mixed dtypes as bytes).

* **DeepSpeed ZeRO-1/2/3**: see :mod:`surgery.zero` (ZeRO-3 partitions and gathers the targets with
  their weights; ZeRO-1/2 keep a full target per rank, as DDP does).

Supported: one process, DDP (also through the HF Trainer / Accelerate), FSDP2 with
``fully_shard`` called *after* ``surgery.apply`` (also Accelerate / Trainer ``fsdp_version=2``),
DeepSpeed ZeRO stages 1-3 with ``surgery.apply`` before ``deepspeed.initialize`` (also the Trainer and
Accelerate with a DeepSpeed config; ``apply`` on weights ``zero.Init`` already partitioned works).
Refused with :class:`~surgery.errors.SurgeryError` before anything changes (at ``apply``/``revert``)
or at the first training forward: FSDP1 (``FullyShardedDataParallel``; with its default
``use_orig_params=False`` torch itself refuses to flatten the frozen target with the trainable
weight), ``apply`` on a DeepSpeed engine (after ``deepspeed.initialize``), tensor-parallel (DTensor) weights, ``apply``/``revert`` after
``fully_shard``, or a weight whose shape no longer matches its target (an engine that partitions
parameters in a way surgery cannot see through). A target that code unfroze (``requires_grad_(True)``
on everything) is frozen again at the next training forward.

Counting parameters: ``sum(p.numel() for p in model.parameters())`` (and transformers'
``model.num_parameters()``) now include the targets; count trainable ones with
``p.requires_grad`` (``num_parameters(only_trainable=True)``), which excludes them.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from .errors import SurgeryError
from .layers.mixout import TARGET_CHECKS
from .zero import is_partitioned

__all__ = ["SUPPORTED_ENGINES", "check_apply", "check_revert", "check_target", "is_dtensor"]

SUPPORTED_ENGINES = ("one process, DDP (torch.nn.parallel.DistributedDataParallel; the HF Trainer and Accelerate "
                     "in multi-process mode) and FSDP2 (torch.distributed.fsdp.fully_shard called after "
                     "surgery.apply; Accelerate/Trainer with fsdp_version=2) and DeepSpeed ZeRO-1/2/3 (surgery.apply before "
                     "deepspeed.initialize; the Trainer and Accelerate with a DeepSpeed config)")

_ORDER = ("call surgery.apply(model, ...) on the plain model first, then fully_shard(layer) for each layer and "
          "fully_shard(model): the Mixout targets are then sharded and gathered with their weights")


def is_dtensor(x) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (without importing it when nothing did)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(x, mod.DTensor)


def _refuse(what: str, fix: str) -> SurgeryError:
    return SurgeryError(f"{what}; surgery supports {SUPPORTED_ENGINES}. {fix}")


def _fsdp2_type():
    mod = sys.modules.get("torch.distributed.fsdp")
    return getattr(mod, "FSDPModule", None) if mod is not None else None


_DEEPSPEED_ORDER = ("Apply to the model before deepspeed.initialize (or before the Trainer/accelerator.prepare): "
                    "DeepSpeed then partitions and gathers the Mixout targets with their weights")


def check_apply(model: nn.Module, view) -> None:
    """Refuse, before ``apply`` changes anything, a model already inside an engine surgery cannot
    work through: FSDP2 already applied, DTensor (tensor-parallel) weights, a DeepSpeed engine. (FSDP1 is
    refused by ``wrappers.check_swappable``.)

    ``model`` is what the user passed (a wrapper included; DDP around it is fine), ``view`` the
    walk of the model inside it.
    """
    fsdp2 = _fsdp2_type()
    if type(model).__name__ == "DeepSpeedEngine":
        raise _refuse("the model is a DeepSpeed engine (deepspeed.initialize already ran)", _DEEPSPEED_ORDER + ".")
    for m in [model, *view.modules.values()]:
        if fsdp2 is not None and isinstance(m, fsdp2):
            name = next(iter(view.names.get(id(m), [])), None)
            where = f"module {name!r}" if name else "the model"
            raise _refuse(f"{where} is already sharded with fully_shard (FSDP2)", "Apply first: " + _ORDER + ".")
    for name, p in view.params.items():
        if is_dtensor(p):
            raise _refuse(f"parameter {name!r} is a DTensor (sharded or tensor-parallel)",
                          "Apply to the plain model: " + _ORDER + "; tensor parallelism is not supported.")


def check_revert(view) -> None:
    """Refuse ``revert`` of a model sharded with ``fully_shard``: FSDP2 keeps gathering into the Mixout
    layer objects, so swapping them back would leave the plain layers holding shards."""
    fsdp2 = _fsdp2_type()
    if fsdp2 is not None and any(isinstance(m, fsdp2) for m in view.modules.values()):
        raise SurgeryError("cannot revert a model sharded with fully_shard (FSDP2): its layers hold shards that FSDP2 "
                           "gathers into the Mixout layers. Export instead: call "
                           "surgery.exporting.export_sharded(model, path, should_save=rank == 0) on every rank, or "
                           "save get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)) and run "
                           "`surgery convert` on it")


def _plain(weight: torch.Tensor, target: torch.Tensor) -> bool:
    """The cheap per-forward test: the weight and target Mixout will mix are plain, full, frozen."""
    return not (target.requires_grad or target.shape != weight.shape or is_partitioned(weight)
                or is_partitioned(target) or is_dtensor(weight) or is_dtensor(target))


def check_target(weight: torch.Tensor, target: torch.Tensor) -> None:
    """Registered in ``MixLinear``'s per-forward checks: one clear error for an engine that partitioned
    or flattened a Mixout layer's weight or target in a way surgery cannot see through."""
    if _plain(weight, target):
        return
    if target.requires_grad:
        raise _refuse("a Mixout layer computes with a target that is a view requiring grad, not its frozen Parameter: "
                      "FSDP1 (FullyShardedDataParallel, use_orig_params=True) or another engine flattened it together "
                      "with the trainable weights", "Use FSDP2: " + _ORDER + ".")
    if is_partitioned(weight) or is_partitioned(target):
        raise _refuse("a Mixout layer computes with a ZeRO-3 shard of its weight or target, not the gathered tensor "
                      "(DeepSpeed gathers a layer's own parameters before its forward; this layer was swapped in after "
                      "deepspeed.initialize or is called outside its module)", _DEEPSPEED_ORDER + ".")
    if is_dtensor(weight) or is_dtensor(target):
        raise _refuse("a Mixout layer computes with a DTensor weight or target (tensor parallelism, or a layer "
                      "sharded by an engine that does not gather its targets)",
                      "Apply to the plain model: " + _ORDER + ".")
    raise _refuse(f"a Mixout layer's weight has shape {tuple(weight.shape)} but its target "
                  f"{tuple(target.shape)}: an engine partitioned the weight without gathering the target",
                  "Wrap the model with one of these engines instead.")


TARGET_CHECKS.append(check_target)
