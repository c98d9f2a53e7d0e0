"""Copies that pair their parameters with the model's by position, made before ``apply``.

An averaging copy (``torch.optim.swa_utils.AveragedModel``, timm's ``ModelEmaV2`` / ``ModelEmaV3``) holds a
deep copy of the model made when it was built, and its update zips the copy's parameters (or state dict)
with the live model's, position by position. Mixout adds one frozen Parameter (``mixout_target``) after
each mixed weight, so a copy made before ``apply`` would be paired with the wrong tensors from the first
mixed layer on (``key.weight`` averaged with ``query.mixout_target``), silently where the shapes agree.
A copy made after ``apply`` is surgered too and pairs exactly.

:func:`watch` follows every averaging copy built in this process (a module-registration hook notes each
wrapper when its ``module`` is set; the copies built before the first ``apply`` are found once, when
surgery starts watching); :func:`refuse_copies_made_before` refuses ``apply(mixout=p)`` while one of them
holds a copy with this model's parameter layout, naming the order that works.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

from ...errors import SurgeryError
from ...wrappers import loaded_class

__all__ = ["watch", "averaging_classes", "refuse_copies_made_before", "layout"]

_COPIES: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_WATCHING: list = []


def averaging_classes() -> tuple[type, ...]:
    """The averaging wrappers loaded in this process (never imports timm)."""
    found = [loaded_class("torch.optim.swa_utils", "AveragedModel")]
    found += [loaded_class("timm.utils.model_ema", n) for n in ("ModelEmaV2", "ModelEmaV3")]
    return tuple(c for c in found if isinstance(c, type))


def _note(module: nn.Module, name: str, submodule: Any) -> None:
    if name == "module" and isinstance(module, averaging_classes()):
        _COPIES.add(module)


def watch() -> None:
    """Start following averaging copies (once per process): the ones alive now, and every one built later."""
    if _WATCHING:
        return
    _WATCHING.append(register_module_module_registration_hook(_note))
    classes = averaging_classes()
    for obj in gc.get_referrers(*classes):  # their instances (and a few other objects that name the classes)
        if isinstance(obj, classes):
            _COPIES.add(obj)


def layout(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """What a tool that pairs parameters by position relies on: every parameter's name and shape, in order."""
    return [(n, tuple(p.shape)) for n, p in model.named_parameters(remove_duplicate=False)]


def refuse_copies_made_before(root: nn.Module) -> None:
    """Refuse Mixout on ``root`` while an averaging copy made before ``apply`` pairs with it by position.

    Raises:
        SurgeryError: naming the wrapper and the order that works (apply first, then build the copy).
    """
    watch()
    copies = [c for c in list(_COPIES) if isinstance(getattr(c, "module", None), nn.Module) and c.module is not root]
    if not copies:
        return
    mine = layout(root)
    for c in copies:
        if layout(c.module) == mine and not any(m is root for m in c.modules()):
            kind = type(c).__name__
            raise SurgeryError(
                f"{kind} ({type(c).__module__}) holds a copy of this model made before surgery.apply: its update pairs "
                "the copy's parameters with the model's by position, and Mixout adds a frozen Parameter (mixout_target) "
                "after each mixed weight, so the pairs would shift (a weight averaged with another layer's target). "
                f"Build the copy after apply: surgery.apply(model, ...), then {kind}(model) (its copy carries the "
                f"surgery too, and surgery.revert / is_surgered see through {kind}); drop the old copy (del it) first")
