"""The MSD head's per-sample outputs, pooled as the model pooled their mean.

A model may transform its head's output before returning it: GPT-2 / Llama / Mistral sequence classifiers
apply ``score`` to every token and return the last real token's row; a multiple-choice model scores each
``(example, choice)`` row with one output and returns them as ``(B, choices)``. The MSD head returns the
mean of its ``K`` samples, so the model's logits are that mean, pooled. :func:`pool_like` finds the pooling
from the two (which token of each example, or which reshape, gives exactly the model's logits) and applies
it to every sample: the paper's loss then scores each sample as the model scores its output. Nothing is
guessed from the model's class: a pooling is used only when it reproduces the model's logits.
"""

from __future__ import annotations

from typing import Any

import torch

from .losses import logits_of

__all__ = ["pool_like"]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6))


def pool_like(samples: Any, outputs: Any) -> Any:
    """``samples`` ``(K, B, ...)`` mapped as the model mapped their mean to ``outputs``' logits: unchanged when
    the shapes already agree, reshaped (multiple choice: ``(K, B*C, 1)`` -> ``(K, B, C)``), or one token per
    example (``(K, B, T, C)`` -> ``(K, B, C)``, the token whose mean is the model's row). Unchanged when no
    such pooling gives the model's logits (the callers then refuse, naming ``postprocess=``)."""
    if not isinstance(samples, torch.Tensor) or samples.dim() < 2:
        return samples
    try:
        logits = logits_of(outputs)
    except (TypeError, ValueError):
        return samples
    mean = samples.detach().mean(0)
    if mean.shape == logits.shape:
        return samples
    logits = logits.detach()
    if mean.numel() == logits.numel() and _same(mean.reshape(logits.shape), logits):
        return samples.reshape(samples.shape[0], *logits.shape)
    if mean.dim() == logits.dim() + 1 and mean.shape[0] == logits.shape[0] and mean.shape[2:] == logits.shape[1:]:
        rows = torch.arange(mean.shape[0], device=mean.device)
        dist = (mean.float() - logits.float().unsqueeze(1)).abs().flatten(2).amax(-1)  # (B, T)
        token = dist.argmin(1)
        if _same(mean[rows, token], logits):
            return samples[:, rows, token]
    return samples
