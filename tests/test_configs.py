"""One function restores a config from the change record (``surgery.configs.restore_config``):
live ``revert``, ``surgery.export`` and ``surgery convert`` give identical configs, nested
sub-configs included, for the model itself and for a backbone inside a custom model."""

from __future__ import annotations

import copy
import json

import pytest
import transformers
from torch import nn
import zoo
from zoo import NAMES, build

import surgery
from surgery.checkpoint import convert
from surgery.configs import restore_config

FAST = ["bert", "t5", "x-clip"]  # flat, a model whose stacks hold config copies, nested text/vision configs


class Regressor(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.bert = backbone
        self.regressor = nn.Linear(zoo.HIDDEN, 1)


def read_json(path):
    return json.loads((path / "config.json").read_text())


def three_paths(model: nn.Module, sub: nn.Module, tmp_path) -> dict:
    """config.json of: a plain save, export, convert of a surgered save, a save after live revert."""
    sub.save_pretrained(tmp_path / "plain")  # before apply; also fixes architectures/dtype in the live config
    live = copy.deepcopy(sub.config.to_dict())
    surgery.apply(model, mixout=0.1, dropout=0.0)
    assert sub.config.to_dict() != live  # dropout fields really changed
    sub.save_pretrained(tmp_path / "surgered")
    surgery.export(sub, tmp_path / "exported")
    convert(tmp_path / "surgered", tmp_path / "converted")
    surgery.revert(model)
    assert sub.config.to_dict() == live
    sub.save_pretrained(tmp_path / "reverted")
    return {k: read_json(tmp_path / k) for k in ("plain", "exported", "converted", "reverted")}


def check_same(got: dict, tmp_path) -> None:
    assert got["exported"] == got["plain"] == got["reverted"] == got["converted"]
    assert "surgery" not in got["plain"]
    loaded = [transformers.AutoConfig.from_pretrained(tmp_path / k).to_dict() for k in got]
    assert all({**d, "_name_or_path": ""} == {**loaded[0], "_name_or_path": ""} for d in loaded)


@pytest.mark.parametrize("name", FAST + [pytest.param(n, marks=pytest.mark.slow) for n in NAMES if n not in FAST])
def test_revert_export_and_convert_restore_the_same_config(name, tmp_path):
    model = build(name)
    check_same(three_paths(model, model, tmp_path), tmp_path)


@pytest.mark.parametrize("name", FAST)
def test_same_for_a_backbone_inside_a_custom_model(name, tmp_path):
    model = Regressor(transformers.AutoModel.from_config(zoo.config(name)))
    check_same(three_paths(model, model.bert, tmp_path), tmp_path)


def test_nested_fields_are_restored_at_depth(tmp_path):
    model = build("x-clip")
    surgery.apply(model, dropout=0.0)
    paths = [c.path for c in surgery.get_record(model).config]
    assert ["text_config", "dropout"] in paths and ["vision_config", "attention_dropout"] in paths
    assert model.config.text_config.dropout == 0.0 and model.text_model.config is model.config.text_config
    surgery.revert(model)
    assert model.config.text_config.dropout == zoo.P and model.config.vision_config.attention_dropout == zoo.P


def test_one_function_for_live_configs_and_dicts():
    """The same record restores a live config and its ``to_dict()`` to the same values, three levels deep."""
    cfg = zoo.config("x-clip")
    cfg.text_config.extra = transformers.PretrainedConfig(inner_dropout=0.0)  # a sub-config of a sub-config
    rec = surgery.Record(config=[
        {"module": "", "path": ["prompt_attention_dropout"], "old": 0.3, "new": 0.0},
        {"module": "", "path": ["text_config", "dropout"], "old": 0.4, "new": 0.0},
        {"module": "", "path": ["text_config", "extra", "inner_dropout"], "old": 0.5, "new": 0.0},
        {"module": "text_model", "path": ["dropout"], "old": 0.9, "new": 0.0},  # another module's config: not this one
    ])
    d = cfg.to_dict()
    d["surgery"] = rec.to_dict()
    cfg.surgery = rec.to_dict()
    live_changes = restore_config(cfg, rec)
    dict_changes = restore_config(d)  # the record the dict carries
    assert live_changes == dict_changes == [("prompt_attention_dropout", zoo.P, 0.3), ("text_config.dropout", zoo.P, 0.4),
                                            ("text_config.extra.inner_dropout", 0.0, 0.5)]
    assert cfg.to_dict() == d and "surgery" not in d and not hasattr(cfg, "surgery")
    assert cfg.text_config.extra.inner_dropout == 0.5
