"""Dotted module names: ``include``/``exclude`` patterns, ancestors, the task head by name, and names
grouped by layer pattern for the reader.

A pattern is either a string, matched with :func:`re.fullmatch` against a module's
dotted name, or a list/tuple of names, each matching a module whose dotted name equals
it or ends with ``"." + name``. A module is selected when the pattern matches its name
or the name of any module that contains it, so ``exclude=["classifier"]`` excludes
every layer inside the classifier.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Iterable, Mapping, Sequence, Union

from .errors import HeadError, PatternError, SurgeryTypeError

__all__ = ["Pattern", "compile_pattern", "ancestors", "relative", "close_names", "find_head", "group_names",
           "HEAD_NAMES"]

Pattern = Union[str, Sequence[str], None]

# attribute names transformers task models use for their freshly initialised head
HEAD_NAMES = ("classifier", "score", "classification_head", "qa_outputs")


def ancestors(name: str) -> list[str]:
    """``"a.b.c"`` -> ``["a.b.c", "a.b", "a"]``: the name and every module containing it, nearest first
    (the root, ``""``, left out)."""
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def relative(name: str, prefix: str) -> str | None:
    """``name`` relative to the module ``prefix`` (``""`` for ``prefix`` itself), None when outside it."""
    if not prefix:
        return name
    if name == prefix:
        return ""
    return name[len(prefix) + 1:] if name.startswith(prefix + ".") else None


def close_names(word: str, names: Iterable[str]) -> str:
    names = [n for n in names if n]
    tails = {n.rsplit(".", 1)[-1] for n in names}
    close = difflib.get_close_matches(word, names, n=5, cutoff=0.5)
    close += [t for t in difflib.get_close_matches(word, sorted(tails), n=3, cutoff=0.5) if t not in close]
    return ", ".join(repr(c) for c in close[:6]) if close else "none"


def compile_pattern(pattern: Pattern, names: Sequence[str], argname: str):
    """Validate ``pattern`` against all module ``names``; return ``match(name) -> bool`` or None.

    Raises:
        SurgeryTypeError: the pattern is neither a string nor a sequence of strings.
        PatternError: the regex is invalid, or it (or one of the listed names) matches no module.
    """
    if pattern is None:
        return None
    if isinstance(pattern, str):
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise PatternError(f"{argname}={pattern!r} is not a valid regular expression ({e})") from None
        if not any(rx.fullmatch(n) for n in names if n):
            raise PatternError(
                f"{argname}={pattern!r} (a regex, full match on dotted module names) matches no module; "
                f"close names: {close_names(pattern, names)}"
            )
        return lambda name: any(rx.fullmatch(a) for a in ancestors(name))
    if not isinstance(pattern, (list, tuple, set, frozenset)) or not all(isinstance(p, str) for p in pattern):
        raise SurgeryTypeError(
            f"{argname} must be a regex string or a list of module names, got {type(pattern).__name__}"
        )
    wanted = set(pattern)
    for p in sorted(wanted):
        if not p or not any(n == p or n.endswith("." + p) for n in names):
            raise PatternError(
                f"{argname} entry {p!r} matches no module (a list matches exact dotted names or "
                f"dotted suffixes); close names: {close_names(p, names)}"
            )

    def match(name: str) -> bool:
        for a in ancestors(name):
            for p in wanted:
                if a == p or a.endswith("." + p):
                    return True
        return False

    return match


def find_head(modules: Mapping[str, Any], title: str, head: str | None = None, *,
              required: bool = True) -> str | None:
    """Dotted name of the task head among ``modules`` (name -> module of the model ``title``):
    ``head`` if given (validated), else found by name.

    The automatic search looks for the shallowest module whose last name component is
    one of :data:`HEAD_NAMES`.

    Raises:
        HeadError: ``head`` names no module, or (when ``required``) no head or several
            equally shallow candidates were found.
    """
    if head is not None:
        if not isinstance(head, str):
            raise SurgeryTypeError(f"head must be a module name (str), got {type(head).__name__}")
        if head not in modules or head == "":
            raise HeadError(f"head={head!r} names no module in {title}; close names: {close_names(head, modules)}")
        return head
    found = [n for n in modules if n and n.rsplit(".", 1)[-1] in HEAD_NAMES]
    if found:
        depth = min(n.count(".") for n in found)
        found = [n for n in found if n.count(".") == depth]
    if len(found) == 1:
        return found[0]
    if not required:
        return None
    if not found:
        top = [n for n in modules if n and "." not in n]
        raise HeadError(
            f"no task head found in {title} (looked for modules named {', '.join(HEAD_NAMES)}); "
            f"name it with head=..., e.g. one of the top-level modules: {', '.join(map(repr, top))}"
        )
    raise HeadError(
        f"ambiguous task head in {title}: candidates {', '.join(map(repr, found))}; pick one with head=..."
    )


def _ranges(values: list[int]) -> str:
    values = sorted(set(values))
    out, start = [], values[0]
    for a, b in zip(values, values[1:] + [None]):
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return out[0] if len(out) == 1 and "-" not in out[0] else "{" + ",".join(out) + "}"


def _is_index(part: str) -> bool:
    """A layer index as ``named_modules`` writes one: ASCII digits, no leading zero, at most 18
    of them (``\u00b2``, ``\u0663``, ``007`` or a 5000-digit number stay text, printed as they are)."""
    return part.isascii() and part.isdigit() and len(part) <= 18 and (part == "0" or part[0] != "0")


def group_names(names: list[str]) -> list[str]:
    """``a.0.q, a.1.q, a.2.q`` -> ``a.{0-2}.q (x3)``: one line per layer pattern."""
    groups: dict[tuple, list[list[int]]] = {}
    for n in names:
        parts = n.split(".")
        key = tuple("#" if _is_index(p) else p for p in parts)
        groups.setdefault(key, []).append([int(p) for p in parts if _is_index(p)])
    lines = []
    for key, idx in groups.items():
        parts, slot = [], 0
        for p in key:
            if p == "#":
                parts.append(_ranges([i[slot] for i in idx]))
                slot += 1
            else:
                parts.append(p)
        lines.append(".".join(parts) + (f"  (x{len(idx)})" if len(idx) > 1 else ""))
    return lines
