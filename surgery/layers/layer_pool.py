"""The layer-weighted multi-sample-dropout head's forward: a learned mix of every layer's summary token.

:class:`LayerPool` computes ``sum_l softmax(layer_weights)_l * dropout(h_l[summary])`` over the
``L + 1`` hidden states of a transformers backbone; :class:`LayerMSD` holds the hooks that feed it
(the backbone's pre-hook asks for the hidden states, its post-hook pools them, the head's pre-hook
replaces the head's input with the pooled vector and stacks the ``K`` dropout samples). Installed by
:mod:`surgery.regularizers.msd.layered`, which also says what the head is and why.

No dropout, weighting or head call runs per layer or per sample: the ``L + 1`` summary vectors are
gathered into one ``(B, H, L + 1)`` tensor (one ``torch.stack`` of views), which gets one dropout
mask; the weighted sum is one product and one sum; the ``K`` samples go through the head in one call.

The layer weights are kept in float32 (as the QUEST solution keeps them) whatever the model's dtype:
the mix is computed in the promoted dtype (float32 for a bf16/fp16 model) and the pooled vector is
cast back to the hidden states' dtype, the dtype the head's input had before.

One forward of the model is one backbone call and one head call. The hooks on the model root mark
where a forward begins and ends: a second backbone call inside one forward (a two-tower model) is
refused, and the head called by itself, outside any forward of the model, runs on its own input.
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
        w = torch.full((n,), INIT, dtype=torch.float32 if dtype is None else dtype, device=device)
        w[-1] = 0.0
        self.layer_weights = nn.Parameter(w)
        self.layer_p = layer_p  # not named "*dropout*": dropout control leaves it alone, like msd_p
        self.pool = pool

    def extra_repr(self) -> str:
        return f"n={self.layer_weights.numel()}, layer_p={self.layer_p}, pool={self.pool!r}"

    def summary(self, hidden_states, mask: torch.Tensor | None, ids: torch.Tensor | None = None,
                pad_id: int | None = None) -> torch.Tensor:
        """The ``(B, H, L + 1)`` stack of the summary-token vectors of every hidden state.

        ``pool="last"`` picks, per row, the last position ``mask`` keeps; without a mask, the
        rightmost token of ``ids`` that is not ``pad_id`` (transformers' GPT-2/Llama
        sequence-classification rule); without either, position ``T - 1`` for a single row.

        Raises:
            SurgeryError: ``pool="last"`` for several rows with neither a mask nor ``ids`` and a pad id.
        """
        if self.pool == "first":
            return torch.stack([h[:, 0] for h in hidden_states], dim=-1)
        h0 = hidden_states[0]
        b, t = h0.shape[0], h0.shape[1]
        if mask is not None:  # the last position the mask keeps (right or left padding)
            idx = (t - 1) - mask.to(torch.long).flip(-1).argmax(-1)
        elif ids is not None and pad_id is not None:  # the rightmost token that is not padding
            keep = (ids != pad_id).to(device=h0.device, dtype=torch.long)
            idx = (torch.arange(t, device=h0.device, dtype=torch.long) * keep).argmax(-1)
        elif b == 1:
            idx = torch.full((b,), t - 1, device=h0.device, dtype=torch.long)
        else:
            why = "no pad token id in the config" if ids is not None else "inputs_embeds, no input_ids"
            raise SurgeryError(
                f"msd_pool='last' pools the last non-padding token, but this batch of {b} rows has no attention_mask "
                f"and {why}, so where each row ends is unknown (transformers' own sequence-classification heads "
                "refuse the same batch); pass attention_mask, or set config.pad_token_id and pass input_ids")
        rows = torch.arange(b, device=h0.device)
        return torch.stack([h[rows, idx] for h in hidden_states], dim=-1)

    def forward(self, hidden_states, mask: torch.Tensor | None = None, ids: torch.Tensor | None = None,
                pad_id: int | None = None) -> torch.Tensor:
        cls = self.summary(hidden_states, mask, ids, pad_id)
        if self.training and self.layer_p > 0:
            cls = cls * _msd.draw_masks(cls, 1, self.layer_p)[0]  # one mask, independent per layer and feature
        # the weights stay float32: the mix is computed in the promoted dtype, the result has the hidden states' dtype
        return (torch.softmax(self.layer_weights, dim=0) * cls).sum(-1).to(cls.dtype)


def _strip_hidden_states(out):
    """The backbone output without ``hidden_states`` (the caller did not ask for them)."""
    return type(out)(**{k: v for k, v in out.items() if k != "hidden_states"})


class LayerMSD(MultiSampleDropout):
    """Hooks of the layer-weighted MSD head. It is a :class:`MultiSampleDropout`, so
    :func:`surgery.msd_samples`, :func:`surgery.msd_loss` and ``compute_loss(msd_loss=True)``
    see its ``K`` per-sample outputs. What one forward passes from hook to hook (whether a forward
    of the model is running, how many backbone calls it made, the pooled vector, the mask) is kept
    per thread, as the plain head keeps its calls.

    One forward of the model (the root's hooks mark it) makes one backbone call, whose pooled
    hidden states the head reads once. Outside a forward of the model the head is the plain
    multi-sample-dropout head on its own input.
    """

    def __init__(self, k: int, p: float, pool: LayerPool, n: int, mask_pos: int | None, backbone_name: str,
                 head_name: str, ids_pos: int | None = None, title: str = "the model"):
        super().__init__(k, p)
        self.pool, self.n, self.mask_pos, self.ids_pos = pool, n, mask_pos, ids_pos
        self.backbone_name, self.head_name, self.title = backbone_name, head_name, title

    def __getstate__(self):  # copies (deepcopy of the model) start with no call in flight
        return {k: v for k, v in vars(self).items() if k != "_local"}

    def __setstate__(self, state):
        vars(self).update(state)
        self._local = threading.local()

    def install_root(self, root: nn.Module) -> list:
        """The hooks that mark a forward of the model (the second one runs when the forward raises too)."""
        return [root.register_forward_pre_hook(self.root_pre), root.register_forward_hook(self.root_post,
                                                                                          always_call=True)]

    # ---- the model's forward -------------------------------------------------------------
    def root_pre(self, module, args):
        local = self._local
        local.active, local.calls, local.pooled, local.pooled_call = True, 0, None, False

    def root_post(self, module, args, out):
        local = self._local
        local.active, local.calls, local.pooled = False, 0, None  # a pooled vector no head read is dropped

    # ---- backbone ----------------------------------------------------------------------
    def backbone_pre(self, module, args, kwargs):
        local = self._local
        if getattr(local, "active", False):
            local.calls = getattr(local, "calls", 0) + 1
            if local.calls > 1:
                raise SurgeryError(
                    f"{self.title} called its backbone {self.backbone_name!r} a second time in one forward (two "
                    "towers, e.g. question and answer?); the layer-weighted MSD head pools the hidden states of one "
                    "backbone call into its head, so the other call's input would not reach the outputs. Call the "
                    "backbone once per forward (e.g. on the pair as one sequence), or use the plain msd=K head "
                    "(msd_layers=False) on this model")
        local.pooled = None
        want = kwargs.get("output_hidden_states")
        local.want = bool(want if want is not None else getattr(module.config, "output_hidden_states", False))
        mask = kwargs.get("attention_mask")
        if mask is None and self.mask_pos is not None and len(args) > self.mask_pos:
            mask = args[self.mask_pos]
        local.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        ids = kwargs.get("input_ids")
        if ids is None and self.ids_pos is not None and len(args) > self.ids_pos:
            ids = args[self.ids_pos]
        local.ids = ids if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None
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
        mask, ids = getattr(local, "mask", None), getattr(local, "ids", None)
        local.mask = local.ids = None
        local.pooled = self.pool(hs, mask, ids, _pad_id(module.config) if mask is None else None)
        return None if getattr(local, "want", False) else _strip_hidden_states(out)

    # ---- head ----------------------------------------------------------------------------
    def pre(self, module, args, kwargs):
        local = self._local
        pooled, local.pooled = getattr(local, "pooled", None), None
        local.expanded = local.pooled_call = False
        if not getattr(local, "active", False):
            if pooled is not None:
                raise SurgeryError(
                    f"the head {self.head_name!r} ran after a forward of the backbone {self.backbone_name!r}, both "
                    f"outside a call of {self.title} (model.forward(...) instead of model(...), or the backbone and "
                    "the head called by themselves): the layer-weighted MSD head knows a forward of the model by the "
                    "model's own call. Call the model (model(...)); to run the head on features of your own, call "
                    "the head without a backbone call before it")
            return super().pre(module, args, kwargs)  # the head by itself: multi-sample dropout on its own input
        if pooled is None:
            raise SurgeryError(f"the head {self.head_name!r} ran without a forward of the backbone "
                               f"{self.backbone_name!r} before it in this forward of {self.title} (or ran twice); the "
                               "layer-weighted MSD head reads that forward's hidden states once")
        x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        local.seq = tuple(x.shape[1:-1]) if isinstance(x, torch.Tensor) and x.dim() > 2 else ()
        if module.training:
            pooled = _msd.stack_samples(pooled, self.k, self.p, None)
            local.expanded = True
        local.pooled_call = True
        if args:
            return (pooled,) + tuple(args[1:]), kwargs
        key = next(n for n, v in kwargs.items() if isinstance(v, torch.Tensor))
        return args, dict(kwargs, **{key: pooled})

    def post(self, module, args, kwargs, out):
        local = self._local
        if not getattr(local, "pooled_call", False):
            return super().post(module, args, kwargs, out)
        local.pooled_call = False
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


def _pad_id(config) -> int | None:
    """The pad token id the model's own sequence-classification head uses (its text config's)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    pad = getattr(text, "pad_token_id", None)
    return pad if isinstance(pad, int) and not isinstance(pad, bool) else None
