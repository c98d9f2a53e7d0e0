""".bin / .pt state dicts, loaded with ``torch.load(weights_only=True)`` only.

A pickle that would import or call anything besides tensors and plain containers is
refused by torch's weights-only unpickler and never executed; the refusal names the
global it wanted (found by reading the opcodes, not by running them).
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from .common import CheckpointError

if TYPE_CHECKING:
    import torch

__all__ = ["load_state_dict_file"]


def _unsafe_global(msg: str) -> str | None:
    m = re.search(r"GLOBAL ([\w.]+)", msg) or re.search(r"[Uu]nsupported (?:global|class)[^\w]*([\w.]+)", msg)
    return m.group(1) if m else None


_ALLOWED_MODULES = ("torch", "collections", "builtins", "_codecs", "numpy")


def _scan_globals(path: Path) -> str | None:
    """The first non-torch global a plain pickle file imports, found without executing it."""
    import pickletools

    try:
        strings: list[str] = []
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if isinstance(arg, str):
                    strings.append(arg)
                if op.name in ("GLOBAL", "INST"):
                    name = arg.replace(" ", ".")
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    name = f"{strings[-2]}.{strings[-1]}"
                else:
                    continue
                if not name.startswith(_ALLOWED_MODULES):
                    return name
    except Exception:
        return None
    return None


def expanded_views(sd: dict[str, "torch.Tensor"]) -> list[tuple[str, int, int]]:
    """``(name, storage bytes, written bytes)`` of each tensor that takes more bytes written
    out than its storage holds (a stride-0 view made by ``expand``): a few bytes in the file can
    become gigabytes in DST."""
    out = []
    for k, t in sd.items():
        nbytes = t.numel() * t.element_size()
        try:
            storage = t.untyped_storage().nbytes()
        except Exception:
            continue
        if nbytes > storage:
            out.append((k, storage, nbytes))
    return out


def load_state_dict_file(path: str | os.PathLike, *, name: str | os.PathLike | None = None) -> dict[str, "torch.Tensor"]:
    """A ``.bin``/``.pt`` state dict loaded with ``torch.load(weights_only=True)``
    (memory-mapped where the file allows it). A pickle that would import or call anything
    besides tensors and plain containers is refused; nothing in it is executed.

    Raises:
        CheckpointError: the file is unreadable, refused, or not a mapping of names to tensors.
    """
    import torch

    path = Path(path)
    shown = Path(name) if name is not None else path  # the name errors use (``path`` may be a resolved link)
    try:
        with warnings.catch_warnings():
            # torch's own warnings while it unpickles (TypedStorage deprecation, quantized tensors, old
            # pickle protocols) are about torch, not the file: the outcome is the state dict or one error line
            warnings.simplefilter("ignore")
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e) and "zipfile" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except pickle.UnpicklingError as e:
        what = _unsafe_global(str(e)) or _scan_globals(path)
        raise CheckpointError(shown, "refused to load: the pickle "
                              + (f"references {what}, which is not" if what else "holds something that is not")
                              + " a tensor or plain container (torch.load(weights_only=True)); nothing in it was "
                              "executed. If you trust the file, load it yourself and save model.state_dict() with "
                              "safetensors") from None
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except Exception as e:  # whatever a corrupt file makes torch.load raise (EOFError, RuntimeError, RecursionError ...)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(shown, f"cannot read as a torch.save state dict ({msg})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(shown, f"holds a {type(obj).__name__}, not a state dict (a dict of names to tensors); "
                                    "save model.state_dict()")
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise CheckpointError(shown, f"is not a state dict (a dict of names to tensors): entry {bad[0]!r} is a "
                                    f"{type(obj[bad[0]]).__name__} (keys: {', '.join(map(str, list(obj)[:6]))}); "
                                    "save model.state_dict() instead")
    return obj
