"""One walk over what a model returns: every tensor of a nested output, mapped.

Multi-sample dropout views each output as ``(K, B, ...)`` and R-Drop splits the outputs of the
concatenated batch ``[x; x]`` into halves: both are :func:`map_tensors` with their own function.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch

__all__ = ["map_tensors"]


def map_tensors(out: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``out`` with ``fn`` applied to every tensor in it.

    Tuples, named tuples, lists, dicts and transformers ``ModelOutput`` are walked recursively and
    rebuilt (dicts and ModelOutputs as shallow copies: the original is never touched); any other
    value is returned as it is.
    """
    if isinstance(out, torch.Tensor):
        return fn(out)
    if hasattr(out, "keys"):  # dict / ModelOutput
        new = copy.copy(out)
        for key in list(out.keys()):
            new[key] = map_tensors(out[key], fn)
        return new
    if isinstance(out, tuple) and hasattr(out, "_fields"):  # a named tuple
        return type(out)(*(map_tensors(o, fn) for o in out))
    if isinstance(out, list):
        return [map_tensors(o, fn) for o in out]
    if isinstance(out, tuple):
        return tuple(map_tensors(o, fn) for o in out)
    return out
