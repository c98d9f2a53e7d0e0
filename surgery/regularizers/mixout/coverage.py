"""What Mixout covers, for the record's ``coverage`` (``surgery/coverage.py``): the trainable weights it
mixes (a LoRA adapter's ``lora_A``/``lora_B``, whose product it mixes) and, by kind, what it leaves plain:
``embeddings``, ``norms``, ``biases`` (never mixed, as in the paper), ``convolutions``, ``expert tensors``
(undeclared layouts), ``routers``, ``tied heads`` (``mixout_tied=False``), ``linear layers`` (excluded or
skipped) and ``other`` Parameters (learned scales, attention sinks, ...)."""

from __future__ import annotations

from torch import nn

from ...layers.mixout import is_conv1d
from ...patterns import group_names
from .experts import classify

__all__ = ["covered", "left_plain", "KINDS"]

KINDS = ("embeddings", "norms", "biases", "convolutions", "expert tensors", "routers", "tied heads", "linear layers",
         "other")
MAX_NAMES = 6  # name patterns kept per kind


def _lora_b(name: str) -> str:
    head, _, adapter = name.rpartition(".lora_A.")
    return f"{head}.lora_B.{adapter}"


def covered(view, entries, wrappers) -> set[str]:
    """Names of the Parameters the Mixout ``entries`` mix (``wrappers``: PEFT ParamWrappers by the module
    they wrapped when apply planned)."""
    out: set[str] = set()
    for m in entries:
        if m.family in ("linear", "lora"):
            out.add(f"{m.name}.weight")
            if m.family == "lora":
                out.add(f"{_lora_b(m.name)}.weight")
        elif m.family != "lora experts":
            out.update(f"{m.name}.{k}" for k in m.params)
        else:  # expert tensors under PEFT ParamWrappers: their adapters
            for wname, w in wrappers.get(id(view.modules.get(m.name)), []):
                if w.parameter_name in m.params:
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


def left_plain(view, trainable: dict[str, int], mixed: set[str]) -> list[dict]:
    """The record's ``coverage.left``: the trainable weights Mixout leaves plain, by kind (in :data:`KINDS`
    order), with up to six name patterns each."""
    left: dict[str, list[str]] = {}
    for name in trainable:
        if name not in mixed:
            left.setdefault(_kind(view, name), []).append(name)
    return [{"kind": k, "weights": sum(trainable[n] for n in left[k]), "names": group_names(left[k])[:MAX_NAMES]}
            for k in KINDS if k in left]
