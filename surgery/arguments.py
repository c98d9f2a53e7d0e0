"""``apply``'s options, checked before the model is looked at.

:meth:`Options.check` turns the keyword arguments of :func:`surgery.apply` into one
:class:`Options` value or raises the one error that names the bad argument and the fix:
probabilities are real numbers in [0, 1], counts are integers, flags are real bools, and an
option that only matters with another option comes with it. Nothing here needs the model.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import SurgeryError, SurgeryTypeError
from .patterns import Pattern

__all__ = ["Options", "check_p", "check_count", "check_bool", "check_materialised", "MSD_P_DEFAULT", "POOLS"]

MSD_P_DEFAULT = 0.2
LAYER_P_DEFAULT = 0.2
POOLS = ("first", "last")  # the layer-weighted head's summary token: position 0, or the last non-padding one


def check_p(value: Any, name: str) -> float:
    """``value`` as a float in [0, 1], or a ValueError naming ``name`` and the range.

    Any real number is accepted (``float``, ``int``, numpy scalars such as ``np.float32(0.1)``,
    a 0-d real tensor), read back at the precision it was written in: ``np.float32(0.1)``
    gives ``0.1``, not ``0.10000000149011612``. Bools, strings and other objects are refused.
    """
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool and not value.is_complex():
        dt = value.dtype
        value = _shortest(value.item(), lambda c: torch.tensor(c, dtype=dt).item()) if dt.is_floating_point \
            else value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or type(value).__name__ == "bool_":
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r} ({type(value).__name__})")
    if not isinstance(value, (float, numbers.Integral)):  # numpy float32/16, ...
        value = _shortest(value, lambda c, cls=type(value): float(cls(c)))
    value = float(value)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return value


def _shortest(value, roundtrip) -> float:
    """The shortest decimal that ``roundtrip`` (a cast to the value's own precision) maps back to
    ``value``: ``np.float32(0.1)`` -> ``0.1``, the number the user wrote."""
    f = float(value)
    if not math.isfinite(f):
        return f
    for digits in range(1, 18):
        c = float(f"{f:.{digits}g}")
        if roundtrip(c) == f:
            return c
    return f


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


def _recorded_pattern(pattern: Any) -> Any:
    """The JSON form of an include/exclude pattern: a set becomes a *sorted* list, so the record
    (and resume's comparison of it) does not depend on the hash seed."""
    if pattern is None or isinstance(pattern, str):
        return pattern
    if isinstance(pattern, (set, frozenset)):
        return sorted(pattern)
    return list(pattern)


@dataclass(frozen=True)
class Options:
    """The checked arguments of one ``apply`` call (see :func:`surgery.apply` for each)."""

    mixout: float = 0.0
    dropout: float | None = None
    drop_path: float | None = None
    msd: int = 0
    msd_p: float = MSD_P_DEFAULT
    head: str | None = None
    include: Pattern = None
    exclude: Pattern = None
    mixout_head: bool = True
    mixout_tied: bool = False
    target_dtype: torch.dtype | None = None
    low_memory: bool = False
    msd_layers: bool = False
    msd_layer_p: float = LAYER_P_DEFAULT
    msd_pool: str = "first"
    router_noise: float | None = None

    @classmethod
    def check(cls, *, mixout=0.0, dropout=None, drop_path=None, msd=0, msd_p=None, head=None, include=None,
              exclude=None, mixout_head=True, mixout_tied=False, target_dtype=None, low_memory=False,
              msd_layers=False, msd_layer_p=LAYER_P_DEFAULT, msd_pool="first", router_noise=None) -> "Options":
        """Check every argument; an option that only matters with another one needs it.

        Raises:
            ValueError: a probability outside [0, 1], NaN or not a number; ``msd`` not an int >= 0;
                ``msd_pool`` not one of :data:`POOLS`; ``msd_layers`` without ``msd``.
            SurgeryTypeError: a flag that is not a bool, a ``target_dtype`` that is not a floating dtype.
            SurgeryError: an option whose regularizer is off (``msd_p`` without ``msd``, ...).
        """
        mixout = check_p(mixout, "mixout")
        dropout = None if dropout is None else check_p(dropout, "dropout")
        drop_path = None if drop_path is None else check_p(drop_path, "drop_path")
        router_noise = None if router_noise is None else check_p(router_noise, "router_noise")
        msd = check_count(msd, "msd")
        given_msd_p = None if msd_p is None else check_p(msd_p, "msd_p")
        for flag, value in (("mixout_head", mixout_head), ("mixout_tied", mixout_tied), ("low_memory", low_memory),
                            ("msd_layers", msd_layers)):
            check_bool(value, flag)
        msd_layer_p = check_p(msd_layer_p, "msd_layer_p")
        if msd_pool not in POOLS:
            raise ValueError(f"msd_pool must be one of {', '.join(map(repr, POOLS))} (the summary token: position 0, "
                             f"or the last non-padding token of attention_mask), got {msd_pool!r}")
        if target_dtype is not None and not (isinstance(target_dtype, torch.dtype) and target_dtype.is_floating_point):
            raise SurgeryTypeError("target_dtype must be a floating torch.dtype such as torch.bfloat16, got "
                                   f"{target_dtype!r}")
        if not msd_layers and (msd_layer_p != LAYER_P_DEFAULT or msd_pool != "first"):
            raise SurgeryError("msd_layer_p/msd_pool configure the layer-weighted MSD head; pass msd_layers=True")
        if msd_layers and msd < 1:
            raise ValueError(f"msd_layers=True needs msd=K >= 1 samples (the Kaggle head: msd=5, msd_p=0.5), got "
                             f"msd={msd}")
        if (include is not None or exclude is not None) and mixout == 0.0:
            raise SurgeryError("include/exclude select Mixout layers; they need mixout > 0")
        if given_msd_p is not None and msd == 0:
            raise SurgeryError(f"msd_p={given_msd_p!r} is the dropout probability of multi-sample dropout, which is "
                               "off (msd=0); pass msd=K (e.g. msd=8) or drop msd_p")
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
        if head is not None and not isinstance(head, str):
            raise SurgeryTypeError(f"head must be a module name (str), got {type(head).__name__}")
        return cls(mixout, dropout, drop_path, msd, MSD_P_DEFAULT if given_msd_p is None else given_msd_p, head,
                   include, exclude, mixout_head, mixout_tied, target_dtype, low_memory, msd_layers, msd_layer_p,
                   msd_pool, router_noise)

    def record_args(self, head: str | None) -> dict[str, Any]:
        """The record's ``args``: these options, ``head`` as it was resolved, patterns in JSON form."""
        args = dict(mixout=self.mixout, dropout=self.dropout, drop_path=self.drop_path, msd=self.msd,
                    msd_p=self.msd_p, head=head, include=_recorded_pattern(self.include),
                    exclude=_recorded_pattern(self.exclude), mixout_head=self.mixout_head,
                    mixout_tied=self.mixout_tied,
                    target_dtype=str(self.target_dtype).replace("torch.", "") if self.target_dtype else None,
                    low_memory=self.low_memory)
        if self.router_noise is not None:  # written only when given: records of earlier versions compare equal
            args["router_noise"] = self.router_noise
        if self.msd_layers:
            args.update(msd_layers=True, msd_layer_p=self.msd_layer_p, msd_pool=self.msd_pool)
        return args


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


def check_materialised(tensors) -> None:
    """Refuse Mixout on a model whose weights hold no data: its targets would copy nothing.

    ``tensors`` yields ``(kind, name, tensor)``. Dropout control and multi-sample dropout touch no
    tensor data, so they work on a meta model whose weights are loaded afterwards.

    Raises:
        SurgeryError: a parameter or buffer is on the meta device, a fake tensor or uninitialized.
    """
    for kind, name, t in tensors:
        found = _unmaterialised(t)
        if found is not None:
            raise SurgeryError(f"{kind} {name!r} is {found[0]}, so it holds no weights: Mixout copies the "
                               f"pretrained weights as its targets; {found[1]}")
