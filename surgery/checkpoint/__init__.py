"""Checkpoint I/O: safetensors read and written one tensor at a time, the checkpoint
layouts ``surgery convert`` understands, conversion to plain checkpoints, inspection, and
saving a surgered model with its change record.

A surgered checkpoint differs from a plain one in three places only (see ``record.py``):

* one extra tensor per Mixout layer, ``<layer>.mixout_target`` (the frozen pretrained
  weight); the layer's trained weight keeps the original key;
* the change record: ``"surgery"`` in ``config.json`` (``save_pretrained``, Trainer) and/or
  the ``"surgery"`` entry of the safetensors header metadata (:func:`save`);
* the dropout values the record lists, in ``config.json``.

Modules: ``safetensors_file`` (the format), ``pickle_file`` (.bin/.pt, weights only),
``layout`` (files and directories), ``atomic`` (the temporary), ``swap`` (putting it in place), ``conversion``
(convert), ``summary`` (inspect), ``save``.
"""

from .atomic import atomic_path
from .common import CheckpointError, CheckpointWarning, is_target_key
from .conversion import Plan, convert, execute, plan_convert, restore_config
from .layout import Checkpoint, open_checkpoint
from .pickle_file import load_state_dict_file
from .safetensors_file import Item, SafetensorsFile, TensorInfo, read_header, tensor_item, write_safetensors
from .save import save
from .summary import format_inspect, inspect
from .swap import place

__all__ = [
    "CheckpointError", "CheckpointWarning", "TensorInfo", "SafetensorsFile", "Item", "read_header",
    "write_safetensors", "tensor_item", "load_state_dict_file", "Checkpoint", "open_checkpoint", "is_target_key", "restore_config", "Plan",
    "plan_convert", "execute", "convert", "inspect", "format_inspect", "save", "atomic_path", "place",
]
