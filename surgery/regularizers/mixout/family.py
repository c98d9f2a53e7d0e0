"""One planned swap of any Mixout layer family, and the refusals every family shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ...errors import SurgeryError
from ...layers.experts import MixoutParams
from ...layers.mixout import LoraMixout, MixLinear
from ...layers.swap import MixoutLayer, unswappable
from . import MixoutEntry

__all__ = ["Swap", "refuse_unswappable", "qualname"]


def qualname(m: Any) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def refuse_unswappable(name: str, module: nn.Module, what: str = "weight") -> None:
    """Refuse a module whose swap could not be exact.

    Raises:
        SurgeryError: a Mixout layer no live surgery owns (a copy of a surgered model's module), a
            parametrized weight, a module compiled on its own, a forward replaced on the instance (and for
            a Linear layer, a weight recomputed before every forward), naming ``exclude=[name]``.
    """
    if isinstance(module, MixoutLayer):
        raise SurgeryError(f"{name!r} is already a Mixout layer ({type(module).__name__}) that no live surgery "
                           "of this model owns (a copy of a surgered model's module?); build the model from "
                           f"plain modules, or pass exclude=[{name!r}]")
    why = unswappable(module, what)
    if why is not None:
        raise SurgeryError(f"mixout cannot mix {name!r}: {why[0]}. Pass exclude=[{name!r}] to leave it alone, or "
                           f"{why[1]}")


@dataclass
class Swap:
    """The module ``name`` to be swapped for a Mixout layer of ``family``: ``"linear"`` (``MixLinear``),
    ``"lora"`` (a LoRA adapter's ``lora_A``: ``LoraMixout``), ``"experts"`` / ``"router"`` (``MixoutParams``
    mixing the Parameters ``layout`` names), ``"lora experts"`` (expert tensors under PEFT ``ParamWrapper``
    layers, mixed toward their frozen base)."""

    name: str
    module: nn.Module
    family: str
    layout: tuple[tuple[str, tuple[int, ...]], ...] = ()
    transposed: bool = False  # fused experts stored (E, in, out)

    def build(self, p: float, target_dtype: Any, low_memory: bool) -> Any:
        """What can fail (the target copy), allocated: the Linear families' layer, the experts' target."""
        if self.family == "linear":
            return MixLinear.from_module(self.module, p, target_dtype=target_dtype, low_memory=low_memory)
        if self.family == "lora":
            return LoraMixout.from_module(self.module, p)
        if self.family == "lora experts":
            return None
        return MixoutParams.make_target(self.module, self.layout, target_dtype)

    def layer(self, built: Any, p: float, low_memory: bool) -> MixoutLayer:
        """The Mixout layer, built now for the experts families (from the module's attributes as apply leaves
        them: its config copy)."""
        if self.family in ("linear", "lora"):
            return built
        return MixoutParams.from_module(self.module, p, self.layout, target=built, base=built is None,
                                        low_memory=low_memory)

    def entry(self, p: float, layer: MixoutLayer) -> MixoutEntry:
        if self.family in ("linear", "lora"):
            return MixoutEntry(name=self.name, p=p, orig=qualname(self.module), transposed=layer.transposed,
                               kind="lora" if self.family == "lora" else None)
        return MixoutEntry(name=self.name, p=p, orig=qualname(self.module), transposed=self.transposed,
                           kind="lora" if self.family == "lora experts" else self.family,
                           params=[k for k, _ in self.layout])
