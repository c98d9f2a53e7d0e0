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
* Resolving paths cannot see hard links: a file of SRC may be a second name of a file
  elsewhere (a private file beside SRC, linked in by whoever made the folder). A regular
  file with more names (``st_nlink``) than SRC's allowed root holds for it is refused the
  same way, unless the user opts in (``--allow-external-hard-links`` /
  ``allow_external_hard_links=True``). Hard links between two files inside SRC are fine.
  The count is taken on the descriptor that is then read, so a file swapped in after the
  folder was planned is caught too.
* Only regular files are read: a FIFO, socket or device is never opened for reading
  (opening a FIFO would block), and symlinked folders are not walked. Both are named in a
  warning when they would otherwise have been copied.
* Folders are walked without recursion, at most ``MAX_DIR_DEPTH`` levels deep (deeper is
  refused: a checkpoint's files are a few levels deep), and a folder that cannot be listed
  is an error, not a silent gap in DST.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .common import CheckpointError, os_error

__all__ = ["SourceTree", "hf_repo_root", "identity", "changed", "MAX_DIR_DEPTH"]

MAX_DIR_DEPTH = 64  # folder levels below SRC

_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)


def identity(st: os.stat_result) -> tuple[int, ...]:
    """What changes when a file is replaced or written (device, inode, size, modification and
    change times): compared before and after a file is read."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def changed(path: Path) -> CheckpointError:
    return CheckpointError(path, "changed while convert was reading it (rewritten, replaced or still being written); "
                                 "nothing is published from a mix of two versions: run convert again once the file "
                                 "is complete")


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

    def __init__(self, src: Path, follow_external_symlinks: bool = False, allow_external_hard_links: bool = False):
        self.src = src
        self.follow_external = follow_external_symlinks
        self.allow_hard_links = allow_external_hard_links
        real = Path(os.path.realpath(src))
        self.is_dir = stat.S_ISDIR(os.stat(real).st_mode)  # an I/O error is raised, not taken for "a file"
        self.root = (hf_repo_root(real) or real) if self.is_dir else real
        self._names: dict[tuple[int, int], int] | None = None  # (dev, ino) -> names inside root (nlink > 1 only)
        self.read: dict[Path, tuple[Path, tuple[int, ...]]] = {}  # file -> (real path, identity when last opened)

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
            if st.st_nlink > 1 and self.is_dir and not self.allow_hard_links:
                self._check_hard_links(path, st)
            if getattr(os, "O_NONBLOCK", 0):
                os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        self.read[path] = (real, identity(st))
        return fd

    def check_unchanged(self) -> None:
        """Every file read is still the file that was read (same identity at the same path):
        run before DST is published, so a file a trainer replaced or rewrote meanwhile (a new
        ``config.json`` beside the old weights) is refused, not mixed into DST.

        Raises:
            CheckpointError: naming the first file that changed or went away.
        """
        for path, (real, known) in self.read.items():
            try:
                now = identity(os.stat(real))
            except (FileNotFoundError, NotADirectoryError):
                now = ()  # gone: changed
            except OSError as e:
                raise CheckpointError(path, f"cannot be checked again before DST is published ({os_error(e)[1]}); "
                                            "nothing was published") from None
            if now != known:
                raise changed(path)

    def check_readable(self, path: Path) -> os.stat_result:
        """Open ``path`` as :meth:`open` does and close it; its ``stat``."""
        fd = self.open(path)
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def _check_hard_links(self, path: Path, st: os.stat_result) -> None:
        """Refuse ``path`` (open, ``fstat`` gave ``st``) when some of its ``st_nlink`` names
        lie outside the allowed root (counted once; counted again before refusing, so a
        link made inside SRC after the count is not held against it)."""
        key = (st.st_dev, st.st_ino)
        for fresh in (False, True):
            if fresh or self._names is None:
                self._names = _count_names(self.root)
            inside = self._names.get(key, 0)
            if inside >= st.st_nlink:
                return
        raise CheckpointError(path, f"is a hard link: the file has {st.st_nlink} names, {inside} of them inside the "
                                    f"checkpoint ({self.root}); the others are outside it, so it may be a local file "
                                    "and convert does not read files outside SRC (DST could publish it). Copy the "
                                    "file into SRC (cp, not ln), or pass --allow-external-hard-links if you mean it")

    def walk(self) -> tuple[list[str], list[str]]:
        """``(files, warnings)``: the regular files (or links to them) under a directory SRC,
        relative to it, each folder's files (sorted) before its subfolders (sorted); links
        are checked later by :meth:`resolve`. Symlinked folders, FIFOs, sockets, devices and
        broken links are not returned but named in a warning. Nothing is left out by its
        name: a ``.surgery-tmp-*`` file or folder in SRC (left there by an interrupted run
        whose output was inside SRC's folder) is SRC's content, copied like the rest and named
        in a warning. DST's own temporaries are never inside SRC (DST may not be).

        Raises:
            CheckpointError: a folder that cannot be listed, or folders nested more than
                ``MAX_DIR_DEPTH`` levels below SRC.
        """
        files, warnings = [], []
        stack = [("", 0)]
        while stack:
            rel, depth = stack.pop()
            subdirs = []
            for e in _entries(self.src, rel):
                r = os.path.join(rel, e.name) if rel else e.name
                try:
                    is_dir = e.is_dir()  # a folder, or a link to one
                except OSError:  # a link loop: named as a broken link below
                    is_dir = False
                if e.name.startswith(".surgery-tmp"):
                    warnings.append(f"{r} looks like the temporary of an interrupted surgery run (convert or export); "
                                    "it is SRC's content and is copied like the rest (remove it from SRC if it is "
                                    "one)")
                if is_dir:
                    if e.is_symlink():
                        warnings.append(f"{r} is a symbolic link to a folder; not followed, not copied")
                    else:
                        subdirs.append(r)
                    continue
                try:
                    st = os.stat(e.path)
                except OSError as err:
                    if err.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):  # an I/O error: not "broken"
                        raise CheckpointError(self.src / r, f"cannot read ({err.strerror or err})") from None
                    warnings.append(f"{r} is a broken symbolic link; not copied")
                    continue
                if stat.S_ISREG(st.st_mode):
                    files.append(r)
                else:
                    warnings.append(f"{r} is {_kind(st.st_mode)}; not copied")
            if subdirs and depth >= MAX_DIR_DEPTH:
                raise CheckpointError(self.src, f"holds folders nested more than {MAX_DIR_DEPTH} levels deep "
                                                f"({_abbrev(subdirs[0])}); a checkpoint's files are a few levels "
                                                "deep, so this is refused")
            stack.extend((d, depth + 1) for d in reversed(subdirs))
        return files, warnings


def _abbrev(rel: str) -> str:
    return rel if len(rel) <= 120 else f"{rel[:60]}...{rel[-40:]}"


def _entries(top: Path, rel: str) -> list[os.DirEntry]:
    """The entries of folder ``top/rel``, sorted by name."""
    try:
        with os.scandir(os.path.join(top, rel) if rel else top) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise CheckpointError(top, f"cannot list its folder {_abbrev(rel) or '.'} ({e.strerror or e}); convert "
                                   "copies every file of SRC, so every folder must be readable") from None


def _count_names(root: Path) -> dict[tuple[int, int], int]:
    """``(dev, ino) -> names`` of the regular files with more than one name under ``root``
    (links not followed, no recursion; folders that cannot be listed count nothing)."""
    names: dict[tuple[int, int], int] = {}
    stack = [(str(root), 0)]
    while stack:
        top, depth = stack.pop()
        try:
            with os.scandir(top) as it:
                entries = list(it)
        except OSError:
            continue
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    if depth < MAX_DIR_DEPTH + 8:
                        stack.append((e.path, depth + 1))
                    continue
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                names[key] = names.get(key, 0) + 1
    return names
