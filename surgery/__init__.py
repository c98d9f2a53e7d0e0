"""surgery: Mixout, multi-sample dropout, R-Drop and dropout control for fine-tuning
pretrained transformers, applied in place and reverted exactly.

    import surgery
    surgery.apply(model, mixout=0.1, dropout=0.0, msd=8)
    ...  # train
    surgery.revert(model)

The public names are imported on first use (PEP 562), so ``surgery convert`` and
``surgery inspect`` on a safetensors checkpoint never import torch.
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
    "apply": "engine", "describe": "describing", "is_surgered": "engine", "revert": "engine",
    "export": "exporting", "MixLinear": "mixout",
    "msd_loss": "msd", "msd_sample_loss": "msd", "msd_samples": "msd",
    "rdrop_forward": "rdrop", "rdrop_loss": "rdrop", "rdrop_strategy": "rdrop",
    "TrainingLoss": "train", "check_same_surgery": "train", "compute_loss": "train", "load_training_state": "train",
    "rank": "train", "save_training_state": "train", "seed_rank": "train", "SurgeryTrainer": "train",
    "RankSeedCallback": "train", "train_noise": "noise", "param_groups": "layer_msd",
}

__all__ = [
    "apply", "revert", "describe", "export", "is_surgered", "MixLinear", "msd_samples", "Record", "get_record",
    "SurgeryError", "SurgeryTypeError", "PatternError", "HeadError", "NotSurgeredError", "AlreadySurgeredError",
    "rdrop_loss", "rdrop_forward", "rdrop_strategy", "msd_loss", "msd_sample_loss", "compute_loss", "TrainingLoss",
    "seed_rank", "rank", "save_training_state", "load_training_state", "check_same_surgery",
    "SurgeryTrainer", "RankSeedCallback", "train_noise", "param_groups",
]


# submodules `import surgery` used to load (``surgery.checkpoint.save(...)`` keeps working)
_SUBMODULES = ("checkpoint", "engine", "dropout", "mixout", "msd", "rdrop", "select", "train", "exporting", "lora",
               "wrappers", "configs", "droppath", "noise", "arguments", "layer_msd")


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
