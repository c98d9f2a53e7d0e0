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
from .record import Record, get_record  # noqa: E402,F401 - Record: older code imports it from here

__version__ = "0.1.0"

__all__ = [
    "apply", "revert", "describe", "is_surgered", "get_record", "export",
    "compute_loss", "SurgeryTrainer", "train_noise",
    "SurgeryError", "SurgeryTypeError", "PatternError", "HeadError", "NotSurgeredError", "AlreadySurgeredError",
]

# public name -> the submodule that defines it (imported on first access). The names below the
# first line are reachable here too (older code imports them from the top) but live in their modules.
_LAZY = {
    "apply": "engine", "revert": "engine", "is_surgered": "engine", "describe": "describing",
    "export": "exporting", "compute_loss": "training.compute", "SurgeryTrainer": "training.trainer",
    "train_noise": "noise",
    # reachable from the top for older code; documented in their modules
    "MixLinear": "layers.mixout", "msd_samples": "layers.msd",
    "msd_loss": "training.compute", "TrainingLoss": "training.compute",
    "msd_sample_loss": "training.losses", "rdrop_loss": "training.losses",
    "rdrop_forward": "training.rdrop", "rdrop_strategy": "training.rdrop",
    "SurgeryTrainerMixin": "training.trainer", "RankSeedCallback": "training.trainer",
    "trainer_class": "training.trainer",
    "seed_rank": "training.state", "rank": "training.state", "save_training_state": "training.state",
    "load_training_state": "training.state", "check_same_surgery": "training.state",
    "param_groups": "training.groups", "plain_state_dict": "exporting",
    "load_pretrained": "loading",
}

_SUBMODULES = ("checkpoint", "cli", "configs", "describing", "distributed", "engine", "exporting", "layers", "noise",
               "regularizers", "training", "view")


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
