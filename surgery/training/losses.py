"""The training losses of the regularizers, on outputs already computed: R-Drop's and the paper's
multi-sample-dropout loss.

**R-Drop** (Liang et al., "R-Drop: Regularized Dropout for Neural Networks", NeurIPS 2021): every
example goes through the model twice with independent dropout noise (:func:`surgery.rdrop_forward`),
and the two output distributions are pulled together. The paper's per-example objective is::

    L = NLL(P1, y) + NLL(P2, y) + alpha * 1/2 * (KL(P1 || P2) + KL(P2 || P1))

:func:`rdrop_loss` returns exactly half of it (the task loss *averaged* over the two
passes, so its scale is that of an ordinary single-pass loss)::

    loss = 1/2 * (task(out1, y) + task(out2, y)) + alpha * C
    C    = 1/4 * (KL(P1 || P2) + KL(P2 || P1))           classification / token tasks
    C    = 1/2 * mean((out1 - out2) ** 2)                  regression

Halving task and consistency together keeps their ratio, so the ``alpha`` values the
paper and its code use carry over unchanged. Reductions: KL is summed over the class
dimension and *averaged* over examples (or over non-padding tokens, ``mask``), like the
task loss; the official criteria sum both over examples and tokens and then divide
the gradient by the sample size (fairseq), which is the same average. Summing the KL over
the batch while averaging the task loss (as the authors' Hugging Face GLUE script does)
would make the effective ``alpha`` grow with batch size and sequence length.

**Multi-sample dropout** (Inoue 2019), the paper's form: the mean of the ``K`` per-sample losses
(:func:`msd_sample_loss`), on the per-sample outputs :func:`surgery.msd_samples` collects.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ..errors import SurgeryError, SurgeryTypeError

__all__ = ["rdrop_loss", "msd_sample_loss", "symmetric_kl", "check_task", "check_alpha", "logits_of"]

_TASK_ALIASES = {"classification": "classification", "token_classification": "classification",
                 "sequence_classification": "classification", "regression": "regression"}


def check_task(task: Any) -> str:
    """``task`` normalised to one of :data:`TASKS`, or a SurgeryError listing them."""
    if not isinstance(task, str) or task not in _TASK_ALIASES:
        raise SurgeryError(f"unknown task {task!r}; use one of {', '.join(map(repr, _TASK_ALIASES))}")
    return _TASK_ALIASES[task]


def check_alpha(alpha: Any) -> float:
    """``alpha`` as a finite float >= 0, or a SurgeryError."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or isinstance(alpha, complex):
        raise SurgeryError(f"alpha must be a number >= 0, got {alpha!r} ({type(alpha).__name__})")
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha < 0:
        raise SurgeryError(f"alpha must be a finite number >= 0 (the weight of the consistency term), got {alpha!r}")
    return alpha


def logits_of(out: Any, name: str = "output") -> torch.Tensor:
    """The tensor of a model output: ``out`` itself, ``out.logits`` or ``out["logits"]``."""
    if isinstance(out, torch.Tensor):
        return out
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise SurgeryTypeError(
            f"{name} must be a tensor or a model output with a .logits tensor, got {type(out).__name__}"
            + (" whose logits is None" if hasattr(out, "logits") or (isinstance(out, Mapping) and "logits" in out) else "")
            + "; pass the prediction tensor itself (e.g. out.start_logits)"
        )
    return logits


def _row_mask(mask: torch.Tensor | None, shape: torch.Size, what: str) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise SurgeryTypeError(f"mask must be a tensor (1/True = real token, 0/False = padding), got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape[: mask.dim()]) or mask.dim() == 0:
        raise SurgeryError(f"mask shape {tuple(mask.shape)} does not match the {what} shape {tuple(shape)}; "
                           f"it must be {tuple(shape)} or a leading part of it (e.g. attention_mask (batch, seq))")
    return mask != 0


def _masked_mean(values: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    if keep is None:
        return values.mean()
    keep = keep.reshape(tuple(keep.shape) + (1,) * (values.dim() - keep.dim())).expand_as(values)
    w = keep.to(values.dtype)
    return (values * w).sum() / w.sum().clamp_min(1.0)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None, ignore_index: int):
    valid = target != ignore_index
    if keep is not None:
        valid = valid & keep
    safe = torch.where(valid, target, torch.zeros_like(target))
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), safe.reshape(-1), reduction="none")
    w = valid.reshape(-1).to(nll.dtype)
    return (nll * w).sum() / w.sum().clamp_min(1.0)


def check_target(target: Any, pred: torch.Tensor, task: str) -> torch.Tensor:
    if not isinstance(target, torch.Tensor):
        raise SurgeryTypeError(f"target must be a tensor, got {type(target).__name__}")
    if task == "classification":
        if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
            raise SurgeryError(
                f"task='classification' needs integer class indices as target, got a {target.dtype} tensor of shape "
                f"{tuple(target.shape)}; for a regression target use task='regression'"
            )
        if tuple(target.shape) != tuple(pred.shape[:-1]):
            raise SurgeryError(f"classification target shape {tuple(target.shape)} does not match the outputs "
                               f"{tuple(pred.shape)}: it must be the outputs' shape without the class dimension, "
                               f"{tuple(pred.shape[:-1])}")
        return target
    if target.dtype == torch.bool or target.dtype.is_complex:
        raise SurgeryError(f"task='regression' needs a real-valued target, got {target.dtype}")
    if tuple(target.shape) == tuple(pred.shape):
        return target.to(torch.float32)
    if pred.dim() >= 1 and pred.shape[-1] == 1 and tuple(target.shape) == tuple(pred.shape[:-1]):
        return target.to(torch.float32).unsqueeze(-1)
    raise SurgeryError(f"regression target shape {tuple(target.shape)} does not match the predictions "
                       f"{tuple(pred.shape)} (no broadcasting: a (B,) target against (B, 1) predictions is "
                       "accepted, anything else must match exactly)")


def symmetric_kl(logits1: torch.Tensor, logits2: torch.Tensor) -> torch.Tensor:
    """``KL(P1 || P2) + KL(P2 || P1)`` per row (summed over the last, class, dimension), in float32.

    Uses the identity ``KL(P||Q) + KL(Q||P) = sum_c (p_c - q_c)(log p_c - log q_c)``.
    """
    lp = F.log_softmax(logits1.float(), dim=-1)
    lq = F.log_softmax(logits2.float(), dim=-1)
    return ((lp.exp() - lq.exp()) * (lp - lq)).sum(-1)


def rdrop_loss(out1: Any, out2: Any, target: torch.Tensor | None = None, *, task: str = "classification",
               alpha: float = 1.0, mask: torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
    """The R-Drop loss of two passes over the same batch (see the module docstring for the math).

    Args:
        out1, out2: the two passes' outputs: tensors, or model outputs with ``.logits``.
            Classification: logits ``(..., C)`` with ``C >= 2`` (token tasks: ``(B, T, C)``).
            Regression: predictions of any shape, e.g. ``(B,)`` or ``(B, 1)``.
        target: optional. Classification: integer class indices shaped like the logits
            without the class dimension (``ignore_index`` entries are skipped).
            Regression: values shaped like the predictions (or ``(B,)`` for ``(B, 1)``).
            When given, the task loss (cross-entropy / MSE) averaged over the two passes
            is added; without it the result is ``alpha * C`` alone.
        task: ``"classification"`` (also ``"token_classification"``) or ``"regression"``.
        alpha: weight of the consistency term, finite and >= 0.
        mask: optional padding mask, ``1``/``True`` for real positions (an ``attention_mask``
            works as is), shaped like the leading dimensions of the outputs. Masked positions
            count in neither the consistency term nor the task loss.
        ignore_index: target value skipped by the classification task loss.

    Returns:
        A scalar float32 tensor; gradients reach both passes.

    Raises:
        SurgeryError: outputs of different shapes, an unknown task, ``alpha`` < 0 / NaN /
            infinite, a target of the wrong shape or kind (e.g. a float target with
            ``task="classification"``), a single-class classification output, a bad mask.
        SurgeryTypeError: an output that is neither a tensor nor has ``.logits``.
    """
    task = check_task(task)
    alpha = check_alpha(alpha)
    a, b = logits_of(out1, "out1"), logits_of(out2, "out2")
    if a.shape != b.shape:
        raise SurgeryError(f"the two passes have different shapes, {tuple(a.shape)} and {tuple(b.shape)}; "
                           "R-Drop compares two forwards of the same batch")
    if task == "classification":
        if a.dim() == 0 or a.shape[-1] < 2:
            raise SurgeryError(
                f"task='classification' needs logits with a class dimension of size >= 2, got shape {tuple(a.shape)}: "
                "a softmax over one value is constant, so its KL is identically zero. For one-output (regression) "
                "heads use task='regression'"
            )
        keep = _row_mask(mask, a.shape[:-1], "logits without the class dimension")
        consistency = 0.25 * _masked_mean(symmetric_kl(a, b), keep)
    else:
        keep = _row_mask(mask, a.shape, "predictions")
        consistency = 0.5 * _masked_mean((a.float() - b.float()).pow(2), keep)
    if target is None:
        return alpha * consistency
    t = check_target(target, a, task)
    if task == "classification":
        t = t.to(a.device)
        task_loss = 0.5 * (cross_entropy(a, t, keep, ignore_index) + cross_entropy(b, t, keep, ignore_index))
    else:
        t = t.to(a.device)
        task_loss = 0.5 * (_masked_mean((a.float() - t).pow(2), keep) + _masked_mean((b.float() - t).pow(2), keep))
    return task_loss + alpha * consistency


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
    if not isinstance(samples, torch.Tensor) or samples.dim() < 2:
        raise SurgeryTypeError("samples must be a (K, B, ...) tensor of per-sample head outputs; for a head that "
                               "returns a tuple or a model output, pass postprocess= to pick the tensor")
    k = samples.shape[0]
    if loss_fn is not None:
        return torch.stack([loss_fn(samples[i], target) for i in range(k)]).mean()
    task = check_task(task)
    if task == "classification" and samples.shape[-1] < 2:
        raise SurgeryError(f"task='classification' needs a class dimension of size >= 2, got per-sample outputs "
                           f"{tuple(samples.shape[1:])}: a one-output head is a regression head (task='regression'), "
                           "or scores one row of a group (multiple choice: map the samples to one row per example "
                           "with postprocess=, e.g. lambda s: s.view(s.shape[0], -1, num_choices))")
    t = check_target(target, samples[0], task).to(samples.device)
    if task == "classification":
        # every sample has the same valid positions, so the mean over all K*B rows is the mean of the K means
        return cross_entropy(samples, t.expand((k,) + tuple(t.shape)), None, ignore_index)
    return (samples.float() - t).pow(2).mean()
