"""Resume and seeding: plain-loop checkpoints that resume bitwise, the check that a resumed model
carries the checkpoint's surgery, and per-rank seeds so every rank draws its own masks.

* :func:`save_training_state` / :func:`load_training_state` -- weights with the Mixout targets,
  optimizer, scheduler, RNG states, step; read back with ``torch.load(weights_only=True)``.
* :func:`check_same_surgery` -- the model carries the surgery the checkpoint was trained with.
* :func:`seed_rank` / :func:`rank` -- DDP broadcasts rank 0's weights at construction, so the
  ranks need different seeds only for their masks.
"""

from __future__ import annotations

import json
import os
import pickle
import random
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import SurgeryError, SurgeryTypeError
from ..record import CONFIG_KEY, Record, get_record, unwrap

__all__ = ["seed_rank", "rank", "save_training_state", "load_training_state", "check_same_surgery",
           "checkpoint_record"]


def rank() -> int:
    """This process's global rank: from ``torch.distributed`` when initialised, else ``$RANK``, else 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))


def seed_rank(seed: int) -> int:
    """Seed ``random`` and torch (and numpy if installed) with ``seed + rank()``; returns that seed.

    Call it after the model is built and wrapped (DDP copies rank 0's parameters and buffers
    to every rank at construction), so each rank draws its own dropout and Mixout masks.
    With one process it is ``torch.manual_seed(seed)``.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SurgeryTypeError(f"seed must be an int, got {type(seed).__name__}")
    s = seed + rank()
    random.seed(s)
    torch.manual_seed(s)
    try:
        import numpy as np
        np.random.seed(s % 2**32)
    except ImportError:  # pragma: no cover - numpy is optional
        pass
    return s


# ---- plain-loop checkpoints ------------------------------------------------------------------

def _rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain Python data only, so ``torch.load(weights_only=True)`` reads them."""
    state = {"python": random.getstate(), "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(gauss)]
    except ImportError:  # pragma: no cover
        pass
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))


_PLAIN = (str, int, float, bool, type(None), torch.Tensor, torch.dtype, torch.device, torch.Size)


def _check_plain(value: Any, where: str) -> None:
    """Refuse what ``torch.load(weights_only=True)`` would refuse to read back."""
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            _check_plain(k, where)
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    raise SurgeryTypeError(f"{where} is a {type(value).__name__}; training states hold only tensors and plain data "
                           "(numbers, strings, lists, tuples, dicts), because they are read back with "
                           "torch.load(weights_only=True), which runs no code. Convert it (e.g. .tolist(), float())")


def _comparable(rec: Record | Mapping | None) -> Any:
    if rec is None:
        return None
    d = rec.to_dict() if isinstance(rec, Record) else dict(rec)
    return {"args": d.get("args"), "mixout": [m["name"] for m in d.get("mixout", [])],
            "msd": d.get("msd"), "dropout": len(d.get("dropout", []))}


def check_same_surgery(model: nn.Module, saved: Record | Mapping | None, where: str = "the checkpoint") -> None:
    """Raise unless ``model`` carries the same surgery as the record ``saved`` (None = none).

    Raises:
        SurgeryError: the surgery differs (different args, layers or heads), or one side has none.
    """
    live = get_record(model, required=False)
    a, b = _comparable(live), _comparable(saved)
    if a == b:
        return
    if b is None:
        raise SurgeryError(f"{where} was saved without surgery but the model carries surgery; resume with the same "
                           "setup it was trained with")
    if a is None:
        raise SurgeryError(f"{where} was trained with surgery {b['args']}; build the pretrained model and call "
                           "surgery.apply(model, ...) with those arguments before resuming, so Mixout mixes toward the "
                           "pretrained weights")
    raise SurgeryError(f"{where} was trained with surgery {b['args']} but the model carries {a['args']}; apply the "
                       "same arguments before resuming")


def save_training_state(path: str | os.PathLike, model: nn.Module, optimizer=None, scheduler=None, *,
                        step: int = 0, **extra: Any) -> None:
    """Write everything a plain loop needs to resume bitwise to one file (``torch.save``).

    Saved: the model's state_dict (with the Mixout targets), the surgery record, the
    optimizer and scheduler state, ``step``, ``extra`` (tensors and plain data only) and the
    RNG states of ``random``, torch (CPU and CUDA) and numpy, all as tensors and plain data,
    so :func:`load_training_state` reads the file with ``torch.load(weights_only=True)``. In
    DDP every rank draws its own masks, so every rank saves its own file (e.g.
    ``f"state-{surgery.rank()}.pt"``).

    Raises:
        SurgeryTypeError: ``extra`` holds something other than tensors and plain data.
    """
    rec = get_record(model, required=False)
    _check_plain(extra, "extra")
    torch.save({"model": unwrap(model).state_dict(), "surgery": rec.to_dict() if rec is not None else None,
                "optimizer": optimizer.state_dict() if optimizer is not None else None,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "step": step, "extra": extra, "rng": _rng_state()}, os.fspath(path))


def load_training_state(path: str | os.PathLike, model: nn.Module, optimizer=None, scheduler=None) -> dict[str, Any]:
    """Restore what :func:`save_training_state` wrote into a freshly built and surgered model.

    Build the *pretrained* model, ``surgery.apply`` it with the same arguments, then call
    this: the weights, the Mixout targets (the pretrained weights), optimizer, scheduler and
    RNG states are restored, so the next step is the one an uninterrupted run would take.

    Returns:
        ``{"step": ..., **extra}``.

    Raises:
        SurgeryError: the model's surgery differs from the checkpoint's, or the checkpoint
            lacks keys the model has (strict loading).
    """
    try:
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise SurgeryError(f"checkpoint {os.fspath(path)!r} holds objects other than tensors and plain data, so it is "
                           "not unpickled (torch.load(weights_only=True) runs no code): re-save it with "
                           f"surgery.save_training_state ({str(e).splitlines()[0]})") from None
    check_same_surgery(model, state.get("surgery"), where=f"checkpoint {os.fspath(path)!r}")
    missing, unexpected = unwrap(model).load_state_dict(state["model"], strict=False)
    if missing or unexpected:
        raise SurgeryError(f"checkpoint {os.fspath(path)!r} does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    if optimizer is not None:
        if state.get("optimizer") is None:
            raise SurgeryError(f"checkpoint {os.fspath(path)!r} holds no optimizer state")
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return {"step": state["step"], **state.get("extra", {})}


def checkpoint_record(checkpoint: str) -> dict | None:
    """The record a Trainer checkpoint carries: in ``config.json`` (transformers models) or in the
    header metadata of ``model.safetensors`` (other modules, see ``SurgeryTrainer._save``)."""
    cfg = os.path.join(checkpoint, "config.json")
    if os.path.isfile(cfg):
        with open(cfg, encoding="utf-8") as f:
            return json.load(f).get(CONFIG_KEY)
    weights = os.path.join(checkpoint, "model.safetensors")
    if not os.path.isfile(weights):
        return None
    from safetensors import safe_open

    from ..checkpoint.common import RECORD_METADATA_KEY

    with safe_open(weights, framework="pt") as f:
        raw = (f.metadata() or {}).get(RECORD_METADATA_KEY)
    return None if raw is None else Record.from_dict(raw).to_dict()
