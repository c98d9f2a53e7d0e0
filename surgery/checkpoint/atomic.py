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
import stat
import threading
import uuid
from pathlib import Path
from typing import Any

from .common import CheckpointError, lexists, lstat_or_none

__all__ = ["atomic_path", "remove", "fsync_dir", "fsync_tree", "close_quietly", "write_json", "check_dst",
           "signals_blocked", "signal_pending", "make_parents", "remove_parents", "TMP_PREFIX", "host_tag",
           "name_max"]

TMP_PREFIX = ".surgery-tmp-"

_SIGNALS = {s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None}


_held: list[list[int]] = []  # the signals recorded by the active signals_blocked() (at most one: nesting is flat)


@contextlib.contextmanager
def signals_blocked():
    """SIGINT and SIGTERM held back (main thread, where the platform allows): a final rename
    or a cleanup is not cut in half; a signal that came meanwhile is delivered afterwards.

    Masking them in this thread is not enough: a signal sent to the process goes to any
    thread that does not mask it (numpy's BLAS threads, once safetensors has imported numpy),
    and CPython then runs the Python handler in the main thread at once. So while held, the
    Python handlers are replaced by one that only records the signal; on leaving, the real
    handlers are put back and each recorded signal is raised again, once."""
    if _held or not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield  # nested in a block that already holds them, or nothing this thread can hold
        return
    # each signal whose handler Python can put back is swapped; None (a handler set from C) stays as it is,
    # held back by the mask alone
    handlers = {s: h for s in _SIGNALS if (h := signal.getsignal(s)) is not None}
    caught: list[int] = []
    for s in handlers:
        signal.signal(s, lambda signum, frame: caught.append(signum))
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    _held.append(caught)
    try:
        yield
    finally:
        _held.pop()
        signal.pthread_sigmask(signal.SIG_SETMASK, old)  # what was pending is recorded now
        for s, h in handlers.items():
            signal.signal(s, h)
        for s in dict.fromkeys(caught):
            signal.raise_signal(s)


def signal_pending() -> bool:
    """A SIGINT/SIGTERM came and is held back by :func:`signals_blocked`."""
    return bool(_held and _held[-1]) or (hasattr(signal, "sigpending") and bool(signal.sigpending() & _SIGNALS))


def make_parents(p: Path, created: list[Path] | None = None) -> list[Path]:
    """``mkdir -p`` of ``p``; the folders it created, deepest first (for :func:`remove_parents`).
    Each folder is added to ``created`` (deepest first) as soon as it exists, so a caller that
    sees an error still knows what to remove. An I/O error while looking is raised, never
    taken for "missing".

    Raises:
        OSError: a folder could not be looked at or made (without ``created``, those made are
            removed again).
    """
    missing = []
    q = p
    while lstat_or_none(q) is None and q != q.parent:
        missing.append(q)
        q = q.parent
    done: list[Path] = [] if created is None else created
    try:
        for d in reversed(missing):
            os.mkdir(d)
            done.insert(0, d)
    except BaseException:
        if created is None:
            remove_parents(done)
        raise
    return missing


def remove_parents(created: list[Path]) -> list[Path]:
    """Remove the folders :func:`make_parents` created, if they are still empty (each tried
    twice). Returns those still there, deepest first (nothing when all are gone)."""
    for i, d in enumerate(created):
        for attempt in (0, 1):
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST) or attempt:
                    return [q for q in created[i:] if _there(q)]
    return []


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
    """Remove ``p`` (a folder with what it holds; a link, not what it points to), best effort,
    tried twice: a clean-up must never hide the error that made it necessary. True when ``p``
    is known to be gone (a failure to look counts as "still there", so it gets named)."""
    for _ in range(2):
        try:
            st = lstat_or_none(p)
            if st is None:
                return True
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.unlink(p)
        except OSError:
            pass
        if not _there(p):
            return True
    return False


def _there(p: Path) -> bool:
    """Whether ``p`` may still exist: True unless ``lstat`` says it does not."""
    try:
        return lstat_or_none(p) is not None
    except OSError:
        return True


def fsync_dir(p: Path) -> None:
    """Make the entries of folder ``p`` durable (``fsync`` of the folder).

    Raises:
        OSError: the sync failed (an I/O error, no space). A file system that cannot sync a
            folder (EINVAL, ENOTSUP) or a folder that cannot be opened for reading is not an
            error: there is nothing more to do.
    """
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
            raise
    finally:
        close_quietly(fd)


def close_quietly(fd: int) -> None:
    """Close a descriptor whose data needs nothing more (read-only, or already fsync'ed): the
    descriptor is released even when ``close`` reports an error, and there is nothing to redo."""
    try:
        os.close(fd)
    except OSError:
        pass


def fsync_tree(top: Path) -> None:
    """``fsync`` every file and folder under ``top`` (files other code wrote without it:
    transformers' ``config.json``, PEFT's adapter files), folders after what they hold.

    Raises:
        OSError: a file or folder could not be listed, opened or synced.
    """
    for d, dirs, files in os.walk(top, topdown=False, onerror=_raise):
        for n in files:
            q = os.path.join(d, n)
            if stat.S_ISLNK(os.lstat(q).st_mode):
                continue
            fd = os.open(q, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                os.fsync(fd)
            finally:
                close_quietly(fd)
        fsync_dir(Path(d))


def _raise(e: OSError) -> None:
    raise e


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
    if lexists(dst) and not overwrite:
        raise CheckpointError(dst, "already exists; pass --overwrite (overwrite=True) to replace it")
    missing, q = [dst.name], dst.parent
    while not lexists(q) and q != q.parent:
        missing.append(q.name)
        q = q.parent
    kind = _followed_kind(q)
    if kind != "a folder":
        raise CheckpointError(dst, f"cannot be created: {q} is {kind}, "
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


def _followed_kind(q: Path) -> str:
    """"a folder", "a file" or "a broken link", links followed; an I/O error is raised."""
    try:
        return "a folder" if stat.S_ISDIR(os.stat(q).st_mode) else "a file"
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ELOOP):
            return "a broken link"
        raise


def write_json(path: Path, obj: Any, *, mode: int | None = None) -> None:
    """Write ``obj`` as indented JSON to the new file ``path``, fsync'ed; ``mode``: its permission bits."""
    with open(path, "x", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        f.flush()
        if mode is not None:
            os.fchmod(f.fileno(), mode)
        os.fsync(f.fileno())
