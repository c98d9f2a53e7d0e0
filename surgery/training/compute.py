"""One training loss for any loop: :func:`compute_loss` (the model's own loss, R-Drop, the paper's
multi-sample-dropout loss, or both) and :func:`msd_loss`. Plain loops, Accelerate and DDP call
them directly; the Trainer integration (:mod:`surgery.training.trainer`) calls them too.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, NamedTuple

import torch
from torch import nn

from ..errors import NotSurgeredError, SurgeryError, SurgeryTypeError
from ..layers.msd import msd_samples, tie
from ..record import get_record, unwrap
from .losses import check_alpha, check_task, logits_of, msd_sample_loss, rdrop_loss
from .pooling import pool_like
from .rdrop import STRATEGIES, call, rdrop_forward

__all__ = ["compute_loss", "msd_loss", "msd_loss_default", "TrainingLoss", "infer_task", "consistency_mask", "shifts_labels",
           "next_token"]


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
            the head output before returning it in a way surgery does not find by itself.
            Without it the samples are pooled as the model pooled their mean
            (:func:`surgery.training.pooling.pool_like`): GPT-2 / Llama sequence classifiers
            score every token and return the last real one, a multiple-choice model returns
            its ``(B * choices, 1)`` scores as ``(B, choices)``; each sample is pooled the same way.

    A causal language model (transformers' ``...ForCausalLM``, or a decoder-only
    ``...ForConditionalGeneration``) scores token ``t + 1`` with the output at position ``t``:
    its own loss shifts ``labels`` by one, and so does this function when the target is
    ``batch["labels"]`` (an explicit ``target`` is taken as already aligned with the outputs).

    Raises:
        NotSurgeredError / SurgeryError: the model has no MSD head (call
            ``surgery.apply(model, msd=K)`` first), it is in eval mode, the head ran more
            than once in the forward, no target, or a loss/target mismatch
            (:func:`msd_sample_loss`).
    """
    rec = get_record(model, required=False)
    if rec is None or not rec.msd:
        raise (NotSurgeredError if rec is None else SurgeryError)(
            f"{type(model).__name__} has no multi-sample-dropout head; call surgery.apply(model, msd=K) first")
    forward_batch, shift = batch, False
    if target is None:
        if not (isinstance(batch, Mapping) and "labels" in batch):
            raise SurgeryError("msd_loss needs a target: pass target=... or a dict batch with 'labels'")
        forward_batch = {k: v for k, v in batch.items() if k != "labels"}
        target = batch["labels"]
        shift = shifts_labels(model)
    with msd_samples(model) as got:
        if not model.training:
            raise SurgeryError("model is in eval mode, where the MSD head takes no samples; call model.train() first")
        outputs = call(model, forward_batch)
    if not got:
        raise SurgeryError("the multi-sample-dropout head did not run in this thread during the forward: the model "
                           "skipped it, or runs it in other threads (nn.DataParallel replicas on several GPUs); "
                           "msd_loss needs one head call per forward in the calling thread: use "
                           "DistributedDataParallel (one process per GPU) instead of DataParallel")
    if len(got) != 1:
        raise SurgeryError(f"the multi-sample-dropout head ran {len(got)} times in one forward; msd_loss needs exactly "
                           "one call (compute the loss from surgery.msd_samples(model) yourself for other models)")
    samples = tie(got[0], outputs)  # the backward runs through the output an engine's hooks wrapped (ZeRO-3)
    samples = postprocess(samples) if postprocess is not None else pool_like(samples, outputs)
    if shift:
        samples, target = next_token(samples, target)
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
            f"{tuple(target.shape)}: this model transforms the head output before returning it in a way surgery "
            "could not match to its logits (not one token per example, not a reshape). Compute the loss with "
            "surgery.msd_loss(model, batch, postprocess=...) mapping the (K, B, ...) samples to per-example logits "
            "(in your loop, or in a Trainer subclass's compute_loss), or pass msd_loss=False to train on the head's "
            "averaged output"
        )
    return msd_sample_loss(samples, target, task=task, loss_fn=loss_fn, ignore_index=ignore_index), outputs


def shifts_labels(model: nn.Module) -> bool:
    """True for a transformers causal language model, whose own loss scores ``labels[:, t + 1]`` with
    the logits at position ``t`` (transformers' ``ForCausalLMLoss``): a ``...ForCausalLM`` class, or
    a decoder-only ``...ForConditionalGeneration`` (vision-language models). Encoder-decoder models
    shift their decoder inputs instead, never the labels."""
    inner = unwrap(model)
    kind = getattr(inner, "loss_type", None)
    cfg = getattr(inner, "config", None)
    return kind == "ForCausalLM" or (kind == "ForConditionalGeneration"
                                     and not getattr(cfg, "is_encoder_decoder", False))


def next_token(samples: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample outputs ``(K, B, T, ...)`` and ``labels`` ``(B, T)`` aligned as a causal LM's loss
    aligns them: the outputs at positions ``0 .. T-2`` against the labels at ``1 .. T-1``.

    Raises:
        SurgeryError: the outputs are not per-token (``(K, B, T, ...)`` against ``(B, T)`` labels).
    """
    if not (isinstance(samples, torch.Tensor) and isinstance(labels, torch.Tensor) and labels.dim() == 2
            and samples.dim() >= 4 and tuple(samples.shape[1:3]) == tuple(labels.shape)):
        raise SurgeryError(
            "a causal language model's labels are its next tokens (B, T), scored by the per-token outputs "
            f"(K, B, T, vocab), but the head's samples have shape {tuple(getattr(samples, 'shape', ()))} and the labels "
            f"{tuple(getattr(labels, 'shape', ()))}; put the MSD head on the LM head (head='lm_head')")
    return samples[:, :, :-1], labels[:, 1:]


class TrainingLoss(NamedTuple):
    """What :func:`compute_loss` returns. ``loss`` is what to backpropagate."""

    loss: torch.Tensor
    task_loss: torch.Tensor  # the task part (averaged over passes / samples)
    consistency: torch.Tensor | None  # the R-Drop consistency term C (before alpha); None without R-Drop
    outputs: Any  # the (first pass's) model outputs


def infer_task(model: nn.Module, labels: Any = None) -> str:
    """``"regression"`` for a transformers model with ``problem_type="regression"`` or one label, or for a
    model without a config and float ``labels`` (real-valued targets); else ``"classification"``.

    Raises:
        SurgeryError: ``problem_type="multi_label_classification"`` (per-label Bernoulli outputs;
            neither the softmax KL of R-Drop nor cross-entropy applies).
    """
    cfg = getattr(unwrap(model), "config", None)
    problem = getattr(cfg, "problem_type", None)
    if problem == "multi_label_classification":
        raise SurgeryError("multi-label classification (independent sigmoid outputs) is not supported by the R-Drop "
                           "and MSD losses here: their consistency/task terms assume one softmax or one regression "
                           "value; compute your own loss from surgery.rdrop_forward / surgery.msd_samples")
    if problem == "regression" or (problem is None and getattr(cfg, "num_labels", None) == 1):
        return "regression"
    if cfg is None and isinstance(labels, torch.Tensor) and labels.dtype.is_floating_point:
        return "regression"  # a module without a config says nothing; its float targets are values, not classes
    return "classification"


def consistency_mask(inputs: Mapping, logits: torch.Tensor, *, decoder: bool | None = None) -> torch.Tensor | None:
    """The padding mask for a token-level consistency term, taken from the batch.

    For logits ``(B, T, C)``: the first of ``attention_mask``, ``decoder_attention_mask``,
    ``labels != -100`` whose shape is ``(B, T)``; None for ``(B, C)`` logits or when
    nothing matches. Decoder logits of an encoder-decoder model (``decoder=True``; by default
    assumed when the batch has a ``decoder_*`` entry) never take the encoder's
    ``attention_mask``, even when the two lengths happen to match: only
    ``decoder_attention_mask`` or ``labels != -100``.
    """
    if logits.dim() < 3:
        return None
    if decoder is None:
        decoder = any(isinstance(k, str) and k.startswith("decoder_") for k in inputs)
    rows = tuple(logits.shape[:-1])
    for key in ("decoder_attention_mask",) if decoder else ("attention_mask", "decoder_attention_mask"):
        m = inputs.get(key)
        if isinstance(m, torch.Tensor) and tuple(m.shape) == rows:
            return m
    labels = inputs.get("labels")
    if isinstance(labels, torch.Tensor) and tuple(labels.shape) == rows and not labels.dtype.is_floating_point:
        return labels != -100
    return None


def compute_loss(model: nn.Module, batch: Mapping, *, rdrop_alpha: float = 0.0, msd_loss: bool | None = None,
                 task: str | None = None, strategy: str = "auto") -> TrainingLoss:
    """The training loss of ``model`` on ``batch`` (a dict with ``labels``).

    * neither option: the model's own loss, one forward;
    * ``msd_loss=True``: the mean of the K per-sample losses of the MSD head (one forward), the
      paper's loss. The default ``msd_loss=None`` is True for a model with an MSD head
      (``apply(model, msd=K)``) in training mode; ``msd_loss=False`` trains on the model's own
      loss of the head's averaged output instead (:func:`msd_loss_default`);
    * ``rdrop_alpha > 0``: two passes (:func:`surgery.rdrop_forward`), the model's own loss
      averaged over them plus ``rdrop_alpha * C`` on the logits (padding excluded with
      :func:`consistency_mask`);
    * both: two passes, the task part is the mean of the per-sample losses of both passes,
      the consistency term compares the two passes' averaged outputs.

    Args:
        task: ``"classification"`` or ``"regression"``; default :func:`infer_task`.
        strategy: how the two R-Drop passes run (``"auto"``, ``"concat"``, ``"separate"``).

    Raises:
        SurgeryError: no ``labels``, ``alpha`` < 0 / NaN, an unknown task/strategy, no MSD
            head with ``msd_loss=True`` (``apply(model, msd=K)`` first), a model that computes
            no loss from its labels.
    """
    alpha = check_alpha(rdrop_alpha)
    if strategy not in STRATEGIES:
        raise SurgeryError(f"unknown strategy {strategy!r}; use one of {', '.join(map(repr, STRATEGIES))}")
    if not isinstance(batch, Mapping) or "labels" not in batch:
        raise SurgeryError("compute_loss needs a dict batch with 'labels' (the model's keyword arguments)")
    if not isinstance(model, nn.Module):
        raise SurgeryTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    task = check_task(task) if task is not None else infer_task(model, batch["labels"])
    msd_loss = msd_loss_default(model, msd_loss)
    if msd_loss:
        get_record(model)  # NotSurgeredError with the apply() hint
    else:
        _check_takes_labels(model, alpha)
    if alpha == 0.0 and not msd_loss:
        out = model(**batch)
        loss = _own_loss(out)
        return TrainingLoss(loss, loss.detach(), None, out)
    if not msd_loss:
        out1, out2 = rdrop_forward(model, batch, strategy=strategy)
        task_loss = (_own_loss(out1) + _own_loss(out2)) / 2
        logits = logits_of(out1, "model output")
    else:
        labels = batch["labels"]
        fwd = {k: v for k, v in batch.items() if k != "labels"}
        if alpha == 0.0:
            loss, out = _msd_loss(model, batch, task=task)  # the target is batch["labels"] (shifted for a causal LM)
            return TrainingLoss(loss, loss.detach(), None, out)
        with msd_samples(model) as got:
            out1, out2 = rdrop_forward(model, fwd, strategy=strategy)
        if len(got) not in (1, 2):
            raise SurgeryError(f"the multi-sample-dropout head ran {len(got)} times in two R-Drop passes; expected one "
                               "call per forward")
        samples = got[0] if len(got) == 1 else torch.cat(got, dim=1)  # (K, 2B, ...) in both strategies
        samples = pool_like(samples, torch.cat([logits_of(out1, "model output"), logits_of(out2, "model output")]))
        target = torch.cat([labels, labels])
        if shifts_labels(model):
            samples, target = next_token(samples, target)
        task_loss = msd_sample_loss(samples, target, task=task)
        logits = logits_of(out1, "model output")
    decoder = bool(getattr(getattr(unwrap(model), "config", None), "is_encoder_decoder", False))
    consistency = rdrop_loss(out1, out2, task=task, alpha=1.0, mask=consistency_mask(batch, logits, decoder=decoder))
    return TrainingLoss(task_loss + alpha * consistency, task_loss.detach(), consistency.detach(), out1)


def msd_loss_default(model: nn.Module | None, msd_loss: bool | None) -> bool:
    """``msd_loss`` as given; None (the default): True when ``model`` has a multi-sample-dropout head and is in
    training mode, so that a model surgered with ``apply(msd=K)`` trains on the paper's loss (the mean of the K
    per-sample losses) unless ``msd_loss=False`` asks for the head's averaged output."""
    if msd_loss is not None:
        if not isinstance(msd_loss, bool):
            raise SurgeryTypeError(f"msd_loss must be True, False or None (the default), got {msd_loss!r}")
        return msd_loss
    rec = get_record(model, required=False) if isinstance(model, nn.Module) else None
    return bool(rec is not None and rec.msd and model.training)


def _check_takes_labels(model: nn.Module, alpha: float) -> None:
    """Refuse, before any forward, a model whose forward takes no ``labels``: it computes no loss."""
    inner = unwrap(model)
    try:
        params = inspect.signature(inner.forward).parameters.values()
    except (TypeError, ValueError):
        return
    if any(p.name == "labels" or p.kind == p.VAR_KEYWORD for p in params):
        return
    how = ("out1, out2 = surgery.rdrop_forward(model, inputs); loss = surgery.rdrop_loss(out1, out2, labels, "
           "task=..., alpha=...)" if alpha > 0 else "loss = your_loss_fn(model(**inputs), labels)")
    raise SurgeryError(
        f"{type(inner).__name__}.forward takes no 'labels' argument, so the model computes no loss of its own, and "
        "compute_loss without msd_loss=True trains on the model's own loss. Compute the task loss yourself from the "
        f"batch without 'labels': {how}; or, with a multi-sample-dropout head, pass msd_loss=True (surgery then "
        "computes cross-entropy or MSE against batch['labels'], task=...)"
    )


def _own_loss(out: Any) -> torch.Tensor:
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None and isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor) and out[0].dim() == 0:
        loss = out[0]
    if not isinstance(loss, torch.Tensor):
        raise SurgeryError("the model computed no loss from the batch's 'labels' (its output has no .loss); "
                           "use surgery.rdrop_loss(out1, out2, target, task=...) for models without a built-in loss")
    return loss


_msd_loss = msd_loss  # compute_loss's own argument msd_loss shadows the function
