"""What every part of checkpoint I/O shares: the error, file names, key predicates."""

from __future__ import annotations

import re
from typing import Any

from ..errors import SurgeryError
from ..record import TARGET_SUFFIX

__all__ = ["CheckpointError", "is_target_key", "fmt_bytes", "printable", "one_line", "RECORD_METADATA_KEY", "SAFE_NAME", "SAFE_INDEX",
           "BIN_NAME", "BIN_INDEX", "CONFIG_NAME", "PICKLE_SUFFIXES", "TRAINER_STATE", "OTHER_WEIGHTS"]

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
