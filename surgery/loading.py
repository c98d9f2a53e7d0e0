"""``surgery.load_pretrained``: load a checkpoint saved with surgery applied, rebuilt from its record
and verified.

A surgered ``save_pretrained`` folder or Trainer ``checkpoint-N`` folder holds fine-tuned weights,
the Mixout targets (the pretrained weights), a layer-weighted head's layer weights, and the change
record in ``config.json``. Loading it right means: the model as it was before ``apply`` (the
config's recorded changes undone), the same ``apply`` call, every saved tensor loaded strictly,
and the record the rebuild wrote equal to the saved one. A hand-written rebuild checks none of this
(another ``msd_pool``, a missing ``apply`` argument: all keys still match, predictions differ).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any

import torch
from torch import nn

from .checkpoint.common import BIN_INDEX, BIN_NAME, CONFIG_NAME, SAFE_INDEX, SAFE_NAME
from .configs import restore_config
from .engine import apply
from .errors import SurgeryError, SurgeryTypeError
from .record import CONFIG_KEY, Record, get_record
from .regularizers import apply_kwargs

__all__ = ["load_pretrained"]


def load_pretrained(cls, path: str | os.PathLike, **from_pretrained_kwargs) -> nn.Module:
    """Load a checkpoint saved from a surgered transformers model: the model rebuilt from the record
    stored in the checkpoint, with the same surgery, every saved tensor loaded, the record verified.

    ``surgery.load_pretrained(AutoModelForSequenceClassification, "out/checkpoint-500")`` works for
    ``model.save_pretrained(DIR)`` folders and Trainer ``checkpoint-N`` folders. Steps: read
    ``config.json`` and its record; undo the recorded config changes (the config of the model
    before ``apply``); ``cls.from_pretrained(path, config=that, **from_pretrained_kwargs)``;
    ``surgery.apply`` with the recorded arguments; compare the record the rebuild wrote with the
    saved one (arguments and every entry); load every tensor of the checkpoint (Mixout targets,
    layer weights included) with no key missing or left over.

    Args:
        cls: a transformers model class (``AutoModelFor...`` or a concrete ``PreTrainedModel``
            subclass), or None for the class named in the config's ``architectures``.
        path: the checkpoint folder (local).
        from_pretrained_kwargs: passed to ``cls.from_pretrained`` (``dtype=...``, ``device_map=...``);
            not ``config`` (it comes from the checkpoint).

    Returns:
        The surgered model, in eval mode (as ``from_pretrained`` returns it).

    Raises:
        SurgeryError: ``path`` is not a folder with ``config.json`` and weights; no surgery record in
            it (load it with ``cls.from_pretrained``); a record of a sub-model (``scope``); a record
            argument this surgery does not know; keys missing from or left over in the checkpoint;
            the rebuilt record differs from the saved one (names the differences).
        SurgeryTypeError: ``cls`` is not a transformers model class; ``config`` passed.
    """
    path = os.fspath(path)
    if "config" in from_pretrained_kwargs:
        raise SurgeryTypeError("load_pretrained takes the config from the checkpoint (the record says how it was "
                               "changed); do not pass config=")
    cfg_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isdir(path) or not os.path.isfile(cfg_file):
        raise SurgeryError(f"{path!r} is not a checkpoint folder with a {CONFIG_NAME} (load_pretrained reads local "
                           "save_pretrained / Trainer checkpoint-N folders; download a Hub repository first, e.g. "
                           "huggingface_hub.snapshot_download)")
    with open(cfg_file, encoding="utf-8") as f:
        saved_config = json.load(f)
    if not isinstance(saved_config, dict) or saved_config.get(CONFIG_KEY) is None:
        raise SurgeryError(f"{cfg_file} holds no surgery record, so the checkpoint was saved without surgery (or "
                           "its record was removed): load it with from_pretrained; surgery.load_pretrained rebuilds "
                           "the surgery a checkpoint records")
    try:
        saved = Record.from_dict(saved_config[CONFIG_KEY])
    except ValueError as e:
        raise SurgeryError(f"{cfg_file}: {e}") from None
    if saved.scope:
        raise SurgeryError(f"{cfg_file} records the surgery of a sub-model ({saved.scope!r}) of a larger model; load "
                           "the model apply ran on (build it, apply the same arguments, load its state_dict)")
    from .remote_code import plain_config_dict

    plain = plain_config_dict(saved_config)
    restore_config(plain, saved)  # the config as it was before apply; drops the record
    import transformers

    if cls is None:
        arch = (plain.get("architectures") or [None])[0]
        cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
        if cls is None:
            raise SurgeryError(f"{cfg_file} names no transformers model class in 'architectures' ({arch!r}); pass the "
                               "class: surgery.load_pretrained(YourModelClass, path)")
    if not (isinstance(cls, type) and hasattr(cls, "from_pretrained")):
        raise SurgeryTypeError(f"cls must be a transformers model class such as AutoModelForSequenceClassification, "
                               f"got {cls!r}")
    config = _config(cls, plain, cfg_file)
    with _quiet_load_report():  # every key is checked below, against the surgered model
        model = cls.from_pretrained(path, config=config, **from_pretrained_kwargs)
    apply(model, **apply_kwargs(saved.args, cfg_file))
    _compare(get_record(model).to_dict(), saved.to_dict(), cfg_file)
    _load_weights(model, path)
    return model


def _config(cls, d: dict[str, Any], where: str):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = d.get("model_type")
    config_cls = CONFIG_MAPPING[model_type] if model_type in CONFIG_MAPPING else getattr(cls, "config_class", None)
    if config_cls is None:
        raise SurgeryError(f"{where}: model type {model_type!r} is not one transformers knows; pass its model class, "
                           "one with a config_class")
    return config_cls.from_dict(d)


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextlib.contextmanager
def _quiet_load_report():
    """from_pretrained's key report about the plain model (the targets and layer weights it has no place
    for) says nothing: the surgered model's keys are checked afterwards."""
    log = logging.getLogger("transformers.modeling_utils")
    f = _DropLoadReport()
    log.addFilter(f)
    try:
        yield
    finally:
        log.removeFilter(f)


def _weight_files(path: str) -> list[str]:
    for index, single in ((SAFE_INDEX, SAFE_NAME), (BIN_INDEX, BIN_NAME)):
        if os.path.isfile(os.path.join(path, index)):
            with open(os.path.join(path, index), encoding="utf-8") as f:
                shards = sorted(set(json.load(f).get("weight_map", {}).values()))
            return [os.path.join(path, s) for s in shards]
        if os.path.isfile(os.path.join(path, single)):
            return [os.path.join(path, single)]
    raise SurgeryError(f"{path!r} holds no {SAFE_NAME}, {BIN_NAME} or their index: no weights to load")


def _read(file: str) -> dict[str, torch.Tensor]:
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(file)
    return torch.load(file, map_location="cpu", weights_only=True)


def _load_weights(model: nn.Module, path: str) -> None:
    """Every tensor of the checkpoint into the surgered model; no key missing (but tied copies the save
    leaves out), none left over.

    Raises:
        SurgeryError: keys missing or left over.
    """
    expected = model.state_dict(keep_vars=True)
    loaded: set[str] = set()
    unexpected: list[str] = []
    for file in _weight_files(path):
        sd = _read(file)
        result = model.load_state_dict(sd, strict=False)
        unexpected += result.unexpected_keys
        loaded |= set(sd) - set(result.unexpected_keys)
    have = {id(expected[k]) for k in loaded}
    missing = [k for k in expected if k not in loaded and id(expected[k]) not in have]  # a tie: loaded under its twin
    if missing or unexpected:
        raise SurgeryError(f"{path!r} does not hold the weights of the rebuilt model: missing {missing[:5]}"
                           f"{' ...' if len(missing) > 5 else ''}, left over {unexpected[:5]}"
                           f"{' ...' if len(unexpected) > 5 else ''}; was it saved from another model class or "
                           "surgery?")


def _compare(rebuilt: dict[str, Any], saved: dict[str, Any], where: str) -> None:
    """Raises SurgeryError naming where the rebuilt record differs from the saved one (``coverage`` describes the
    weights that trained, not the surgery: it is not compared)."""
    rebuilt, saved = ({k: v for k, v in d.items() if k != "coverage"} for d in (rebuilt, saved))
    if rebuilt == saved:
        return
    diffs = []
    for key in sorted(set(rebuilt) | set(saved)):
        a, b = saved.get(key), rebuilt.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{key}.{k}: saved {a.get(k)!r}, rebuilt {b.get(k)!r}" for k in sorted(set(a) | set(b))
                      if a.get(k) != b.get(k)]
        elif isinstance(a, list) and isinstance(b, list):
            i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            diffs.append(f"{key}[{i}]: saved {a[i] if i < len(a) else '<none>'!r}, "
                         f"rebuilt {b[i] if i < len(b) else '<none>'!r}")
        else:
            diffs.append(f"{key}: saved {a!r}, rebuilt {b!r}")
    raise SurgeryError(f"{where}: the model rebuilt from the checkpoint's record carries other surgery than the "
                       f"record says ({'; '.join(diffs[:4])}{' ...' if len(diffs) > 4 else ''}); its predictions "
                       "would differ from the trained model's. Load with the model class it was trained with, and "
                       "check that its config.json was not edited. (Parameters frozen before apply are not recorded "
                       "as such: rebuild such a model by hand, build, freeze, apply, load_state_dict, then "
                       "surgery.check_same_surgery(model, record))")
