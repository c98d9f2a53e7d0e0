"""The layer-weighted multi-sample-dropout head's forward: a learned mix of every layer's summary token.

:class:`LayerPool` computes ``sum_l softmax(layer_weights)_l * dropout(h_l[summary])`` over the
``L + 1`` hidden states of a transformers backbone; :class:`LayerMSD` holds the hooks that feed it
(the backbone's pre-hook asks for the hidden states, its post-hook pools them, the head's pre-hook
replaces the head's input with the pooled vector and stacks the ``K`` dropout samples). Installed by
:mod:`surgery.regularizers.layer_msd`, which also says what the head is and why.

No dropout, weighting or head call runs per layer or per sample: the ``L + 1`` summary vectors are
gathered into one ``(B, H, L + 1)`` tensor (one ``torch.stack`` of views), which gets one dropout
mask; the weighted sum is one product and one sum; the ``K`` samples go through the head in one call.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from ..errors import SurgeryError
from . import msd as _msd
from .msd import MultiSampleDropout

__all__ = ["LayerPool", "LayerMSD", "INIT", "POOL_NAME"]

POOL_NAME = "layer_pool"  # child module of the model root holding the layer weights
INIT = -3.0  # initial logit of every layer but the last (0), as in the QUEST solution


class LayerPool(nn.Module):
    """``sum_l softmax(layer_weights)_l * dropout(h_l[summary])``: the learned layer mix.

    ``layer_weights`` has ``n`` entries (``L + 1``), initialised to -3 except the last (0).
    """

    def __init__(self, n: int, layer_p: float, pool: str, dtype: torch.dtype | None = None,
                 device: torch.device | None = None):
        super().__init__()
        w = torch.full((n,), INIT, dtype=dtype or torch.float32, device=device)
        w[-1] = 0.0
        self.layer_weights = nn.Parameter(w)
        self.layer_p = layer_p  # not named "*dropout*": dropout control leaves it alone, like msd_p
        self.pool = pool

    def extra_repr(self) -> str:
        return f"n={self.layer_weights.numel()}, layer_p={self.layer_p}, pool={self.pool!r}"

    def summary(self, hidden_states, mask: torch.Tensor | None) -> torch.Tensor:
        """The ``(B, H, L + 1)`` stack of the summary-token vectors of every hidden state."""
        if self.pool == "first":
            return torch.stack([h[:, 0] for h in hidden_states], dim=-1)
        h0 = hidden_states[0]
        b, t = h0.shape[0], h0.shape[1]
        if mask is None:
            idx = torch.full((b,), t - 1, device=h0.device, dtype=torch.long)
        else:  # the last position the mask keeps (right or left padding)
            idx = (t - 1) - mask.to(torch.long).flip(-1).argmax(-1)
        rows = torch.arange(b, device=h0.device)
        return torch.stack([h[rows, idx] for h in hidden_states], dim=-1)

    def forward(self, hidden_states, mask: torch.Tensor | None = None) -> torch.Tensor:
        cls = self.summary(hidden_states, mask)
        if self.training and self.layer_p > 0:
            cls = cls * _msd.draw_masks(cls, 1, self.layer_p)[0]  # one mask, independent per layer and feature
        return (torch.softmax(self.layer_weights, dim=0) * cls).sum(-1)


def _strip_hidden_states(out):
    """The backbone output without ``hidden_states`` (the caller did not ask for them)."""
    return type(out)(**{k: v for k, v in out.items() if k != "hidden_states"})


class LayerMSD(MultiSampleDropout):
    """Hooks of the layer-weighted MSD head. It is a :class:`MultiSampleDropout`, so
    :func:`surgery.msd_samples`, :func:`surgery.msd_loss` and ``compute_loss(msd_loss=True)``
    see its ``K`` per-sample outputs. What one forward passes from hook to hook (the pooled
    vector, the mask, whether the head's K samples were stacked) is kept per thread, as the
    plain head keeps its calls."""

    def __init__(self, k: int, p: float, pool: LayerPool, n: int, mask_pos: int | None, backbone_name: str,
                 head_name: str):
        super().__init__(k, p)
        self.pool, self.n, self.mask_pos = pool, n, mask_pos
        self.backbone_name, self.head_name = backbone_name, head_name

    def __getstate__(self):  # copies (deepcopy of the model) start with no call in flight
        return {k: v for k, v in vars(self).items() if k != "_local"}

    def __setstate__(self, state):
        vars(self).update(state)
        self._local = threading.local()

    # ---- backbone ----------------------------------------------------------------------
    def backbone_pre(self, module, args, kwargs):
        local = self._local
        local.pooled = None
        want = kwargs.get("output_hidden_states")
        local.want = bool(want if want is not None else getattr(module.config, "output_hidden_states", False))
        mask = kwargs.get("attention_mask")
        if mask is None and self.mask_pos is not None and len(args) > self.mask_pos:
            mask = args[self.mask_pos]
        local.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        return args, dict(kwargs, output_hidden_states=True)

    def backbone_post(self, module, args, kwargs, out):
        local = self._local
        hs = out.get("hidden_states") if hasattr(out, "keys") else None
        if hs is None:
            raise SurgeryError(
                f"backbone {self.backbone_name!r} ({type(module).__name__}) returned no hidden_states although "
                "output_hidden_states=True was passed (call it with return_dict=True, or the model cannot return "
                "per-layer hidden states); the layer-weighted MSD head needs them")
        if len(hs) != self.n:
            raise SurgeryError(f"backbone {self.backbone_name!r} returned {len(hs)} hidden states, the layer weights "
                               f"have {self.n} (num_hidden_layers + 1); was the model changed after apply?")
        local.pooled = self.pool(hs, getattr(local, "mask", None))
        local.mask = None
        return None if getattr(local, "want", False) else _strip_hidden_states(out)

    # ---- head ----------------------------------------------------------------------------
    def pre(self, module, args, kwargs):
        local = self._local
        pooled, local.pooled = getattr(local, "pooled", None), None
        local.expanded = False
        if pooled is None:
            raise SurgeryError(f"the head {self.head_name!r} ran without a forward of the backbone "
                               f"{self.backbone_name!r} before it; the layer-weighted MSD head reads that forward's "
                               "hidden states")
        x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        local.seq = tuple(x.shape[1:-1]) if isinstance(x, torch.Tensor) and x.dim() > 2 else ()
        if module.training:
            pooled = _msd.stack_samples(pooled, self.k, self.p, None)
            local.expanded = True
        if args:
            return (pooled,) + tuple(args[1:]), kwargs
        key = next(n for n, v in kwargs.items() if isinstance(v, torch.Tensor))
        return args, dict(kwargs, **{key: pooled})

    def post(self, module, args, kwargs, out):
        local = self._local
        seq, local.seq = getattr(local, "seq", ()), ()
        if getattr(local, "expanded", False):
            local.expanded = False
            collect = getattr(local, "collect", None)
            if collect is not None:  # per-sample outputs (K, B, C), before any expansion over tokens
                collect.append(_msd.per_sample(out, self.k, lambda o: o))
            out = _msd.per_sample(out, self.k, lambda o: o.mean(0))
        if seq:  # a head run on every token (GPT-2 / Llama `score`): every token gets the pooled logits (a view)
            out = out.reshape((out.shape[0],) + (1,) * len(seq) + (out.shape[-1],)).expand(
                (out.shape[0],) + seq + (out.shape[-1],))
        return out
