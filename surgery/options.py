"""The options of ``apply``: how one is declared, checked and recorded, without torch and without the model.

Each regularizer declares its options (:class:`Option`: a name, a default, a check, the words for the
docs, its JSON form in the record); :func:`surgery.regularizers.check_options` turns ``apply``'s
keyword arguments into one :class:`Options` value or raises the one error that names the bad argument
and the fix. The value checks are here: probabilities are real numbers in [0, 1], counts are integers,
flags are real bools. Torch is never imported: a 0-d tensor or a dtype can only be passed once torch
is loaded, so it is looked up in ``sys.modules``.
"""

from __future__ import annotations

import math
import numbers
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from .errors import SurgeryTypeError
from .schema import Check

__all__ = ["Option", "Options", "check_p", "check_count", "check_bool", "check_choice", "check_float_dtype",
           "optional", "dtype_json", "dtype_from_json"]


def _torch():
    return sys.modules.get("torch")


def _tensor_item(value: Any) -> Any:
    """A 0-d real tensor as a Python number (a bool or complex tensor is left as it is, to be refused)."""
    torch = _torch()
    if torch is None or not isinstance(value, torch.Tensor) or value.dim() != 0:
        return value
    if value.dtype == torch.bool or value.is_complex():
        return value
    if value.dtype.is_floating_point:
        dt = value.dtype
        return _shortest(value.item(), lambda c: torch.tensor(c, dtype=dt).item())
    return value.item()


def check_p(value: Any, name: str) -> float:
    """``value`` as a float in [0, 1], or a ValueError naming ``name`` and the range.

    Any real number is accepted (``float``, ``int``, numpy scalars such as ``np.float32(0.1)``,
    a 0-d real tensor), read back at the precision it was written in: ``np.float32(0.1)``
    gives ``0.1``, not ``0.10000000149011612``. Bools, strings and other objects are refused.
    """
    value = _tensor_item(value)
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
    torch = _torch()
    if torch is not None and isinstance(value, torch.Tensor) and value.dim() == 0 \
            and not value.dtype.is_floating_point and not value.dtype.is_complex and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be the number of dropout samples, an int >= 0 (0 = off), got {value!r}")
    return int(value)


def check_choice(*choices: str, why: str = "") -> Callable[[Any, str], str]:
    """A check that accepts one of ``choices`` (``why`` says what they mean)."""
    def check(value: Any, name: str) -> str:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}{f' ({why})' if why else ''}, "
                             f"got {value!r}")
        return value
    return check


def check_float_dtype(value: Any, name: str) -> Any:
    """A floating ``torch.dtype`` (``torch.bfloat16`` ...)."""
    torch = _torch()
    if not (torch is not None and isinstance(value, torch.dtype) and value.is_floating_point):
        raise SurgeryTypeError(f"{name} must be a floating torch.dtype such as torch.bfloat16, got {value!r}")
    return value


def optional(check: Callable[[Any, str], Any]) -> Callable[[Any, str], Any]:
    """``check`` for an option whose ``None`` means "not asked for"."""
    def maybe(value: Any, name: str) -> Any:
        return None if value is None else check(value, name)
    return maybe


def dtype_json(value: Any) -> str | None:
    """A dtype as the record writes it: ``torch.bfloat16`` -> ``"bfloat16"``."""
    return None if value is None else str(value).replace("torch.", "")


def dtype_from_json(value: Any) -> Any:
    """The dtype a record names (imports torch: only ``load_pretrained``, which builds a model, reads it)."""
    if not isinstance(value, str):
        return value
    import torch  # noqa: PLC0415 - reading a record does not need torch; rebuilding a model does

    return getattr(torch, value)


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Option:
    """One keyword argument of ``apply``, declared by the regularizer that reads it.

    Attributes:
        name: the keyword.
        default: its value when not given (the signature's default).
        check: ``check(value, name)`` returns the value to use, or raises the error naming the option.
        doc: what it does, for ``help(surgery.apply)`` and the docs.
        json: what its recorded value must be (the record's ``args.<name>``, checked on read).
        fill: the value used (and recorded) when the default is left, if not the default itself
            (``msd_p``: None means 0.2).
        recorded: ``recorded(opts)`` says whether the record's ``args`` holds it (default: always);
            options added after records were first written are written only when given, so records
            of earlier versions compare equal.
        to_json / from_json: the recorded form and back (``target_dtype``: ``"bfloat16"``).
    """

    name: str
    default: Any
    check: Callable[[Any, str], Any]
    doc: str
    json: Check
    fill: Any = None
    recorded: Callable[["Options"], bool] | None = None
    to_json: Callable[[Any], Any] = _same
    from_json: Callable[[Any], Any] = _same

    def used(self, value: Any) -> Any:
        """The value plans read: ``fill`` when the default was left."""
        return self.fill if value == self.default and self.fill is not None else value


@dataclass(frozen=True)
class Options:
    """The checked options of one ``apply`` call: ``opts.mixout``, ``opts.msd_p`` ...; ``given`` holds the
    names passed with a value other than their default."""

    values: Mapping[str, Any]
    given: frozenset[str] = field(default_factory=frozenset)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(f"no option {name!r}") from None

    def __contains__(self, name: str) -> bool:
        return name in self.values

    @classmethod
    def check(cls, kwargs: Mapping[str, Any], options: Iterable[Option], what: str = "apply") -> "Options":
        """Each keyword checked by its option, in declaration order (the rules between options are the
        regularizers' own, :func:`surgery.regularizers.check_options`).

        Raises:
            SurgeryTypeError: a keyword no option has (the close names listed).
            ValueError / SurgeryTypeError: what the option's check raises.
        """
        known = {o.name: o for o in options}
        unknown = [k for k in kwargs if k not in known]
        if unknown:
            import difflib

            close = difflib.get_close_matches(unknown[0], known, n=3, cutoff=0.6)
            raise SurgeryTypeError(f"{what}() got an unexpected keyword argument {unknown[0]!r}"
                                   + (f"; did you mean {' or '.join(map(repr, close))}?" if close else "")
                                   + f" (its options: {', '.join(known)})")
        values, given = {}, set()
        for name, opt in known.items():
            value = kwargs.get(name, opt.default)
            checked = opt.check(value, name) if name in kwargs else opt.default
            if name in kwargs and not _equal(value, opt.default):
                given.add(name)
            values[name] = opt.used(checked)
        return cls(values, frozenset(given))


def _equal(a: Any, b: Any) -> bool:
    """``a == b`` for option values (a tensor or numpy scalar compares as its number; never raises)."""
    try:
        return bool(a == b) and (a is None) == (b is None) and isinstance(a, bool) == isinstance(b, bool)
    except Exception:  # noqa: BLE001 - a value whose == does not give one bool is not the default
        return False
