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

The forward (one batched pass, no per-layer or per-sample loop) is
:mod:`surgery.layers.layer_pool`.

It is installed with hooks plus one new module, ``layer_pool`` (its parameter
``layer_pool.layer_weights``, float32 whatever the model's dtype, as the original keeps it), on the
model root: the root's hooks mark one forward of the model, a pre-hook on the backbone asks for the
hidden states (and hides them from the output again unless the caller asked for them), a post-hook
pools them, and the head's pre-hook replaces the head's input with the pooled vector. One forward
of the model makes one backbone call (a second one, a two-tower model, is refused at that call);
the head called by itself, outside a forward of the model, runs on its own input. The modules that
used to compute the head's input from the backbone (a pooler, a classification head's dense layer)
are bypassed; their parameters are frozen while the head is installed (no gradient, so DDP needs
no ``find_unused_parameters`` and optimizers leave them bitwise as they were) and unfrozen by
revert.

In eval the head computes ``head(sum_l softmax(w)_l * h_l[:, 0])`` exactly.

The learned weights change what the model computes, and the head reads a different vector
than the plain model: a plain transformers class cannot hold this, so ``revert``, ``export``
and ``surgery convert`` refuse such a model with an error saying what to do
(:meth:`surgery.regularizers.msd.MSD.no_plain_form`). A transformers model root saves itself as a custom-code
checkpoint instead (:mod:`surgery.remote_code`): plain ``AutoModel...from_pretrained`` refuses it
without ``trust_remote_code``, and :func:`surgery.load_pretrained` rebuilds and verifies it.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import HeadError, SurgeryError
from ...layers.layer_pool import INIT, POOL_NAME, LayerMSD, LayerPool
from .. import Plan
from . import LayerMix, MSDHead
from .head import check_msd_head, head_weights

__all__ = ["plan_layered", "LayeredPlan"]


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


class LayeredUndo:
    """The installed head's undo: its hooks removed, the layer pool taken off the root, what was frozen
    unfrozen, the root's config given its class back (:mod:`surgery.remote_code`)."""

    def __init__(self, state: LayerMSD, root: nn.Module, frozen: list[nn.Parameter], config=None):
        self.state, self.root, self.frozen, self.config = state, root, frozen, config

    def check(self, view, rec) -> None:
        pass

    def undo(self, view, rec) -> None:
        self.state.undo(view, rec)
        if POOL_NAME in self.root._modules:
            del self.root._modules[POOL_NAME]
        for prm in self.frozen:
            prm.requires_grad_(True)
        if self.config is not None:
            from ...remote_code import restore_class
            restore_class(self.config)


@dataclass
class LayeredPlan(Plan):
    head: str = ""
    backbone: str = ""
    n: int = 0
    k: int = 0
    p: float = 0.0
    layer_p: float = 0.0
    pool: str = "first"
    mask_pos: int | None = None
    ids_pos: int | None = None

    def install(self, ctx, rec) -> LayeredUndo:
        """The layer pool and the hooks; the bypassed parameters frozen."""
        root = ctx.root
        head, backbone = ctx.module(self.head), ctx.module(self.backbone)
        w = head.weight
        # float32 weights as the QUEST solution keeps them (float64 for a float64 head), whatever the model's dtype
        dtype = torch.promote_types(torch.float32, w.dtype) if w.dtype.is_floating_point else torch.float32
        pool = LayerPool(self.n, self.layer_p, self.pool, dtype=dtype, device=w.device)
        pool.train(root.training)
        root.add_module(POOL_NAME, pool)
        frozen = [ctx.view.params[n] for n in self.freezes]
        for prm in frozen:
            prm.requires_grad_(False)
        config = vars(root).get("config") if isinstance(root, _pretrained_cls()) else None
        if config is not None:  # save_pretrained writes a custom-code checkpoint that plain classes cannot load
            from ...remote_code import save_as_custom_code
            save_as_custom_code(config)
        state = LayerMSD(self.k, self.p, pool, self.n, self.mask_pos, self.backbone, self.head, ids_pos=self.ids_pos,
                         title=ctx.title)
        state.handles += [backbone.register_forward_pre_hook(state.backbone_pre, with_kwargs=True),
                          backbone.register_forward_hook(state.backbone_post, with_kwargs=True),
                          *state.install_root(root)]
        state.install(head)
        rec.msd.append(MSDHead(name=self.head, k=self.k, p=self.p, layers=LayerMix(
            backbone=self.backbone, n=self.n, p=self.layer_p, pool=self.pool, init=INIT,
            param=f"{POOL_NAME}.layer_weights", frozen=list(self.freezes))))
        return LayeredUndo(state, root, frozen, config)

    def coverage(self, ctx, rec, trainable, first):
        return {"msd": head_weights(ctx.view, self.head, trainable, first)}


def _linear_head(ctx, name: str) -> str:
    """The Linear the pooled vector goes into: ``name``, or the ``out_proj`` inside a classification head.

    Raises:
        HeadError: no such Linear (or several candidates).
    """
    head = ctx.view.modules[name]
    if isinstance(head, nn.Linear):
        return name
    outs = [n for n, m in ctx.view.under(name) if n != name and isinstance(m, nn.Linear)]
    proj = [n for n in outs if n.rsplit(".", 1)[-1] == "out_proj"]
    if ctx.opts.head is not None or len(proj) != 1:
        raise HeadError(
            f"head {name!r} is a {type(head).__name__}, not an nn.Linear: the layer-weighted MSD head feeds "
            f"the pooled vector into one Linear classifier; pass head=... naming it"
            + (f" (Linear layers inside: {', '.join(map(repr, outs))})" if outs else ""))
    return proj[0]


def _backbone(ctx, head: str) -> str:
    """The one transformers backbone before the head (the task model's ``base_model``, or the shallowest
    ``PreTrainedModel`` inside a custom module).

    Raises:
        SurgeryError: none, or several.
    """
    modules, root = ctx.view.modules, ctx.root
    pretrained = _pretrained_cls()
    cands = [n for n, m in modules.items() if n and isinstance(m, pretrained) and n != head
             and not head.startswith(n + ".")]
    if isinstance(root, pretrained) and getattr(root, "base_model", root) is not root:
        cands = [next(n for n, m in modules.items() if m is root.base_model)]
    if cands:
        depth = min(n.count(".") for n in cands)
        cands = [n for n in cands if n.count(".") == depth]
    if not cands:
        raise SurgeryError(
            f"{type(root).__name__} holds no transformers backbone (a PreTrainedModel such as AutoModel) before "
            f"the head {head!r}: the layer-weighted MSD head needs one that returns per-layer hidden states "
            "(output_hidden_states=True); use plain msd=K without msd_layers for this model")
    if len(cands) > 1:
        raise SurgeryError(f"several transformers backbones in {type(root).__name__} ({', '.join(map(repr, cands))}); "
                           "the layer-weighted MSD head pools the hidden states of exactly one")
    return cands[0]


def _check_backbone(ctx, name: str, head: str) -> int:
    """The number of hidden states the backbone ``name`` returns (layers + 1), after checking it can.

    Raises:
        SurgeryError: no per-layer hidden states, an encoder-decoder, a decoder-only backbone with
            ``msd_pool="first"``, a root already holding ``layer_pool``.
        HeadError: a head that does not take the hidden size.
    """
    backbone = ctx.view.modules[name]
    cfg = backbone.config
    params = inspect.signature(backbone.forward).parameters
    takes = "output_hidden_states" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    n_layers = getattr(cfg, "num_hidden_layers", None)
    if not takes or not isinstance(n_layers, int):
        raise SurgeryError(f"backbone {name!r} ({type(backbone).__name__}) cannot return per-layer hidden states "
                           "(no output_hidden_states argument or no num_hidden_layers in its config); the "
                           "layer-weighted MSD head needs them")
    if getattr(cfg, "is_encoder_decoder", False):
        raise SurgeryError(f"backbone {name!r} ({type(backbone).__name__}) is an encoder-decoder model; the "
                           "layer-weighted MSD head pools the hidden states of one encoder or decoder stack: wrap "
                           "its encoder (AutoModel ... .get_encoder()) in your own module with a Linear head")
    if ctx.opts.msd_pool == "first" and _is_decoder_only(cfg):
        raise SurgeryError(f"backbone {name!r} ({type(backbone).__name__}) is decoder-only: with causal attention "
                           "position 0 sees only itself and is no summary token; pass msd_pool='last' (the last "
                           "non-padding token of attention_mask)")
    hidden = getattr(cfg, "hidden_size", None)
    in_features = ctx.view.modules[head].in_features
    if isinstance(hidden, int) and in_features != hidden:
        raise HeadError(f"head {head!r} takes {in_features} features but the hidden states of {name!r} "
                        f"have {hidden}; the layer-weighted MSD head feeds the pooled hidden state straight into "
                        "the head: name a Linear taking the hidden size with head=...")
    if POOL_NAME in vars(ctx.root)["_modules"] or hasattr(ctx.root, POOL_NAME):
        raise SurgeryError(f"{type(ctx.root).__name__} already has an attribute {POOL_NAME!r}; the layer-weighted MSD "
                           "head adds a module of that name")
    return n_layers + 1


def _bypassed(ctx, backbone: str, head: str) -> list[str]:
    """The trainable parameters that computed the head's input from the backbone (a pooler, a classification
    head's dense layer): bypassed by the layer mix, so frozen while it is installed. Each Parameter once."""
    view = ctx.view
    keep = {id(p) for p in view.params_under(backbone)} | {id(p) for p in view.params_under(head)}
    pooler = getattr(view.modules[backbone], "pooler", None)
    pooler_name = next(iter(view.names.get(id(pooler), [])), None) if isinstance(pooler, nn.Module) else None
    skip = {id(p) for p in view.params_under(pooler_name)} if pooler_name else set()
    seen: set[int] = set()
    frozen = []
    for n, p in view.params.items():  # each Parameter once, under its first name
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.requires_grad and (id(p) not in keep or id(p) in skip):
            frozen.append(n)
    return frozen


def plan_layered(ctx) -> LayeredPlan:
    """Find and check the backbone and the Linear head; nothing is changed. The task head the plan resolves
    (the Linear) is the one later plans read.

    Raises:
        HeadError: the head is not an ``nn.Linear`` taking the hidden size.
        SurgeryError: no (or several) transformers backbones returning per-layer hidden states,
            an encoder-decoder, a decoder-only backbone with ``msd_pool="first"``, a name clash
            with ``layer_pool``.
    """
    opts = ctx.opts
    found = ctx.task_head(required=True)
    check_msd_head(ctx.view, found)
    head = _linear_head(ctx, found)
    ctx.resolve_head(head)
    bname = _backbone(ctx, head)
    n = _check_backbone(ctx, bname, head)
    names = list(inspect.signature(ctx.view.modules[bname].forward).parameters)
    frozen = _bypassed(ctx, bname, head)
    return LayeredPlan(changes=[head, bname], head=head, backbone=bname, n=n, k=opts.msd, p=opts.msd_p,
                       layer_p=opts.msd_layer_p, pool=opts.msd_pool,
                       mask_pos=names.index("attention_mask") if "attention_mask" in names else None,
                       ids_pos=names.index("input_ids") if "input_ids" in names else None,
                       freezes={n: "bypassed by the layer-weighted MSD head, frozen" for n in frozen})
