"""Mixout (``apply(mixout=p)``; Lee et al., ICLR 2020): the unit's face, without torch.

Its options and their rules, its record section ``mixout`` (:class:`MixoutEntry`), its ``describe``
lines and the state-dict keys it adds (one target per mixed module, ``<name>.mixout_target``, which
``export`` and ``surgery convert`` drop). The torch part, :mod:`.plan`, mixes every layer family with
one swap mechanism (:mod:`surgery.layers.swap`): ``nn.Linear`` and transformers ``Conv1D``
(:mod:`.linear`), PEFT LoRA adapters (:mod:`.lora`), fused mixture-of-experts tensors and routers
(:mod:`.experts`), all selected by one rule (:mod:`.selection`).
"""

from __future__ import annotations

from typing import Any

from ...entry import Entry, Field
from ...errors import SurgeryError
from ...options import Option, check_bool, check_float_dtype, check_p, dtype_from_json, dtype_json, optional
from ...patterns import group_names
from ...schema import BOOL, PATH, PROB, STR, STRS, either, one_of, or_null
from ...wording import count, mib
from ..unit import Regularizer

__all__ = ["Mixout", "MixoutEntry", "TARGET_SUFFIX"]

TARGET_SUFFIX = "mixout_target"  # a Mixout target (frozen Parameter); state_dict key "<module>.mixout_target"


class MixoutEntry(Entry):
    """One mixed module: ``name``, ``p``, ``orig`` (the class revert gives back), ``transposed`` (GPT-2's
    ``Conv1D``); ``kind`` ``"lora"`` (a LoRA adapter's ``lora_A``: no target), ``"experts"`` or ``"router"``
    (a fused-experts module or router, its mixed Parameters in ``params``; ``"lora"`` with ``params``:
    expert tensors under a PEFT ``ParamWrapper``)."""

    name = Field(STR, required=True)
    p = Field(PROB, required=True)
    orig = Field(STR)
    transposed = Field(BOOL, default=False)
    kind = Field(one_of("lora", "experts", "router"))
    params = Field(PATH)

    @property
    def family(self) -> str:
        """``"linear"``, ``"lora"``, ``"experts"``, ``"router"`` or ``"lora experts"``."""
        if self.params is None:
            return "lora" if self.kind == "lora" else "linear"
        return "lora experts" if self.kind == "lora" else self.kind

    @property
    def has_target(self) -> bool:
        """Whether the module holds a target copy (a LoRA adapter mixes toward its frozen base instead)."""
        return self.kind != "lora"

    @property
    def target_key(self) -> str:
        return f"{self.name}.{TARGET_SUFFIX}" if self.name else TARGET_SUFFIX


def _pattern_json(pattern: Any) -> Any:
    """The JSON form of an include/exclude pattern: a set becomes a *sorted* list, so the record
    (and resume's comparison of it) does not depend on the hash seed."""
    if pattern is None or isinstance(pattern, str):
        return pattern
    if isinstance(pattern, (set, frozenset)):
        return sorted(pattern)
    return list(pattern)


def _same(value: Any, _: str) -> Any:
    return value  # checked against the model's module names when planned (surgery.patterns.compile_pattern)


PATTERN = or_null(either(STR, STRS))
OPTIONS = (
    Option("mixout", 0.0, check_p, json=PROB, doc=(
        "Mixout probability p in [0, 1]; 0 turns Mixout off. Every ``nn.Linear`` and transformers ``Conv1D`` "
        "(selected by ``include``/``exclude``) becomes a :class:`~surgery.layers.mixout.MixLinear` mixing toward a "
        "frozen copy of its current weight; fused mixture-of-experts tensors and routers are mixed per expert and "
        "input neuron; in a PEFT LoRA layer the adapter is mixed on the layer's effective weight toward the "
        "frozen base weight. A layer whose weight does not require grad is left alone (``describe`` lists it).")),
    Option("include", None, _same, json=PATTERN, to_json=_pattern_json, doc=(
        "Mixout layers to select: a regex (full match on dotted names) or a list of names / dotted suffixes. A "
        "layer is selected when it or a module containing it matches. Default: all.")),
    Option("exclude", None, _same, json=PATTERN, to_json=_pattern_json, doc=(
        "Mixout layers to leave alone, same forms as ``include``.")),
    Option("mixout_head", True, check_bool, json=BOOL, doc=(
        "also mix the task head, toward its (random) initial weights, as the paper and its reference code do. "
        "False leaves the head a plain layer.")),
    Option("mixout_tied", False, check_bool, json=BOOL, doc=(
        "also mix layers whose weight is tied to another parameter (an LM head tied to the embeddings). The tie "
        "is kept either way; default False leaves them alone and ``describe`` says so.")),
    Option("target_dtype", None, optional(check_float_dtype), json=or_null(STR), to_json=dtype_json,
           from_json=dtype_from_json, doc=(
               "keep Mixout targets in this dtype (e.g. ``torch.bfloat16``) to save memory; they are cast to the "
               "weight's dtype in forward. Default: the weight's.")),
    Option("low_memory", False, check_bool, json=BOOL, doc=(
        "Mixout layers recompute the mixed weight in backward instead of keeping it (one weight-sized tensor "
        "less per layer alive during backward).")),
)


class Mixout(Regularizer):
    """Mixout on every selected layer family (see the module doc)."""

    name = "mixout"
    options = OPTIONS
    sections = {"mixout": MixoutEntry}
    sections_always = True
    after = ("msd",)  # the task head the MSD head resolved, the layers a layer-weighted head bypasses
    planner = "surgery.regularizers.mixout.plan"
    coverage_label = "mixout"
    head_use = ("the head that mixout_head=False leaves a plain layer", "mixout=p with mixout_head=False")

    def check(self, opts) -> None:
        if (opts.include is not None or opts.exclude is not None) and opts.mixout == 0.0:
            raise SurgeryError("include/exclude select Mixout layers; they need mixout > 0")
        if opts.mixout == 0.0:
            for name in ("mixout_head", "mixout_tied", "target_dtype", "low_memory"):
                if name in opts.given:
                    raise SurgeryError(f"{name}={getattr(opts, name)!r} only matters with Mixout, which is off "
                                       f"(mixout=0); pass mixout=p (e.g. mixout=0.1) or drop {name}")

    def uses_head(self, opts) -> bool:
        return opts.mixout > 0.0 and opts.mixout_head is False

    def describe(self, rec, measured=None) -> list[str]:
        entries: list[MixoutEntry] = rec.mixout
        if not entries:
            return []
        total, local = (measured or {}).get("target_bytes", (None, None))
        extra = f", targets {mib(total)}" if total is not None else ""
        extra += f" (sharded: {mib(local)} on this rank)" if local is not None else ""
        ps = sorted({m.p for m in entries})
        lines = [f"  mixout p={'/'.join(map(str, ps))} on {len(entries)} layers{extra}:"]
        lines += [f"    {g}" for g in group_names([m.name for m in entries])]
        families = [m.family for m in entries]
        if "lora" in families:
            lines.append(f"  LoRA: {families.count('lora')} lora_A layers mix their layer's W0 + s*B@A toward the "
                         "frozen base weight W0 (no target copy)")
        if "experts" in families or "router" in families:
            lines.append(f"  experts: {count(families.count('experts'), 'fused-experts module')} mixed per expert "
                         f"and input neuron, {count(families.count('router'), 'router')} per input neuron (biases "
                         "plain)")
        if "lora experts" in families:
            lines.append(f"  LoRA on experts: {count(families.count('lora experts'), 'module')} mix their W0 + delta "
                         "toward the frozen base W0, per expert and input neuron (no target copy)")
        return lines

    def target_keys(self, rec) -> list[str]:
        return [m.target_key for m in rec.mixout if m.has_target]
