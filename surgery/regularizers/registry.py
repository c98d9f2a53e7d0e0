"""The registry of regularizers: ``apply``'s keywords, the record's sections and every reader loop over it.

A regularizer is one registered :class:`~surgery.regularizers.unit.Regularizer` (PEFT's
``register_peft_method``, torchao's config-to-handler table): ``register(MyUnit())`` adds its options to
``apply``, its sections to the record (and to the record's check), its lines to ``describe`` and
``surgery inspect``, its rules to ``export``, ``surgery convert`` and ``load_pretrained``. Registration
order is the order of ``describe`` and of the record; planning order puts the units a unit names in
``after`` before it. The option ``head`` belongs to no unit: it names the task head, which the units
that read it resolve once (:class:`~surgery.regularizers.context.Context`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

from ..errors import SurgeryError, SurgeryTypeError
from ..options import Option, Options
from ..schema import STR, or_null
from .unit import Regularizer

__all__ = ["register", "unregister", "registered", "units", "get", "plan_order", "all_options", "check_options",
           "record_args", "apply_kwargs", "section_types", "HEAD", "CORE_SECTIONS"]

HEAD = Option("head", None, lambda v, _: v, json=or_null(STR), doc=(
    "dotted name of the task head; found automatically (``classifier``, ``score``, ``classification_head``, "
    "``qa_outputs``) when None. It names the head of every regularizer that reads one (see theirs)."))
CORE_SECTIONS = ("args", "skipped", "coverage", "scope", "version", "format")  # the record's own fields

_UNITS: dict[str, Regularizer] = {}


def register(unit: Regularizer) -> Regularizer:
    """Add ``unit`` to ``apply`` and to every reader of the record; returns it.

    Raises:
        SurgeryError: a name, option or record section another unit (or the record itself) has.
    """
    if not isinstance(unit, Regularizer) or not unit.name:
        raise SurgeryTypeError(f"register takes a Regularizer instance with a name, got {unit!r}")
    if unit.name in _UNITS:
        raise SurgeryError(f"a regularizer named {unit.name!r} is registered already")
    taken = {o.name: u.name for u in _UNITS.values() for o in u.options} | {HEAD.name: "the task head"}
    taken_sections = {s: u.name for u in _UNITS.values() for s in u.sections} | dict.fromkeys(CORE_SECTIONS, "record")
    for o in unit.options:
        if o.name in taken:
            raise SurgeryError(f"option {o.name!r} of {unit.name!r} is an option of {taken[o.name]!r} already")
    for s in unit.sections:
        if s in taken_sections:
            raise SurgeryError(f"record section {s!r} of {unit.name!r} is written by {taken_sections[s]!r} already")
    _UNITS[unit.name] = unit
    return unit


def unregister(name: str) -> Regularizer:
    """Remove the unit ``name`` (for tests and plugins that register one for a while)."""
    if any(name in u.after for u in _UNITS.values() if u.name != name):
        raise SurgeryError(f"{name!r} is planned before other regularizers; unregister them first")
    return _UNITS.pop(name)


@contextlib.contextmanager
def registered(unit: Regularizer) -> Iterator[Regularizer]:
    """``unit`` registered inside the block."""
    register(unit)
    try:
        yield unit
    finally:
        unregister(unit.name)


def units() -> tuple[Regularizer, ...]:
    """Every registered unit, in registration order (``describe``'s and the record's order)."""
    return tuple(_UNITS.values())


def get(name: str) -> Regularizer:
    return _UNITS[name]


def plan_order() -> list[Regularizer]:
    """The units in planning order: registration order, each after the units its ``after`` names."""
    out: list[Regularizer] = []
    visiting: list[str] = []

    def visit(u: Regularizer) -> None:
        if u in out:
            return
        if u.name in visiting:
            raise SurgeryError(f"regularizers plan after each other in a circle: {' -> '.join(visiting + [u.name])}")
        visiting.append(u.name)
        for a in u.after:
            if a not in _UNITS:
                raise SurgeryError(f"{u.name!r} plans after {a!r}, which is not registered")
            visit(_UNITS[a])
        visiting.pop()
        out.append(u)

    for u in _UNITS.values():
        visit(u)
    return out


def all_options() -> list[Option]:
    """``apply``'s keyword options: every unit's, in registration order, then ``head``."""
    return [o for u in _UNITS.values() for o in u.options] + [HEAD]


def section_types() -> dict[str, Any]:
    """Record section -> its entry type, in record order."""
    return {s: t for u in _UNITS.values() for s, t in u.sections.items()}


def check_options(kwargs: Mapping[str, Any]) -> Options:
    """``apply``'s keyword arguments, checked: every value by its option, then each unit's rules between
    its options, then ``head`` (which needs a unit that reads it). The one place they are checked.

    Raises:
        SurgeryTypeError: an unknown keyword, a flag that is not a bool, a ``head`` that is not a string.
        ValueError: a value outside its range.
        SurgeryError: an option without the option it needs.
    """
    opts = Options.check(kwargs, all_options())
    for u in _UNITS.values():
        u.check(opts)
    _check_head(opts)
    return opts


def _check_head(opts: Options) -> None:
    head = opts.head
    if head is None:
        return
    users = [u for u in plan_order() if u.head_use is not None]
    if not any(u.uses_head(opts) for u in users):
        whats = " or ".join(u.head_use[0] for u in users)
        hows = ", or ".join(u.head_use[1] for u in users)
        neither = "neither" if len(users) == 2 else "none of them"
        raise SurgeryError(f"head={head!r} names {whats}; with {neither} it has no effect: pass {hows}, or drop head")
    if not isinstance(head, str):
        raise SurgeryTypeError(f"head must be a module name (str), got {type(head).__name__}")


def record_args(opts: Options, head: str | None) -> dict[str, Any]:
    """The record's ``args``: each option in its recorded form (``head`` as the units resolved it)."""
    args: dict[str, Any] = {}
    for o in all_options():
        if o is HEAD:
            args["head"] = head
        elif o.recorded is None or o.recorded(opts):
            args[o.name] = o.to_json(getattr(opts, o.name))
    return args


def apply_kwargs(args: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``apply``'s keyword arguments that give the recorded ``args`` (the inverse of :func:`record_args`):
    values at their default left out, ``head`` passed where a unit reads it.

    Raises:
        SurgeryError: an argument no registered unit has (a record of a newer surgery).
    """
    known = {o.name: o for o in all_options()}
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise SurgeryError(f"{where}: the record has apply arguments this surgery does not know "
                           f"({', '.join(unknown)}); it was saved by a newer surgery: upgrade surgery")
    out: dict[str, Any] = {}
    for key, value in args.items():
        o = known[key]
        if o is not HEAD and value != o.to_json(o.used(o.default)):
            out[key] = o.from_json(value)
    if args.get("head") is not None and any(u.uses_head(Options.check(out, all_options())) for u in _UNITS.values()):
        out["head"] = args["head"]  # the head as it was resolved (apply takes head= only where it matters)
    return out
