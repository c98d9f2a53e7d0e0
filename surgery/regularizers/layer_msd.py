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
(:func:`surgery.record.no_plain_form`). A transformers model root saves itself as a custom-code
checkpoint instead (:mod:`surgery.remote_code`): plain ``AutoModel...from_pretrained`` refuses it
without ``trust_remote_code``, and :func:`surgery.load_pretrained` rebuilds and verifies it.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..errors import HeadError, SurgeryError
from ..layers.layer_pool import INIT, POOL_NAME, LayerMSD, LayerPool
from ..patterns import find_head
from .base import Plan, Regularizer
from .msd import check_msd_head

__all__ = ["LayerWeightedMSD"]

class _Undo:
    """In ``rec.handles``: ``remove()`` takes the layer pool off the root, unfreezes what was frozen and
    gives the root's config its class back (:mod:`surgery.remote_code`)."""

    def __init__(self, root: nn.Module, frozen: list[nn.Parameter], config=None):
        self.root, self.frozen, self.config = root, frozen, config

    def remove(self):
        if POOL_NAME in self.root._modules:
            del self.root._modules[POOL_NAME]
        for prm in self.frozen:
            prm.requires_grad_(True)
        if self.config is not None:
            from ..remote_code import restore_class
            restore_class(self.config)




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


@dataclass
class LayerPlan(Plan):
    backbone: str = ""
    n: int = 0
    k: int = 0
    p: float = 0.0
    layer_p: float = 0.0
    pool: str = "first"
    mask_pos: int | None = None
    ids_pos: int | None = None

    def install(self, view, rec) -> None:
        """The layer pool and the hooks; the bypassed parameters frozen."""
        root = view.root
        head = view.modules[self.head]
        backbone = view.modules[self.backbone]
        w = head.weight
        # float32 weights as the QUEST solution keeps them (float64 for a float64 head), whatever the model's dtype
        dtype = torch.promote_types(torch.float32, w.dtype) if w.dtype.is_floating_point else torch.float32
        pool = LayerPool(self.n, self.layer_p, self.pool, dtype=dtype, device=w.device)
        pool.train(root.training)
        root.add_module(POOL_NAME, pool)
        frozen = [view.params[n] for n in self.freezes]
        for prm in frozen:
            prm.requires_grad_(False)
        config = vars(root).get("config") if isinstance(root, _pretrained_cls()) else None
        if config is not None:  # save_pretrained writes a custom-code checkpoint that plain classes cannot load
            from ..remote_code import save_as_custom_code
            save_as_custom_code(config)
        state = LayerMSD(self.k, self.p, pool, self.n, self.mask_pos, self.backbone, self.head, ids_pos=self.ids_pos,
                         title=view.title)
        rec.handles += [state, _Undo(root, frozen, config),
                        backbone.register_forward_pre_hook(state.backbone_pre, with_kwargs=True),
                        backbone.register_forward_hook(state.backbone_post, with_kwargs=True),
                        *state.install_root(root)] + state.install(head)
        rec.msd.append({"name": self.head, "k": self.k, "p": self.p,
                        "layers": {"backbone": self.backbone, "n": self.n, "p": self.layer_p, "pool": self.pool,
                                   "init": INIT, "param": f"{POOL_NAME}.layer_weights", "frozen": list(self.freezes)}})


class LayerWeightedMSD(Regularizer):
    """The layer-weighted multi-sample-dropout head (``msd=K, msd_layers=True``)."""

    name = "msd_layers"

    def plan(self, view, opts, earlier: Sequence[Plan]) -> LayerPlan | None:
        """Find and check the backbone and the Linear head; nothing is changed.

        Raises:
            HeadError: the head is not an ``nn.Linear`` taking the hidden size.
            SurgeryError: no (or several) transformers backbones returning per-layer hidden
                states, an encoder-decoder, a decoder-only backbone with ``msd_pool="first"``,
                a name clash with ``layer_pool``.
        """
        if not opts.msd_layers:
            return None
        head_name = find_head(view.modules, view.title, opts.head, required=True)
        check_msd_head(view, head_name)
        pool = opts.msd_pool
        root, modules = view.root, view.modules
        head = modules[head_name]
        if not isinstance(head, nn.Linear):
            outs = [n for n, m in view.under(head_name) if n != head_name and isinstance(m, nn.Linear)]
            proj = [n for n in outs if n.rsplit(".", 1)[-1] == "out_proj"]
            if opts.head is not None or len(proj) != 1:
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
        ids_pos = names.index("input_ids") if "input_ids" in names else None
        # modules that computed the head's input from the backbone are bypassed: their parameters get frozen
        keep = {id(p) for p in view.params_under(bname)} | {id(p) for p in view.params_under(head_name)}
        pooler = getattr(backbone, "pooler", None)
        pooler_name = next((n for n in view.names.get(id(pooler), [])), None) if isinstance(pooler, nn.Module) else None
        skip = {id(p) for p in view.params_under(pooler_name)} if pooler_name else set()
        seen: set[int] = set()
        frozen = []
        for n, p in view.params.items():  # each Parameter once, under its first name
            if id(p) in seen:
                continue
            seen.add(id(p))
            if p.requires_grad and (id(p) not in keep or id(p) in skip):
                frozen.append(n)
        return LayerPlan(claims=[head_name, bname], head=head_name, backbone=bname, n=n_layers + 1, k=opts.msd,
                         p=opts.msd_p, layer_p=opts.msd_layer_p, pool=pool, mask_pos=mask_pos, ids_pos=ids_pos,
                         freezes={n: "bypassed by the layer-weighted MSD head, frozen" for n in frozen})



