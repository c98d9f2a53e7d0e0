"""Multi-sample dropout over a learned, layer-weighted summary token (``apply(msd=K, msd_layers=True)``).

The head Kaggle NLP solutions ship (Google QUEST Q&A Labeling, 2nd place, ``CustomBert`` /
``CustomRoberta``):

* the backbone returns the hidden states of all its layers, the embedding output included
  (``L + 1`` tensors);
* the summary vector of each (position 0, or with ``msd_pool="last"`` the last non-padding
  token) gets its own dropout (``msd_layer_p``, 0.2 there);
* the ``L + 1`` vectors are combined with learned weights ``softmax(layer_weights)``,
  initialised to -3 for every layer but the last (0);
* the result passes ``K`` times through dropout ``msd_p`` (0.5 there) into one ``nn.Linear``,
  and the ``K`` outputs are averaged (the paper's loss form: :func:`surgery.msd_loss`).

No dropout, weighting or head call runs per layer or per sample: the ``L + 1`` summary
vectors are gathered into one ``(B, H, L + 1)`` tensor (one ``torch.stack`` of ``L + 1``
views, the only per-layer Python work), which gets one dropout mask; the weighted sum is one
product and one sum; the ``K`` samples go through the head in one call (as for the plain
MSD head).

It is installed with hooks plus one new module, ``layer_pool`` (its parameter
``layer_pool.layer_weights``), on the model root: a pre-hook on the backbone asks for the
hidden states (and hides them from the output again unless the caller asked for them), a
post-hook pools them, and the head's pre-hook replaces the head's input with the pooled
vector. The modules that used to compute the head's input from the backbone (a pooler, a
classification head's dense layer) are bypassed; their parameters are frozen while the head is
installed (no gradient, so DDP needs no ``find_unused_parameters`` and optimizers leave them
bitwise as they were) and unfrozen by revert.

In eval the head computes ``head(sum_l softmax(w)_l * h_l[:, 0])`` exactly.

The learned weights change what the model computes, and the head reads a different vector
than the plain model: a plain transformers class cannot hold this, so ``revert``, ``export``
and ``surgery convert`` refuse such a model with an error saying what to do (see the README).
"""

from __future__ import annotations

import inspect
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import msd as _msd
from .errors import HeadError, SurgeryError, SurgeryTypeError
from .mixout import check_p
from .msd import MultiSampleDropout

__all__ = ["LayerPool", "LayerMSD", "POOLS", "POOL_NAME", "plan_layers", "install_layers", "is_layered",
           "check_revert", "refuse_export", "param_groups"]

POOLS = ("first", "last")
POOL_NAME = "layer_pool"  # child module of the model root holding the layer weights
INIT = -3.0  # initial logit of every layer but the last (0), as in the seed


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
            pooled = _msd._stack(pooled, self.k, self.p, None)
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
                collect.append(_msd._split(out, self.k, lambda o: o))
            out = _msd._split(out, self.k, lambda o: o.mean(0))
        if seq:  # a head run on every token (GPT-2 / Llama `score`): every token gets the pooled logits (a view)
            out = out.reshape((out.shape[0],) + (1,) * len(seq) + (out.shape[-1],)).expand(
                (out.shape[0],) + seq + (out.shape[-1],))
        return out


class _Undo:
    """In ``rec.handles``: ``remove()`` takes the layer pool off the root and unfreezes what was frozen."""

    def __init__(self, root: nn.Module, frozen: list[nn.Parameter]):
        self.root, self.frozen = root, frozen

    def remove(self):
        if POOL_NAME in self.root._modules:
            del self.root._modules[POOL_NAME]
        for prm in self.frozen:
            prm.requires_grad_(True)


# ---- plan (validation only) -------------------------------------------------------------------

@dataclass
class LayerPlan:
    head: str
    backbone: str
    n: int
    layer_p: float
    pool: str
    mask_pos: int | None
    frozen: list[str] = field(default_factory=list)

    @property
    def args(self) -> dict[str, Any]:
        return {"msd_layers": True, "msd_layer_p": self.layer_p, "msd_pool": self.pool}


def _pretrained_cls():
    tf = sys.modules.get("transformers")
    if tf is None:
        import transformers as tf  # noqa: F811 - only reached for models that may hold one
    return tf.PreTrainedModel


def _is_decoder_only(cfg) -> bool:
    if getattr(cfg, "is_decoder", False):
        return True
    from transformers.models.auto import modeling_auto as ma
    mt = getattr(cfg, "model_type", None)
    return mt in ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES


def check_layer_args(msd: int, msd_layers: Any, msd_layer_p: Any, msd_pool: Any) -> tuple[float, str]:
    """Validate the layer options; returns ``(layer_p, pool)``."""
    if not isinstance(msd_layers, bool):
        raise SurgeryTypeError(f"msd_layers must be True or False, got {msd_layers!r}")
    layer_p = check_p(msd_layer_p, "msd_layer_p")
    if msd_pool not in POOLS:
        raise ValueError(f"msd_pool must be one of {', '.join(map(repr, POOLS))} (the summary token: position 0, or "
                         f"the last non-padding token of attention_mask), got {msd_pool!r}")
    if not msd_layers:
        if layer_p != 0.2 or msd_pool != "first":
            raise SurgeryError("msd_layer_p/msd_pool configure the layer-weighted MSD head; pass msd_layers=True")
        return layer_p, msd_pool
    if msd < 1:
        raise ValueError(f"msd_layers=True needs msd=K >= 1 samples (the Kaggle head: msd=5, msd_p=0.5), got msd={msd}")
    return layer_p, msd_pool


def plan_layers(root: nn.Module, head_name: str, head_given: bool, layer_p: float, pool: str) -> LayerPlan:
    """Find and check the backbone and the Linear head; nothing is changed.

    Raises:
        HeadError: the head is not an ``nn.Linear`` taking the hidden size.
        SurgeryError: no (or several) transformers backbones returning per-layer hidden
            states, an encoder-decoder, a decoder-only backbone with ``msd_pool="first"``,
            a name clash with ``layer_pool``.
    """
    modules = dict(root.named_modules())
    head = modules[head_name]
    if not isinstance(head, nn.Linear):
        outs = [f"{head_name}.{n}" for n, m in head.named_modules() if n and isinstance(m, nn.Linear)]
        proj = [n for n in outs if n.rsplit(".", 1)[-1] == "out_proj"]
        if head_given or len(proj) != 1:
            raise HeadError(
                f"head {head_name!r} is a {type(head).__name__}, not an nn.Linear: the layer-weighted MSD head feeds "
                f"the pooled vector into one Linear classifier; pass head=... naming it"
                + (f" (Linear layers inside: {', '.join(map(repr, outs))})" if outs else ""))
        head_name, head = proj[0], modules[proj[0]]
    PreTrained = _pretrained_cls()
    cands = [n for n, m in modules.items() if isinstance(m, PreTrained) and n != head_name
             and not head_name.startswith(n + ".") if n]
    if isinstance(root, PreTrained) and getattr(root, "base_model", root) is not root:
        base = next(n for n, m in modules.items() if m is root.base_model)
        cands = [base]
    if cands:
        depth = min(n.count(".") for n in cands)
        cands = [n for n in cands if n.count(".") == depth]
    if not cands:
        raise SurgeryError(
            f"{type(root).__name__} holds no transformers backbone (a PreTrainedModel such as AutoModel) before "
            f"the head {head_name!r}: the layer-weighted MSD head needs one that returns per-layer hidden states "
            "(output_hidden_states=True); use plain msd=K without msd_layers for this model")
    if len(cands) > 1:
        raise SurgeryError(f"several transformers backbones in {type(root).__name__} ({', '.join(map(repr, cands))}); "
                           "the layer-weighted MSD head pools the hidden states of exactly one")
    bname = cands[0]
    backbone = modules[bname]
    cfg = backbone.config
    params = inspect.signature(backbone.forward).parameters
    takes = "output_hidden_states" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    n_layers = getattr(cfg, "num_hidden_layers", None)
    if not takes or not isinstance(n_layers, int):
        raise SurgeryError(f"backbone {bname!r} ({type(backbone).__name__}) cannot return per-layer hidden states "
                           "(no output_hidden_states argument or no num_hidden_layers in its config); the "
                           "layer-weighted MSD head needs them")
    if getattr(cfg, "is_encoder_decoder", False):
        raise SurgeryError(f"backbone {bname!r} ({type(backbone).__name__}) is an encoder-decoder model; the "
                           "layer-weighted MSD head pools the hidden states of one encoder or decoder stack: wrap "
                           "its encoder (AutoModel ... .get_encoder()) in your own module with a Linear head")
    if pool == "first" and _is_decoder_only(cfg):
        raise SurgeryError(f"backbone {bname!r} ({type(backbone).__name__}) is decoder-only: with causal attention "
                           "position 0 sees only itself and is no summary token; pass msd_pool='last' (the last "
                           "non-padding token of attention_mask)")
    hidden = getattr(cfg, "hidden_size", None)
    if isinstance(hidden, int) and head.in_features != hidden:
        raise HeadError(f"head {head_name!r} takes {head.in_features} features but the hidden states of {bname!r} "
                        f"have {hidden}; the layer-weighted MSD head feeds the pooled hidden state straight into "
                        "the head: name a Linear taking the hidden size with head=...")
    if POOL_NAME in vars(root)["_modules"] or hasattr(root, POOL_NAME):
        raise SurgeryError(f"{type(root).__name__} already has an attribute {POOL_NAME!r}; the layer-weighted MSD "
                           "head adds a module of that name")
    names = list(params)
    mask_pos = names.index("attention_mask") if "attention_mask" in names else None
    # modules that computed the head's input from the backbone are bypassed: their parameters get frozen
    keep = {id(p) for p in backbone.parameters()} | {id(p) for p in head.parameters()}
    pooler = getattr(backbone, "pooler", None)
    skip = {id(p) for p in pooler.parameters()} if isinstance(pooler, nn.Module) else set()
    frozen = [n for n, p in root.named_parameters() if p.requires_grad and (id(p) not in keep or id(p) in skip)]
    return LayerPlan(head_name, bname, n_layers + 1, layer_p, pool, mask_pos, frozen)


def install_layers(root: nn.Module, plan: LayerPlan, k: int, p: float, rec) -> None:
    """Install the layer pool and the hooks (the mutation step of ``apply``); record it in ``rec``."""
    head = root.get_submodule(plan.head)
    backbone = root.get_submodule(plan.backbone)
    w = head.weight
    pool = LayerPool(plan.n, plan.layer_p, plan.pool, dtype=w.dtype if w.dtype.is_floating_point else None,
                     device=w.device)
    pool.train(root.training)
    root.add_module(POOL_NAME, pool)
    prms = dict(root.named_parameters())
    frozen = [prms[n] for n in plan.frozen]
    for prm in frozen:
        prm.requires_grad_(False)
    state = LayerMSD(k, p, pool, plan.n, plan.mask_pos, plan.backbone, plan.head)
    rec.handles += [state, _Undo(root, frozen),
                    backbone.register_forward_pre_hook(state.backbone_pre, with_kwargs=True),
                    backbone.register_forward_hook(state.backbone_post, with_kwargs=True)] + state.install(head)
    rec.msd.append({"name": plan.head, "k": k, "p": p,
                    "layers": {"backbone": plan.backbone, "n": plan.n, "p": plan.layer_p, "pool": plan.pool,
                               "init": INIT, "param": f"{POOL_NAME}.layer_weights", "frozen": plan.frozen}})


# ---- what reads the record ------------------------------------------------------------------

def _layered(rec) -> list[dict]:
    return [h for h in (rec.msd if rec is not None else []) if h.get("layers")]


def is_layered(rec) -> bool:
    """True when the record (a Record) has a layer-weighted MSD head."""
    return bool(_layered(rec))


def _what(h: dict) -> str:
    return (f"learned layer weights {h['layers']['param']!r} and head {h['name']!r} reading their weighted "
            f"summary token instead of what it read before")


def check_revert(rec, drop_layer_weights: bool) -> None:
    """Raise unless reverting this record keeps what the model computes, or dropping was asked for."""
    heads = _layered(rec)
    if heads and not drop_layer_weights:
        raise SurgeryError(
            f"cannot revert: the model has a layer-weighted MSD head ({_what(heads[0])}); the plain model computes "
            "something else, so revert would silently change its predictions. To deploy it, save the surgered "
            "model (model.save_pretrained(DIR) or surgery.checkpoint.save(model, FILE)) and load it by rebuilding: "
            "the pretrained model, surgery.apply(...) with the same arguments, model.load_state_dict(...). To undo "
            "the surgery anyway (e.g. before training), call surgery.revert(model, drop_layer_weights=True)")


def refuse_export(rec, what: str = "surgery.export") -> None:
    """Raise for a record with a layer-weighted MSD head: a plain checkpoint cannot hold it."""
    heads = _layered(rec)
    if heads:
        raise SurgeryError(
            f"{what} writes a plain checkpoint, which cannot hold the layer-weighted MSD head ({_what(heads[0])}): "
            "plain transformers would load it without the layer weights and compute something else. Keep the "
            "surgered form (model.save_pretrained(DIR), a Trainer checkpoint, or surgery.checkpoint.save(model, "
            "FILE)) and load it by rebuilding: the pretrained model, surgery.apply(...) with the same arguments, "
            "model.load_state_dict(...)")


# ---- optimiser help -------------------------------------------------------------------------

def param_groups(model: nn.Module, *, lr: float, head_lr: float, **group_options) -> list[dict[str, Any]]:
    """Two optimiser parameter groups read from the change record: the backbone at ``lr``, the
    MSD head (and the learned layer weights of a layer-weighted head) at ``head_lr``.

    ``torch.optim.AdamW(surgery.param_groups(model, lr=2e-5, head_lr=1e-2))`` gives the
    seed's 500x. Only parameters that require a gradient are listed (bypassed, frozen ones
    are not); each parameter is in exactly one group. ``group_options`` (e.g.
    ``weight_decay=0.0``) go into both groups.

    Raises:
        NotSurgeredError: the model has no surgery; SurgeryError: no MSD head in the record;
        ValueError: a learning rate that is not a positive number.
    """
    from .record import get_record, unwrap

    for name, v in (("lr", lr), ("head_lr", head_lr)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v != v or v == float("inf"):
            raise ValueError(f"{name} must be a positive number, got {v!r}")
    root = unwrap(model)
    rec = get_record(root)
    if not rec.msd:
        raise SurgeryError("param_groups separates the MSD head from the backbone and the record has no MSD head; "
                           "call surgery.apply(model, msd=K, ...) first, or build one group yourself")
    ids: set[int] = set()
    for h in rec.msd:
        ids |= {id(p) for p in root.get_submodule(h["name"]).parameters()}
        if h.get("layers"):
            ids.add(id(root.get_parameter(h["layers"]["param"])))
    head, rest, seen = [], [], set()
    for p in root.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (head if id(p) in ids else rest).append(p)
    return [dict(group_options, params=rest, lr=lr), dict(group_options, params=head, lr=head_lr)]
