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
from .msd import msd_samples
from .record import Record, get_record

__version__ = "0.1.0"

__all__ = [
    "apply", "revert", "describe", "export", "is_surgered", "MixLinear", "msd_samples", "Record", "get_record",
    "SurgeryError", "SurgeryTypeError", "PatternError", "HeadError", "NotSurgeredError", "AlreadySurgeredError",
]
