"""Trainers that save in a format of their own (sentence-transformers' ``SentenceTransformerTrainer`` writes
``modules.json``, each module's folder and config through the model's own ``save_pretrained``).

Their saves keep that format and are plain (:func:`surgery.exporting.plain_view`: no Mixout targets, plain
configs): the final ``save_model()`` loads with the library's own loader, and so does every periodic
``checkpoint-N``. A periodic checkpoint also holds what resume needs beside it, in one file:
:data:`TARGETS_FILE`, the Mixout targets under the live model's names and the record in its header.
Resume runs the trainer's own load (the plain weights: the targets follow them, see
:meth:`surgery.layers.swap.MixoutLayer.loaded_target`), then puts the saved targets back exactly.
"""

from __future__ import annotations

import json
import os

from transformers import Trainer

from ..checkpoint.common import RECORD_METADATA_KEY, is_target_key
from ..errors import SurgeryError
from ..record import Record, records, unwrap

__all__ = ["TARGETS_FILE", "own_format", "write_targets", "load_targets", "targets_record"]

TARGETS_FILE = "surgery_targets.safetensors"


def own_format(trainer_cls: type, mixin: type) -> bool:
    """Whether a Trainer subclass with surgery's ``mixin`` in front writes checkpoints its own way: a class
    between the mixin and ``transformers.Trainer`` defines ``_save``."""
    mro = trainer_cls.__mro__
    start = mro.index(mixin) + 1 if mixin in mro else 0
    end = mro.index(Trainer) if Trainer in mro else len(mro)
    return any("_save" in vars(c) for c in mro[start:end])


def write_targets(model, path: str) -> None:
    """The Mixout targets of ``model`` (live names) and its record, as one safetensors file."""
    from safetensors.torch import save_file

    root = unwrap(model)
    targets = {k: v.detach().contiguous().cpu() for k, v in root.state_dict().items() if is_target_key(k)}
    recs = records(root)
    meta = {"format": "pt", RECORD_METADATA_KEY: recs[0][1].to_json() if recs and not recs[0][0] else ""}
    save_file(targets, path, metadata=meta)


def targets_record(checkpoint: str) -> dict | None:
    """The record a checkpoint's :data:`TARGETS_FILE` carries, or None when it has none."""
    path = os.path.join(checkpoint, TARGETS_FILE)
    if not os.path.isfile(path):
        return None
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        raw = (f.metadata() or {}).get(RECORD_METADATA_KEY)
    return Record.from_dict(json.loads(raw)).to_dict() if raw else None


def load_targets(model, checkpoint: str) -> None:
    """Put the targets of ``checkpoint``'s :data:`TARGETS_FILE` back into ``model``, exactly.

    Raises:
        SurgeryError: a target the model does not have (the checkpoint is of another surgery).
    """
    path = os.path.join(checkpoint, TARGETS_FILE)
    if not os.path.isfile(path):
        return
    from safetensors.torch import load_file

    saved = load_file(path)
    root = unwrap(model)
    result = root.load_state_dict(saved, strict=False)
    if result.unexpected_keys:
        raise SurgeryError(f"{path} holds Mixout targets this model does not have ({result.unexpected_keys[0]!r}, ...): "
                           "resume with the surgery the checkpoint was saved with")
