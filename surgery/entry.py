"""Typed change-record entries over their JSON form.

A record section (``mixout``, ``dropout``, ``msd`` ...) is a list of entries of one type, declared by
the regularizer that writes it. An :class:`Entry` subclass declares its fields (:class:`Field`: the
check of the JSON value, whether it is required); an instance reads and writes its JSON object
through them (``entry.name``, ``entry.kind``), so readers never branch on which keys a dict holds, and
the JSON is exactly what was read or written: a field left out stays out, a field this version does
not know is kept as it is. The same declarations check an entry read from disk
(:meth:`Entry.check`, run by :func:`surgery.record.check_record`).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

from .schema import OBJECT, Check, check_fields, short

__all__ = ["Field", "Entry"]


class Field:
    """One field of an entry: ``check`` the JSON value must pass, ``required``, and the ``default`` read
    when it is absent. ``entry``: the Entry type of a nested object (``msd[i].layers``)."""

    def __init__(self, check: Check, *, required: bool = False, default: Any = None, entry: type | None = None):
        self.check, self.required, self.default, self.entry = check, required, default, entry
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        value = obj._json.get(self.name, self.default)
        if self.entry is not None and isinstance(value, dict):
            return self.entry.from_json(value)
        return value

    def __set__(self, obj: Any, value: Any) -> None:
        obj._json[self.name] = value.to_json() if isinstance(value, Entry) else value


class Entry:
    """A typed record entry. Subclasses declare :class:`Field` attributes; ``NAME`` is the field naming a
    module of the model (what a sub-model's part of the record makes relative: ``surgery.configs``)."""

    NAME: ClassVar[str | None] = "name"

    def __init__(self, **values: Any):
        fields = self.fields()
        unknown = set(values) - set(fields)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {sorted(unknown)[0]!r}")
        self._json: dict[str, Any] = {}
        for name in fields:  # declaration order: the JSON key order
            value = values.get(name)
            if value is not None:  # a None field is left out (absent reads as its default)
                setattr(self, name, value)

    @classmethod
    def fields(cls) -> dict[str, Field]:
        out: dict[str, Field] = {}
        for klass in reversed(cls.__mro__):
            out.update({k: v for k, v in vars(klass).items() if isinstance(v, Field)})
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Entry":
        """The entry over ``d`` (checked by :meth:`check` before, when read from disk)."""
        new = cls.__new__(cls)
        new._json = dict(d)
        return new

    def to_json(self) -> dict[str, Any]:
        return copy.deepcopy(self._json)

    def moved(self, name: str) -> "Entry":
        """A copy naming ``name`` instead (``NAME``)."""
        return type(self).from_json({**self._json, self.NAME: name})

    @classmethod
    def check(cls, d: Any, where: str) -> None:
        """Raise one ValueError naming the first field of ``d`` that is not what this entry writes."""
        if not isinstance(d, dict):
            raise ValueError(f"{where} must be {OBJECT.desc}, not {short(d)}")
        fields = cls.fields()
        check_fields(d, {k: (f.check, f.required) for k, f in fields.items()}, where)
        for key, f in fields.items():
            if f.entry is not None and isinstance(d.get(key), dict):
                f.entry.check(d[key], f"{where}.{key}")

    def __eq__(self, other: Any) -> bool:
        return type(other) is type(self) and other._json == self._json

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self._json.items())})"
