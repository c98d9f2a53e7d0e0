"""surgery: Mixout, multi-sample dropout, R-Drop and dropout control for fine-tuning pretrained
transformers, applied in place and reverted exactly.

    import surgery
    surgery.apply(model, mixout=0.1, dropout=0.0, msd=8)
    ...  # train
    surgery.revert(model)

The names below are the public face, each documented in docs/ (docs/api.md, docs/training.md,
docs/checkpoints.md); the rest lives in its module (``surgery.layers.mixout.MixLinear``,
``surgery.checkpoint.convert`` ...). They are imported on first use (PEP 562), so ``surgery convert``
and ``surgery inspect`` on a safetensors checkpoint never import torch.
"""

from __future__ import annotations

from . import interrupts as _interrupts

if _interrupts.started_as_console_script():  # the `surgery` command: Ctrl-C is handled from its first line
    _interrupts.install()
    _interrupts.test_hook("startup")

import importlib  # noqa: E402

from .errors import (AlreadySurgeredError, HeadError, NotSurgeredError, PatternError, SurgeryError,  # noqa: E402
                     SurgeryTypeError)
from .record import Record, get_record  # noqa: E402

__version__ = "0.1.0"

# public name -> the submodule that defines it (imported on first access)
_LAZY = {
    # surgery and its record (docs/api.md)
    "apply": "engine", "revert": "engine", "is_surgered": "engine", "describe": "describing",
    # saves and loads (docs/checkpoints.md)
    "export": "exporting", "plain_state_dict": "exporting", "load_pretrained": "loading",
    # training (docs/training.md)
    "compute_loss": "training.compute", "msd_loss": "training.compute", "msd_sample_loss": "training.losses",
    "rdrop_loss": "training.losses", "rdrop_forward": "training.rdrop", "rdrop_strategy": "training.rdrop",
    "msd_samples": "layers.msd", "param_groups": "training.groups",
    "SurgeryTrainer": "training.trainer", "SurgeryTrainerMixin": "training.trainer", "trainer_class": "training.trainer",
    "save_training_state": "training.state", "load_training_state": "training.state",
    "check_same_surgery": "training.state", "seed_rank": "training.state", "rank": "training.state",
    "train_noise": "noise",
}

__all__ = [
    "apply", "revert", "describe", "is_surgered", "get_record", "Record",
    "export", "plain_state_dict", "load_pretrained",
    "compute_loss", "msd_loss", "msd_sample_loss", "msd_samples", "rdrop_loss", "rdrop_forward", "rdrop_strategy",
    "param_groups", "SurgeryTrainer", "SurgeryTrainerMixin", "trainer_class",
    "save_training_state", "load_training_state", "check_same_surgery", "seed_rank", "rank", "train_noise",
    "SurgeryError", "SurgeryTypeError", "PatternError", "HeadError", "NotSurgeredError", "AlreadySurgeredError",
]

# the subpackages the docs name as ``surgery.<name>.<attribute>``, imported on first access
_SUBMODULES = ("checkpoint", "cli", "compare", "configs", "describing", "exporting", "layers", "record", "regularizers", "training")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
