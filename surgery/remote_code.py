"""The checkpoint form of a transformers model with surgery's layer-weighted MSD head: custom code.

A plain transformers class cannot hold the head (learned layer weights, the head reading their mix
of all hidden states), so a plain ``from_pretrained`` of its save would load the pooler path with
one "unexpected key" warning and predict something else. Such a model is therefore saved the way
transformers saves a model with a custom head (its "custom code" convention):

* its ``config.json`` names a model type of its own, ``"surgery_layer_msd"`` (the model's own type
  kept under ``"surgery_base_model_type"``), and an ``auto_map`` pointing at this file;
* this file is copied beside the weights (``save_pretrained``, every Trainer checkpoint).

So ``AutoModelFor...from_pretrained(DIR)`` stops with transformers' "contains custom code ... pass
trust_remote_code=True" error, and with ``trust_remote_code=True`` it loads the right model: the
class below hands over to :func:`surgery.load_pretrained`, which rebuilds the surgery from the
record in the checkpoint and verifies it. ``surgery.load_pretrained(cls, DIR)`` does the same
without running code from the folder.

The live model keeps computing as before: only the JSON text of its config changes (the config
object, the model's own copy made by ``apply``, becomes an instance of a subclass of its class
with the same name and ``model_type``; revert gives it its class back).

When transformers imports this file from a checkpoint folder it needs ``transformers`` only;
``surgery`` is imported when the model is loaded.
"""

from __future__ import annotations

import json
from typing import Any

from transformers import PretrainedConfig, PreTrainedModel

__all__ = ["MODEL_TYPE", "BASE_TYPE_KEY", "OWN_AUTO_MAP_KEY", "save_as_custom_code", "restore_class",
           "plain_config_dict",
           "SurgeryLayerMSDConfig", "SurgeryLayerMSDModel"]

MODEL_TYPE = "surgery_layer_msd"  # a model type transformers does not know: its Auto classes need this file
BASE_TYPE_KEY = "surgery_base_model_type"  # config.json: the model's own model type
OWN_AUTO_MAP_KEY = "surgery_base_auto_map"  # config.json: the model's own auto_map (a custom-code model), if any
_FILE = __name__.rsplit(".", 1)[-1]  # the module name this file has beside the weights


class SurgeryLayerMSDConfig(PretrainedConfig):
    """What ``AutoConfig.from_pretrained(DIR, trust_remote_code=True)`` reads: the saved fields as they are."""

    model_type = MODEL_TYPE


class SurgeryLayerMSDModel(PreTrainedModel):
    """What ``AutoModelFor...from_pretrained(DIR, trust_remote_code=True)`` finds; it returns the model
    class named in the config's ``architectures`` with the recorded surgery, through
    :func:`surgery.load_pretrained` (never an instance of this class)."""

    config_class = SurgeryLayerMSDConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        import surgery

        if model_args:
            raise TypeError("a surgery checkpoint takes no positional model arguments; pass keyword arguments of "
                            "from_pretrained (dtype=..., device_map=...)")
        for key in ("config", "trust_remote_code", "adapter_kwargs", "code_revision"):  # what the Auto class adds
            kwargs.pop(key, None)
        return surgery.load_pretrained(None, pretrained_model_name_or_path, **kwargs)


def _auto_classes(model_type: str | None, architectures: Any) -> list[str]:
    """The transformers Auto classes that build ``architectures[0]`` for ``model_type``."""
    arch = architectures[0] if isinstance(architectures, list) and architectures else None
    found = []
    try:
        from transformers.models.auto import modeling_auto
        for name in dir(modeling_auto):
            auto = getattr(modeling_auto, name)
            names = getattr(getattr(auto, "_model_mapping", None), "_model_mapping", None)
            if not (name.startswith("AutoModel") and isinstance(names, dict)):
                continue
            value = names.get(model_type)
            if value == arch or (isinstance(value, (list, tuple)) and arch in value):
                found.append(name)
    except Exception:  # noqa: BLE001 - transformers' internals moved: the generic entry below still works
        pass
    return sorted(set(found) | {"AutoModel"})


def _checkpoint_json(text: str) -> str:
    d = json.loads(text)
    d[BASE_TYPE_KEY] = d.get("model_type")
    if "auto_map" in d:
        d[OWN_AUTO_MAP_KEY] = d["auto_map"]
    d["model_type"] = MODEL_TYPE
    d["auto_map"] = {"AutoConfig": f"{_FILE}.{SurgeryLayerMSDConfig.__name__}",
                     **{a: f"{_FILE}.{SurgeryLayerMSDModel.__name__}"
                        for a in _auto_classes(d[BASE_TYPE_KEY], d.get("architectures"))}}
    return json.dumps(d, indent=2, sort_keys=True) + "\n"


_SUBCLASSES: dict[type, type] = {}


def _rebuild(base: type, state: dict) -> PretrainedConfig:
    """Unpickling: the config in its checkpoint form again."""
    obj = base.__new__(base)
    vars(obj).update(state)
    obj.__class__ = _subclass(base)
    return obj


def _subclass(base: type) -> type:
    """``base`` (a config class) with the checkpoint form above; same name, same ``model_type``."""
    sub = _SUBCLASSES.get(base)
    if sub is None:
        def to_json_string(self, use_diff: bool = True) -> str:
            return _checkpoint_json(base.to_json_string(self, use_diff))

        sub = type(base.__name__, (base,), {
            "__module__": __name__,  # what save_pretrained copies beside the weights (transformers' custom_object_save)
            "__qualname__": base.__qualname__,
            "__doc__": base.__doc__,
            "_auto_class": "AutoConfig",  # makes config.save_pretrained copy this file
            # read by custom_object_save, which would otherwise store an auto_map on the live config
            "auto_map": property(lambda self: dict(vars(self).get("auto_map") or {}),
                                 lambda self, value: vars(self).__setitem__("auto_map", value)),
            "to_json_string": to_json_string,
            "__reduce__": lambda self: (_rebuild, (base, dict(vars(self)))),
        })
        _SUBCLASSES[base] = sub
    return sub


def save_as_custom_code(config: PretrainedConfig) -> None:
    """Make ``config`` (a model's own config object) serialise in the checkpoint form."""
    config.__class__ = _subclass(type(config))


def restore_class(config: Any) -> None:
    """Undo :func:`save_as_custom_code` (nothing when ``config`` is not in the checkpoint form)."""
    if type(config) in _SUBCLASSES.values():
        config.__class__ = type(config).__bases__[0]


def plain_config_dict(d: dict[str, Any]) -> dict[str, Any]:
    """A saved ``config.json`` dict with the model's own ``model_type`` (and ``auto_map``) back."""
    d = dict(d)
    if d.get("model_type") == MODEL_TYPE:
        d["model_type"] = d.pop(BASE_TYPE_KEY, None)
        own = d.pop(OWN_AUTO_MAP_KEY, None)
        if own is None:
            d.pop("auto_map", None)
        else:
            d["auto_map"] = own
    return d
