"""Nothing half-written: outputs are built under a hidden temporary name beside their
destination (same filesystem) and renamed into place once complete and fsync'ed.

The temporary's name, ``.surgery-tmp-<pid>-<host>-<random>-<name>``, records the process
that makes it and a tag of the machine and boot it runs on (``<host>``), so a temporary
left by a run that ``kill -9`` ended can be told apart from one a live run is writing
(``leftovers.py``). It never exceeds the file system's name limit when DST's name does not."""

from __future__ import annotations

import contextlib
import errno
import functools
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
           "signal_pending", "make_parents", "remove_parents", "os_error", "TMP_PREFIX", "host_tag", "name_max"]

TMP_PREFIX = ".surgery-tmp-"

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


@functools.lru_cache(maxsize=None)
def host_tag() -> str:
    """8 hex digits naming this machine and boot (host name and Linux boot id): a process id
    recorded with the same tag can be checked on this machine; with another tag it cannot.
    (A CRC, not a cryptographic hash: hashlib's OpenSSL would cost convert ~4 MiB of RSS, and
    a collision only means a leftover is judged by a pid that is not its own machine's.)"""
    import zlib

    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    key = (os.uname().nodename + "\0" + boot).encode()
    return f"{zlib.crc32(key):08x}"


def name_max(folder: Path) -> int:
    """The longest file name (bytes) the file system of ``folder`` (or its nearest existing
    ancestor) allows; 255 where it cannot tell."""
    q = folder
    while not os.path.isdir(q) and q != q.parent:
        q = q.parent
    try:
        return int(os.pathconf(q, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def atomic_path(dst: Path) -> Path:
    """A hidden temporary name beside ``dst`` (same filesystem, so renaming is atomic):
    ``.surgery-tmp-<pid>-<host tag>-<random>-<dst name>``, the name cut to the file system's
    limit."""
    head = f"{TMP_PREFIX}{os.getpid()}-{host_tag()}-{uuid.uuid4().hex[:8]}-"
    room = max(name_max(dst.parent) - len(head), 1)
    tail = os.fsencode(dst.name)[:room].decode("utf-8", "ignore") if len(os.fsencode(dst.name)) > room else dst.name
    return dst.parent / (head + tail)


def remove(p: Path) -> bool:
    """Remove ``p`` (a folder with what it holds; a link, not what it points to), best effort:
    a clean-up must never hide the error that made it necessary. True when ``p`` is gone."""
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink()
    except OSError:
        pass
    return not os.path.lexists(p)


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
    """Refuse a DST that cannot be written, before anything is read or written: it overlaps
    SRC (by path, or by what the folders are: ``containment.overlap`` compares device and
    inode, so a bind mount or a second mount is seen through), exists (without
    ``overwrite``), a part of its path is a file, a name in it is longer than the file
    system allows, or the folder it goes in is read-only.

    Raises:
        CheckpointError: naming DST.
    """
    from .containment import overlap

    s, d = src.resolve(), dst.resolve()
    why = "" if d == s or s in d.parents or d in s.parents else overlap(src, dst)
    if why is not None:
        raise CheckpointError(dst, f"DST must not be SRC, inside it or contain it ({why or f'SRC is {src}'}); pick "
                                   "another path")
    if os.path.lexists(dst) and not overwrite:
        raise CheckpointError(dst, "already exists; pass --overwrite (overwrite=True) to replace it")
    missing, q = [dst.name], dst.parent
    while not os.path.lexists(q) and q != q.parent:
        missing.append(q.name)
        q = q.parent
    if not os.path.isdir(q):
        raise CheckpointError(dst, f"cannot be created: {q} is {'a file' if os.path.exists(q) else 'a broken link'}, "
                                   "not a folder; choose another DST")
    limit = name_max(q)
    for name in missing:
        if len(os.fsencode(name)) > limit:
            raise CheckpointError(dst, f"file name too long: {len(os.fsencode(name))} bytes in one name, the file "
                                       f"system allows {limit}; choose a shorter DST")
    if not os.access(q, os.W_OK | os.X_OK):
        try:
            ro = bool(os.statvfs(q).f_flag & getattr(os, "ST_RDONLY", 1))
        except OSError:
            ro = False
        raise CheckpointError(dst, f"cannot be created in {q}: " + ("read-only file system; choose a DST on a "
                                                                     "writable one" if ro else "permission denied"))




def write_json(path: Path, obj: Any, *, mode: int | None = None) -> None:
    """Write ``obj`` as indented JSON to the new file ``path``, fsync'ed; ``mode``: its permission bits."""
    with open(path, "x", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        f.flush()
        if mode is not None:
            os.fchmod(f.fileno(), mode)
        os.fsync(f.fileno())
