"""``save``: a surgered model's full state_dict as safetensors, the change record in the
header metadata, so the file can be inspected, converted and resumed from."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .common import RECORD_METADATA_KEY, CheckpointError
from .safetensors_file import Progress, tensor_item, write_safetensors
from .swap import Staging

if TYPE_CHECKING:
    import torch

__all__ = ["save"]


def save(model: "torch.nn.Module", path: str | os.PathLike, *, progress: Progress | None = None) -> Path:
    """Save a surgered model's full state_dict (Mixout targets included) as one safetensors
    file whose header metadata carries the change record (``"surgery"``), so the file can
    be inspected and converted without the model class and resumed from (load it into a
    freshly surgered pretrained model). Written tensor by tensor, atomically.

    Raises:
        NotSurgeredError: the model carries no surgery (use :func:`surgery.export`).
        CheckpointError: ``path`` does not end in ``.safetensors`` or the write fails.
    """
    from ..record import get_record, unwrap

    rec = get_record(model)
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(path, "surgery.checkpoint.save writes one .safetensors file; give a path ending in "
                                    ".safetensors")
    sd = unwrap(model).state_dict()
    items = [tensor_item(k, v, path=path) for k, v in sd.items()]
    with Staging(path, overwrite=True) as st:
        write_safetensors(st.tmp, items, {"format": "pt", RECORD_METADATA_KEY: rec.to_json()}, progress)
        st.place()
    st.warn()
    return path
