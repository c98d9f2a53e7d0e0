"""The Mixout layers stay where the record says, checked at every training forward of the model.

A layer put in a Mixout layer's place after ``apply`` (``resize_token_embeddings`` builds a new, plain
``lm_head`` for an untied head, which Mixout mixes by default; code that assigns a module) would train
without Mixout while the record and ``describe`` still list it, and only ``revert`` would notice, at
the end. :class:`Placement`, a forward pre-hook on the model ``apply`` ran on, looks each recorded layer up
(a dict lookup per name part) and refuses the forward that would train without one, as the layer's own
check refuses a weight of another shape (:func:`surgery.layers.mixout._check_target`, the tied case). A
layer wrapped since (PEFT's LoRA layer keeps it as ``base_layer``) is found inside the wrapper, as
``revert`` finds it (:func:`surgery.wrappers.find_layers`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...errors import SurgeryError
from ...wrappers import find_layers

__all__ = ["Placement"]


def _at(root: nn.Module, name: str) -> nn.Module | None:
    m: Any = root
    for part in name.split(".") if name else ():
        m = m._modules.get(part) if isinstance(m, nn.Module) else None
    return m


class Placement:
    """Forward pre-hook: in training, every recorded Mixout layer is still in the model.

    ``layers``: ``(recorded name, the Mixout layer, the classes revert looks for)``.
    """

    def __init__(self, root: nn.Module, layers: list[tuple[str, nn.Module, tuple[type, ...]]]):
        self.root = root
        self.layers = layers
        self.seen = {name: layer for name, layer, _ in layers}  # what stands at each name (a wrapper, once checked)

    def __call__(self, module: nn.Module, args: Any) -> None:
        if not module.training or torch.compiler.is_compiling():
            return
        for name, layer, classes in self.layers:
            here = _at(self.root, name)
            if here is not self.seen[name]:
                self._recheck(name, layer, classes, here)

    def _recheck(self, name: str, layer: nn.Module, classes: tuple[type, ...], here: Any) -> None:
        found, _ = find_layers(self.root, name, classes)
        if not any(m is layer for _, m in found):
            what = type(here).__name__ if here is not None else "nothing"
            raise SurgeryError(
                f"Mixout layer {name!r} was replaced after surgery.apply (it holds {what} now), so training would run "
                "it without Mixout while the record lists it (model.resize_token_embeddings builds a new LM head; "
                "so does any code that assigns a module there). Make the change before apply: load the model again, "
                f"resize or replace, then surgery.apply(model, ...); or pass exclude=[{name!r}] to apply")
        self.seen[name] = here
