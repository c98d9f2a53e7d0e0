"""The change record's typed entries over unchanged JSON (surgery/record.py, surgery/entry.py): version-1
records written by earlier versions read back field for field, typed, and write back the same JSON."""

from __future__ import annotations

import json

import pytest

import surgery
from surgery.record import Record, Skip
from surgery.regularizers.mixout import MixoutEntry
from surgery.regularizers.msd import LayerMix, MSDHead
from surgery.regularizers.rates import DROP_PATH, DROPOUT, AttrChange, ConfigChange, LeftOn

# a record as main wrote it before the entries were typed (every kind of entry), in its JSON form
V1 = {"format": "surgery", "version": 1,
      "args": {"mixout": 0.1, "dropout": 0.0, "drop_path": 0.0, "msd": 8, "msd_p": 0.2, "head": "classifier",
               "include": None, "exclude": None, "mixout_head": True, "mixout_tied": False, "target_dtype": None,
               "low_memory": False},
      "mixout": [{"name": "enc.0.q", "p": 0.1, "orig": "torch.nn.modules.linear.Linear", "transposed": False},
                 {"name": "enc.0.q.lora_A.default", "p": 0.1, "orig": "torch.nn.modules.linear.Linear",
                  "transposed": False, "kind": "lora"},
                 {"name": "moe.experts", "p": 0.1, "orig": "x.Experts", "kind": "experts",
                  "params": ["gate_up_proj", "down_proj"], "transposed": True},
                 {"name": "moe.gate", "p": 0.1}],
      "dropout": [{"module": "enc.drop", "attr": "p", "old": 0.1, "new": 0.0},
                  {"module": "enc.1.drop_path", "attr": "drop_prob", "old": 0.1, "new": 0.0, "kind": "drop_path",
                   "later": "a field this version does not know"}],
      "config": [{"module": "", "path": ["hidden_dropout_prob"], "old": 0.1, "new": 0.0}],
      "msd": [{"name": "classifier", "k": 8, "p": 0.2,
               "layers": {"backbone": "bert", "n": 3, "p": 0.2, "pool": "first", "init": -3.0,
                          "param": "layer_pool.layer_weights", "frozen": ["bert.pooler.dense.weight"]}}],
      "skipped": [{"name": "lm_head", "reason": "weight tied to wte.weight"}],
      "left_on": [{"kind": "router_noise", "values": [0.01], "modules": 2, "config": 1}],
      "coverage": {"trainable": 10, "mixout": 6, "msd": 2, "left": []}}


def test_a_version_1_record_reads_typed_and_writes_the_same_json():
    rec = Record.from_dict(json.dumps(V1))
    assert rec.to_dict() == V1 and json.loads(rec.to_json()) == V1
    assert [type(e) for e in rec.mixout] == [MixoutEntry] * 4
    assert [m.family for m in rec.mixout] == ["linear", "lora", "experts", "linear"]
    assert [m.has_target for m in rec.mixout] == [True, False, True, True]
    assert rec.target_keys == ["enc.0.q.mixout_target", "moe.experts.mixout_target", "moe.gate.mixout_target"]
    assert rec.mixout[3].transposed is False and rec.mixout[3].orig is None  # absent: its default, still absent
    assert "transposed" not in rec.mixout[3].to_json()
    assert [type(c) for c in rec.dropout] == [AttrChange] * 2 and [c.kind for c in rec.dropout] == [DROPOUT, DROP_PATH]
    assert isinstance(rec.config[0], ConfigChange) and rec.config_changes() == rec.config
    assert isinstance(rec.msd[0], MSDHead) and isinstance(rec.msd[0].layers, LayerMix)
    assert rec.msd[0].layers.backbone == "bert" and isinstance(rec.left_on[0], LeftOn)
    assert rec.skipped == [Skip(name="lm_head", reason="weight tied to wte.weight")]


def test_entries_write_only_what_they_hold():
    assert MixoutEntry(name="a", p=0.1, kind=None).to_json() == {"name": "a", "p": 0.1}
    assert MSDHead(name="h", k=2, p=0.2).to_json() == {"name": "h", "k": 2, "p": 0.2}
    with pytest.raises(TypeError, match="MixoutEntry has no field 'layers'"):
        MixoutEntry(name="a", p=0.1, layers={})


def test_a_record_of_a_live_model_is_what_its_json_reads_back(tiny_bert):
    model = surgery.apply(tiny_bert(layers=2), mixout=0.1, dropout=0.0, msd=4)
    rec = surgery.get_record(model)
    back = Record.from_dict(rec.to_json())
    assert back == rec and back.to_dict() == rec.to_dict()
    assert surgery.describe(back).splitlines()[1:] == [
        line.split(", targets")[0] + (":" if ", targets" in line else "")
        for line in surgery.describe(model).splitlines()[1:]]


def test_an_entry_is_not_a_mapping():
    entry = Record.from_dict(V1).mixout[0]
    with pytest.raises(TypeError):
        entry["name"]  # noqa: B018 - readers use the typed fields
