"""DST and SRC must not overlap, judged by what the folders *are*, not how their paths read.

A bind mount (``mount --bind``), a second mount of the same file system or a link gives
one folder several paths. Compared as spelled, ``convert SRC DST --overwrite`` with SRC
reached through a bind mount of a folder inside DST passed the "DST contains SRC" check and
deleted the old DST, SRC's real files with it; DST under a bind mount of SRC was written
inside SRC. So every folder is compared by its device and inode (``st_dev``, ``st_ino``;
a bind mount shows the same pair as its source):

* DST inside SRC: a folder on DST's way (DST itself when it exists, and each folder above
  it) is one of SRC's folders;
* DST contains SRC: with an existing DST (``--overwrite`` would replace it and delete what it
  holds), a folder inside DST is SRC or a folder above SRC. DST is walked as its deletion
  would walk it: links not followed, mount points entered.

For a Hugging Face cache snapshot, "SRC" is the cache repository whose ``blobs/`` the
snapshot's links lead into (the files convert reads). A file SRC and an existing DST file
that are one file (a hard link, a bind mount) are refused too.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .trust import MAX_DIR_DEPTH, hf_repo_root

__all__ = ["overlap"]

_Id = tuple[int, int]


def _ident(p: str | Path) -> _Id | None:
    try:
        st = os.stat(p)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _folders(top: Path, depth: int = MAX_DIR_DEPTH + 8) -> dict[_Id, str]:
    """``(dev, ino) -> path`` of ``top`` and every folder below it (links not followed,
    mount points entered, no recursion; a folder that cannot be listed counts itself only)."""
    found: dict[_Id, str] = {}
    first = _ident(top)
    if first is None:
        return found
    found[first] = str(top)
    stack = [(str(top), 0)]
    while stack:
        d, level = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = list(it)
        except OSError:
            continue
        for e in entries:
            try:
                if not e.is_dir(follow_symlinks=False):
                    continue
                st = os.lstat(e.path)  # a mount point: the mounted folder's identity
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if stat.S_ISDIR(st.st_mode) and key not in found:
                found[key] = e.path
                if level < depth:
                    stack.append((e.path, level + 1))
    return found


def _way(real: Path) -> list[Path]:
    """``real`` (when it exists) and every folder above it, nearest first."""
    return [p for p in (real, *real.parents) if os.path.lexists(p)]


def overlap(src: Path, dst: Path) -> str | None:
    """How DST overlaps SRC (words for an error), or None when it does not."""
    s_real, d_real = Path(os.path.realpath(src)), Path(os.path.realpath(dst))
    if os.path.isdir(s_real):
        root = hf_repo_root(s_real) or s_real
        inside = _folders(root)
        for p in _way(d_real):
            q = inside.get(_ident(p))  # type: ignore[arg-type]
            if q is not None:
                return _words(f"DST's folder {p}" if p != d_real else "DST", "inside" if q != str(root) else "", q)
        above = {_ident(p): p for p in _way(root)}
    else:
        s_id = _ident(s_real)
        if s_id is not None and os.path.isfile(d_real) and _ident(d_real) == s_id:
            return "DST is the SRC file itself under another name (a hard link or a mount of the same file)"
        root = s_real
        above = {_ident(p): p for p in _way(s_real.parent)}
    above.pop(None, None)
    if os.path.isdir(dst) and not os.path.islink(dst):  # replaced with --overwrite: what it holds is deleted
        for key, path in _folders(d_real).items():
            if key in above:
                return _words(f"DST's folder {path}" if path != str(d_real) else "DST",
                              "" if above[key] == root else "holding", above[key])
    return None


def _words(what: str, relation: str, folder: str | Path) -> str:
    kind = {"inside": "a folder inside SRC", "holding": "a folder that holds SRC", "": "SRC"}[relation]
    return f"{what} is {folder}, {kind}, reached by another path: a bind mount, a second mount or a link"
