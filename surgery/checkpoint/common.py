"""What every part of checkpoint I/O shares: the error, file names, key predicates."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Any

from ..errors import SurgeryError
from ..record import TARGET_SUFFIX

__all__ = ["CheckpointError", "is_target_key", "fmt_bytes", "printable", "one_line", "RECORD_METADATA_KEY", "SAFE_NAME", "SAFE_INDEX",
           "BIN_NAME", "BIN_INDEX", "CONFIG_NAME", "PICKLE_SUFFIXES", "TRAINER_STATE", "OTHER_WEIGHTS",
           "CheckpointWarning", "lexists", "lstat_or_none", "os_error"]

RECORD_METADATA_KEY = "surgery"  # safetensors header metadata entry holding Record.to_json()
SAFE_NAME, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_NAME, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
CONFIG_NAME = "config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# files in a model/Trainer directory that are not copied to a plain checkpoint
TRAINER_STATE = re.compile(r"optimizer\.pt|scheduler\.pt|scaler\.pt|trainer_state\.json|training_args\.bin"
                           r"|rng_state(_\d+)?\.pth")
OTHER_WEIGHTS = re.compile(r".*(\.safetensors|\.bin|\.pt|\.pth|\.ckpt|\.h5|\.msgpack|\.pkl|\.pickle|\.onnx"
                           r"|\.gguf|\.npy|\.npz|\.joblib|\.index\.json)")


class CheckpointError(SurgeryError):
    """A checkpoint that cannot be read, converted or written. ``str(e)`` is one line:
    the file, then the problem and (where there is one) the fix."""

    def __init__(self, path: Any, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


class CheckpointWarning(UserWarning):
    """A write that put DST in place but could not finish something after it (the old copy
    not removed, the folder not synced): DST is the new checkpoint; the warning names what is
    left."""


_ABSENT = (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG)  # nothing there (an overlong name cannot be)


def lstat_or_none(path: Any) -> os.stat_result | None:
    """``os.lstat(path)``, or None when nothing is there. Unlike ``os.path.lexists`` (which
    answers False for any error), a failure to look (an I/O error) raises: "absent" is never
    concluded from a failing disk.

    Raises:
        OSError: any error but "no such file", "a part of the path is not a folder" and "name
            too long".
    """
    try:
        return os.lstat(path)
    except OSError as e:
        if e.errno in _ABSENT:
            return None
        raise


def lexists(path: Any) -> bool:
    """``os.path.lexists`` that raises on an I/O error instead of answering False (see
    :func:`lstat_or_none`)."""
    return lstat_or_none(path) is not None


def fmt_bytes(n: int) -> str:
    """``1.5 GiB`` / ``12.0 MiB``."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def is_target_key(key: str) -> bool:
    """True for the state_dict key of a Mixout target (``<layer>.mixout_target``)."""
    return key == TARGET_SUFFIX or key.endswith("." + TARGET_SUFFIX)


def printable(text: str) -> str:
    """``text`` with every character a terminal could act on escaped (``\\x1b``, ``\\n``,
    ``\\u202e`` ...): tensor, shard and file names from SRC are untrusted, and printed raw an
    escape sequence would retitle or clear the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def one_line(text: str) -> str:
    """``text`` on one line (runs of whitespace joined), escaped as :func:`printable` does."""
    return printable(" ".join(text.split()))


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
