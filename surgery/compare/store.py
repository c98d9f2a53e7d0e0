"""The output folder of ``surgery compare``: what was asked (``compare.json``) and one file per finished run
(``runs/*.json``), each written whole (a temporary file renamed into place), so a comparison cut short
loses only the run in progress and the same command picks up from there.

A different command on the same folder is refused, naming what differs; ``overwrite`` starts over
(deleting only what compare wrote there).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from .settings import CompareError

__all__ = ["Store", "identity_of_path", "OUTPUTS"]

SETTINGS = "compare.json"
RUNS = "runs"
OUTPUTS = ("results.json", "results.csv", "report.md", "figure.png")
FORMAT = 1


def _hash_file(path: Path, h) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def identity_of_path(path: str | os.PathLike, *, content: bool) -> dict:
    """What identifies a data file or folder (``content``: a sha256 of every byte) or a model folder
    (its config.json hashed, its other files by name and size: weights are not re-read)."""
    p = Path(path).expanduser().resolve()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    h = hashlib.sha256()
    for f in files:
        rel = f.name if f == p else str(f.relative_to(p))
        h.update(rel.encode("utf-8", "surrogateescape") + b"\0")
        if content or f.name == "config.json":
            _hash_file(f, h)
        else:
            h.update(str(f.stat().st_size).encode())
    return {"path": str(p), "sha256": h.hexdigest()}


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _show(v) -> str:
    if isinstance(v, dict) and "path" in v:
        return v["path"]
    if isinstance(v, list):
        return " ".join(map(str, v)) if v else "(none)"
    return str(v)


def _normal(identity, defaults: dict):
    """``identity`` without the entries that equal their default (None where it is no dict)."""
    if not isinstance(identity, dict):
        return None
    return {k: v for k, v in identity.items() if not (k in defaults and v == defaults[k])}


class Store:
    """The output folder ``out`` of a comparison identified by ``identity`` (a JSON-ready dict); entries equal
    to their value in ``defaults`` do not count (so a setting added later, left at its default, changes nothing)."""

    def __init__(self, out: str | os.PathLike, identity: dict, defaults: dict | None = None):
        self.out = Path(out).expanduser()
        self.defaults = json.loads(json.dumps(defaults or {}))
        self.identity = json.loads(json.dumps(identity))  # as it reads back: lists, not tuples
        self.runs_dir = self.out / RUNS

    def open(self, *, overwrite: bool) -> dict[str, dict]:
        """Create or reopen the folder; the records of the runs already finished there, by key.

        Raises:
            CompareError: the folder holds a comparison with other settings (without ``overwrite``), or
                is not a compare folder and not empty, or is a file.
        """
        if self.out.exists() and not self.out.is_dir():
            raise CompareError(f"--out {self.out} is a file; give a folder")
        stored = self.out / SETTINGS
        if self.out.is_dir() and not stored.is_file() and any(self.out.iterdir()):
            raise CompareError(f"--out {self.out} holds other files and no {SETTINGS}: not a surgery compare folder; "
                               "give a new or empty folder")
        if stored.is_file():
            try:
                before = json.loads(stored.read_text(encoding="utf-8"))
            except ValueError:
                before = None
            same = (isinstance(before, dict) and before.get("format") == FORMAT
                    and _normal(before.get("comparison"), self.defaults) == _normal(self.identity, self.defaults))
            if not same:
                if not overwrite:
                    raise CompareError(self._difference(before))
                self._clear()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        if not stored.is_file():
            _write_json(stored, self._content())
        done = {}
        for f in sorted(self.runs_dir.glob("*.json")):
            try:
                rec = json.loads(f.read_text(encoding="utf-8"))
            except ValueError:
                continue  # cannot happen with the atomic writes; a damaged file is run again
            if isinstance(rec, dict) and "key" in rec:
                done[rec["key"]] = rec
        return done

    def _content(self) -> dict:
        return {"format": FORMAT, "comparison": self.identity}

    def _difference(self, before) -> str:
        where = f"--out {self.out} holds runs of a different comparison"
        fix = "give another --out, or --overwrite to delete those runs and start over"
        old = _normal((before or {}).get("comparison") if isinstance(before, dict) else None, self.defaults)
        if old is None:
            return f"{where} (its {SETTINGS} is unreadable); {fix}"
        new = _normal(self.identity, self.defaults)
        def value(d, k):
            return d.get(k, self.defaults.get(k))

        keys = [k for k in sorted(set(old) | set(new)) if value(old, k) != value(new, k)]
        shown = "; ".join(f"{k}: {_show(value(old, k))} there, {_show(value(new, k))} here" for k in keys[:3])
        more = f" (and {len(keys) - 3} more)" if len(keys) > 3 else ""
        return f"{where} ({shown}{more}); {fix}"

    def _clear(self) -> None:
        if self.runs_dir.is_dir():
            shutil.rmtree(self.runs_dir)
        for name in (SETTINGS, *OUTPUTS):
            (self.out / name).unlink(missing_ok=True)

    def save(self, key: str, record: dict) -> None:
        """Write one finished run (atomically: the file is there whole or not at all)."""
        safe = "".join(c if c.isalnum() or c in "-_.=+," else "_" for c in key)
        _write_json(self.runs_dir / f"{safe}.json", {"key": key, **record})
