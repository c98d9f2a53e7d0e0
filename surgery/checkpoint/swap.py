"""Putting a finished DST in place: at every moment DST is the old one or the complete new one,
and when a step fails the error says exactly what is where.

DST is built under a hidden temporary beside it (:class:`Staging`, ``atomic.py``), fsync'ed,
then put in place:

* a new DST: ``renameat2(RENAME_NOREPLACE)``, so a DST that appeared meanwhile is never
  replaced unasked (where the C library, kernel or file system lacks it: a check, then
  ``rename``);
* ``overwrite`` of a file by a file: ``rename``, which replaces it in one step;
* ``overwrite`` of a folder (or of a file by a folder, or the reverse):
  ``renameat2(RENAME_EXCHANGE)`` swaps the two in one step; the old one, now under the
  temporary's name, is then removed. Where exchange is not available the old DST is renamed
  aside, the new one renamed in, and if that fails the old one renamed back; only when that
  fails too is DST missing, and the error names where the old DST is;
* export into an existing folder (:meth:`Staging.merge`, what ``save_pretrained`` does: other
  files stay): the entries being replaced or removed are first moved aside into a hidden
  folder, then the new ones moved in; a failure undoes the moves in reverse order.

Once DST is in place, what cannot be finished (removing the old copy, syncing the folder) is
returned as *notes*, not raised: DST is the new checkpoint, and an error would say it is not
(the CLI prints them as warnings and exits 0). Before that, any failure leaves DST as it was,
removes the temporary and the parent folders this run created, and the error names whatever
could not be removed.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
import sys
import warnings
from pathlib import Path
from typing import Iterable

from .. import interrupts
from .atomic import TMP_PREFIX, atomic_path, fsync_dir, make_parents, remove, remove_parents, signals_blocked
from .common import CheckpointError, CheckpointWarning, lexists, lstat_or_none, os_error

__all__ = ["Staging", "SwapError", "place", "RENAME_NOREPLACE", "RENAME_EXCHANGE"]

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2  # linux/fs.h
_AT_FDCWD = -100
_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP)


class SwapError(CheckpointError):
    """Replacing DST failed after the old DST was moved aside, and it could not be moved back:
    the message names where it is."""


@functools.lru_cache(maxsize=None)
def _libc_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (ImportError, OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


def _renameat2(src: Path, dst: Path, flags: int) -> None:
    """``renameat2(2)``; an error is raised as ``os.rename`` raises it.

    Raises:
        NotImplementedError: the C library, the kernel or the file system lacks the call or
            the flag (the caller falls back to ``rename``).
        OSError: the rename failed.
    """
    fn = _libc_renameat2()
    if fn is None:
        raise NotImplementedError
    import ctypes

    a, b = os.fsencode(src), os.fsencode(dst)
    while fn(_AT_FDCWD, a, _AT_FDCWD, b, flags) != 0:
        e = ctypes.get_errno()
        if e == errno.EINTR:  # ctypes, unlike os.rename, does not retry (PEP 475)
            continue
        if e in _UNSUPPORTED:
            raise NotImplementedError
        raise OSError(e, os.strerror(e), os.fspath(src), None, os.fspath(dst))


def _is_dir(p: Path) -> bool:
    st = lstat_or_none(p)
    return st is not None and stat.S_ISDIR(st.st_mode)


def _exists_error(dst: Path) -> CheckpointError:
    return CheckpointError(dst, "already exists; pass --overwrite (overwrite=True) to replace it")


def _rename_new(tmp: Path, dst: Path) -> None:
    """``tmp`` to the new name ``dst``; FileExistsError when something is there."""
    try:
        _renameat2(tmp, dst, RENAME_NOREPLACE)
        return
    except NotImplementedError:
        pass
    if lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(dst))
    os.rename(tmp, dst)


def _swap(tmp: Path, dst: Path) -> Path:
    """Put ``tmp`` at ``dst`` in place of what is there; where the old one now is."""
    try:
        _renameat2(tmp, dst, RENAME_EXCHANGE)
        return tmp
    except NotImplementedError:
        pass
    old = atomic_path(dst)
    os.rename(dst, old)  # the old DST aside: from here on, a failure must put it back
    try:
        os.rename(tmp, dst)
    except BaseException as e:
        try:
            os.rename(old, dst)
        except OSError:
            problem = os_error(e)[1] if isinstance(e, OSError) else type(e).__name__
            raise SwapError(dst, f"write failed ({problem}) while replacing DST, and the old DST could not be put "
                                 f"back: it is at {old}; rename it to {dst.name}") from None
        raise
    return old


def _synced(folder: Path, what: str) -> list[str]:
    try:
        fsync_dir(folder)
    except OSError as e:
        return [f"DST was {what}, but its folder {folder} could not be synced to disk ({os_error(e)[1]}): after a "
                "crash or power loss the change may be lost"]
    return []


def place(tmp: Path, dst: Path, overwrite: bool) -> list[str]:
    """Put the finished ``tmp`` (a file or a folder) at ``dst`` (see the module docstring).

    Returns:
        notes on what could not be finished after DST was in place (nothing when all went well).

    Raises:
        CheckpointError: ``dst`` exists and ``overwrite`` is False (DST untouched).
        SwapError: the old DST was moved aside and could not be moved back (named in it).
        OSError: before DST changed; DST is as it was.
    """
    if not overwrite or not lexists(dst):
        try:
            _rename_new(tmp, dst)
            return _synced(dst.parent, "written")
        except FileExistsError:
            if not overwrite:
                raise _exists_error(dst) from None
            # it appeared meanwhile: replaced below, as asked
    if not _is_dir(tmp) and not _is_dir(dst):
        os.replace(tmp, dst)  # a file (or link) by a file: one step, nothing old left over
        return _synced(dst.parent, "replaced")
    old = _swap(tmp, dst)
    notes = [] if remove(old) else [f"DST was replaced, but the old copy could not be removed: {old}; remove it "
                                    "yourself"]
    return notes + _synced(dst.parent, "replaced")



def _merge(tmp: Path, path: Path, stale: Iterable[str]) -> list[str]:
    """Move every entry of the folder ``tmp`` into the existing folder ``path`` (replacing
    entries of the same name) and remove the entries of ``path`` named in ``stale``: all or
    nothing against errors. Returns notes, as :func:`place`.

    Raises:
        OSError: before ``path`` changed, or after a failure that was undone.
        SwapError: a failure that could not be undone (where the old entries are is named).
    """
    new = sorted(os.listdir(tmp))
    out = [n for n in sorted(set(new) | set(stale)) if lexists(path / n)]
    aside = atomic_path(path)
    os.mkdir(aside, 0o700)
    moved_out: list[str] = []
    moved_in: list[str] = []
    try:
        for n in out:
            os.rename(path / n, aside / n)
            moved_out.append(n)
        for n in new:
            os.rename(tmp / n, path / n)
            moved_in.append(n)
    except BaseException as e:
        stuck = _undo(tmp, path, aside, moved_in, moved_out)
        if stuck:
            problem = os_error(e)[1] if isinstance(e, OSError) else type(e).__name__
            raise SwapError(path, f"write failed ({problem}) while replacing files in DST, and DST could not be put "
                                  f"back as it was: {stuck}") from None
        raise
    notes = [] if remove(aside) else [f"DST was updated, but its old files could not be removed: {aside}; remove "
                                      "it yourself"]
    return notes + _synced(path, "updated")


def _undo(tmp: Path, path: Path, aside: Path, moved_in: list[str], moved_out: list[str]) -> str:
    """Undo the moves of :func:`_merge` in reverse order; what could not be undone, in words
    (empty when DST is as it was)."""
    new_left, old_left = [], []
    for n in reversed(moved_in):
        try:
            os.rename(path / n, tmp / n)
        except OSError:
            new_left.append(n)
    for n in reversed(moved_out):
        try:
            os.rename(aside / n, path / n)
        except OSError:
            old_left.append(n)
    if not new_left and not old_left:
        if not remove(aside):
            return f"its old files are back, but the empty folder {aside} could not be removed"
        return ""
    words = []
    if new_left:
        words.append(f"the new {', '.join(sorted(new_left))} are in it")
    if old_left:
        words.append(f"the old {', '.join(sorted(old_left))} are in {aside}")
    return "; ".join(words)


class Staging:
    """DST built under a hidden temporary beside it, then put in place: ::

        with Staging(dst, overwrite=True) as st:
            write(st.tmp)          # a file or a folder
            st.place()             # or st.merge(stale) into an existing folder
        st.notes                   # what could not be finished after DST was in place

    Entering creates DST's missing parent folders. Leaving with an error removes the
    temporary and those folders and raises one error naming DST (never the temporary) that
    says whether DST is as it was and names anything that could not be removed; a
    ``KeyboardInterrupt`` is raised again, with that list as its message.

    Raises:
        CheckpointError: ``dst`` exists and ``overwrite`` is False; DST's folder cannot be
            made; a failed write (the first error, then what is left).
    """

    def __init__(self, dst: str | os.PathLike, *, overwrite: bool):
        self.dst, self.overwrite = Path(dst), overwrite
        self.tmp: Path | None = None
        self.created: list[Path] = []
        self.notes: list[str] = []
        self.existed = True  # until known: "DST was left as it was" is true either way
        self.placed = False

    def __enter__(self) -> "Staging":
        try:
            self.existed = lexists(self.dst)
            if self.existed and not self.overwrite:
                raise _exists_error(self.dst)
            try:
                make_parents(self.dst.parent, self.created)
            except OSError as e:
                name, problem = os_error(e, dst=self.dst)
                raise CheckpointError(name, f"cannot create DST's folder ({problem})") from None
            self.tmp = atomic_path(self.dst)
        except BaseException as e:
            raise self._failed(e) from None
        return self

    def place(self, *, overwrite: bool | None = None) -> None:
        """Put the finished temporary at DST (:func:`place`; ``overwrite`` defaults to the
        Staging's), SIGINT/SIGTERM held back."""
        with signals_blocked():
            self.notes += place(self.tmp, self.dst, self.overwrite if overwrite is None else overwrite)
            self.placed = True

    def merge(self, stale: Iterable[str] = ()) -> None:
        """Move the entries of the finished temporary folder into DST, an existing folder,
        and remove DST's entries named in ``stale`` (all or nothing, see :func:`_merge`),
        SIGINT/SIGTERM held back."""
        with signals_blocked():
            self.notes += _merge(self.tmp, self.dst, stale)
            self.placed = True
            if not remove(self.tmp):
                self.notes.append(f"the empty temporary {self.tmp} could not be removed")

    def warn(self) -> None:
        """Each note as a :class:`CheckpointWarning` (the Python API's way to say them)."""
        for note in self.notes:
            warnings.warn(f"{self.dst}: {note}", CheckpointWarning, stacklevel=3)

    def __exit__(self, typ, e, tb) -> bool:
        if e is None:
            self.notes += self._sync_parents()
            return False
        if self.placed:
            return False
        raise self._failed(e) from None

    def _sync_parents(self) -> list[str]:
        """The new parent folders' own entries made durable (DST's was synced when placed)."""
        notes: list[str] = []
        for d in self.created:
            notes += _synced(d.parent, "written")
        return notes

    def _failed(self, e: BaseException) -> BaseException:
        """The error to raise for ``e``, after removing the temporary and the new parent folders."""
        with signals_blocked():  # the clean-up never raises: the first error is the one reported
            interrupts.test_hook("cleanup")
            left = [] if self.tmp is None or remove(self.tmp) else [f"the temporary {self.tmp}"]
            left += [f"the folder {d} (made for DST)" for d in remove_parents(self.created)]
        note = f"; {' and '.join(left)} could not be removed" if left else ""
        if isinstance(e, KeyboardInterrupt):
            return KeyboardInterrupt(note[2:]) if note else e
        if isinstance(e, CheckpointError):
            path = e.path
            if self.tmp is not None and path.startswith(str(self.tmp)):
                path = str(self.dst) + path[len(str(self.tmp)):]  # DST's name, not the temporary's
            return CheckpointError(path, e.problem + note) if note or path != e.path else e
        if isinstance(e, OSError):
            name, problem = os_error(e, tmp=self.tmp, dst=self.dst)
            if Path(name).name.startswith(TMP_PREFIX):  # the old DST's or its files' place aside: not the user's
                name = str(self.dst)
            where = "DST was left as it was" if self.existed else "nothing was left at DST"
            return CheckpointError(name, f"write failed ({problem}); {where}{note}")
        if note:
            e.add_note(note[2:])
        return e
