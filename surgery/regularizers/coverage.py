"""What share of the model's trainable weights each regularizer covers, written into the record.

Planned last, installed last: it reads the record the other plans wrote and the view of the model
(the sizes and kinds of the Parameters), changes nothing in the model, and adds the record's
``coverage`` field, so ``describe`` can say what "Mixout on the model" means for this model, also
for a checkpoint (``surgery inspect`` reads the record alone)::

    "coverage": {"trainable": 47520,                 # trainable weights (elements) when apply ran
                 "mixout": 39008, "msd": 99,          # weights each regularizer covers
                 "left": [{"kind": "embeddings", "weights": 3168, "names": ["model.embed_tokens.weight"]},
                          ...]}                       # trainable weights Mixout leaves plain, by kind

Mixout covers the weights it mixes (a LoRA adapter's ``lora_A``/``lora_B``, whose product it mixes);
multi-sample dropout covers the task head's weights (the dropout acts on the head's input). Dropout
and drop-path rates act on activations, not on weights, and are not counted. ``left`` (only with
Mixout) names each kind of trainable weight Mixout does not touch: ``embeddings``, ``norms``,
``biases`` (never mixed, as in the paper), ``convolutions``, ``expert tensors`` (undeclared layouts),
``routers``, ``tied heads`` (``mixout_tied=False``), ``linear layers`` (excluded or skipped) and
``other`` Parameters (learned scales, attention sinks, ...). Sizes count each Parameter once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from torch import nn

from ..describing import group_names
from ..layers.mixout import is_conv1d
from .base import Plan, Regularizer
from .experts import _param_wrappers, classify

__all__ = ["Coverage", "KINDS"]

KINDS = ("embeddings", "norms", "biases", "convolutions", "expert tensors", "routers", "tied heads", "linear layers",
         "other")
MAX_NAMES = 6  # name patterns kept per kind


def _lora_b(name: str) -> str:
    head, _, adapter = name.rpartition(".lora_A.")
    return f"{head}.lora_B.{adapter}"


def _covered_by_mixout(view, rec, wrappers) -> set[str]:
    """Names of the Parameters the record's Mixout entries mix (``wrappers``: PEFT ParamWrappers by the
    module they wrapped when apply planned)."""
    out: set[str] = set()
    for m in rec.mixout:
        name, kind = m["name"], m.get("kind")
        if "params" not in m:
            out.add(f"{name}.weight")
            if kind == "lora":
                out.add(f"{_lora_b(name)}.weight")
        elif kind != "lora":
            out.update(f"{name}.{k}" for k in m["params"])
        else:  # expert tensors under PEFT ParamWrappers: their adapters
            for wname, w in wrappers.get(id(view.modules.get(name)), []):
                if w.parameter_name in m["params"]:
                    out.update(n for n, _ in w.named_parameters(prefix=wname) if ".lora_A." in n or ".lora_B." in n)
    return out


def _kind(view, name: str) -> str:
    owner_name, _, leaf = name.rpartition(".")
    owner = view.modules.get(owner_name)
    names = view.param_names[id(view.params[name])]
    owners = [view.modules.get(n.rpartition(".")[0]) for n in names]
    if len(names) > 1 and any(isinstance(o, nn.Linear) or is_conv1d(o) for o in owners):
        return "tied heads"
    cls = type(owner).__name__
    if isinstance(owner, (nn.Embedding, nn.EmbeddingBag)):
        return "embeddings"
    if "Norm" in cls or isinstance(owner, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
        return "norms"
    if "bias" in leaf:
        return "biases"
    if isinstance(owner, nn.modules.conv._ConvNd):
        return "convolutions"
    found = classify(owner) if owner is not None else None
    if found is not None:
        return "expert tensors" if found.kind == "experts" else "routers"
    if isinstance(owner, nn.Linear) or is_conv1d(owner):
        return "linear layers"
    if "embed" in leaf or "Embedding" in cls:
        return "embeddings"
    if "expert" in name:
        return "expert tensors"
    return "other"


@dataclass
class CoveragePlan(Plan):
    frozen: set[str] = field(default_factory=set)  # Parameters other plans freeze while installed
    wrappers: dict = field(default_factory=dict)  # PEFT ParamWrappers by the module they wrap, before any swap

    def install(self, view, rec) -> None:
        trainable: dict[str, int] = {}
        seen: set[int] = set()
        for name, p in view.params.items():
            if p.requires_grad and id(p) not in seen and name not in self.frozen:
                seen.add(id(p))
                trainable[name] = p.numel()
        first = {n: view.param_names[id(view.params[n])][0] for n in view.params}
        cov: dict = {"trainable": sum(trainable.values())}
        if rec.mixout:
            mixed = {first[n] for n in _covered_by_mixout(view, rec, self.wrappers) if n in first} & trainable.keys()
            cov["mixout"] = sum(trainable[n] for n in mixed)
            left: dict[str, list[str]] = {}
            for name in trainable:
                if name not in mixed:
                    left.setdefault(_kind(view, name), []).append(name)
            cov["left"] = [{"kind": k, "weights": sum(trainable[n] for n in left[k]),
                            "names": group_names(left[k])[:MAX_NAMES]} for k in KINDS if k in left]
        if rec.msd:
            heads = {first[n] for h in rec.msd for n in view.params if n.startswith(h["name"] + ".")}
            cov["msd"] = sum(trainable[n] for n in heads & trainable.keys())
        rec.coverage = cov


class Coverage(Regularizer):
    """Not a regularizer: the record's account of which trainable weights the others cover."""

    name = "coverage"

    def plan(self, view, opts, earlier: Sequence[Plan]) -> CoveragePlan | None:
        if not earlier:
            return None
        return CoveragePlan(frozen={n for p in earlier for n in p.freezes}, wrappers=_param_wrappers(view))
