"""What share of the model's trainable weights each regularizer covers, written into the record.

After the plans are installed, ``apply`` asks each plan for its part (:meth:`surgery.regularizers.Plan.coverage`)
and writes the record's ``coverage`` field, so ``describe`` can say what "Mixout on the model" means for
this model, also for a checkpoint (``surgery inspect`` reads the record alone)::

    "coverage": {"trainable": 47520,                 # trainable weights (elements) when apply ran
                 "mixout": 39008, "msd": 99,          # weights each regularizer covers (keyed by its name)
                 "left": [{"kind": "embeddings", "weights": 3168, "names": ["model.embed_tokens.weight"]},
                          ...]}                       # trainable weights Mixout leaves plain, by kind

Mixout covers the weights it mixes, multi-sample dropout the task head's weights (the dropout acts on the
head's input); dropout and drop-path rates act on activations, not on weights, and are not counted.
``trainable`` counts the Parameters that require grad and no plan freezes, each Parameter once.
"""

from __future__ import annotations

from typing import Any

__all__ = ["coverage"]


def coverage(ctx, rec, plans) -> dict[str, Any]:
    """The record's ``coverage`` for the installed ``plans`` ({} when there are none)."""
    if not plans:
        return {}
    view = ctx.view
    frozen = {n for p in plans for n in p.freezes}
    trainable: dict[str, int] = {}
    seen: set[int] = set()
    for name, p in view.params.items():
        if p.requires_grad and id(p) not in seen and name not in frozen:
            seen.add(id(p))
            trainable[name] = p.numel()
    first = {n: view.param_names[id(view.params[n])][0] for n in view.params}
    cov: dict[str, Any] = {"trainable": sum(trainable.values())}
    for plan in plans:
        cov.update(plan.coverage(ctx, rec, trainable, first))
    return cov
