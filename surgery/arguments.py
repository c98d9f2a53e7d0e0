"""Checks of ``apply``'s arguments that do not need the model's modules: flags are real
bools, counts are integers, options that only matter with another option come with it,
sets are recorded in a fixed order, and Mixout gets materialised weights to copy.

Every check raises before ``apply`` changes anything.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import nn

from .errors import SurgeryError, SurgeryTypeError

__all__ = ["check_bool", "check_count", "check_dependent", "recorded_pattern", "check_materialised"]

MSD_P_DEFAULT = 0.2


def check_bool(value: Any, name: str) -> bool:
    """``value`` if it is a real ``bool``; a string such as ``"False"`` would be truthy, so it is refused."""
    if not isinstance(value, bool):
        raise SurgeryTypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def check_count(value: Any, name: str) -> int:
    """``value`` as an int >= 0: ints, numpy integers and 0-d integer tensors; never bools or floats."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.dtype.is_floating_point \
            and not value.dtype.is_complex and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be the number of dropout samples, an int >= 0 (0 = off), got {value!r}")
    return int(value)


def check_dependent(*, mixout: float, msd: int, msd_p, head, mixout_head: bool, mixout_tied: bool,
                    target_dtype, low_memory: bool) -> None:
    """Refuse an argument that only matters with another option when that option is off.

    ``msd_p`` needs ``msd > 0``; ``mixout_head=False``, ``mixout_tied=True``, ``target_dtype``
    and ``low_memory=True`` need ``mixout > 0``; ``head`` names the MSD head (``msd > 0``) or
    the head ``mixout_head=False`` leaves alone (``mixout > 0``), so it needs one of those.
    """
    if msd_p is not None and msd == 0:
        raise SurgeryError(f"msd_p={msd_p!r} is the dropout probability of multi-sample dropout, which is off "
                           "(msd=0); pass msd=K (e.g. msd=8) or drop msd_p")
    if mixout == 0.0:
        for name, value, off in (("mixout_head", mixout_head, True), ("mixout_tied", mixout_tied, False),
                                 ("target_dtype", target_dtype, None), ("low_memory", low_memory, False)):
            if value != off:
                raise SurgeryError(f"{name}={value!r} only matters with Mixout, which is off (mixout=0); pass "
                                   f"mixout=p (e.g. mixout=0.1) or drop {name}")
    if head is not None and msd == 0 and not (mixout > 0.0 and mixout_head is False):
        raise SurgeryError(f"head={head!r} names the multi-sample-dropout head (msd=K) or the head that "
                           "mixout_head=False leaves a plain layer; with neither it has no effect: pass msd=K, "
                           "or mixout=p with mixout_head=False, or drop head")


def recorded_pattern(pattern: Any) -> Any:
    """The JSON form of an include/exclude pattern for the record: a set becomes a *sorted* list,
    so the record (and resume's comparison of it) does not depend on the hash seed."""
    if pattern is None or isinstance(pattern, str):
        return pattern
    if isinstance(pattern, (set, frozenset)):
        return sorted(pattern)
    return list(pattern)


_LOAD = "load the pretrained weights first (from_pretrained, or load_state_dict(state_dict, assign=True) on a model "\
        "built on the meta device), then call surgery.apply"


def _unmaterialised(t: torch.Tensor) -> tuple[str, str] | None:
    """``(what it is, the fix)`` for a tensor that holds no data, else None."""
    if isinstance(t, nn.parameter.UninitializedTensorMixin):
        return "uninitialized (a lazy module before its first forward)", \
            "run one forward to materialise the lazy modules and " + _LOAD
    fake = getattr(getattr(torch, "_subclasses", None), "FakeTensor", None)
    if fake is not None and isinstance(t, fake):
        return "a fake tensor (FakeTensorMode)", "apply surgery to the real model, outside FakeTensorMode"
    if t.is_meta:
        return "on the meta device", _LOAD
    return None


def check_materialised(model: nn.Module) -> None:
    """Refuse Mixout on a model whose weights hold no data: its targets would copy nothing.

    Dropout control and multi-sample dropout touch no tensor data, so they work on a meta
    model whose weights are loaded afterwards (``load_state_dict(..., assign=True)``).

    Raises:
        SurgeryError: a parameter or buffer is on the meta device, a fake tensor or uninitialized.
    """
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            found = _unmaterialised(t)
            if found is not None:
                raise SurgeryError(f"{kind} {name!r} is {found[0]}, so it holds no weights: Mixout copies the "
                                   f"pretrained weights as its targets; {found[1]}")
