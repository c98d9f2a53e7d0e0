"""Nothing half-written: outputs are built under a hidden temporary name beside their
destination (same filesystem) and renamed into place once complete and fsync'ed."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from .common import CheckpointError

__all__ = ["atomic_path", "commit", "remove", "fsync_dir", "write_json", "check_dst"]


def atomic_path(dst: Path) -> Path:
    """A hidden temporary name beside ``dst`` (same filesystem, so renaming is atomic)."""
    return dst.parent / f".surgery-tmp-{dst.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def fsync_dir(p: Path) -> None:
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit(tmp: Path, dst: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``dst``; an existing ``dst`` is replaced only with ``overwrite``.

    Raises:
        CheckpointError: ``dst`` exists and ``overwrite`` is False.
    """
    if os.path.lexists(dst):
        if not overwrite:
            raise CheckpointError(dst, "already exists; pass --overwrite (overwrite=True) to replace it")
        if tmp.is_dir() or (dst.is_dir() and not dst.is_symlink()):
            old = atomic_path(dst)
            os.rename(dst, old)
            try:
                os.rename(tmp, dst)
            except BaseException:
                os.rename(old, dst)
                raise
            remove(old)
        else:
            os.replace(tmp, dst)
    else:
        os.rename(tmp, dst)
    fsync_dir(dst.parent)


def check_dst(src: Path, dst: Path, overwrite: bool) -> None:
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents or d in s.parents:
        raise CheckpointError(dst, f"DST must not be SRC, inside it or contain it (SRC is {src}); pick another path")
    if os.path.lexists(dst) and not overwrite:
        raise CheckpointError(dst, "already exists; pass --overwrite (overwrite=True) to replace it")




def write_json(path: Path, obj: Any) -> None:
    with open(path, "x", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
