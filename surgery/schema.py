"""Untrusted JSON, checked once and up front: the JSON that checkpoint files carry (safetensors
headers, shard indexes, ``config.json``, the change record), and the checks its fields are declared with.

Every check raises ``ValueError`` with one line naming the field and what it must be, so a
tampered or corrupt file is refused before anything is written, instead of failing deep
inside the code that reads it (``RecursionError``, ``TypeError: unhashable``, a value
silently ignored). Nesting depth is checked without recursion.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
from typing import Any

__all__ = ["parse_json", "check_depth", "short", "brief", "no_duplicates", "DuplicateKeyError", "MAX_DEPTH", "Check",
           "check_fields", "non_finite", "one_of", "or_null", "either", "NUMBER", "STR", "BOOL", "INT", "PROB", "K",
           "COUNT", "PATH", "CONFIG_PATH", "MAX_CONFIG_PATH", "STRS", "VALUES", "OBJECT", "LIST"]

MAX_DEPTH = 64  # JSON nesting the files convert reads may have (transformers configs nest 3 or 4 deep)

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict = 2, 60, 60, 4, 4


def brief(v: Any) -> str:
    """``repr(v)``, cut short (strings to 60 characters, containers to 4 items)."""
    return _repr.repr(v)


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


class DuplicateKeyError(ValueError):
    """A JSON object with the same key twice (readers disagree on which one counts)."""

    def __init__(self, key: str):
        self.key = key
        super().__init__(key)


def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` that refuses a key given twice in one object."""
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        raise DuplicateKeyError(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return d


class _NotJSON(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NotJSON(name)


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a UTF-16 surrogate, high or low


def _lone_surrogate(obj: Any) -> str | None:
    """The first string (key or value) holding an unpaired UTF-16 surrogate, iteratively."""
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)
        elif isinstance(o, str) and not o.isascii():
            try:
                o.encode("utf-8")
            except UnicodeEncodeError:
                return o
    return None


def parse_json(raw: str | bytes | bytearray, what: str, *, max_depth: int | None = MAX_DEPTH,
               constants: bool = True, object_pairs_hook: Any = no_duplicates) -> Any:
    """``json.loads`` for untrusted text: every way it can fail is one ``ValueError`` line
    (bad JSON, bad UTF-8, integers past Python's digit limit, nesting deep enough for a
    RecursionError), and nesting deeper than ``max_depth`` is refused.

    Stricter than ``json.loads`` where other readers (safetensors' Rust parser, ``jq``) are:
    bytes must be UTF-8 (no UTF-16/32 guessing), no byte order mark, no key twice in one
    object (``object_pairs_hook`` must refuse duplicates with :class:`DuplicateKeyError`),
    no unpaired surrogate escape (``"\\ud800"``), and, with ``constants=False``, no
    ``NaN``/``Infinity``."""
    if isinstance(raw, (bytes, bytearray)):
        if b"\0" in raw[:4]:
            raise ValueError(f"{what} is encoded as UTF-16 or UTF-32, not UTF-8")
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{what} is not UTF-8 ({e.reason} at byte {e.start})") from None
    if raw.startswith("\ufeff"):
        raise ValueError(f"{what} starts with a byte order mark (BOM), which strict JSON readers (safetensors, "
                         "Python's json) refuse; save it as UTF-8 without a BOM")
    kw: dict[str, Any] = {"object_pairs_hook": object_pairs_hook}
    if not constants:
        kw["parse_constant"] = _refuse_constant
    try:
        obj = json.loads(raw, **kw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} is not valid JSON ({e.msg}: line {e.lineno} column {e.colno})") from None
    except DuplicateKeyError as e:
        raise ValueError(f"{what} has the key {_repr.repr(e.key)} twice in one object; JSON readers disagree on which "
                         "one counts, so it is refused") from None
    except _NotJSON as e:
        raise ValueError(f"{what} holds {e}, which is not JSON (safetensors and jq refuse it)") from None
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply to read (thousands of levels)") from None
    except ValueError as e:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise ValueError(f"{what} holds a value Python's JSON reader refuses ({' '.join(str(e).split())[:120]})") \
            from None
    if _SURROGATE_ESCAPE.search(raw):
        bad = _lone_surrogate(obj)
        if bad is not None:
            raise ValueError(f"{what} holds a string with an unpaired UTF-16 surrogate escape ({_repr.repr(bad)}), which "
                             "is not Unicode text; safetensors refuses it")
    if max_depth is not None:
        check_depth(obj, what, max_depth)
    return obj


# ---- checks of JSON values ----------------------------------------------------------------
#
# The primitives every reader of a record uses: a change record's fields are declared with them by the
# regularizer that writes them (its entry types, ``surgery/entry.py``, and its options,
# ``surgery/options.py``); ``surgery.record.check_record`` runs them all (tests/checkpoint/test_convert_fuzz.py
# fuzzes every field).


class Check:
    """A predicate on one JSON value and the words for what it must be."""

    def __init__(self, ok: Any, desc: str):
        self.ok, self.desc = ok, desc

    def __call__(self, v: Any) -> bool:
        return self.ok(v)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v: Any) -> bool:
    return type(v) is int


def _text(v: Any) -> bool:
    return isinstance(v, str) and v.isprintable()  # no newline or escape sequence reaches a terminal


NUMBER = Check(_finite, "a finite number")
STR = Check(_text, "a string of printable characters")
BOOL = Check(lambda v: isinstance(v, bool), "true or false")
INT = Check(_int, "an integer")
PROB = Check(lambda v: _finite(v) and 0 <= v <= 1, "a number in [0, 1]")
K = Check(lambda v: _int(v) and 1 <= v <= 2**20, "an integer in [1, 1048576]")
COUNT = Check(lambda v: _int(v) and 0 <= v <= 2**53, "a non-negative integer")
PATH = Check(lambda v: isinstance(v, list) and len(v) > 0 and all(_text(k) and k for k in v),
             "a non-empty list of non-empty printable strings")
MAX_CONFIG_PATH = 16  # keys in a config entry's path (transformers configs nest 3 or 4 deep); restoring a longer one
# would write config.json sub-objects SRC never had, nested past what readers take (and past Python's recursion limit)
CONFIG_PATH = Check(lambda v: PATH(v) and len(v) <= MAX_CONFIG_PATH,
                    f"a non-empty list of at most {MAX_CONFIG_PATH} non-empty printable strings")
STRS = Check(lambda v: isinstance(v, list) and all(_text(k) for k in v), "a list of printable strings")
VALUES = Check(lambda v: isinstance(v, list) and len(v) > 0 and all(_finite(x) for x in v),
               "a non-empty list of finite numbers")
OBJECT = Check(lambda v: isinstance(v, dict), "a JSON object")
LIST = Check(lambda v: isinstance(v, list), "a list")


def one_of(*values: str) -> Check:
    return Check(lambda v: isinstance(v, str) and v in values, "one of " + ", ".join(map(repr, values)))


def or_null(c: Check) -> Check:
    return Check(lambda v: v is None or c(v), f"{c.desc} or null")


def either(a: Check, b: Check) -> Check:
    return Check(lambda v: a(v) or b(v), f"{a.desc} or {b.desc}")


def check_fields(obj: dict, spec: dict[str, tuple[Check, bool]], where: str) -> None:
    """Raise one ValueError naming the first field of ``obj`` that ``spec`` (field -> (check, required))
    refuses; fields ``spec`` does not name are left alone."""
    for key, (check, required) in spec.items():
        if key not in obj:
            if required:
                raise ValueError(f"{where} has no {key!r}")
            continue
        if not check(obj[key]):
            raise ValueError(f"{where}.{key} must be {check.desc}, not {short(obj[key])}")


def non_finite(d: Any) -> str | None:
    """The path of the first NaN or infinity anywhere in ``d`` (iteratively), else None."""
    stack: list[tuple[Any, str]] = [(d, "")]
    while stack:
        o, path = stack.pop()
        if isinstance(o, float) and not math.isfinite(o):
            return path or "(the record)"
        if isinstance(o, dict):
            stack.extend((v, f"{path}.{k}" if path else str(k)) for k, v in o.items())
        elif isinstance(o, list):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(o))
    return None
