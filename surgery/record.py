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

Each list is a *section* written by one regularizer, its entries typed (:class:`~surgery.entry.Entry`)
and declared, with their meaning, where the regularizer is (``surgery/regularizers/<name>/__init__.py``):
``mixout`` (:mod:`surgery.regularizers.mixout`: Linear layers, LoRA adapters, fused experts and
routers; every entry that is not ``"kind": "lora"`` adds one frozen Parameter,
``<name>.mixout_target``, to the state_dict), ``dropout`` / ``config`` / ``left_on``
(:mod:`surgery.regularizers.rates`), ``msd`` (:mod:`surgery.regularizers.msd`). The record's own
fields: ``args`` (each option in the form its regularizer records it), ``skipped`` (what a
regularizer left alone, and why), ``coverage`` (optional: which share of the trainable weights each
regularizer covers and what Mixout leaves plain, by kind; ``surgery/coverage.py``), ``scope`` and
``version``. Nothing else changes keys: MSD heads are hooks, dropout changes are attribute values.
For transformers models the record is also written into the config (``config.surgery``), so
``save_pretrained``/Trainer checkpoints carry it. A transformers sub-model that owns its config
(``self.bert = AutoModel...`` in a custom module) carries the part of the record inside it, names
relative to it, plus ``"scope": "bert"`` (see ``configs.py``).
"""

from __future__ import annotations

import json
import reprlib
import weakref
from typing import Any, Iterable

from .entry import Entry, Field
from .errors import NotSurgeredError
from .regularizers import registry
from .regularizers.mixout import TARGET_SUFFIX
from .schema import COUNT, LIST, OBJECT, STR, STRS, brief, check_depth, check_fields, non_finite, parse_json, short

__all__ = ["Record", "Skip", "TARGET_SUFFIX", "CONFIG_KEY", "FORMAT", "VERSION", "get_record", "unwrap",
           "no_plain_form", "check_record", "claim", "release", "claimant", "records"]

FORMAT = "surgery"
VERSION = 1
CONFIG_KEY = "surgery"  # attribute of a transformers config that carries the record
ATTR = "_surgery"  # attribute of the model that holds the live Record


class Skip(Entry):
    """What a regularizer left alone, and why (``describe`` lists them last)."""

    name = Field(STR, required=True)
    reason = Field(STR, required=True)


def _typed(kind: type[Entry], e: Any) -> Entry:
    return e if isinstance(e, kind) else kind.from_json(e)


class Record:
    """What one ``apply`` call changed: the arguments, one section of typed entries per regularizer
    (``rec.mixout``, ``rec.dropout``, ... as the registered units declare them), what was left alone
    (``skipped``), the ``coverage``, the ``scope`` of a sub-model's part. JSON-serialisable apart from
    ``undos`` (the live undo of each installed plan, see :mod:`surgery.regularizers.unit`)."""

    def __init__(self, args: dict[str, Any] | None = None, *, skipped: Iterable[Any] = (),
                 coverage: dict[str, Any] | None = None, scope: str = "", version: int = VERSION, **sections: Any):
        types = registry.section_types()
        unknown = sorted(set(sections) - set(types))
        if unknown:
            raise TypeError(f"Record has no section {unknown[0]!r} (no registered regularizer writes it)")
        self.args: dict[str, Any] = dict(args or {})
        self.sections: dict[str, list[Entry]] = {
            name: [_typed(kind, e) for e in sections.get(name, ())] for name, kind in types.items()}
        self.skipped: list[Skip] = [_typed(Skip, e) for e in skipped]
        # share of the trainable weights each regularizer covers, and what Mixout leaves plain, by kind
        # (surgery/coverage.py); {} when not computed, and then not written
        self.coverage: dict[str, Any] = dict(coverage or {})
        # where a sub-model sits in the model apply ran on (its config carries this part of the record,
        # names relative to it); "" for the record of the model itself, and then not written
        self.scope = scope
        self.version = version
        self.undos: list[Any] = []  # live: how each installed plan is undone (revert); never serialised

    def __getattr__(self, name: str) -> list[Entry]:
        sections = self.__dict__.get("sections")
        if sections is not None and name in registry.section_types():
            return sections.setdefault(name, [])  # a unit registered after this record was made
        raise AttributeError(f"{type(self).__name__} has no attribute or section {name!r}")

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Record) and other.to_dict() == self.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Record({self.to_json()})"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": FORMAT, "args": self.args}
        for u in registry.units():
            for name in u.sections:
                entries = self.sections.get(name, [])
                if entries or u.sections_always:  # a unit's empty section is written only if records always had it
                    d[name] = [e.to_json() for e in entries]
        d["skipped"] = [e.to_json() for e in self.skipped]
        if self.coverage:
            d["coverage"] = self.coverage
        if self.scope:
            d["scope"] = self.scope
        d["version"] = self.version
        return json.loads(json.dumps(d))

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
        sections = {name: d.get(name, []) for name in registry.section_types()}
        return cls(args=d.get("args", {}), skipped=d.get("skipped", []), coverage=d.get("coverage", {}),
                   scope=d.get("scope", ""), version=d["version"], **sections)

    @property
    def target_keys(self) -> list[str]:
        """State-dict keys the regularizers added (Mixout targets; LoRA entries add none)."""
        return [k for u in registry.units() for k in u.target_keys(self)]

    def config_changes(self) -> list[Any]:
        """Every config field the regularizers changed (``module``, ``path``, ``old``, ``new``)."""
        return [c for u in registry.units() for c in u.config_changes(self)]


# ---- the check of a record read from disk ------------------------------------------------------
#
# The one check of a record read from disk: ``Record.from_dict`` runs it, and every reader
# (``describe`` / ``surgery inspect`` text, ``inspect --json``, ``convert``, ``configs``) relies on
# it for every field it touches. The fields are declared where they are written: the options of each
# regularizer (``args``), its entry types (its sections); tests/checkpoint/test_convert_fuzz.py fuzzes
# every field with a table of its own.

_LEFT = {"kind": (STR, True), "weights": (COUNT, True), "names": (STRS, True)}


def check_record(d: Any) -> None:
    """Check a change-record dict (``Record.to_dict()`` form) field by field.

    Fields this version does not know are ignored (as ``Record.from_dict`` ignores them);
    known fields must have the types ``surgery.apply`` writes. No value anywhere may be NaN
    or infinite (not JSON: ``inspect --json`` prints the record).

    Raises:
        ValueError: one line naming the first field that is wrong and what it must be.
    """
    if not isinstance(d, dict):
        raise ValueError(f"the record must be a JSON object, not {short(d)}")
    check_depth(d, "the record", 16)
    if "version" in d and type(d["version"]) is not int:
        raise ValueError(f"record field 'version' must be an integer, not {short(d['version'])}")
    bad = non_finite(d)
    if bad is not None:
        raise ValueError(f"record field {brief(bad)[1:-1]} is NaN or infinite, which is not JSON; "
                         "apply writes finite numbers only")
    if "scope" in d and not STR(d["scope"]):
        raise ValueError(f"record field 'scope' must be {STR.desc}, not {short(d['scope'])}")
    args = d.get("args", {})
    if not isinstance(args, dict):
        raise ValueError(f"record field 'args' must be a JSON object, not {short(args)}")
    check_fields(args, {o.name: (o.json, False) for o in registry.all_options()}, "record field args")
    cov = d.get("coverage", {})
    if not isinstance(cov, dict):
        raise ValueError(f"record field 'coverage' must be {OBJECT.desc}, not {short(cov)}")
    if cov:
        keys = {u.name: (COUNT, False) for u in registry.units() if u.coverage_label}
        check_fields(cov, {"trainable": (COUNT, True), **keys, "left": (LIST, False)}, "record field coverage")
        for i, e in enumerate(cov.get("left", [])):
            if not isinstance(e, dict):
                raise ValueError(f"record field coverage.left[{i}] must be {OBJECT.desc}, not {short(e)}")
            check_fields(e, _LEFT, f"record field coverage.left[{i}]")
    for field, kind in [*registry.section_types().items(), ("skipped", Skip)]:
        entries = d.get(field, [])
        if not isinstance(entries, list):
            raise ValueError(f"record field {field!r} must be a list, not {short(entries)}")
        for i, e in enumerate(entries):
            kind.check(e, f"record entry {field}[{i}]")


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
    model or checkpoint for this record, or None when it can: the first regularizer that says so
    (a layer-weighted MSD head has no plain form). Every reader of a record asks this one function.
    """
    if rec is None:
        return None
    return next((why for u in registry.units() if (why := u.no_plain_form(rec, action))), None)


def unwrap(model):
    """:func:`surgery.wrappers.unwrap` (imported on first use, for start-up time: reading a record
    from disk, as ``surgery convert`` does, must not import torch)."""
    from .wrappers import unwrap as _unwrap

    return _unwrap(model)


def records(model) -> list[tuple[str, Record]]:
    """Every live record in ``model``'s tree, ``(module name, record)``, the model's own first: surgery
    applied to a sub-module (``surgery.apply(model.bert, ...)``) lives on that sub-module, and a save of
    the whole model must see it there."""
    return [(n, vars(m)[ATTR]) for n, m in unwrap(model).named_modules() if ATTR in vars(m)]


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
