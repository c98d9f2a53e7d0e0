"""The multi-sample-dropout head, planned and installed: the head's input is taken ``K`` times through
dropout and the ``K`` outputs are averaged, in one batched head call (:mod:`surgery.layers.msd`). The
head keeps its class and keys: two hooks do the work. ``msd_layers=True``: :mod:`.layered`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...layers.msd import MultiSampleDropout
from .. import Plan
from . import MSDHead
from .head import check_msd_head, head_weights
from .layered import plan_layered

__all__ = ["plan", "HeadPlan"]


@dataclass
class HeadPlan(Plan):
    head: str = ""
    k: int = 0
    p: float = 0.0

    def install(self, ctx, rec) -> MultiSampleDropout:
        state = MultiSampleDropout(self.k, self.p)
        state.install(ctx.module(self.head))
        rec.msd.append(MSDHead(name=self.head, k=self.k, p=self.p))
        return state

    def coverage(self, ctx, rec, trainable, first):
        return {"msd": head_weights(ctx.view, self.head, trainable, first)}


def plan(unit, ctx) -> Plan | None:
    """The plan for ``msd=K`` (None when it is 0)."""
    opts = ctx.opts
    if opts.msd == 0:
        return None
    if opts.msd_layers:
        return plan_layered(ctx)
    head = ctx.task_head(required=True)
    check_msd_head(ctx.view, head)
    return HeadPlan(changes=[head], head=head, k=opts.msd, p=opts.msd_p)
