"""Mixout on Parameters a module reads in its own forward: fused mixture-of-experts tensors and routers.

transformers 5 stores the experts of a mixture-of-experts layer fused, one 3-D Parameter per
projection (``gate_up_proj`` of shape ``(E, 2I, H)``, ``down_proj`` of shape ``(E, H, I)``; GPT-OSS
stores them ``(E, in, out)``), and its router as a 2-D ``weight`` ``(E, H)`` read with
``F.linear`` by a module that is not an ``nn.Linear``. Their forwards are many (an eager loop
over experts, ``batched_mm``, ``grouped_mm``, hub kernels, chosen by
``config._experts_implementation``), so the layer does not compute them: it hands the module's
own forward the *mixed* tensor in place of the Parameter. In a training forward every mixed
Parameter ``W`` (and its frozen target ``T``) becomes::

    W_mix = T + M * (W - T) / (1 - p),   M ~ Bernoulli(1 - p), one value per expert and input neuron

(per input neuron for a router), drawn once per forward and shared by the batch, exactly as
:class:`~surgery.layers.mixout.MixLinear` draws it for a Linear; the forward reads ``W_mix``
wherever it reads ``self.<name>``. The gradient is exact: ``dL/dW = M / (1 - p) * dL/dW_mix``,
one elementwise pass, in float32 for bf16/fp16 weights and rounded once. Eval and ``p == 0``
call the module's forward untouched (the plain model bitwise); ``p == 1`` uses the target alone.

The swap follows the Linear rule: :meth:`MixoutParams.from_module` builds an instance of a subclass
of the module's own class (``Mixout<Class>``) that shares the Parameter, buffer and submodule
objects, the hook dictionaries and its other attributes (:func:`~surgery.layers.swap.carry_over`)
and adds one frozen Parameter ``mixout_target`` holding every mixed Parameter's target, ``(E, sum of
the per-expert sizes)`` (its state_dict key ``<module>.mixout_target`` is a Mixout target's key, dropped by export
and ``surgery convert``; dim 0 is the experts dim, so FSDP2 shards it with the weights);
:meth:`MixoutParams.to_module` gives back the original object holding the current Parameters.

With ``low_memory`` the mixed tensor is not kept for backward: the tensors the forward saves that
are views of it are recomputed from ``W``, ``T`` and the mask when backward needs them.

Under a PEFT ``ParamWrapper`` (LoRA on ``target_parameters``) the module reads its weight as
``W0 + delta`` (a parametrization PEFT installs for each forward); the layer then mixes that
effective weight toward the frozen base ``W0`` itself (no target copy): ``W0 + M * delta / (1 - p)``,
the LoRA rule of :mod:`surgery.regularizers.mixout.lora`.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import SurgeryError
from ..options import check_p
from ..record import TARGET_SUFFIX
from .mixout import _check_target, _mix, _scale
from .swap import MODULE_STATE, MixoutLayer, carry_over

__all__ = ["MixoutParams", "mixout_class"]

class _Active(threading.local):
    """The mixed tensors of the forwards running in this thread, by ``id(module)``."""

    def __init__(self):
        self.by_module: dict[int, dict[str, torch.Tensor]] = {}


_ACTIVE = _Active()


class _MixParam(torch.autograd.Function):
    """``T + s * (W - T)`` with the exact gradient ``s * g`` for ``W`` (``T`` and ``s`` take none).

    The gradient is written once, in ``W``'s memory layout (a float32 product rounded once into a bf16/fp16
    gradient), so that ``AccumulateGrad`` takes it as it is: the plain layer pays that same pass to bring a
    transposed gradient (``grouped_mm`` of ``W.transpose``) into ``W``'s layout."""

    @staticmethod
    def forward(ctx, weight, target, s):
        ctx.save_for_backward(s)
        ctx.layout = weight.stride()
        return _mix(target, weight, s)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (s,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        out = torch.empty_strided(g.shape, ctx.layout, dtype=g.dtype, device=g.device)
        return torch.mul(g, s, out=out), None, None


class _Saved:
    """What the low-memory pack hook keeps instead of a view of a mixed tensor."""

    __slots__ = ("i", "size", "stride", "offset")

    def __init__(self, i, t):
        self.i, self.size, self.stride, self.offset = i, t.size(), t.stride(), t.storage_offset()


def _recompute_hooks(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]):
    """``saved_tensors_hooks`` that keep no view of a mixed tensor for backward: such a view is saved as
    its geometry and rebuilt from ``(mixed, weight, target, s)``'s weight, target and mask when backward
    unpacks it (the rebuilt tensor is kept while this forward's views of it are still to be unpacked)."""
    ptrs = {m.untyped_storage().data_ptr(): i for i, (m, _, _, _) in enumerate(parts) if m.numel()}
    inputs = [(w, t, s) for _, w, t, s in parts]
    left = [0] * len(parts)
    cache: dict[int, torch.Tensor] = {}

    def pack(t):
        try:
            i = ptrs.get(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError, TypeError):  # a tensor without plain storage
            return t
        if i is None:
            return t
        left[i] += 1
        return _Saved(i, t)

    def unpack(x):
        if not isinstance(x, _Saved):
            return x
        full = cache.get(x.i)
        if full is None:
            w, t, s = inputs[x.i]
            with torch.no_grad():
                full = _mix(t, w, s)
            cache[x.i] = full
        left[x.i] -= 1
        if left[x.i] <= 0:
            cache.pop(x.i, None)
        return full.as_strided(x.size, x.stride, x.offset)

    return pack, unpack


class MixoutParams(MixoutLayer, nn.Module):
    """Mixout on Parameters that a module's own forward reads (fused experts, routers); see the module doc.

    Never instantiated directly: :func:`mixout_class` derives ``Mixout<Class>`` from this and the
    module's class, and :meth:`from_module` builds the swap-in from an existing module.

    Attributes:
        mixout_p: the Mixout probability.
        mixout_layout: ``((name, axes), ...)``: each mixed Parameter and the dims its mask varies
            along (the experts dim and the input-neuron dim; the input-neuron dim for a router).
        mixout_base: True when the target is the frozen base Parameter under a PEFT parametrization
            (no ``mixout_target`` copy), False for a module holding a ``mixout_target``.
        mixout_low_memory: recompute the mixed tensors in backward instead of keeping them.
    """

    def __getattribute__(self, name: str) -> Any:
        # in a training forward the module's own code reads the mixed tensor wherever it reads the Parameter
        # (a PEFT parametrization's property included, hence __getattribute__ and not __getattr__)
        by_module = _ACTIVE.by_module
        if by_module:
            own = by_module.get(id(self))
            if own is not None and name in own:
                return own[name]
        return super().__getattribute__(name)

    @staticmethod
    def make_target(module: nn.Module, layout: Sequence[tuple[str, Sequence[int]]],
                    target_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The frozen copy of the Parameters ``layout`` names: ``(E, sum of their per-expert sizes)``.

        Raises:
            SurgeryError: the Parameters do not share their leading (experts) dim and device.
        """
        weights = [module._parameters[name] for name, _ in layout]
        lead = {w.shape[0] for w in weights}
        if len(lead) != 1 or len({w.device for w in weights}) != 1:
            raise SurgeryError(f"{type(module).__name__}: the mixed Parameters {[n for n, _ in layout]} do not share "
                               "their leading (experts) dim and device, so they cannot share one target")
        dtype = target_dtype
        if dtype is None:
            dtype = weights[0].dtype
            for w in weights[1:]:
                dtype = torch.promote_types(dtype, w.dtype)  # exact for every weight
        n = lead.pop()
        target = torch.empty(n, sum(math.prod(w.shape[1:]) for w in weights), dtype=dtype, device=weights[0].device)
        lo = 0
        for w in weights:
            hi = lo + math.prod(w.shape[1:])
            target[:, lo:hi].copy_(w.detach().reshape(n, -1))
            lo = hi
        return nn.Parameter(target, requires_grad=False)

    @classmethod
    def from_module(cls, module: nn.Module, p: float, layout: Sequence[tuple[str, Sequence[int]]], *,
                    target: torch.Tensor | None = None, base: bool = False,
                    target_dtype: torch.dtype | None = None, low_memory: bool = False) -> "MixoutParams":
        """The swap-in for ``module``, sharing its Parameters, buffers, submodules, attributes and hooks.

        Args:
            module: the module whose forward reads the Parameters named in ``layout``.
            p: Mixout probability in [0, 1].
            layout: ``(name, axes)`` per mixed Parameter: the dims its mask varies along. Every mixed
                Parameter has the same leading dim (the experts).
            target: the target copy, as :meth:`make_target` makes it (default: made here).
            base: mix toward the frozen Parameter itself (under a PEFT parametrization), no target copy.
            target_dtype: dtype of the target copy (default: the Parameters' common dtype, exact).
            low_memory: recompute the mixed tensors in backward.

        Raises:
            SurgeryError: the mixed Parameters do not share their leading dim or their device.
        """
        p = check_p(p, "p")
        layout = tuple((name, tuple(axes)) for name, axes in layout)
        if not base and target is None:
            target = cls.make_target(module, layout, target_dtype)
        new = object.__new__(mixout_class(type(module)))
        state = vars(new)
        state.update({k: v for k, v in vars(module).items() if k in MODULE_STATE})
        for key in ("_parameters", "_buffers", "_modules"):
            state[key] = dict(vars(module)[key])
        state["_non_persistent_buffers_set"] = set(module._non_persistent_buffers_set)
        carry_over(module, new)  # hooks shared; its other attributes (config, flags, library attributes) carried
        state.update(_original=module, mixout_p=p, mixout_layout=layout, mixout_base=base,
                     mixout_low_memory=low_memory)
        if not base:
            if target.shape != (module._parameters[layout[0][0]].shape[0], sum(n for _, n in new._sizes())):
                raise ValueError(f"target shape {tuple(target.shape)} does not fit the Parameters {layout}")
            new.register_parameter(TARGET_SUFFIX, target if isinstance(target, nn.Parameter)
                                   else nn.Parameter(target.detach(), requires_grad=False))
        new.train(module.training)
        return new

    def loaded_target(self, state_dict, prefix: str):
        weights = [state_dict.get(prefix + name) for name, _ in self.mixout_layout]
        if self.mixout_base or any(w is None for w in weights) or len({w.shape[0] for w in weights}) != 1:
            return None
        return torch.cat([w.detach().reshape(w.shape[0], -1) for w in weights], dim=1)  # make_target's layout

    def _sizes(self) -> list[tuple[str, int]]:
        return [(name, math.prod(self._weight(name).shape[1:])) for name, _ in self.mixout_layout]

    def _offsets(self) -> list[tuple[int, int]]:
        out, lo = [], 0
        for _, n in self._sizes():
            out.append((lo, lo + n))
            lo += n
        return out

    def _weight(self, name: str) -> torch.Tensor:
        """The Parameter ``name`` (the frozen original when a PEFT parametrization is on)."""
        if parametrize.is_parametrized(self, name):
            return self.parametrizations[name].original
        return self._parameters[name]

    def targets(self) -> dict[str, torch.Tensor]:
        """Each mixed Parameter's target (views into ``mixout_target``; the frozen base under PEFT)."""
        if self.mixout_base:
            return {name: self._weight(name) for name, _ in self.mixout_layout}
        t = self._parameters[TARGET_SUFFIX]
        out = {}
        for (name, _), (lo, hi) in zip(self.mixout_layout, self._offsets()):
            out[name] = t[:, lo:hi].view(self._weight(name).shape)
        return out

    def to_module(self) -> nn.Module:
        """The original module (same object and class) holding this module's current Parameters (without
        the target), buffers and submodules, in this module's training mode."""
        orig = vars(self)["_original"]
        for key in ("_parameters", "_buffers", "_modules"):
            kept = {k: v for k, v in vars(self)[key].items() if not (key == "_parameters" and k == TARGET_SUFFIX)}
            vars(orig)[key].clear()
            vars(orig)[key].update(kept)
        return self._hand_back(orig)

    def forward(self, *args, **kwargs):
        if not self.training or self.mixout_p == 0.0:
            return super().forward(*args, **kwargs)
        mixed, parts = {}, []
        for (name, axes), target in zip(self.mixout_layout, self.targets().values()):
            weight = getattr(self, name)  # the Parameter, or PEFT's W0 + delta
            if not torch.compiler.is_compiling():
                _check_target(weight, target)
            if not weight.requires_grad and not self.mixout_base:
                self._warn_frozen("This happens when the model is frozen after surgery.apply: unfreeze it, or call "
                                  "surgery.revert(model) first and apply to the model as it will train")
            shape = [n if d in axes else 1 for d, n in enumerate(weight.shape)]
            if self.mixout_p == 1.0:
                s = torch.zeros(shape, device=weight.device, dtype=torch.float64 if weight.dtype == torch.float64
                                else torch.float32)
            else:
                s = _scale(self.mixout_p, math.prod(shape), weight).view(shape)
            mixed[name] = _MixParam.apply(weight, target, s)
            parts.append((mixed[name], weight, target, s))
        by_module = _ACTIVE.by_module
        before = by_module.get(id(self))
        by_module[id(self)] = mixed
        try:
            if self.mixout_low_memory:
                with torch.autograd.graph.saved_tensors_hooks(*_recompute_hooks(parts)):
                    return super().forward(*args, **kwargs)
            return super().forward(*args, **kwargs)
        finally:
            if before is None:
                by_module.pop(id(self), None)
            else:
                by_module[id(self)] = before

    def __reduce_ex__(self, protocol):
        # pickled as the original class plus the Mixout state: the derived class is rebuilt on load
        state = dict(vars(self))
        return _rebuild, (type(vars(self)["_original"]), state)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        names = ", ".join(n for n, _ in self.mixout_layout)
        return (f"{s}, " if s else "") + f"mixout_p={self.mixout_p} on {names}" + \
            (", low_memory=True" if self.mixout_low_memory else "")


_CLASSES: dict[type, type] = {}


def mixout_class(cls: type) -> type:
    """``Mixout<cls>``: :class:`MixoutParams` in front of ``cls`` (one class per ``cls``)."""
    if issubclass(cls, MixoutParams):
        raise SurgeryError(f"{cls.__name__} already mixes its Parameters")
    sub = _CLASSES.get(cls)
    if sub is None:
        sub = type(f"Mixout{cls.__name__}", (MixoutParams, cls), {"__module__": __name__})
        _CLASSES[cls] = sub
    return sub


def _rebuild(cls: type, state: dict) -> nn.Module:
    new = object.__new__(mixout_class(cls))
    vars(new).update(state)
    return new
