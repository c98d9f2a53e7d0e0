"""Does ``describe`` know every randomness ``train_noise`` sees? One check for any model.

``apply`` records in ``left_on`` the kinds of train-time randomness (dropout, drop_path,
router_noise) whose option was not given; ``surgery.train_noise`` sees what a training forward
really draws. They agree when, for every kind, leaving only that kind on (the others at 0.0)
gives a noisy forward exactly when the record says that kind is left on, and all options at 0.0
give ``[]``. Randomness no option controls (``"sampling"``: a router that samples its experts) is
left on in every case, and the forward is never quiet while it is.

    from agreement import check_agreement
    check_agreement(model, lambda: surgery.train_noise(model, x))
"""

from __future__ import annotations

from typing import Callable

import torch

import surgery
from surgery.regularizers.rates import DROP_PATH, DROPOUT, ROUTER_NOISE

__all__ = ["KNOBS", "ALL_OFF", "left_on", "check_agreement"]

KNOBS = {DROPOUT: "dropout", DROP_PATH: "drop_path", ROUTER_NOISE: "router_noise"}  # kind -> apply's option
ALL_OFF = {option: 0.0 for option in KNOBS.values()}


def left_on(model) -> set[str]:
    """The kinds the record of a surgered model says are left on in training."""
    return {on.kind for on in surgery.get_record(model).left_on}


def _noise(noise: Callable[[], list[str]]) -> list[str]:
    torch.manual_seed(0)  # LayerDrop: which layers run (so which calls are made) depends on the generator
    return noise()


def check_agreement(model, noise: Callable[[], list[str]]) -> set[str]:
    """Assert that ``describe``'s left-on kinds and ``train_noise`` agree on ``model``; return the kinds
    on in the model as built. ``noise()`` runs ``surgery.train_noise`` on the model with its input."""
    before = _noise(noise)
    surgery.apply(model)  # no option: every kind is left on
    kinds = left_on(model)
    text = surgery.describe(model)
    surgery.revert(model)
    assert bool(before) == bool(kinds), f"train_noise {before} but the record says left on: {kinds}\n{text}"
    if any("(" in c for c in before):  # a dropout-family call with p > 0
        assert DROPOUT in kinds, f"train_noise {before}, yet describe names no dropout left on\n{text}"
    uncontrolled = kinds - set(KNOBS)
    for kind, option in KNOBS.items():
        surgery.apply(model, **{o: 0.0 for o in KNOBS.values() if o != option})
        only, text = left_on(model), surgery.describe(model)
        found = _noise(noise)
        surgery.revert(model)
        assert only == (kinds & {kind}) | uncontrolled, text
        assert bool(found) == bool(only), f"{option} only: train_noise {found}, record left on {only}\n{text}"
    surgery.apply(model, **ALL_OFF)
    rest, found, text = left_on(model), _noise(noise), surgery.describe(model)
    surgery.revert(model)
    assert rest == uncontrolled and bool(found) == bool(uncontrolled), f"all off: {found}\n{text}"
    return kinds
