"""Which files of an untrusted SRC ``convert`` and ``inspect`` may read.

A checkpoint folder someone else made can hold symbolic links. Following one that leads
outside the checkpoint would copy a local file (``/etc/passwd``, ``/proc/self/environ``, a
private key) into DST, which is then published. The rule:

* SRC itself (the path given on the command line) may be a link: the user named it.
* Every file read inside a directory SRC must resolve (``os.path.realpath``) inside the
  *allowed root*: the real path of SRC, or, when SRC is a Hugging Face cache snapshot
  (its real path is ``<repo>/snapshots/<revision>`` and ``<repo>/blobs`` is a folder),
  the repository folder ``<repo>``, where the snapshot's relative links point.
* Anything else is refused before anything is written, naming the file, unless the user
  opts in (``--follow-external-symlinks`` / ``follow_external_symlinks=True``).
* Only regular files are read: a FIFO, socket or device is never opened for reading
  (opening a FIFO would block), and symlinked folders are not walked. Both are named in a
  warning when they would otherwise have been copied.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .common import CheckpointError

__all__ = ["SourceTree", "hf_repo_root"]

_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)


def hf_repo_root(real_dir: Path) -> Path | None:
    """``<repo>`` when ``real_dir`` is ``<repo>/snapshots/<revision>`` of a Hugging Face cache
    (``<repo>/blobs`` exists), else None."""
    parent = real_dir.parent
    if parent.name == "snapshots" and (parent.parent / "blobs").is_dir():
        return parent.parent
    return None


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a regular file"


class SourceTree:
    """The files of one SRC that may be read, and how to open them safely."""

    def __init__(self, src: Path, follow_external_symlinks: bool = False):
        self.src = src
        self.follow_external = follow_external_symlinks
        real = Path(os.path.realpath(src))
        self.is_dir = real.is_dir()
        self.root = (hf_repo_root(real) or real) if self.is_dir else real

    def _inside(self, real: Path) -> bool:
        return real == self.root or self.root in real.parents

    def resolve(self, path: Path) -> Path:
        """The real path of ``path`` (a file of SRC), refused when it leads outside the allowed root."""
        if not self.is_dir or path == self.src:
            return Path(os.path.realpath(path))
        real = Path(os.path.realpath(path))
        if not self.follow_external and not self._inside(real):
            raise CheckpointError(path, f"is a symbolic link to {real}, outside the checkpoint ({self.root}); "
                                        "convert does not read files outside SRC (DST could publish a local file). "
                                        "Copy the file into SRC, or pass --follow-external-symlinks if you mean it")
        return real

    def open(self, path: Path) -> int:
        """A read-only descriptor of ``path`` after :meth:`resolve`; only a regular file is opened
        (a FIFO is opened non-blocking and refused, never read).

        Raises:
            CheckpointError: outside the allowed root, missing, unreadable, or not a regular file.
        """
        real = self.resolve(path)
        try:
            fd = os.open(real, _FLAGS)
        except OSError as e:
            raise CheckpointError(path, f"cannot read ({e.strerror or e})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CheckpointError(path, f"is {_kind(st.st_mode)}, not a regular file; convert reads regular "
                                            "files only")
            if getattr(os, "O_NONBLOCK", 0):
                os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def check_readable(self, path: Path) -> os.stat_result:
        """Open ``path`` as :meth:`open` does and close it; its ``stat``."""
        fd = self.open(path)
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def walk(self) -> tuple[list[str], list[str]]:
        """``(files, warnings)``: the regular files (or links to them) under a directory SRC,
        relative to it and sorted; links are checked later by :meth:`resolve`. Symlinked
        folders, FIFOs, sockets, devices and broken links are not returned but named in a
        warning. Hidden ``.surgery-tmp*`` folders of an interrupted run are left out."""
        files, warnings = [], []
        for dirpath, dirnames, filenames in os.walk(self.src):
            keep = []
            for d in sorted(dirnames):
                if d.startswith(".surgery-tmp"):
                    continue
                full = os.path.join(dirpath, d)
                if os.path.islink(full):
                    warnings.append(f"{os.path.relpath(full, self.src)} is a symbolic link to a folder; "
                                    "not followed, not copied")
                    continue
                keep.append(d)
            dirnames[:] = keep
            for fn in sorted(filenames):
                full = os.path.join(dirpath, fn)
                rel = os.path.relpath(full, self.src)
                try:
                    st = os.stat(full)
                except OSError:
                    warnings.append(f"{rel} is a broken symbolic link; not copied")
                    continue
                if stat.S_ISREG(st.st_mode):
                    files.append(rel)
                else:
                    warnings.append(f"{rel} is {_kind(st.st_mode)}; not copied")
        return files, warnings
