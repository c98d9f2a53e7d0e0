"""Wrappers that training tools put around a model, recognised by type, never by attribute name.

Two kinds:

* **model wrappers** hold the whole model: ``DistributedDataParallel``, ``DataParallel``,
  FSDP1's ``FullyShardedDataParallel``, DeepSpeed's engine (what Accelerate hands back for
  those), ``torch.compile``'s ``OptimizedModule``, PEFT's ``PeftModel`` / ``PeftMixedModel``
  and its tuner models (``LoraModel``, ...), and the averaging copies (``torch.optim.swa_utils.AveragedModel``,
  timm's ``ModelEmaV2`` / ``ModelEmaV3``: the copy they hold). :func:`unwrap` peels them off down to the model
  that owns the weights; surgery keeps its record there, so the record survives every usual
  unwrapping (``merge_and_unload()`` returns that model, ``accelerator.unwrap_model`` too).
* **layer wrappers** hold one layer inside the model: PEFT's tuner layers (a LoRA layer keeps
  the wrapped layer as ``base_layer``) and its ``ModulesToSaveWrapper`` (the original layer
  plus a trainable copy). :func:`is_layer_wrapper` recognises them; ``revert`` looks inside
  one for the layers it recorded.

A class from a library counts only when that library is already imported (an instance of
the class cannot exist otherwise), so nothing here imports peft, deepspeed or dynamo.
A model's own attribute called ``module`` or ``model`` is never descended into.
"""

from __future__ import annotations

import sys

from torch import nn

from .errors import SurgeryError
from .patterns import ancestors

__all__ = ["loaded_class", "unwrap", "chain", "model_wrappers", "is_layer_wrapper", "peft_tuner_layer_type", "find_layers", "check_swappable"]


def loaded_class(module: str, name: str):
    """The class ``name`` of ``module`` when that module is imported, else None (never imports it)."""
    mod = sys.modules.get(module)
    return getattr(mod, name, None) if mod is not None else None


def model_wrappers() -> list[tuple[type, str]]:
    """``(wrapper class, attribute holding the wrapped model)`` for every wrapper class loaded."""
    out: list[tuple[type, str]] = [(nn.parallel.DistributedDataParallel, "module"), (nn.DataParallel, "module")]
    for module, name, attr in (
        ("torch._dynamo.eval_frame", "OptimizedModule", "_orig_mod"),
        ("torch.distributed.fsdp.fully_sharded_data_parallel", "FullyShardedDataParallel", "module"),
        ("deepspeed.runtime.engine", "DeepSpeedEngine", "module"),
        ("peft.peft_model", "PeftModel", "base_model"),
        ("peft.mixed_model", "PeftMixedModel", "base_model"),
        ("peft.tuners.tuners_utils", "BaseTuner", "model"),
        ("torch.optim.swa_utils", "AveragedModel", "module"),  # an averaging copy: the copy it holds
        ("timm.utils.model_ema", "ModelEmaV2", "module"),
        ("timm.utils.model_ema", "ModelEmaV3", "module"),
    ):
        cls = loaded_class(module, name)
        if isinstance(cls, type):
            out.append((cls, attr))
    return out


def chain(model: nn.Module) -> list[nn.Module]:
    """``model``, the model inside it, ... down to the model inside every model wrapper."""
    wrappers = model_wrappers()
    out = [model]
    while True:
        inner = next((getattr(model, attr) for cls, attr in wrappers if isinstance(model, cls)), None)
        if not isinstance(inner, nn.Module) or any(inner is m for m in out):
            return out
        out.append(inner)
        model = inner


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside every model wrapper around ``model`` (``model`` itself when unwrapped)."""
    return chain(model)[-1]


def check_swappable(modules, action: str) -> None:
    """Refuse to swap layers under FSDP1, which flattens the Parameters at wrap time.

    FSDP1 (``FullyShardedDataParallel``) re-points the wrapped modules' weights at views of
    its flat Parameter and records the module objects it did that for; a layer swapped in
    afterwards would not get them. FSDP2 (``fully_shard`` after ``apply``) is checked in
    ``surgery.distributed``.

    ``modules``: the wrappers around the model and every module of it.

    Raises:
        SurgeryError: one of ``modules`` is an FSDP1 module.
    """
    fsdp1 = loaded_class("torch.distributed.fsdp.fully_sharded_data_parallel", "FullyShardedDataParallel")
    if isinstance(fsdp1, type) and any(isinstance(m, fsdp1) for m in modules):
        fix = ("apply surgery to the plain model, then wrap it" if action == "apply" else
               "revert the model before wrapping it, or run `surgery convert` on a full (gathered) checkpoint")
        raise SurgeryError(f"cannot {action} inside FullyShardedDataParallel (FSDP1): it flattened the Parameters when "
                           f"it wrapped the model, so swapped layers would not hold them; {fix} "
                           "(or use FSDP2: surgery.apply first, then fully_shard; see docs/training.md)")


def peft_tuner_layer_type():
    """PEFT's ``BaseTunerLayer`` class when peft is loaded, else None."""
    return loaded_class("peft.tuners.tuners_utils", "BaseTunerLayer")


def is_layer_wrapper(module: nn.Module) -> bool:
    """True for a PEFT layer wrapper: a tuner layer (LoRA, IA3, ...) or a ``modules_to_save`` wrapper."""
    types = tuple(t for t in (peft_tuner_layer_type(), loaded_class("peft.utils.other", "AuxiliaryTrainingWrapper"),
                              loaded_class("peft.utils.other", "ModulesToSaveWrapper")) if isinstance(t, type))
    return bool(types) and isinstance(module, types)


def find_layers(root: nn.Module, name: str, classes) -> tuple[list[tuple[str, nn.Module]], nn.Module | None]:
    """Where the layer that ``apply`` recorded at ``name`` is now.

    Returns the ``(dotted name, layer)`` pairs of ``classes`` found, and the module at
    ``name`` (None when there is none). The layer is looked for:

    * at ``name`` itself;
    * inside a layer wrapper put at ``name`` after apply (PEFT's LoRA layer keeps it as
      ``base_layer``, a ``modules_to_save`` wrapper keeps it and a trainable copy): every
      instance of ``classes`` inside;
    * at the nearest existing module enclosing ``name``, when that is an instance of
      ``classes``: the layer took the place of the layer wrapper it was recorded in
      (``merge_and_unload()`` does that).
    """
    try:
        here = root.get_submodule(name)
    except AttributeError:
        here = None
    if isinstance(here, classes):
        return [(name, here)], here
    if here is not None:
        if is_layer_wrapper(here):
            return [(f"{name}.{n}", m) for n, m in here.named_modules() if isinstance(m, classes)], here
        return [], here
    for up_name in ancestors(name)[1:]:
        try:
            up = root.get_submodule(up_name)
        except AttributeError:
            continue
        return ([(up_name, up)] if isinstance(up, classes) else []), None
    return [], None
