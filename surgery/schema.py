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
import re
import reprlib
from typing import Any

__all__ = ["parse_json", "check_depth", "short", "check_record", "no_duplicates", "DuplicateKeyError",
           "MAX_DEPTH", "MAX_CONFIG_PATH"]

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


# ---- the change record -----------------------------------------------------------------
#
# The one check of a record read from disk: ``Record.from_dict`` runs it, and every reader
# (``describe`` / ``surgery inspect`` text, ``inspect --json``, ``convert``, ``configs``)
# relies on it for every field it touches. A field added to the record or read by a new
# reader is added here (tests/test_convert_fuzz.py fuzzes every field of these tables).


class _Check:
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


NUMBER = _Check(_finite, "a finite number")
STR = _Check(_text, "a string of printable characters")
BOOL = _Check(lambda v: isinstance(v, bool), "true or false")
PROB = _Check(lambda v: _finite(v) and 0 <= v <= 1, "a number in [0, 1]")
K = _Check(lambda v: _int(v) and 1 <= v <= 2**20, "an integer in [1, 1048576]")
COUNT = _Check(lambda v: _int(v) and 0 <= v <= 2**53, "a non-negative integer")
PATH = _Check(lambda v: isinstance(v, list) and len(v) > 0 and all(_text(k) and k for k in v),
              "a non-empty list of non-empty printable strings")
MAX_CONFIG_PATH = 16  # keys in a config entry's path (transformers configs nest 3 or 4 deep); restoring a longer one
# would write config.json sub-objects SRC never had, nested past what readers take (and past Python's recursion limit)
CONFIG_PATH = _Check(lambda v: PATH(v) and len(v) <= MAX_CONFIG_PATH,
                     f"a non-empty list of at most {MAX_CONFIG_PATH} non-empty printable strings")
STRS = _Check(lambda v: isinstance(v, list) and all(_text(k) for k in v), "a list of printable strings")
VALUES = _Check(lambda v: isinstance(v, list) and len(v) > 0 and all(_finite(x) for x in v),
                "a non-empty list of finite numbers")
OBJECT = _Check(lambda v: isinstance(v, dict), "a JSON object")
LIST = _Check(lambda v: isinstance(v, list), "a list")


def _one_of(*values: str) -> _Check:
    return _Check(lambda v: isinstance(v, str) and v in values, "one of " + ", ".join(map(repr, values)))


def _or_null(c: _Check) -> _Check:
    return _Check(lambda v: v is None or c(v), f"{c.desc} or null")


def _either(a: _Check, b: _Check) -> _Check:
    return _Check(lambda v: a(v) or b(v), f"{a.desc} or {b.desc}")


KIND = _one_of("dropout", "drop_path", "router_noise")  # record.DROPOUT, DROP_PATH, ROUTER_NOISE
POOL = _one_of("first", "last")

# list field -> {entry field: (check, required)}
_ENTRIES: dict[str, dict[str, tuple[_Check, bool]]] = {
    "mixout": {"name": (STR, True), "p": (PROB, True), "orig": (STR, False), "transposed": (BOOL, False),
               "kind": (_one_of("lora", "experts", "router"), False), "params": (PATH, False)},
    "dropout": {"module": (STR, True), "attr": (STR, True), "old": (NUMBER, True), "new": (_or_null(NUMBER), False),
                "kind": (KIND, False)},
    "config": {"path": (CONFIG_PATH, True), "old": (NUMBER, True), "new": (_or_null(NUMBER), False),
               "module": (STR, False), "kind": (KIND, False)},
    "msd": {"name": (STR, True), "k": (K, True), "p": (PROB, True), "layers": (_or_null(OBJECT), False)},
    "skipped": {"name": (STR, True), "reason": (STR, True)},
    "left_on": {"kind": (_one_of("dropout", "drop_path", "router_noise", "sampling"), True), "what": (STR, False),
                "values": (_either(VALUES, _Check(lambda v: v == [], "[]")), True), "modules": (COUNT, True),
                "config": (COUNT, True)},
}
# coverage (surgery/regularizers/coverage.py): trainable weights each regularizer covers, and what Mixout leaves
# plain by kind; {} or absent when apply planned nothing
_COVERAGE: dict[str, tuple[_Check, bool]] = {
    "trainable": (COUNT, True), "mixout": (COUNT, False), "msd": (COUNT, False), "left": (LIST, False)}
_LEFT: dict[str, tuple[_Check, bool]] = {"kind": (STR, True), "weights": (COUNT, True), "names": (STRS, True)}
# msd[i].layers (a layer-weighted MSD head, surgery/regularizers/layer_msd.py)
_LAYERS: dict[str, tuple[_Check, bool]] = {
    "backbone": (STR, True), "n": (K, True), "p": (PROB, True), "pool": (POOL, True), "param": (STR, True),
    "frozen": (STRS, True), "init": (NUMBER, False)}
# args: what apply was called with (engine.py); every key optional, unknown keys ignored
_ARGS: dict[str, tuple[_Check, bool]] = {
    "mixout": (PROB, False), "dropout": (_or_null(PROB), False), "drop_path": (_or_null(PROB), False),
    "msd": (COUNT, False), "msd_p": (PROB, False), "head": (_or_null(STR), False),
    "include": (_or_null(_either(STR, STRS)), False), "exclude": (_or_null(_either(STR, STRS)), False),
    "mixout_head": (BOOL, False), "mixout_tied": (BOOL, False), "target_dtype": (_or_null(STR), False),
    "low_memory": (BOOL, False), "msd_layers": (BOOL, False), "msd_layer_p": (PROB, False), "msd_pool": (POOL, False),
    "router_noise": (_or_null(PROB), False)}


def _check_fields(obj: dict, spec: dict[str, tuple[_Check, bool]], where: str) -> None:
    for key, (check, required) in spec.items():
        if key not in obj:
            if required:
                raise ValueError(f"{where} has no {key!r}")
            continue
        if not check(obj[key]):
            raise ValueError(f"{where}.{key} must be {check.desc}, not {short(obj[key])}")


def _non_finite(d: Any) -> str | None:
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


def check_record(d: Any) -> None:
    """Check a change-record dict (``Record.to_dict()`` form) field by field.

    Fields this version does not know are ignored (as ``Record.from_dict`` ignores them);
    known fields must have the types ``surgery.apply`` writes. No value anywhere may be NaN
    or infinite (not JSON: ``inspect --json`` prints the record).

    Raises:
        ValueError: one line naming the first field that is wrong and what it must be.
    """
    if not isinstance(d, dict):
        raise ValueError(f"the record must be a JSON object, not {short(d)}")
    check_depth(d, "the record", 16)
    if "version" in d and not _int(d["version"]):
        raise ValueError(f"record field 'version' must be an integer, not {short(d['version'])}")
    bad = _non_finite(d)
    if bad is not None:
        raise ValueError(f"record field {_repr.repr(bad)[1:-1]} is NaN or infinite, which is not JSON; "
                         "apply writes finite numbers only")
    if "scope" in d and not _text(d["scope"]):
        raise ValueError(f"record field 'scope' must be {STR.desc}, not {short(d['scope'])}")
    args = d.get("args", {})
    if not isinstance(args, dict):
        raise ValueError(f"record field 'args' must be a JSON object, not {short(args)}")
    _check_fields(args, _ARGS, "record field args")
    cov = d.get("coverage", {})
    if not isinstance(cov, dict):
        raise ValueError(f"record field 'coverage' must be {OBJECT.desc}, not {short(cov)}")
    if cov:
        _check_fields(cov, _COVERAGE, "record field coverage")
        for i, e in enumerate(cov.get("left", [])):
            if not isinstance(e, dict):
                raise ValueError(f"record field coverage.left[{i}] must be {OBJECT.desc}, not {short(e)}")
            _check_fields(e, _LEFT, f"record field coverage.left[{i}]")
    for field, spec in _ENTRIES.items():
        entries = d.get(field, [])
        if not isinstance(entries, list):
            raise ValueError(f"record field {field!r} must be a list, not {short(entries)}")
        for i, e in enumerate(entries):
            where = f"record entry {field}[{i}]"
            if not isinstance(e, dict):
                raise ValueError(f"{where} must be a JSON object, not {short(e)}")
            _check_fields(e, spec, where)
            if field == "msd" and e.get("layers") is not None:
                _check_fields(e["layers"], _LAYERS, f"{where}.layers")
