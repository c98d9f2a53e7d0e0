"""Mixout (Lee et al., "Mixout: Effective Regularization to Finetune Large-scale
Pretrained Language Models", ICLR 2020).

In training, each *input neuron* of a layer (one column of ``weight``, shared by all
rows and the whole batch) is swapped with probability ``p`` for its pretrained value
``target`` and the result rescaled so that ``E[W_mix] = W``::

    W_mix = target + M * (W - target) / (1 - p),    M ~ Bernoulli(1 - p), one per column

computed as ``torch.lerp(target, W, M / (1 - p))``: one weight-sized temporary (the mixed
weight), never a weight-sized mask. The gradient is exact, ``dL/dW = M / (1-p) * dL/dW_mix``
(the widely copied reference implementation returns ``M * dL/dW_mix``, (1-p) times too
small). The bias is not mixed. In eval, and for ``p == 0``, the layer computes exactly
what the original layer computes. ``p == 1`` uses the target alone (W gets zero gradient).

Masks come from the global torch generator of the weight's device, so seeding works and
activation checkpointing (which restores RNG state) recomputes the same masks.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SurgeryError
from ..options import check_p
from ..record import TARGET_SUFFIX
from .swap import MixoutLayer

__all__ = ["MixLinear", "LoraMixout", "mixout_weight", "is_conv1d", "TARGET_CHECKS"]

# Checks a training forward runs on ``(weight, target)`` before mixing: each returns when the pair can be
# mixed and raises the one error that explains why not. Engines register theirs (``surgery.distributed``
# refuses weights a sharding engine partitioned without their targets); a layer knows no engine.
TARGET_CHECKS: list[Callable[[torch.Tensor, torch.Tensor], None]] = []


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 family: a Linear with the weight stored (in, out))."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def _scale(p: float, n: int, like: torch.Tensor) -> torch.Tensor:
    """``M / (1 - p)`` for ``n`` input neurons: a vector, never a weight-sized mask.

    Always float32 (float64 for float64 weights): ``1 / (1 - p)`` rounded to bf16 is off by up
    to 0.4% (p = 0.1: 1.1111 becomes 1.1094, so ``E[W_mix]`` would be 0.16% short). ``torch.lerp``
    of a bf16 weight with a float32 scale would promote the mixed weight to float32, so the
    callers compute the mix in the weight's dtype from this exact scale."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    keep = torch.empty(n, device=like.device, dtype=dtype).bernoulli_(1.0 - p)
    return keep.div_(1.0 - p)


def _mix(target: torch.Tensor, weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``target + s * (weight - target)`` in the weight's dtype, with the scale ``s`` applied exactly.

    For a float32/float64 weight it is one ``torch.lerp``. For a bf16/fp16 weight and a float32
    scale, the product is evaluated in float32 and rounded once into a tensor of the weight's
    dtype (``weight - target`` is exact in the weight's dtype whenever the two are within a factor
    of 2, as a fine-tuned weight and its pretrained value are)."""
    t = target.to(weight.dtype)
    if s.dtype == weight.dtype:
        return torch.lerp(t, weight, s)
    return torch.addcmul(t, weight - t, s, out=torch.empty_like(weight, memory_format=torch.contiguous_format))


def _frozen(t: torch.Tensor) -> nn.Parameter:
    """A Mixout target: a Parameter that never gets a gradient (see :class:`MixLinear`)."""
    return nn.Parameter(t, requires_grad=False)


class _MixoutLinear(torch.autograd.Function):
    """``F.linear(x, lerp(T, W, s), bias)`` with the exact Mixout gradient in one pass.

    Forward builds the mixed weight once. Backward computes ``dL/dx = g W_mix`` and
    ``dL/dW = s * (g^T x)``, scaling whichever is smaller in place, the input columns
    (``g^T (x * s)``) or the product: no weight-sized temporary beyond the gradient
    itself. ``keep_mixed`` keeps the mixed weight for backward (default mode); without it
    only ``x`` and ``s`` are kept beside the Parameters and the mixed weight is recomputed
    there (low-memory mode: one extra elementwise pass, one weight fewer alive).
    Matmuls run in the dtype of the incoming gradient (autocast), gradients come back in
    the dtypes of ``x``/``weight``/``bias``.
    """

    @staticmethod
    def forward(ctx, x, weight, target, s, bias, transposed, keep_mixed):
        w = _mix(target, weight, s)
        ctx.save_for_backward(x, w, s) if keep_mixed else ctx.save_for_backward(x, weight, target, s)
        ctx.transposed, ctx.keep_mixed = transposed, keep_mixed
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return F.linear(x, w.t() if transposed else w, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        if ctx.keep_mixed:
            x, w, s = ctx.saved_tensors
        else:
            x, weight, target, s = ctx.saved_tensors
            w = _mix(target, weight, s)
        x_dt, w_dt, b_dt = ctx.dtypes
        dt = g.dtype
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            wl = w.t() if ctx.transposed else w  # (out, in)
            gx = (g @ wl.to(dt)).to(x_dt)
        g2 = g.reshape(-1, g.shape[-1])  # (tokens, out)
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1]).to(dt)  # (tokens, in)
            sv = s.reshape(-1)  # one scale per input neuron, float32: multiplied in float32, never rounded
            out_f = g2.shape[1]
            if x2.shape[0] < out_f:  # fewer tokens than output neurons: scale the input
                x2 = (x2 * sv).to(dt)
                gw = x2.t() @ g2 if ctx.transposed else g2.t() @ x2
            elif ctx.transposed:  # (in, out): scale rows
                gw = (x2.t() @ g2).mul_(sv.unsqueeze(1))
            else:  # (out, in): scale columns
                gw = (g2.t() @ x2).mul_(sv)
            gw = gw.to(w_dt)
        if b_dt is not None and ctx.needs_input_grad[4]:
            gb = g2.sum(0).to(b_dt)
        return gx, gw, None, None, gb, None, None


def mixout_weight(weight: torch.Tensor, target: torch.Tensor, p: float, *, transposed: bool = False) -> torch.Tensor:
    """The mixed weight ``target + M * (weight - target) / (1 - p)`` with a fresh mask.

    ``weight`` is (out, in), or (in, out) when ``transposed``; one mask value per input neuron.
    """
    if p == 1.0:
        return target + weight * 0.0  # target alone; keeps weight in the graph with zero gradient
    n = weight.shape[0] if transposed else weight.shape[-1]
    s = _scale(p, n, weight)
    return _mix(target, weight, s.unsqueeze(1) if transposed else s)


def _check_target(weight: torch.Tensor, target: torch.Tensor) -> None:
    """Before a training forward: a target that code unfroze (``model.requires_grad_(True)``, PEFT's
    ``modules_to_save`` copy of a head) is frozen again, since a target never trains and took no
    gradient yet; then every registered engine check runs."""
    if target.requires_grad and target.is_leaf and isinstance(target, nn.Parameter):
        target.requires_grad_(False)
    if (type(weight) is nn.Parameter and weight.shape != target.shape and weight.dim() == target.dim()
            and weight.numel() > 0 and not hasattr(weight, "ds_id")):  # a whole weight of another shape (a
        # partitioning engine leaves an empty or flat shard instead: the registered engine checks say so)
        raise SurgeryError(
            f"a Mixout layer's weight has shape {tuple(weight.shape)} but its pretrained target "
            f"{tuple(target.shape)}: the weight was replaced after surgery.apply (model.resize_token_embeddings "
            "replaces the embedding and the LM head tied to it, which mixout_tied=True mixes). Resize before "
            "apply: surgery.revert(model), resize, surgery.apply(model, ...) again")
    for check in TARGET_CHECKS:
        check(weight, target)


class MixLinear(MixoutLayer, nn.Linear):
    """A ``nn.Linear`` (or transformers ``Conv1D``) with Mixout toward a frozen target.

    Build it with :meth:`from_module`, which shares the original ``weight``/``bias``
    Parameter objects (state_dict keys and optimizer references survive) and hook
    dictionaries and library attributes (:func:`~surgery.layers.swap.carry_over`) and adds one frozen
    Parameter ``mixout_target`` (``requires_grad=False``). :meth:`to_module` gives
    back the original module (same object, same class) holding the current Parameters.

    The target is a Parameter, not a buffer, so distributed engines treat it like the
    weight it belongs to: DDP broadcasts it once at construction and never again (it has
    no gradient and is not a buffer), FSDP2 ``fully_shard`` shards it and all-gathers it
    with the layer. Optimizers skip it (no gradient, no state); it shows up in
    ``model.parameters()`` counts (see ``surgery.distributed``). Each training forward runs
    :data:`TARGET_CHECKS` first.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        p: Mixout probability in [0, 1] (the attribute ``mixout_p``).
        transposed: weight stored (in, out), as transformers ``Conv1D`` stores it.
        low_memory: keep only the input and the mask for backward, recomputing the
            mixed weight there (saves one weight-sized tensor per layer, costs one
            elementwise pass; the attribute ``mixout_low_memory``).
    """

    def __init__(self, in_features, out_features, bias=True, p: float = 0.0, *, transposed=False,
                 low_memory=False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.mixout_p = check_p(p, "p")
        self.transposed = transposed
        self.mixout_low_memory = low_memory
        if transposed:
            self.weight = nn.Parameter(self.weight.detach().t().contiguous())
        self.register_parameter(TARGET_SUFFIX, _frozen(self.weight.detach().clone()))
        self.__dict__["_original"] = None  # the module this replaced (not a submodule: keys stay)

    @classmethod
    def from_module(cls, linear: nn.Module, p: float, *, target: torch.Tensor | None = None,
                    target_dtype: torch.dtype | None = None, low_memory: bool = False) -> "MixLinear":
        """Take the place of ``linear`` (an ``nn.Linear`` or ``Conv1D``) sharing its Parameters.

        ``target`` defaults to a copy of the current weight (in ``target_dtype`` if given).
        """
        transposed = is_conv1d(linear)
        w = linear.weight
        in_f, out_f = (w.shape[0], w.shape[1]) if transposed else (w.shape[1], w.shape[0])
        with torch.device("meta"):
            new = cls(in_f, out_f, bias=False, p=p, transposed=transposed, low_memory=low_memory)
        new.weight = w
        new.bias = linear.bias
        if target is None:
            target = w.detach().to(dtype=target_dtype or w.dtype, copy=True)
        if target.shape != w.shape:
            raise ValueError(f"target shape {tuple(target.shape)} does not match weight shape {tuple(w.shape)}")
        setattr(new, TARGET_SUFFIX, _frozen(target.detach()))
        new._adopt(linear)
        return new

    @property
    def orig(self) -> str:
        """Dotted class name of the module :meth:`to_module` gives back (the record's ``orig``)."""
        if self.__dict__.get("_original") is None:
            return "transformers.pytorch_utils.Conv1D" if self.transposed else "torch.nn.modules.linear.Linear"
        return super().orig

    def to_module(self) -> nn.Module:
        """The original module (same object and class) holding this layer's current Parameters."""
        orig = self.__dict__.get("_original")
        if orig is None:
            with torch.device("meta"):
                if self.transposed:  # what from_module took the place of: transformers' Conv1D (nf=out, nx=in)
                    from transformers.pytorch_utils import Conv1D
                    orig = Conv1D(self.out_features, self.in_features)
                else:
                    orig = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        orig.weight = self.weight
        orig.bias = self.bias
        return self._hand_back(orig)

    @property
    def target(self) -> torch.Tensor:
        return getattr(self, TARGET_SUFFIX)

    def loaded_target(self, state_dict, prefix: str):
        return state_dict.get(prefix + "weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.mixout_p
        if not self.training or p == 0.0:
            if self.transposed:  # exactly what transformers' Conv1D computes
                out = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight) if self.bias is not None \
                    else x.reshape(-1, x.size(-1)) @ self.weight
                return out.view(x.shape[:-1] + (self.out_features,))
            return F.linear(x, self.weight, self.bias)
        w, t = self.weight, self.target
        if not torch.compiler.is_compiling():
            _check_target(w, t)
        if not w.requires_grad:
            self._warn_frozen("This happens when the model is frozen or wrapped by get_peft_model after "
                              "surgery.apply: call surgery.revert(model) first, then surgery.apply(peft_model, "
                              "mixout=p), which mixes the LoRA adapters and leaves frozen layers alone")
        if p < 1.0:  # a target in a smaller dtype is cast inside (low-memory mode keeps it uncast)
            n = w.shape[0] if self.transposed else w.shape[1]
            s = _scale(p, n, w)
            return _MixoutLinear.apply(x, w, t, s.unsqueeze(1) if self.transposed else s, self.bias, self.transposed,
                                       not self.mixout_low_memory)
        wm = mixout_weight(w, t.to(w.dtype), p, transposed=self.transposed)
        return F.linear(x, wm.t() if self.transposed else wm, self.bias)

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
             f"p={self.mixout_p}")
        if self.transposed:
            s += ", transposed=True"
        if self.mixout_low_memory:
            s += ", low_memory=True"
        return s


class LoraMixout(MixoutLayer, nn.Linear):
    """A PEFT LoRA layer's ``lora_A`` with Mixout on the layer's effective weight ``W0 + s B A``
    toward the frozen base weight ``W0``: its input is scaled by ``M / (1 - p)``, one mask per
    forward shared by the batch, so the LoRA layer computes ``W0 x + s B A (x * M / (1 - p))``
    (the math: :mod:`surgery.regularizers.mixout.lora`). No target copy: the target is ``W0``.

    Shares the ``lora_A`` Linear's Parameters (keys and optimizer references survive);
    :meth:`to_module` gives back the original module holding them.
    """

    transposed = False  # recorded like MixLinear's flag

    def __init__(self, in_features, out_features, bias=False, p: float = 0.0, *, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.mixout_p = check_p(p, "p")
        self.__dict__["_original"] = None

    @classmethod
    def from_module(cls, linear: nn.Linear, p: float) -> "LoraMixout":
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=False, p=p)
        new.weight, new.bias = linear.weight, linear.bias
        new._adopt(linear)
        return new

    @property
    def orig(self) -> str:
        return "torch.nn.modules.linear.Linear" if self.__dict__.get("_original") is None else super().orig

    def to_module(self) -> nn.Module:
        orig = self.__dict__.get("_original")
        if orig is None:
            with torch.device("meta"):
                orig = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        orig.weight, orig.bias = self.weight, self.bias
        return self._hand_back(orig)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.mixout_p
        if self.training and p > 0.0:
            if p == 1.0:
                x = x * torch.zeros(self.in_features, device=x.device, dtype=x.dtype)
            else:
                # the float32 scale multiplies first, one rounding to x's dtype after (no bf16 1/(1-p))
                x = (x * _scale(p, self.in_features, self.weight)).to(x.dtype)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, lora_mixout_p={self.mixout_p}"
