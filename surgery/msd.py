"""Multi-Sample Dropout heads (Inoue, "Multi-Sample Dropout for Accelerated Training and
Better Generalization", 2019).

In training, ``K`` dropout samples of the head's input go through the head in *one*
batched call (the samples are stacked along the batch dimension, no Python loop), and
the head returns the mean of the ``K`` outputs. That mean works with the model's own loss
(what Kaggle solutions do). The paper's form, the mean of the ``K`` per-sample losses, is
stronger for an affine head (where the mean of outputs is just one weaker dropout):
:func:`msd_samples` exposes the ``K`` per-sample outputs so a loss can be computed on each.

The head module itself is not replaced: two hooks do the work, so state_dict keys,
Parameters and the head's class stay as they are. In eval the hooks do nothing and the
head computes exactly what it computed before.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

__all__ = ["MultiSampleDropout", "msd_forward", "draw_masks", "msd_samples"]


def draw_masks(x: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """``k`` inverted-dropout masks shaped ``(k, *x.shape)`` (already divided by 1-p)."""
    m = torch.empty((k,) + tuple(x.shape), device=x.device, dtype=x.dtype)
    if p >= 1.0:
        return m.zero_()
    return m.bernoulli_(1.0 - p).div_(1.0 - p)


def _stack(x: torch.Tensor, k: int, p: float, masks: torch.Tensor | None) -> torch.Tensor:
    if masks is None:
        masks = draw_masks(x, k, p)
    return (x.unsqueeze(0) * masks).reshape((k * x.shape[0],) + tuple(x.shape[1:]))


def _split(out, k: int, fn):
    """Apply ``fn`` to every tensor of ``out`` after viewing it as ``(k, B, ...)``."""
    if isinstance(out, torch.Tensor):
        return fn(out.view((k, out.shape[0] // k) + tuple(out.shape[1:])))
    if isinstance(out, tuple) and not hasattr(out, "keys"):
        return type(out)(*(_split(o, k, fn) for o in out)) if hasattr(out, "_fields") else tuple(_split(o, k, fn) for o in out)
    if isinstance(out, list):
        return [_split(o, k, fn) for o in out]
    if hasattr(out, "keys"):  # dict / ModelOutput: a shallow copy, the original is not touched
        new = copy.copy(out)
        for key in list(out.keys()):
            new[key] = _split(out[key], k, fn)
        return new
    return out


def msd_forward(head: nn.Module, x: torch.Tensor, k: int, p: float, masks: torch.Tensor | None = None):
    """Mean over ``k`` dropout samples of ``head(x)``, all samples in one batched call.

    ``masks`` (shape ``(k, *x.shape)``, as :func:`draw_masks` returns) fixes the samples.
    """
    out = head(_stack(x, k, p, masks))
    return _split(out, k, lambda o: o.mean(0))


class MultiSampleDropout:
    """The hook pair that turns ``head`` into a multi-sample-dropout head (see module doc)."""

    def __init__(self, k: int, p: float):
        self.k, self.p = k, p
        self._expanded = False
        self._collect: list | None = None

    def pre(self, module, args, kwargs):
        self._expanded = False
        if not module.training:
            return None
        if args and isinstance(args[0], torch.Tensor):
            args = (_stack(args[0], self.k, self.p, None),) + tuple(args[1:])
        else:
            key = next((n for n, v in kwargs.items() if isinstance(v, torch.Tensor)), None)
            if key is None:
                return None
            kwargs = dict(kwargs, **{key: _stack(kwargs[key], self.k, self.p, None)})
        self._expanded = True
        return args, kwargs

    def post(self, module, args, kwargs, out):
        if not self._expanded:
            return None
        self._expanded = False
        if self._collect is not None:
            self._collect.append(_split(out, self.k, lambda o: o))
            # the collected view and the returned mean share storage; nothing is copied
        return _split(out, self.k, lambda o: o.mean(0))

    def install(self, head: nn.Module) -> list:
        return [head.register_forward_pre_hook(self.pre, with_kwargs=True),
                head.register_forward_hook(self.post, with_kwargs=True)]


@contextlib.contextmanager
def msd_samples(model: nn.Module):
    """Collect the per-sample outputs of every MSD head during the block.

    Yields a list that receives, for each training-mode head call, the head output viewed
    as ``(K, B, ...)`` (before the mean). Outside this block nothing is kept.

    Raises:
        NotSurgeredError / SurgeryError: the model has no MSD head (``apply(model, msd=K)`` first).
    """
    from .errors import SurgeryError
    from .record import get_record

    rec = get_record(model)
    states = [h for h in rec.handles if isinstance(h, MultiSampleDropout)]
    if not states:
        raise SurgeryError("model has no multi-sample-dropout head; call surgery.apply(model, msd=K) first")
    got: list = []
    for s in states:
        s._collect = got
    try:
        yield got
    finally:
        for s in states:
            s._collect = None
