"""surgery: Mixout, multi-sample dropout, R-Drop and dropout control for fine-tuning
pretrained transformers, applied in place and reverted exactly.

    import surgery
    surgery.apply(model, mixout=0.1, dropout=0.0, msd=8)
    ...  # train
    surgery.revert(model)
"""

from .engine import apply, describe, is_surgered, revert
from .export import export
from .errors import (AlreadySurgeredError, HeadError, NotSurgeredError, PatternError, SurgeryError,
                     SurgeryTypeError)
from .mixout import MixLinear
from .msd import msd_loss, msd_sample_loss, msd_samples
from .noise import train_noise
from .rdrop import rdrop_forward, rdrop_loss, rdrop_strategy
from .record import Record, get_record
from .train import (TrainingLoss, check_same_surgery, compute_loss, load_training_state, rank, save_training_state,
                    seed_rank)

__version__ = "0.1.0"

__all__ = [
    "apply", "revert", "describe", "export", "is_surgered", "MixLinear", "msd_samples", "Record", "get_record",
    "SurgeryError", "SurgeryTypeError", "PatternError", "HeadError", "NotSurgeredError", "AlreadySurgeredError",
    "rdrop_loss", "rdrop_forward", "rdrop_strategy", "msd_loss", "msd_sample_loss", "compute_loss", "TrainingLoss",
    "seed_rank", "rank", "save_training_state", "load_training_state", "check_same_surgery",
    "SurgeryTrainer", "RankSeedCallback", "train_noise",
]


def __getattr__(name: str):
    # the transformers Trainer stack is imported on first use only
    if name in ("SurgeryTrainer", "RankSeedCallback"):
        from . import train
        return getattr(train, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
