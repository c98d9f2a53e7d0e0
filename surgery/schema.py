"""Untrusted JSON, checked once and up front: the change record, and the JSON that
checkpoint files carry (safetensors headers, shard indexes, ``config.json``).

Every check raises ``ValueError`` with one line naming the field and what it must be, so a
tampered or corrupt file is refused before anything is written, instead of failing deep
inside the code that reads it (``RecursionError``, ``TypeError: unhashable``, a value
silently ignored). Nesting depth is checked without recursion.
"""

from __future__ import annotations

import json
import math
import reprlib
from typing import Any

__all__ = ["parse_json", "check_depth", "short", "check_record", "MAX_DEPTH"]

MAX_DEPTH = 64  # JSON nesting the files convert reads may have (transformers configs nest 3 or 4 deep)

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict = 2, 60, 60, 4, 4


def short(v: Any) -> str:
    """A short, one-line, recursion-safe rendering of an untrusted value for an error message."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 64:
        return "an integer of thousands of digits" if v.bit_length() > 10_000 else f"an integer of {len(str(abs(v)))} digits"
    if isinstance(v, list) and any(isinstance(x, int) and x.bit_length() > 64 for x in v[:8]):
        return f"a list holding integers past 2**64 ({len(v)} items)"
    return f"{type(v).__name__} {_repr.repr(v)}"


def check_depth(obj: Any, what: str, max_depth: int = MAX_DEPTH) -> None:
    """Refuse JSON nested deeper than ``max_depth`` (iteratively: no RecursionError)."""
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, dict):
            children = o.values()
        elif isinstance(o, (list, tuple)):
            children = o
        else:
            continue
        if d > max_depth:
            raise ValueError(f"{what} is nested more than {max_depth} levels deep")
        stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list, tuple)))


def parse_json(raw: str | bytes, what: str, *, max_depth: int | None = MAX_DEPTH, **kw) -> Any:
    """``json.loads`` for untrusted text: every way it can fail is one ``ValueError`` line
    (bad JSON, bad UTF-8, integers past Python's digit limit, nesting deep enough for a
    RecursionError), and nesting deeper than ``max_depth`` is refused."""
    try:
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8")
        obj = json.loads(raw, **kw)
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} is not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} is not valid JSON ({e.msg}: line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply to read (thousands of levels)") from None
    except ValueError as e:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise ValueError(f"{what} holds a value Python's JSON reader refuses ({' '.join(str(e).split())[:120]})") \
            from None
    if max_depth is not None:
        check_depth(obj, what, max_depth)
    return obj


# ---- the change record -----------------------------------------------------------------

def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _str(v: Any) -> bool:
    return isinstance(v, str) and v.isprintable()  # no newline or escape sequence reaches a terminal


def _path(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(isinstance(k, str) and k and k.isprintable() for k in v)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_prob(v: Any) -> bool:
    return _number(v) and 0 <= v <= 1


def _is_k(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 2**20


_DESC = {_number: "a finite number", _str: "a string of printable characters",
         _path: "a non-empty list of non-empty printable strings",
         _is_bool: "true or false", _is_prob: "a number in [0, 1]", _is_k: "an integer in [1, 1048576]"}

# list field -> {entry field: (check, required)}
_ENTRIES: dict[str, dict[str, tuple[Any, bool]]] = {
    "mixout": {"name": (_str, True), "p": (_is_prob, True), "orig": (_str, False), "transposed": (_is_bool, False),
               "kind": (_str, False)},
    "dropout": {"module": (_str, True), "attr": (_str, True), "old": (_number, True), "new": (_number, False)},
    "config": {"path": (_path, True), "old": (_number, True), "new": (_number, False), "module": (_str, False)},
    "msd": {"name": (_str, True), "k": (_is_k, True), "p": (_is_prob, True)},
    "skipped": {"name": (_str, True), "reason": (_str, True)},
}


def check_record(d: Any) -> None:
    """Check a change-record dict (``Record.to_dict()`` form) field by field.

    Fields this version does not know are ignored (as ``Record.from_dict`` ignores them);
    known fields must have the types ``surgery.apply`` writes.

    Raises:
        ValueError: one line naming the first field that is wrong and what it must be.
    """
    if not isinstance(d, dict):
        raise ValueError(f"the record must be a JSON object, not {short(d)}")
    check_depth(d, "the record", 16)
    args = d.get("args", {})
    if not isinstance(args, dict):
        raise ValueError(f"record field 'args' must be a JSON object, not {short(args)}")
    for field, spec in _ENTRIES.items():
        entries = d.get(field, [])
        if not isinstance(entries, list):
            raise ValueError(f"record field {field!r} must be a list, not {short(entries)}")
        for i, e in enumerate(entries):
            if not isinstance(e, dict):
                raise ValueError(f"record entry {field}[{i}] must be a JSON object, not {short(e)}")
            for key, (check, required) in spec.items():
                if key not in e:
                    if required:
                        raise ValueError(f"record entry {field}[{i}] has no {key!r}")
                    continue
                if not (check(e[key]) or (not required and e[key] is None and key == "new")):
                    raise ValueError(f"record entry {field}[{i}].{key} must be {_DESC[check]}, not {short(e[key])}")
