"""The change record: the single source of truth about what ``apply`` changed.

One :class:`Record` lives on a surgered model (``model._surgery``). ``revert`` undoes
exactly what it lists, ``describe`` prints it, and checkpoint conversion reads it back
from disk, so it is plain JSON (``Record.to_dict`` / ``Record.from_dict``).

On-disk form (version 1)::

    {"format": "surgery", "version": 1,
     "args":    {"mixout": 0.1, "dropout": 0.0, "msd": 8, "msd_p": 0.2, ...},
     "mixout":  [{"name": "bert.encoder.layer.0.attention.self.query", "p": 0.1,
                  "orig": "torch.nn.modules.linear.Linear", "transposed": false}],
     "dropout": [{"module": "bert.embeddings.dropout", "attr": "p", "old": 0.1, "new": 0.0},
                 {"module": "swin.encoder.layers.0.blocks.1.drop_path", "attr": "drop_prob", "old": 0.1,
                  "new": 0.0, "kind": "drop_path"}],
     "config":  [{"module": "", "path": ["hidden_dropout_prob"], "old": 0.1, "new": 0.0}],
     "msd":     [{"name": "classifier", "k": 8, "p": 0.2}],
     "skipped": [{"name": "lm_head", "reason": "weight tied to transformer.wte.weight"}],
     "left_on": [{"kind": "drop_path", "values": [0.1], "modules": 12, "config": 1}]}

``dropout``/``config`` entries with ``"kind": "drop_path"`` are stochastic-depth rates
(``apply(drop_path=...)``), with ``"kind": "router_noise"`` router-noise levels
(``apply(router_noise=...)``); entries without a kind are dropout. ``left_on`` summarises the
non-zero rates of a kind whose option was not given (``describe`` reports it).

A Mixout entry with ``"kind": "lora"`` names the ``lora_A.<adapter>`` layer of a PEFT LoRA
layer: Mixout on that layer's effective weight toward its frozen base weight, no target
copy (see :mod:`surgery.lora`). An entry with ``"params"`` names a fused-experts module or a
router (``"kind": "experts"`` / ``"router"``, the mixed Parameters listed; ``"kind": "lora"`` for expert
tensors under a PEFT ``ParamWrapper``, no target; see :mod:`surgery.regularizers.experts`); its target
packs every listed Parameter's, ``(E, sum of the per-expert sizes)``. ``coverage`` (optional) says
which share of the trainable weights each regularizer covers and what Mixout leaves plain, by kind
(:mod:`surgery.regularizers.coverage`). Every other Mixout layer adds one frozen Parameter,
``<name>.mixout_target`` (the frozen pretrained weight, same shape/dtype as
``<name>.weight``, ``requires_grad=False``), to the state_dict. Nothing
else changes keys: MSD heads are hooks, dropout changes are attribute values.
For transformers models the record is also written into the config
(``config.surgery``), so ``save_pretrained``/Trainer checkpoints carry it. A transformers
sub-model that owns its config (``self.bert = AutoModel...`` in a custom module) carries
the part of the record inside it, names relative to it, plus ``"scope": "bert"``
(see ``configs.py``).
"""

from __future__ import annotations

import dataclasses
import json
import reprlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable

from .errors import NotSurgeredError
from .schema import check_record, parse_json

__all__ = ["Record", "TARGET_SUFFIX", "CONFIG_KEY", "FORMAT", "VERSION", "get_record", "unwrap", "no_plain_form",
           "claim", "release", "claimant"]

FORMAT = "surgery"
VERSION = 1
TARGET_SUFFIX = "mixout_target"  # name of a Mixout target (frozen Parameter); state_dict key "<layer>.mixout_target"
CONFIG_KEY = "surgery"  # attribute of a transformers config that carries the record
ATTR = "_surgery"  # attribute of the model that holds the live Record
DROPOUT, DROP_PATH = "dropout", "drop_path"  # the kinds of probability ("kind" of dropout/config entries)
ROUTER_NOISE = "router_noise"  # train-time noise on a mixture-of-experts router's input (apply(router_noise=...))


@dataclass
class Record:
    """What one ``apply`` call changed. JSON-serialisable apart from ``handles``."""

    args: dict[str, Any] = field(default_factory=dict)
    mixout: list[dict[str, Any]] = field(default_factory=list)
    dropout: list[dict[str, Any]] = field(default_factory=list)
    config: list[dict[str, Any]] = field(default_factory=list)
    msd: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    left_on: list[dict[str, Any]] = field(default_factory=list)  # train-mode randomness not asked about
    # share of the trainable weights each regularizer covers, and what Mixout leaves plain, by kind
    # (surgery.regularizers.coverage); {} when not computed, and then not written
    coverage: dict[str, Any] = field(default_factory=dict)
    # where a sub-model sits in the model apply ran on (its config carries this part of the record,
    # names relative to it); "" for the record of the model itself, and then not written
    scope: str = ""
    version: int = VERSION
    # live hook handles (MSD); never serialised
    handles: list[Any] = field(default_factory=list, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name != "handles" and (f.name not in ("scope", "coverage") or getattr(self, f.name))}
        return {"format": FORMAT, **json.loads(json.dumps(d))}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Any) -> "Record":
        if isinstance(d, str):
            d = parse_json(d, "surgery record (the checkpoint metadata is corrupt)")
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError("not a surgery record (missing 'format': 'surgery')")
        if d.get("version") != VERSION:
            raise ValueError(
                f"surgery record version {reprlib.repr(d.get('version'))} is not supported by this surgery "
                f"(which reads version {VERSION}); upgrade surgery"
            )
        check_record(d)  # one ValueError per wrong field, before anything reads it
        names = {f.name for f in dataclasses.fields(cls)} - {"handles"}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def target_keys(self) -> list[str]:
        """State-dict keys of the Mixout targets this record added (LoRA entries add none)."""
        return [f"{m['name']}.{TARGET_SUFFIX}" if m["name"] else TARGET_SUFFIX for m in self.mixout
                if m.get("kind") != "lora"]


# ---- what live records have changed ------------------------------------------------------------
# Every module and parameter an ``apply`` changed, mapped to the model it was applied to and its name
# there, until that model's ``revert``. A second ``apply`` that reaches one of them (the same model
# again through a sub-module, a parent model, or another model sharing the module) is refused.
_CLAIMS: dict[int, tuple[weakref.ref, weakref.ref, str]] = {}  # id(obj) -> (obj, root, name); weak, by identity


def claim(root: Any, objects: Iterable[tuple[str, Any]]) -> None:
    """Record that ``root``'s surgery changed each ``(name, object)``."""
    for name, obj in objects:
        _CLAIMS[id(obj)] = (weakref.ref(obj), weakref.ref(root), name)


def release(root: Any) -> None:
    """Forget every claim of ``root`` (its revert), and claims whose objects or models are gone."""
    for key, (obj, ref, _) in list(_CLAIMS.items()):
        if ref() is root or ref() is None or obj() is None:
            _CLAIMS.pop(key, None)


def claimant(obj: Any) -> tuple[Any, str] | None:
    """``(the model whose live surgery changed obj, obj's name there)``, or None."""
    found = _CLAIMS.get(id(obj))
    if found is None or found[0]() is not obj:
        return None
    root = found[1]()
    if root is None or ATTR not in getattr(root, "__dict__", {}):
        return None
    return root, found[2]


def no_plain_form(rec: "Record | None", action: str) -> str | None:
    """Why ``action`` (``"revert"``, ``"surgery.export"``, ``"surgery convert"``) cannot give a plain
    model or checkpoint for this record, or None when it can.

    A layer-weighted MSD head (``apply(msd_layers=True)``) learns layer weights and makes the head
    read their weighted summary token: a plain transformers class holds neither, so the plain form
    would compute something else. Every reader of a record asks this one function.
    """
    heads = [h for h in (rec.msd if rec is not None else []) if isinstance(h, dict) and h.get("layers")]
    if not heads:
        return None
    h = heads[0]
    what = (f"the layer-weighted MSD head (learned layer weights {h['layers'].get('param')!r} and head "
            f"{h.get('name')!r} reading their weighted summary token instead of what it read before)")
    rebuild = ("keep the surgered form (model.save_pretrained(DIR) or a Trainer checkpoint) and load it with "
               "surgery.load_pretrained(ModelClass, DIR), which rebuilds the surgery from the checkpoint's record "
               "and checks it")
    if action == "revert":
        return (f"cannot revert: the model has {what}; the plain model computes something else, so revert would "
                f"silently change its predictions. To deploy it, {rebuild}. To undo the surgery anyway (e.g. before "
                "training), call surgery.revert(model, drop_layer_weights=True)")
    return (f"{action} writes a plain checkpoint, which cannot hold {what}: plain transformers would load it "
            f"without the layer weights and compute something else. Instead, {rebuild}")


def unwrap(model):
    """:func:`surgery.wrappers.unwrap` (imported on first use, for start-up time: reading a record
    from disk, as ``surgery convert`` does, must not import torch)."""
    from .wrappers import unwrap as _unwrap

    return _unwrap(model)


def get_record(model, *, required: bool = True) -> Record | None:
    """The live record of a surgered model.

    The record lives on the model inside every wrapper (:func:`surgery.wrappers.unwrap`:
    DDP, DataParallel, FSDP, torch.compile, PEFT, DeepSpeed), so it is found from any of them
    and survives unwrapping (``merge_and_unload()``, ``accelerator.unwrap_model``).
    """
    rec = getattr(unwrap(model), "__dict__", {}).get(ATTR)
    if rec is None and required:
        raise NotSurgeredError(
            f"{type(model).__name__} has no surgery applied; call surgery.apply(model, ...) first"
        )
    return rec
