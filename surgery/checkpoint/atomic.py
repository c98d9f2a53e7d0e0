"""Nothing half-written: outputs are built under a hidden temporary name beside their
destination (same filesystem) and renamed into place once complete and fsync'ed."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import threading
import uuid
from pathlib import Path
from typing import Any

from .common import CheckpointError

__all__ = ["atomic_path", "commit", "remove", "fsync_dir", "write_json", "check_dst", "signals_blocked",
           "signal_pending", "make_parents", "remove_parents", "os_error"]

_SIGNALS = {s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None}


@contextlib.contextmanager
def signals_blocked():
    """SIGINT and SIGTERM held back (main thread, where the platform allows): a final rename
    or a cleanup is not cut in half; a signal that came meanwhile is delivered afterwards."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def signal_pending() -> bool:
    """A SIGINT/SIGTERM is waiting (held back by :func:`signals_blocked`)."""
    return hasattr(signal, "sigpending") and bool(signal.sigpending() & _SIGNALS)


def make_parents(p: Path) -> list[Path]:
    """``mkdir -p`` of ``p``; the folders it created, deepest first (for :func:`remove_parents`)."""
    missing = []
    q = p
    while not os.path.lexists(q) and q != q.parent:
        missing.append(q)
        q = q.parent
    done: list[Path] = []
    try:
        for d in reversed(missing):
            os.mkdir(d)
            done.insert(0, d)
    except BaseException:
        remove_parents(done)
        raise
    return missing


def remove_parents(created: list[Path]) -> None:
    """Remove the folders :func:`make_parents` created, if they are still empty."""
    for d in created:
        try:
            os.rmdir(d)
        except OSError:
            break


_FIX = {errno.EEXIST: "it already exists", errno.EROFS: "read-only file system; choose a DST on a writable one",
        errno.ENOSPC: "no space left on the device; free some or choose another DST",
        errno.EDQUOT: "disk quota exceeded; free some space or choose another DST",
        errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
        errno.ENOTDIR: "a part of the path is not a directory", errno.ENAMETOOLONG: "file name too long",
        errno.EIO: "input/output error (a failing disk?)"}


def os_error(e: OSError, *, tmp: Path | None = None, dst: Path | None = None) -> tuple[str, str]:
    """``(file, problem)`` for an OSError: the file as the user knows it (DST, never the
    hidden temporary) and the problem in words, without ``[Errno N]``."""
    name = str(e.filename) if e.filename is not None else str(dst or "")
    if tmp is not None and dst is not None and name.startswith(str(tmp)):
        name = str(dst) + name[len(str(tmp)):]
    problem = _FIX.get(e.errno) or (e.strerror or type(e).__name__).lower()
    return name, problem


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




def write_json(path: Path, obj: Any, *, mode: int | None = None) -> None:
    """Write ``obj`` as indented JSON to the new file ``path``, fsync'ed; ``mode``: its permission bits."""
    with open(path, "x", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        f.flush()
        if mode is not None:
            os.fchmod(f.fileno(), mode)
        os.fsync(f.fileno())
