"""``surgery.export``: the plain (reverted) weights of a surgered model, written as
safetensors without touching the model; :func:`plain_state_dict`, the same weights for any
framework's own save.

Nothing is reverted and nothing is copied in memory: the state_dict's tensors are the
model's own, Mixout targets are skipped, and each remaining tensor's bytes go to disk one
at a time (see ``checkpoint.write_safetensors``). A Mixout layer keeps its weight under the
original key, so the file holds exactly what ``surgery.revert`` followed by a save would.
A ``PeftModel`` is written as its own ``save_pretrained`` writes it, without the targets: the
adapter checkpoint ``PeftModel.from_pretrained`` loads.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import sys
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from .checkpoint.atomic import fsync_tree, write_json
from .checkpoint.common import os_error
from .checkpoint.common import SAFE_INDEX, SAFE_NAME, CheckpointError, is_target_key
from .checkpoint.safetensors_file import Progress, tensor_item, write_safetensors
from .checkpoint.swap import Staging
from . import zero
from .configs import is_config, restore_config
from .errors import SurgeryError, SurgeryTypeError
from .layers.swap import MixoutLayer
from .record import CONFIG_KEY, TARGET_SUFFIX, get_record, no_plain_form, records, unwrap
from .wrappers import loaded_class, chain

__all__ = ["export", "export_sharded", "plain_state_dict", "plain_view", "writes_directory", "adapter_model"]

_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def _is_pretrained(model: nn.Module) -> bool:
    tf = sys.modules.get("transformers")
    return tf is not None and isinstance(model, tf.PreTrainedModel)


def _plain_state_dict(model: nn.Module, sd: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's state_dict (or ``sd``) without Mixout targets (the model's own tensors, no copies)."""
    return {k: v for k, v in (model.state_dict() if sd is None else sd).items() if not is_target_key(k)}


def plain_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The state_dict of the plain model, for any framework's own save: ``model.state_dict()`` (or
    ``state_dict``) without the Mixout targets; the tensors are the model's own (no copies), under the
    keys of the model as given (``model.`` / ``module.`` prefixes of wrappers kept).

    It is what ``surgery.revert(model)`` followed by ``model.state_dict()`` would give: dropout
    changes and multi-sample-dropout heads hold no tensors. Use it where a framework saves a
    state_dict you hand it (``accelerator.save(surgery.exporting.plain_state_dict(model), path)``,
    ``torch.save``, a Lightning ``on_save_checkpoint``). A transformers or PEFT model's config and
    adapter files need :func:`export`, which also restores the config.

    Raises:
        SurgeryTypeError: ``model`` is not an ``nn.Module``.
        SurgeryError: a model with a layer-weighted MSD head (``msd_layers=True``), which a plain
            state_dict cannot hold.
    """
    if not isinstance(model, nn.Module):
        raise SurgeryTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    why = next((w for _, r in records(model) if (w := no_plain_form(r, "surgery.exporting.plain_state_dict"))), None)
    if why:
        raise SurgeryError(why)
    return _plain_state_dict(model, state_dict)


def adapter_model(model: nn.Module) -> nn.Module | None:
    """The ``PeftModel`` whose ``save_pretrained`` writes ``model``'s adapter checkpoint (``model`` itself
    or the one inside its DDP/compile/... wrappers), or None."""
    peft_cls = loaded_class("peft.peft_model", "PeftModel")
    return next((m for m in chain(model) if isinstance(peft_cls, type) and isinstance(m, peft_cls)), None)


def writes_directory(model: nn.Module) -> bool:
    """Whether :func:`export` writes ``model`` as a directory (a transformers or PEFT model) rather than
    one ``.safetensors`` file."""
    return adapter_model(model) is not None or _is_pretrained(unwrap(model))


@contextmanager
def _targets_hidden(model: nn.Module):
    """While inside, the ``state_dict()`` of ``model`` and of each of its modules leaves out the Mixout
    targets (a state-dict post-hook on every Mixout layer, removed on exit; nothing else changes).
    PEFT's save reads the state_dict of each ``modules_to_save`` copy itself, so a plain state_dict
    handed to it is not enough."""
    def drop(module, sd, prefix, local_metadata):
        sd.pop(prefix + TARGET_SUFFIX, None)

    handles = [m.register_state_dict_post_hook(drop) for m in model.modules() if isinstance(m, MixoutLayer)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def plain_view(model: nn.Module):
    """While inside, ``model`` saves as its plain form through any framework's own save (a sentence-transformers
    ``save_pretrained``, a trainer's own ``_save``): every ``state_dict()`` leaves out the Mixout targets, and
    every module that holds a config carrying a surgery record holds a plain copy of it (the record's
    changes undone, no record; one copy per config object, shared as before). Everything is put back on exit;
    the model stays surgered. MSD heads and dropout values hold no tensors: nothing to hide.

    Raises:
        SurgeryError: a record without a plain form (a layer-weighted MSD head), anywhere in the model.
    """
    root = unwrap(model)
    why = next((w for _, r in records(root) if (w := no_plain_form(r, "a plain save"))), None)
    if why:
        raise SurgeryError(why)
    swaps, copies = [], {}
    for m in root.modules():
        for attr, cfg in list(vars(m).items()):
            if is_config(cfg) and getattr(cfg, CONFIG_KEY, None) is not None:
                if id(cfg) not in copies:
                    copies[id(cfg)] = copy.deepcopy(cfg)
                    restore_config(copies[id(cfg)])
                swaps.append((m, attr, cfg))
                vars(m)[attr] = copies[id(cfg)]
    try:
        with _targets_hidden(root):
            yield model
    finally:
        for m, attr, cfg in swaps:
            vars(m)[attr] = cfg


def _export_adapter(peft: nn.Module, path: Path, state_dict=None) -> Path:
    if path.exists() and not path.is_dir():
        raise SurgeryError(f"{path} is a file; export of a PEFT model writes an adapter directory that "
                           "PeftModel.from_pretrained loads: give a directory path")
    kwargs = {} if state_dict is None else {"state_dict": _plain_state_dict(peft, state_dict)}
    with Staging(path, overwrite=True) as st:
        if st.existed and (path / "README.md").is_file():  # PEFT updates the model card it finds
            os.mkdir(st.tmp)
            shutil.copy2(path / "README.md", st.tmp / "README.md")
        with _targets_hidden(peft):
            peft.save_pretrained(str(st.tmp), **kwargs)
        _put_folder(st)
    st.warn()
    return path


def _put_folder(st: Staging, stale: Iterable[str] = ()) -> None:
    """The folder written (partly by transformers or PEFT, which do not fsync) made durable, then
    put at DST: the folder itself when DST is new, else its entries replace DST's of the same
    names and DST's ``stale`` entries go, all or nothing; DST's other files stay, as
    ``save_pretrained`` keeps them."""
    fsync_tree(st.tmp)
    if st.existed:
        st.merge(stale)
    else:
        st.place(overwrite=False)  # a folder that appeared meanwhile is not replaced


def _untie(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Drop aliases of tied weights and undo load-time weight conversions, as ``save_pretrained`` does."""
    for k in getattr(model, "_keys_to_ignore_on_save", None) or []:
        sd.pop(k, None)
    try:  # transformers >= 5
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:
        remove_tied_weights_from_state_dict = None
    if remove_tied_weights_from_state_dict is not None:
        sd = remove_tied_weights_from_state_dict(sd, model)
        try:
            from transformers.core_model_loading import revert_weight_conversion
        except ImportError:
            return sd
        return revert_weight_conversion(model, sd)
    # transformers 4.x: of each group of tensors sharing storage, drop the names the model
    # declares as tied (``_tied_weights_keys``), keeping at least one
    tied = list(getattr(model, "_tied_weights_keys", None) or [])
    groups = defaultdict(list)
    for k, v in sd.items():
        groups[(v.device, v.untyped_storage().data_ptr())].append(k)
    for names in groups.values():
        drop = [n for n in names if any(re.search(p, n) for p in tied)]
        for n in drop[: len(names) - 1] if len(drop) == len(names) else drop:
            sd.pop(n)
    return sd


def _plain_config(model: nn.Module):
    """A copy of the model's config with the record's config changes undone and no record.

    The record is the model's own (live) one, else the one its config carries: a sub-model's
    part of the record of the model that encloses it, names relative to the sub-model.
    """
    cfg = copy.deepcopy(model.config)
    restore_config(cfg, get_record(model, required=False))
    if hasattr(model, "dtype"):
        cfg.dtype = str(model.dtype).split(".")[1]  # as save_pretrained does
    cls = type(model)
    if len(cls.__mro__) > 2 and cls.__mro__[1].__name__ == "FSDPModule":  # fully_shard's FSDP<X>(FSDPModule, X)
        cls = cls.__mro__[2]
    cfg.architectures = [cls.__name__]
    return cfg


def _export_pretrained(model, path: Path, max_shard_size, progress: Progress | None, state_dict=None) -> Path:
    if path.exists() and not path.is_dir():
        raise SurgeryError(f"{path} is a file; export of a transformers model writes a directory that from_pretrained "
                           "loads: give a directory path")
    sd = _untie(_plain_state_dict(model, state_dict), model)
    files: dict[str, list[str]] = {SAFE_NAME: list(sd)}
    index = None
    if max_shard_size is not None:
        from huggingface_hub import split_torch_state_dict_into_shards

        split = split_torch_state_dict_into_shards(sd, filename_pattern="model{suffix}.safetensors",
                                                   max_shard_size=max_shard_size)
        if split.is_sharded:
            files = dict(split.filename_to_tensors)
            meta = dict(split.metadata)
            if hasattr(model, "num_parameters"):
                meta = {"total_parameters": model.num_parameters(), **meta}
            index = {"metadata": meta, "weight_map": dict(sorted(split.tensor_to_filename.items()))}
    with Staging(path, overwrite=True) as st:
        _plain_config(model).save_pretrained(st.tmp)  # creates the folder
        gen = getattr(model, "generation_config", None)
        if gen is not None and callable(getattr(model, "can_generate", None)) and model.can_generate():
            gen.save_pretrained(st.tmp)
        for name, keys in files.items():
            write_safetensors(st.tmp / name, [tensor_item(k, sd[k], path=path / name) for k in keys],
                              {"format": "pt"}, progress)
        if index is not None:
            write_json(st.tmp / SAFE_INDEX, index)
        produced = set(os.listdir(st.tmp))
        stale = [n for n in (os.listdir(path) if st.existed else ()) if n not in produced  # an earlier save's weights
                 and (n in (SAFE_NAME, SAFE_INDEX) or _SHARD.fullmatch(n))]
        _put_folder(st, stale)
    st.warn()
    return path


def _export_module(model: nn.Module, path: Path, progress: Progress | None, state_dict=None) -> Path:
    if path.suffix != ".safetensors" or path.is_dir():
        raise SurgeryError(f"export of a plain nn.Module ({type(model).__name__}) writes one .safetensors file; "
                           f"give a file path ending in .safetensors (got {str(path)!r})")
    sd = _plain_state_dict(model, state_dict)
    with Staging(path, overwrite=True) as st:
        write_safetensors(st.tmp, [tensor_item(k, v, path=path) for k, v in sd.items()], {"format": "pt"}, progress)
        st.place()
    st.warn()
    return path


def export(model: nn.Module, path: str | os.PathLike, *, max_shard_size: int | str | None = None,
           progress: Progress | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the plain weights of a (surgered) model as safetensors, leaving the model as it is.

    The result is what ``surgery.revert(model)`` followed by a save would write: Mixout
    targets are left out, every other tensor is written bit for bit in its dtype, tensor by
    tensor (no second copy of the model in memory). The model stays surgered.

    Args:
        model: a model, surgered or not (also inside DDP/compile wrappers).
        path: for a PEFT model (a ``PeftModel``), the adapter directory its ``save_pretrained`` writes (``adapter_config.json``,
            ``adapter_model.safetensors``, a subdirectory per further adapter), which
            ``PeftModel.from_pretrained`` loads with plain PEFT: the adapters and the
            ``modules_to_save`` copies without Mixout targets, exactly what ``revert`` then
            ``save_pretrained`` would write. For a transformers ``PreTrainedModel``, a directory that ``from_pretrained``
            loads with plain transformers: ``config.json`` with the original dropout values
            and no ``surgery`` record, ``generation_config.json`` for generative models, and
            ``model.safetensors`` with tied weights stored once as ``save_pretrained`` stores
            them. Files already in the directory are kept (like ``save_pretrained``), except
            earlier weights this export replaces. For any other ``nn.Module``, a
            ``.safetensors`` file with the original state_dict keys.
        max_shard_size: transformers models only (not adapters): shard the weights (``"5GB"`` or
            bytes) and write ``model.safetensors.index.json``; default one file.
        progress: called with the number of bytes written, as they are written.
        state_dict: write these tensors instead of ``model.state_dict()`` (e.g. the full state dict
            gathered from an FSDP2 model: :func:`export_sharded` does that).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        SurgeryTypeError: ``model`` is not an ``nn.Module``.
        SurgeryError: ``path`` of the wrong kind (a file for a transformers or PEFT model, no
            ``.safetensors`` suffix for another module); a model with a layer-weighted MSD
            head (``msd_layers=True``), which a plain checkpoint cannot hold.
        CheckpointError: a tensor safetensors cannot store, or a failed write.
    """
    if not isinstance(model, nn.Module):
        raise SurgeryTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    root = unwrap(model)
    why = next((w for _, r in records(root) if (w := no_plain_form(r, "surgery.export"))), None)  # at any depth
    if why:
        raise SurgeryError(why)
    if state_dict is None:
        _check_whole(root)
    path = Path(path)
    peft = adapter_model(model)
    if peft is not None and max_shard_size is not None:
        raise SurgeryError("max_shard_size shards a full model's weights; a PEFT model is exported as its adapter "
                           "checkpoint, one file per adapter: leave max_shard_size out")
    try:
        if path.is_symlink() and path.is_dir():  # a link to a folder: its files are updated where they are
            path = Path(os.path.realpath(path))
        if peft is not None:
            return _export_adapter(peft, path, state_dict)
        if _is_pretrained(root):
            return _export_pretrained(root, path, max_shard_size, progress, state_dict)
        return _export_module(root, path, progress, state_dict)
    except OSError as e:  # outside the staged write (checking the path): one error, in words
        name, problem = os_error(e, dst=path)
        raise CheckpointError(name, f"write failed ({problem})") from None


def _check_whole(root: nn.Module) -> None:
    """Refuse a model whose weights DeepSpeed ZeRO-3 partitioned: one rank holds a shard of each, and
    gathering them is a collective every rank must join."""
    name = next((n for n, p in root.named_parameters() if zero.is_partitioned(p)), None)
    if name is not None:
        raise SurgeryError(f"parameter {name!r} is partitioned by DeepSpeed ZeRO-3 (this rank holds a shard of it): "
                           "call surgery.exporting.export_sharded(model, path, should_save=rank == 0) on every rank, "
                           "which gathers the weights and writes the plain model once")


def export_sharded(model: nn.Module, path: str | os.PathLike, *, should_save: bool = True, **kwargs) -> Path | None:
    """:func:`export` for a model whose weights are spread over the ranks: FSDP2 (``fully_shard``) or DeepSpeed
    (ZeRO-3 partitions the weights; the engine itself may be passed). Every rank calls it (the full state dict
    is gathered, a collective), the rank with ``should_save`` writes the plain checkpoint."""
    engine = loaded_class("deepspeed.runtime.engine", "DeepSpeedEngine")
    src = model.module if engine is not None and isinstance(model, engine) else model  # the keys export expects
    if zero.zero3_params(src.parameters()):
        sd = zero.full_state_dict(src)
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(src, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return export(model, path, state_dict=sd, **kwargs) if should_save else None
