"""Multi-sample dropout on the task head (``apply(msd=K, msd_p=p)``; Inoue 2019), and its layer-weighted
form (``msd_layers=True``: the head Kaggle solutions feed a learned mix of every layer's summary token):
the unit's face, without torch.

Its record section ``msd`` (:class:`MSDHead`, with :class:`LayerMix` for a layer-weighted head) and the
plain-form rule: a layer-weighted head changes what the model computes at inference, which a plain
transformers class cannot hold, so ``revert``, ``export`` and ``surgery convert`` refuse it
(:meth:`MSD.no_plain_form`). The torch part: :mod:`.plan` (the plain head), :mod:`.layered` (the
layer-weighted head), :mod:`.head` (what a head must be).
"""

from __future__ import annotations

from ...entry import Entry, Field
from ...errors import SurgeryError
from ...options import Option, check_bool, check_choice, check_count, check_p, optional
from ...patterns import group_names
from ...schema import BOOL, COUNT, NUMBER, OBJECT, PROB, STR, STRS, K, one_of, or_null
from ..unit import Regularizer

__all__ = ["MSD", "MSDHead", "LayerMix", "MSD_P_DEFAULT", "LAYER_P_DEFAULT", "POOLS"]

MSD_P_DEFAULT = 0.2
LAYER_P_DEFAULT = 0.2
POOLS = ("first", "last")  # the layer-weighted head's summary token: position 0, or the last non-padding one
POOL = one_of(*POOLS)


class LayerMix(Entry):
    """A layer-weighted head's layer mix: the ``backbone``, its ``n`` hidden states, their dropout ``p``, the
    summary token (``pool``), the initial logit ``init``, the learned weights' ``param``, the parameters it
    bypasses and freezes (``frozen``)."""

    NAME = None
    backbone = Field(STR, required=True)
    n = Field(K, required=True)
    p = Field(PROB, required=True)
    pool = Field(POOL, required=True)
    init = Field(NUMBER)
    param = Field(STR, required=True)
    frozen = Field(STRS, required=True)


class MSDHead(Entry):
    """One multi-sample-dropout head: ``name``, ``k`` samples, dropout ``p``; ``layers`` for a layer-weighted one."""

    name = Field(STR, required=True)
    k = Field(K, required=True)
    p = Field(PROB, required=True)
    layers = Field(or_null(OBJECT), entry=LayerMix)


def _layered(opts) -> bool:
    return bool(opts.msd_layers)


OPTIONS = (
    Option("msd", 0, check_count, json=COUNT, doc=(
        "K > 0 turns the task head into a multi-sample-dropout head with K samples.")),
    Option("msd_p", None, optional(check_p), json=PROB, fill=MSD_P_DEFAULT, doc=(
        f"dropout probability of each MSD sample (default {MSD_P_DEFAULT}; only with ``msd``).")),
    Option("msd_layers", False, check_bool, json=BOOL, recorded=_layered, doc=(
        "the MSD head reads a learned, softmax-weighted mix of the summary token of every hidden state of the "
        "backbone instead of its usual input (the Kaggle head, see :mod:`surgery.regularizers.msd.layered`); the "
        "head must be an ``nn.Linear``.")),
    Option("msd_layer_p", LAYER_P_DEFAULT, check_p, json=PROB, recorded=_layered, doc=(
        "dropout probability of each layer's summary vector (``msd_layers``).")),
    Option("msd_pool", "first", check_choice(*POOLS, why="the summary token: position 0, or the last non-padding "
                                                          "token of attention_mask"),
           json=POOL, recorded=_layered, doc=(
               "the summary token: ``\"first\"`` (position 0) or ``\"last\"`` (the last non-padding token of "
               "``attention_mask``, for decoder-only backbones).")),
)


class MSD(Regularizer):
    """The multi-sample-dropout head, plain or layer-weighted (see the module doc)."""

    name = "msd"
    options = OPTIONS
    sections = {"msd": MSDHead}
    sections_always = True
    planner = "surgery.regularizers.msd.plan"
    coverage_label = "multi-sample dropout (the head)"
    head_use = ("the multi-sample-dropout head (msd=K)", "msd=K")

    def check(self, opts) -> None:
        if not opts.msd_layers and ("msd_layer_p" in opts.given or "msd_pool" in opts.given):
            raise SurgeryError("msd_layer_p/msd_pool configure the layer-weighted MSD head; pass msd_layers=True")
        if opts.msd_layers and opts.msd < 1:
            raise ValueError(f"msd_layers=True needs msd=K >= 1 samples (the Kaggle head: msd=5, msd_p=0.5), got "
                             f"msd={opts.msd}")
        if "msd_p" in opts.given and opts.msd == 0:
            raise SurgeryError(f"msd_p={opts.msd_p!r} is the dropout probability of multi-sample dropout, which is "
                               "off (msd=0); pass msd=K (e.g. msd=8) or drop msd_p")

    def uses_head(self, opts) -> bool:
        return opts.msd > 0

    def describe(self, rec, measured=None) -> list[str]:
        lines = []
        for h in rec.msd:
            if h.layers is None:
                lines.append(f"  multi-sample dropout: head {h.name!r}, K={h.k} samples, p={h.p}")
                continue
            L = h.layers
            where = "position 0" if L.pool == "first" else "the last non-padding token"
            lines.append(f"  layer-weighted multi-sample dropout: head {h.name!r}, K={h.k} samples, p={h.p}, on "
                         f"softmax({L.param}) over the {L.n} hidden states of {L.backbone!r} at {where} "
                         f"(dropout p={L.p} per layer)")
            if L.frozen:
                lines.append("    bypassed, frozen while installed: "
                             + ", ".join(group_names(sorted({n.rsplit(".", 1)[0] for n in L.frozen}))))
        return lines

    def no_plain_form(self, rec, action: str) -> str | None:
        heads = [h for h in rec.msd if h.layers is not None]
        if not heads:
            return None
        h = heads[0]
        what = (f"the layer-weighted MSD head (learned layer weights {h.layers.param!r} and head "
                f"{h.name!r} reading their weighted summary token instead of what it read before)")
        rebuild = ("keep the surgered form (model.save_pretrained(DIR) or a Trainer checkpoint) and load it with "
                   "surgery.load_pretrained(ModelClass, DIR), which rebuilds the surgery from the checkpoint's record "
                   "and checks it")
        if action == "revert":
            return (f"cannot revert: the model has {what}; the plain model computes something else, so revert would "
                    f"silently change its predictions. To deploy it, {rebuild}. To undo the surgery anyway (e.g. "
                    "before training), call surgery.revert(model, drop_layer_weights=True)")
        return (f"{action} writes a plain checkpoint, which cannot hold {what}: plain transformers would load it "
                f"without the layer weights and compute something else. Instead, {rebuild}")
