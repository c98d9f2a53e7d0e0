"""Multi-Sample Dropout heads (Inoue, "Multi-Sample Dropout for Accelerated Training and
Better Generalization", 2019).

In training, ``K`` dropout samples of the head's input go through the head in *one*
batched call (the samples are stacked along the batch dimension, no Python loop), and
the head returns the mean of the ``K`` outputs. That mean works with the model's own loss
(what Kaggle solutions do). The paper's form, the mean of the ``K`` per-sample losses, is
stronger for an affine head (where the mean of outputs is just one weaker dropout):
:func:`msd_samples` exposes the ``K`` per-sample outputs so a loss can be computed on each
(``surgery.msd_loss`` does).

The head module itself is not replaced: two hooks do the work (installed by
:mod:`surgery.regularizers.msd`), so state_dict keys,
Parameters and the head's class stay as they are. In eval the hooks do nothing and the
head computes exactly what it computed before.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import weakref

import torch
from torch import nn

from ..errors import SurgeryError
from ..outputs import map_tensors
from ..record import get_record

__all__ = ["MultiSampleDropout", "msd_forward", "draw_masks", "stack_samples", "per_sample", "msd_samples", "tie"]


def draw_masks(x: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """``k`` inverted-dropout masks shaped ``(k, *x.shape)`` (already divided by 1-p)."""
    m = torch.empty((k,) + tuple(x.shape), device=x.device, dtype=x.dtype)
    if p >= 1.0:
        return m.zero_()
    return m.bernoulli_(1.0 - p).div_(1.0 - p)


def stack_samples(x: torch.Tensor, k: int, p: float, masks: torch.Tensor | None) -> torch.Tensor:
    if masks is None:
        masks = draw_masks(x, k, p)
    return (x.unsqueeze(0) * masks).reshape((k * x.shape[0],) + tuple(x.shape[1:]))


def per_sample(out, k: int, fn):
    """``fn`` applied to every tensor of ``out`` viewed as ``(k, B, ...)``."""
    return map_tensors(out, lambda o: fn(o.view((k, o.shape[0] // k) + tuple(o.shape[1:]))))


def msd_forward(head: nn.Module, x: torch.Tensor, k: int, p: float, masks: torch.Tensor | None = None):
    """Mean over ``k`` dropout samples of ``head(x)``, all samples in one batched call.

    ``masks`` (shape ``(k, *x.shape)``, as :func:`draw_masks` returns) fixes the samples.
    """
    out = head(stack_samples(x, k, p, masks))
    return per_sample(out, k, lambda o: o.mean(0))


def _head_input(args: tuple, kwargs: dict) -> tuple[int | str, torch.Tensor] | None:
    """Where the head's input is: the first positional tensor, else the first tensor keyword."""
    if args and isinstance(args[0], torch.Tensor):
        return 0, args[0]
    key = next((n for n, v in kwargs.items() if isinstance(v, torch.Tensor)), None)
    return None if key is None else (key, kwargs[key])


def _same(stacked: torch.Tensor | None, x: torch.Tensor) -> bool:
    """``x`` is the stacked input, or an alias of all of it: an engine's forward pre-hook registered after
    ours may hand the head ``stacked.detach()`` (DeepSpeed ZeRO-3 does, to hook the backward)."""
    if stacked is None:
        return False
    if stacked is x:
        return True
    return (x.shape == stacked.shape and x.stride() == stacked.stride() and x.dtype == stacked.dtype
            and x.device == stacked.device and x.storage_offset() == stacked.storage_offset()
            and x.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr())


class MultiSampleDropout:
    """The hook pair that turns ``head`` into a multi-sample-dropout head (see module doc), and its undo
    (``apply`` keeps it with the live record; ``revert`` calls :meth:`undo`).

    Nothing about one call is kept on this shared object: the pre-hook stacks the K samples
    and the post-hook recognises that call by its input tensor (the stacked one, which the
    forward hooks receive, or an alias of all of it that an engine's hook put in its place),
    remembered per thread. So several threads may run the head at
    once (``nn.DataParallel`` replicas share these hooks), each getting its own result, and
    :func:`msd_samples` collects, per thread, only what that thread's forwards produced.
    """

    def __init__(self, k: int, p: float):
        self.k, self.p = k, p
        self.handles: list = []  # the hooks installed (removed by undo)
        self._local = threading.local()  # .stacked: weak refs to this thread's stacked inputs; .collect

    def __getstate__(self):  # copies (deepcopy of the model, pickling) start with no calls in flight
        return {"k": self.k, "p": self.p, "handles": self.handles}

    def __setstate__(self, state):
        self.__init__(state["k"], state["p"])
        self.handles = state.get("handles", [])

    def _thread(self, attr: str, default):
        if not hasattr(self._local, attr):
            setattr(self._local, attr, default)
        return getattr(self._local, attr)

    def pre(self, module, args, kwargs):
        if not module.training:
            return None
        found = _head_input(args, kwargs)
        if found is None:
            return None
        where, x = found
        if not (x.dtype.is_floating_point or x.dtype.is_complex):
            raise SurgeryError(f"the multi-sample-dropout head ({type(module).__name__}) got a {x.dtype} input of shape "
                               f"{tuple(x.shape)}, not features; point head= at the module that maps the backbone's "
                               "features to the outputs")
        xs = stack_samples(x, self.k, self.p, None)
        stacked = self._thread("stacked", [])
        stacked[:] = [r for r in stacked if r() is not None]  # drop calls that raised before the post-hook
        stacked.append(weakref.ref(xs))
        if where == 0:
            return (xs,) + tuple(args[1:]), kwargs
        return args, dict(kwargs, **{where: xs})

    def post(self, module, args, kwargs, out):
        stacked = getattr(self._local, "stacked", None)
        found = _head_input(args, kwargs)
        if not stacked or found is None:
            return None
        x = found[1]
        i = next((i for i in range(len(stacked) - 1, -1, -1) if _same(stacked[i](), x)), None)
        if i is None:  # this call was not expanded (eval mode, or no tensor input)
            return None
        del stacked[i]
        collect = getattr(self._local, "collect", None)
        if collect is not None:
            collect.append(per_sample(out, self.k, lambda o: o))
            # the collected view and the returned mean share storage; nothing is copied
        return per_sample(out, self.k, lambda o: o.mean(0))

    def install(self, head: nn.Module) -> None:
        self.handles += [head.register_forward_pre_hook(self.pre, with_kwargs=True),
                         head.register_forward_hook(self.post, with_kwargs=True)]
        forget_compiled()

    def check(self, view, rec) -> None:
        """Nothing to check: hooks are removed wherever the head is now."""

    def undo(self, view, rec) -> None:
        for h in self.handles:
            h.remove()
        forget_compiled()


def forget_compiled() -> None:
    """Drop every graph ``torch.compile`` made so far, so that the next call of a compiled model traces it as it is
    now. Compiled graphs do not guard a module's hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``): a model
    compiled and run before ``apply(msd=K)`` (``Trainer(torch_compile=True)``, Accelerate) would go on without the
    head's hooks, and after ``revert`` with them. Nothing to do when dynamo was never imported."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.reset()


@contextlib.contextmanager
def msd_samples(model: nn.Module):
    """Collect the per-sample outputs of every MSD head during the block.

    Yields a list that receives, for each training-mode head call *in this thread*, the head
    output viewed as ``(K, B, ...)`` (before the mean). Outside this block nothing is kept.
    Other threads running the same model at the same time collect their own calls only.

    Raises:
        NotSurgeredError / SurgeryError: the model has no MSD head (``apply(model, msd=K)`` first).
    """
    rec = get_record(model)
    states = [u for u in rec.undos if isinstance(u, MultiSampleDropout)]
    states += [u.state for u in rec.undos if isinstance(getattr(u, "state", None), MultiSampleDropout)]
    if not rec.msd:
        raise SurgeryError("model has no multi-sample-dropout head; call surgery.apply(model, msd=K) first")
    got: list = []
    before = [getattr(s._local, "collect", None) for s in states]
    for s in states:
        s._local.collect = got
    try:
        yield got
    finally:
        for s, b in zip(states, before):
            s._local.collect = b


class _Tie(torch.autograd.Function):
    """``samples`` unchanged, with ``anchor`` in its graph: the backward hands ``anchor`` a zero gradient."""

    @staticmethod
    def forward(ctx, samples, anchor):
        ctx.anchor = (anchor.shape, anchor.dtype, anchor.device)
        return samples.view_as(samples)

    @staticmethod
    def backward(ctx, g):
        shape, dtype, device = ctx.anchor
        return g, torch.zeros(shape, dtype=dtype, device=device)


def tie(samples, outputs):
    """The collected ``samples`` with the model's returned ``outputs`` (their first tensor that requires grad,
    the logits) in their graph, at zero gradient: a loss on the samples alone then still runs the backward of
    whatever an engine's forward hooks wrapped the head's returned output in. DeepSpeed ZeRO-3 gathers the
    head's weights for its backward there; without it the head's backward would meet a released shard.
    The samples' values and gradients are unchanged (``g + 0``)."""
    found: list = []
    map_tensors(outputs, lambda t: found.append(t) or t)
    anchor = next((t for t in found if t.requires_grad and t.dim() > 0), None)
    if anchor is None:
        return samples
    return map_tensors(samples, lambda t: _Tie.apply(t, anchor) if t.requires_grad else t)
