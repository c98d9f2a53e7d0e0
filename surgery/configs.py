"""The change record in transformers configs: where ``apply`` writes it, and the one
function that restores a config from it.

``apply`` writes the record into the config of every transformers (sub-)model that owns a
config, so ``save_pretrained``, ``surgery.export`` and ``surgery convert`` work at any depth:

* the root model's config (``model.config.surgery``) gets the whole record;
* a sub-model that owns its own config -- a custom module holding
  ``self.bert = AutoModel.from_pretrained(...)`` -- gets the *projection* of the record onto
  it: the entries inside it, with names relative to it and ``"scope": "bert"``. A projection
  is derived from the root record at ``apply`` and removed at ``revert``; nothing else writes it.

A sub-model that shares its parent's config object (``BertForSequenceClassification.bert``)
owns no config of its own: its config carries the parent's record.

``apply`` also gives the model its own copy of every config object it holds (one copy per
owner, sharing inside an owner kept), so a config object two models were built from
(teacher and student) is never modified and never carries the other model's record.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import AlreadySurgeredError, SurgeryError
from .patterns import relative
from .record import CONFIG_KEY, Record

if TYPE_CHECKING:
    from torch import nn


def is_config(obj: Any) -> bool:
    """A transformers ``PretrainedConfig`` (never imports transformers: none exists before it is loaded)."""
    tf = sys.modules.get("transformers")
    return tf is not None and isinstance(obj, tf.PretrainedConfig)


def get_path(d: Any, path: list[str]) -> Any:
    for k in path:
        d = d[k] if isinstance(d, dict) else getattr(d, k)
    return d


def set_path(d: Any, path: list[str], value: Any) -> None:
    parent = get_path(d, path[:-1])
    if isinstance(parent, dict):
        parent[path[-1]] = value
    else:
        setattr(parent, path[-1], value)


def nested(cfg: Any) -> list[tuple[list[str], Any]]:
    """``(path, config)`` of ``cfg`` (path ``[]``) and every config nested in it, each once."""
    out, seen, todo = [], set(), [([], cfg)]
    while todo:  # depth first, in attribute order
        path, c = todo.pop()
        if id(c) in seen:
            continue
        seen.add(id(c))
        out.append((path, c))
        todo += reversed([(path + [k], v) for k, v in list(vars(c).items()) if is_config(v)])
    return out


__all__ = ["is_config", "get_path", "set_path", "nested", "restore_config", "project", "check_no_record", "plan_copies",
           "ConfigCopies", "attach", "Attached"]


def _record(config: Any) -> Record | None:
    raw = config.get(CONFIG_KEY) if isinstance(config, dict) else getattr(config, CONFIG_KEY, None)
    return None if raw is None else Record.from_dict(raw)


def restore_config(config: Any, record: Record | dict | None = None, module: str = "") -> list[tuple[str, Any, Any]]:
    """Undo, in place, the record's changes to the config of ``module`` and drop its ``surgery`` key.

    Args:
        config: a live ``PretrainedConfig`` or a ``config.json`` dict, with nested sub-configs
            (``text_config`` ...) at any depth, as objects or dicts.
        record: the change record (a :class:`Record` or its dict); default: the one ``config``
            carries under ``surgery``.
        module: the name, in the record's model, of the module whose config ``config`` is
            (``""``: the record's own model, what a saved ``config.json`` holds).

    Returns:
        ``[(dotted path, value before, restored value)]``; a field absent from a dict (a save
        leaves out values equal to the class default) reads ``"<absent>"`` and is written back
        explicitly.
    """
    if record is None:
        record = _record(config)
    elif isinstance(record, dict):
        record = Record.from_dict(record)
    changes = []
    for ch in record.config_changes() if record is not None else []:
        if ch.module != module:
            continue
        path, parent = ch.path, config
        for k in path[:-1]:
            if isinstance(parent, dict) and parent.get(k) is None:
                parent[k] = {}  # a sub-config the save left out entirely
            parent = parent[k] if isinstance(parent, dict) else getattr(parent, k, None)
            if isinstance(config, dict) and not isinstance(parent, dict):
                break  # the saved form holds no sub-config there: nothing of it to restore
        if isinstance(config, dict) and not isinstance(parent, dict):
            continue
        key = path[-1]
        before = parent.get(key, "<absent>") if isinstance(parent, dict) else getattr(parent, key, "<absent>")
        set_path(parent, [key], ch.old)
        changes.append((".".join(path), before, ch.old))
    if isinstance(config, dict):
        config.pop(CONFIG_KEY, None)
    elif CONFIG_KEY in vars(config):
        delattr(config, CONFIG_KEY)
    return changes


# ---- the record of a sub-model ------------------------------------------------------------

def project(record: Record, prefix: str) -> Record:
    """The part of ``record`` that concerns the sub-model at ``prefix``, names relative to it: the entries of
    every section that name a module inside it (an entry type's ``NAME`` field), and what was left alone there.

    ``args`` are the arguments of the ``apply`` call on the enclosing model (``scope`` says
    where the sub-model sits in it).
    """
    if not prefix:
        return record

    def inside(entries):
        out = []
        for e in entries:
            rel = relative(getattr(e, e.NAME), prefix) if e.NAME else None
            if rel is not None:
                out.append(e.moved(rel))
        return out

    sections = {name: inside(entries) for name, entries in record.sections.items()}
    return Record(args=dict(record.args), skipped=inside(record.skipped), scope=_join(record.scope, prefix),
                  **sections)


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if a and b else a or b


# ---- which configs a model owns -----------------------------------------------------------
# ``held`` is what the one walk of apply found: ``(module name, module, attribute, config)`` for every
# config a module holds directly, in module order (``surgery.view.View.held``).

Held = "list[tuple[str, nn.Module, str, Any]]"


def _reachable(cfg: Any) -> dict[int, Any]:
    """``cfg`` and every config nested in it, by id."""
    return {id(c): c for _, c in nested(cfg)}


@dataclass
class _Owner:
    prefix: str
    memo: dict = field(default_factory=dict)
    ids: set = field(default_factory=set)
    items: list = field(default_factory=list)  # (module, attribute, config) of every config it holds
    tops: list = field(default_factory=list)  # (module, attribute) of its own config(s), where the record goes


def _owners(held: Held) -> list[_Owner]:
    """Group the configs a model holds by owner: the shallowest module holding a config that no
    enclosing owner's config contains (sub-configs and configs shared with the owner stay with it)."""
    owners: list[_Owner] = []
    for name, mod, attr, cfg in held:
        ids = set(_reachable(cfg))
        own = next((o for o in reversed(owners) if relative(name, o.prefix) is not None and ids & o.ids), None)
        if own is None:
            own = _Owner(name)
            owners.append(own)
        siblings = [c for n, m, _, c in held if m is mod and c is not cfg]
        if own.prefix == name and not any(id(cfg) in _reachable(o) for o in siblings):
            own.tops.append((mod, attr))
        own.ids |= ids
        own.items.append((mod, attr, cfg))
    return owners


def check_no_record(held: Held) -> None:
    """Refuse a model any of whose configs carries a surgery record.

    Raises:
        AlreadySurgeredError: naming the module, with the fix.
    """
    for name, mod, _, cfg in held:
        if getattr(cfg, CONFIG_KEY, None) is None:
            continue
        where = "this model" if not name else f"its module {name!r} ({type(mod).__name__})"
        raise AlreadySurgeredError(
            f"{where} was loaded from a checkpoint saved with surgery applied (its config has a "
            f"'{CONFIG_KEY}' record), or is part of a model that carries surgery now, so its weights are "
            "fine-tuned, not pretrained. To resume training, load the pretrained model, surgery.apply(...) it "
            "and load the checkpoint's state_dict; to deploy, run `surgery convert SRC DST` and load DST"
        )


@dataclass
class ConfigCopies:
    """The model's own copies of its configs, made before ``apply`` changes anything; kept with the
    live record, so that ``revert`` can hand the original objects back (:meth:`undo`, the last undo)."""

    owners: list[_Owner]
    swaps: list[tuple[nn.Module, str, Any, Any]]  # (module, attribute, copy, original)

    def take(self) -> None:
        """Point every module at its copy (the original config objects are left as they were)."""
        for mod, attr, new, _ in self.swaps:
            vars(mod)[attr] = new

    def check(self, view, rec) -> None:
        """Nothing to check: a config the user replaced since ``apply`` stays theirs."""

    def undo(self, view, rec) -> None:
        """Revert's last step for configs: every module that still holds its copy gets the original
        object back (sharing between a parent and its sub-models as before ``apply``), with what was
        set on the copy since ``apply`` (not surgery's changes: revert restored those) carried over."""
        done: set[int] = set()
        for mod, attr, copied, original in self.swaps:
            if vars(mod).get(attr) is not copied:
                continue  # the user replaced the config: theirs stays
            if id(copied) not in done:
                _carry_edits(copied, original, done)
            vars(mod)[attr] = original


def _carry_edits(copied: Any, original: Any, done: set[int]) -> None:
    """Set on ``original`` every field of ``copied`` that differs from it (nested configs field by field)."""
    done.add(id(copied))
    mine, theirs = vars(copied), vars(original)
    for key, value in list(mine.items()):
        if key == CONFIG_KEY:
            continue
        before = theirs.get(key, _MISSING)
        if is_config(value) and is_config(before):
            if id(value) not in done:
                _carry_edits(value, before, done)
            continue
        try:
            same = bool(before == value) and type(before) is type(value)
        except Exception:  # noqa: BLE001 - a value whose == does not give one bool
            same = False
        if not same:
            setattr(original, key, value)
    for key in [k for k in theirs if k not in mine and k != CONFIG_KEY]:
        delattr(original, key)


_MISSING = object()


def plan_copies(held: Held, title: str) -> ConfigCopies:
    """Copy every config in ``held`` (of the model ``title``), one deep copy per owner (sharing
    inside an owner kept).

    Raises:
        SurgeryError: a config that cannot be deep-copied.
    """
    owners, swaps = _owners(held), []
    for own in owners:
        for mod, attr, cfg in own.items:
            try:
                swaps.append((mod, attr, copy.deepcopy(cfg, own.memo), cfg))
            except Exception as e:  # noqa: BLE001 - any failure of a user config's __deepcopy__
                raise SurgeryError(
                    f"cannot copy the config {type(cfg).__name__} of module {own.prefix or title!r} "
                    f"({type(e).__name__}: {e}); apply gives the model its own copy of each config so that a config "
                    "object shared with another model is never changed: make the config deep-copyable") from None
    for own in owners:
        own.memo = {}  # the deepcopy memo holds every copied object: not kept with the live record
    return ConfigCopies(owners, swaps)


class Attached:
    """The record written into the configs (:func:`attach`); its undo removes it from every config the
    model holds at revert (before ``apply`` none held one)."""

    def check(self, view, rec) -> None:
        pass

    def undo(self, view, rec) -> None:
        for _, _, _, cfg in view.held:
            for c in _reachable(cfg).values():
                if CONFIG_KEY in vars(c):
                    delattr(c, CONFIG_KEY)


def attach(copies: ConfigCopies, record: Record) -> Attached:
    """Write ``record`` into the root's config and its projection into each sub-model's own config."""
    for own in copies.owners:
        d = project(record, own.prefix).to_dict()
        for mod, attr in own.tops:
            setattr(vars(mod)[attr], CONFIG_KEY, copy.deepcopy(d))
    return Attached()

