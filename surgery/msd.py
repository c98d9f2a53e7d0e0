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
import threading
import weakref

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


def _head_input(args: tuple, kwargs: dict) -> tuple[int | str, torch.Tensor] | None:
    """Where the head's input is: the first positional tensor, else the first tensor keyword."""
    if args and isinstance(args[0], torch.Tensor):
        return 0, args[0]
    key = next((n for n, v in kwargs.items() if isinstance(v, torch.Tensor)), None)
    return None if key is None else (key, kwargs[key])


class MultiSampleDropout:
    """The hook pair that turns ``head`` into a multi-sample-dropout head (see module doc).

    Nothing about one call is kept on this shared object: the pre-hook stacks the K samples
    and the post-hook recognises that call by its input tensor (the stacked one, which the
    forward hooks receive), remembered per thread. So several threads may run the head at
    once (``nn.DataParallel`` replicas share these hooks), each getting its own result, and
    :func:`msd_samples` collects, per thread, only what that thread's forwards produced.
    """

    def __init__(self, k: int, p: float):
        self.k, self.p = k, p
        self._local = threading.local()  # .stacked: weak refs to this thread's stacked inputs; .collect

    def __getstate__(self):  # copies (deepcopy of the model, pickling) start with no calls in flight
        return {"k": self.k, "p": self.p}

    def __setstate__(self, state):
        self.__init__(state["k"], state["p"])

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
            from .errors import SurgeryError
            raise SurgeryError(f"the multi-sample-dropout head ({type(module).__name__}) got a {x.dtype} input of shape "
                               f"{tuple(x.shape)}, not features; point head= at the module that maps the backbone's "
                               "features to the outputs")
        xs = _stack(x, self.k, self.p, None)
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
        i = next((i for i in range(len(stacked) - 1, -1, -1) if stacked[i]() is x), None)
        if i is None:  # this call was not expanded (eval mode, or no tensor input)
            return None
        del stacked[i]
        collect = getattr(self._local, "collect", None)
        if collect is not None:
            collect.append(_split(out, self.k, lambda o: o))
            # the collected view and the returned mean share storage; nothing is copied
        return _split(out, self.k, lambda o: o.mean(0))

    def install(self, head: nn.Module) -> list:
        return [head.register_forward_pre_hook(self.pre, with_kwargs=True),
                head.register_forward_hook(self.post, with_kwargs=True)]


@contextlib.contextmanager
def msd_samples(model: nn.Module):
    """Collect the per-sample outputs of every MSD head during the block.

    Yields a list that receives, for each training-mode head call *in this thread*, the head
    output viewed as ``(K, B, ...)`` (before the mean). Outside this block nothing is kept.
    Other threads running the same model at the same time collect their own calls only.

    Raises:
        NotSurgeredError / SurgeryError: the model has no MSD head (``apply(model, msd=K)`` first).
    """
    from .errors import SurgeryError
    from .record import get_record

    rec = get_record(model)
    states = [h for h in rec.handles if isinstance(h, MultiSampleDropout)]
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


# ---- the paper's loss: the mean of the K per-sample losses -------------------------------

def msd_sample_loss(samples: torch.Tensor, target: torch.Tensor, *, task: str = "classification",
                    loss_fn=None, ignore_index: int = -100) -> torch.Tensor:
    """Mean over the ``K`` samples of the loss of each sample: ``mean_k loss(samples[k], target)``.

    Args:
        samples: per-sample head outputs ``(K, B, ...)``, as :func:`msd_samples` collects them.
        target: ``(B, ...)``. Classification: integer class indices shaped like one sample
            without its class dimension (``ignore_index`` entries skipped). Regression: values
            shaped like one sample (or ``(B,)`` for ``(B, 1)`` samples).
        task: ``"classification"`` (cross-entropy) or ``"regression"`` (MSE); ignored when
            ``loss_fn`` is given.
        loss_fn: optional ``loss_fn(sample_output, target) -> scalar`` applied to each sample.

    Raises:
        SurgeryError: shapes that do not match, a float target for classification, an unknown task.
    """
    from .errors import SurgeryError, SurgeryTypeError
    from .rdrop import _check_target, _cross_entropy, check_task

    if not isinstance(samples, torch.Tensor) or samples.dim() < 2:
        raise SurgeryTypeError("samples must be a (K, B, ...) tensor of per-sample head outputs; for a head that "
                               "returns a tuple or a model output, pass postprocess= to pick the tensor")
    k = samples.shape[0]
    if loss_fn is not None:
        return torch.stack([loss_fn(samples[i], target) for i in range(k)]).mean()
    task = check_task(task)
    if task == "classification" and samples.shape[-1] < 2:
        raise SurgeryError(f"task='classification' needs a class dimension of size >= 2, got per-sample outputs "
                           f"{tuple(samples.shape[1:])}; for a one-output head use task='regression'")
    t = _check_target(target, samples[0], task).to(samples.device)
    if task == "classification":
        # every sample has the same valid positions, so the mean over all K*B rows is the mean of the K means
        return _cross_entropy(samples, t.expand((k,) + tuple(t.shape)), None, ignore_index)
    return (samples.float() - t).pow(2).mean()


def msd_loss(model: nn.Module, batch, target: torch.Tensor | None = None, *, task: str = "classification",
             loss_fn=None, postprocess=None, ignore_index: int = -100):
    """The paper's multi-sample-dropout loss: one forward, the mean of the ``K`` per-sample losses.

    Runs ``model`` once on ``batch`` (a dict: ``model(**batch)``; a tuple/list:
    ``model(*batch)``; a tensor: ``model(batch)``) in training mode, collects the ``K``
    per-sample outputs of the MSD head installed by ``surgery.apply(model, msd=K)`` and
    returns ``(loss, outputs)``, where ``loss = mean_k loss(sample_k, target)`` and
    ``outputs`` is what the model returned (its logits are the mean of the K samples).

    Args:
        model: a model with an MSD head, in training mode.
        batch: the model's inputs. When ``target`` is None, ``batch["labels"]`` is used as
            the target and left out of the forward (the model does not compute its own loss
            on the averaged output).
        target: see :func:`msd_sample_loss`.
        task: ``"classification"`` or ``"regression"``.
        loss_fn: optional per-sample loss ``loss_fn(sample_output, target) -> scalar``.
        postprocess: optional ``postprocess(samples) -> samples`` for models that transform
            the head output before returning it (GPT-2 / Llama sequence classification apply
            ``score`` to every token and then pick the last one:
            ``lambda s: s[:, torch.arange(B), last_index]``).

    Raises:
        NotSurgeredError / SurgeryError: the model has no MSD head (call
            ``surgery.apply(model, msd=K)`` first), it is in eval mode, the head ran more
            than once in the forward, no target, or a loss/target mismatch
            (:func:`msd_sample_loss`).
    """
    from .errors import NotSurgeredError, SurgeryError
    from .record import get_record

    rec = get_record(model, required=False)
    if rec is None or not rec.msd:
        raise (NotSurgeredError if rec is None else SurgeryError)(
            f"{type(model).__name__} has no multi-sample-dropout head; call surgery.apply(model, msd=K) first")
    forward_batch = batch
    if target is None:
        if not (isinstance(batch, dict) and "labels" in batch):
            raise SurgeryError("msd_loss needs a target: pass target=... or a dict batch with 'labels'")
        forward_batch = {k: v for k, v in batch.items() if k != "labels"}
        target = batch["labels"]
    with msd_samples(model) as got:
        if not model.training:
            raise SurgeryError("model is in eval mode, where the MSD head takes no samples; call model.train() first")
        if isinstance(forward_batch, dict):
            outputs = model(**forward_batch)
        elif isinstance(forward_batch, (tuple, list)):
            outputs = model(*forward_batch)
        else:
            outputs = model(forward_batch)
    if not got:
        raise SurgeryError("the multi-sample-dropout head did not run in this thread during the forward: the model "
                           "skipped it, or runs it in other threads (nn.DataParallel replicas on several GPUs); "
                           "msd_loss needs one head call per forward in the calling thread: use "
                           "DistributedDataParallel (one process per GPU) instead of DataParallel")
    if len(got) != 1:
        raise SurgeryError(f"the multi-sample-dropout head ran {len(got)} times in one forward; msd_loss needs exactly "
                           "one call (compute the loss from surgery.msd_samples(model) yourself for other models)")
    samples = got[0]
    if postprocess is not None:
        samples = postprocess(samples)
    if (loss_fn is None and isinstance(samples, torch.Tensor) and isinstance(target, torch.Tensor)
            and task == "classification" and (target.dtype.is_floating_point or target.dtype.is_complex)):
        per_sample = tuple(samples.shape[1:])
        extra = "" if postprocess is not None or samples.dim() == target.dim() + 1 else (
            f"; the head's per-sample outputs {per_sample} also need postprocess= to become one row per example "
            "(GPT-2 / Llama score every token and pick the last one)")
        raise SurgeryError(
            f"the target is a {target.dtype} tensor of shape {tuple(target.shape)}: float targets are multi-label "
            "(or soft) labels, which msd_loss's built-in losses do not cover (classification: cross-entropy on "
            "integer class indices; regression: MSE with task='regression'). Pass a per-sample loss, e.g. "
            "loss_fn=lambda out, y: F.binary_cross_entropy_with_logits(out, y)" + extra
        )
    if (postprocess is None and loss_fn is None and isinstance(samples, torch.Tensor) and isinstance(target, torch.Tensor)
            and task == "classification" and samples.dim() != target.dim() + 2):
        raise SurgeryError(
            f"the head's per-sample outputs have shape {tuple(samples.shape)} (K, B, ...) but the target has shape "
            f"{tuple(target.shape)}: this model transforms the head output before returning it (GPT-2 / Llama pick "
            "the last token's score); pass postprocess= to map the (K, B, ...) samples to per-sample logits"
        )
    return msd_sample_loss(samples, target, task=task, loss_fn=loss_fn, ignore_index=ignore_index), outputs
