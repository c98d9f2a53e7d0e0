"""apply/revert/describe: arguments, failure leaves the model untouched, record. (Which layers Mixout selects:
regularizers/mixout/test_selection.py.)"""

import copy
import json

import pytest
import torch
from torch import nn
from conftest import assert_untouched as _assert_same
from conftest import snapshot as _snapshot
from conftest import tiny_bert
from transformers import AutoModelForSequenceClassification

import surgery
from surgery.layers.mixout import MixLinear


def _bert():
    return tiny_bert(layers=2, num_labels=2)


BAD_CALLS = [
    (dict(mixout=-0.1), ValueError, r"mixout must be a probability in \[0, 1\]"),
    (dict(mixout=1.5), ValueError, r"mixout must be a probability in \[0, 1\]"),
    (dict(mixout=float("nan")), ValueError, r"mixout must be a probability in \[0, 1\], got nan"),
    (dict(mixout="0.1"), ValueError, r"mixout must be a probability .*str"),
    (dict(mixout=True), ValueError, r"mixout must be a probability"),
    (dict(dropout=2), ValueError, r"dropout must be a probability in \[0, 1\]"),
    (dict(dropout=float("nan")), ValueError, r"dropout must be"),
    (dict(msd=4, msd_p=-1), ValueError, r"msd_p must be a probability"),
    (dict(msd=-1), ValueError, r"msd must be .* int >= 0"),
    (dict(msd=2.5), ValueError, r"msd must be"),
    (dict(mixout=0.1, include="bert.encoder.layer.9.*"), surgery.PatternError, r"include=.*matches no module; close names"),
    (dict(mixout=0.1, exclude=["clasifier"]), surgery.PatternError, r"exclude entry 'clasifier' matches no module.*'classifier'"),
    (dict(mixout=0.1, include="(unclosed"), surgery.PatternError, r"not a valid regular expression"),
    (dict(mixout=0.1, include=3), surgery.SurgeryTypeError, r"include must be a regex string or a list"),
    (dict(include=["query"]), surgery.SurgeryError, r"include/exclude select Mixout layers; they need mixout > 0"),
    (dict(mixout=0.1, include=["embeddings"]), surgery.SurgeryError, r"selected no nn.Linear"),
    (dict(msd=4, head="nope", mixout=0.2, dropout=0.0), surgery.HeadError, r"head='nope' names no module"),
    (dict(mixout=0.1, target_dtype="bf16"), surgery.SurgeryTypeError, r"target_dtype must be a floating torch.dtype"),
]


@pytest.mark.parametrize("kwargs,exc,msg", BAD_CALLS, ids=[str(c[0]) for c in BAD_CALLS])
def test_bad_input_is_one_clear_error_and_nothing_is_mutated(kwargs, exc, msg):
    model = _bert()
    snap = _snapshot(model)
    with pytest.raises(exc, match=msg):
        surgery.apply(model, **kwargs)
    _assert_same(model, snap)
    assert not surgery.is_surgered(model)


def test_errors_subclass_the_builtin_a_torch_user_expects():
    assert issubclass(surgery.PatternError, ValueError) and issubclass(surgery.HeadError, ValueError)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got dict"):
        surgery.apply({}, mixout=0.1)
    with pytest.raises(TypeError):
        surgery.revert("model")


def test_apply_and_revert_return_the_same_object_and_round_trip_exactly():
    model = _bert().eval()
    snap = _snapshot(model)
    ids = torch.randint(0, 50, (2, 9))
    ref = model(ids).logits
    assert surgery.apply(model, mixout=0.3, dropout=0.0, msd=4) is model
    assert torch.equal(model(ids).logits, ref)
    assert surgery.revert(model) is model
    _assert_same(model, snap)
    assert torch.equal(model(ids).logits, ref)


def test_apply_twice_and_revert_without_surgery_are_clear_errors():
    model = _bert()
    with pytest.raises(surgery.NotSurgeredError, match=r"no surgery applied; call surgery.apply"):
        surgery.revert(model)
    with pytest.raises(surgery.NotSurgeredError):
        surgery.describe(model)
    surgery.apply(model, mixout=0.1)
    snap = _snapshot(model)
    with pytest.raises(surgery.AlreadySurgeredError, match=r"call surgery.revert\(model\)"):
        surgery.apply(model, dropout=0.0)
    _assert_same(model, snap)
    surgery.revert(model)
    surgery.apply(model, dropout=0.0)  # a fresh apply after revert is fine


def test_plain_module_round_trip_and_linear_subclasses_are_left_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.3), nn.TransformerEncoderLayer(8, 2, 16, dropout=0.2,
                                                                                       batch_first=True))
    x = torch.randn(2, 5, 8)
    model.eval()
    ref = model(x)
    snap = _snapshot(model)
    surgery.apply(model, mixout=0.2, dropout=0.0)
    rec = surgery.get_record(model)
    assert {m.name for m in rec.mixout} == {"0", "2.linear1", "2.linear2"}
    assert [s.name for s in rec.skipped] == ["2.self_attn.out_proj"]  # MHA reads out_proj.weight directly
    assert model[2].self_attn.dropout == 0.0 and model[1].p == 0.0
    model.train()
    a, b = model(x), model(x)
    assert torch.equal(a, b)  # dropout 0, and right after apply W == target: mixing changes nothing
    surgery.revert(model)
    _assert_same(model, snap)
    assert model[2].self_attn.dropout == 0.2
    assert torch.equal(model.eval()(x), ref)


def test_describe_is_a_few_lines_and_reads_records_from_disk_form():
    model = _bert()
    surgery.apply(model, mixout=0.1, dropout=0.0, msd=8)
    text = surgery.describe(model)
    assert "mixout p=0.1 on 14 layers" in text
    assert "bert.encoder.layer.{0-1}.attention.self.query  (x2)" in text
    assert "dropout -> 0.0" in text and "multi-sample dropout: head 'classifier', K=8" in text
    assert len(text.splitlines()) < 15
    on_disk = json.loads(json.dumps(model.config.to_dict()["surgery"]))
    from_disk = surgery.describe(on_disk).splitlines()
    assert from_disk[0] == "checkpoint: surgery (record v1)"
    assert from_disk[1:] == [line.split(", targets")[0] + (":" if ", targets" in line else "")
                             for line in text.splitlines()[1:]]


def test_record_travels_in_the_config_and_blocks_reapplying_to_a_surgered_checkpoint(tmp_path):
    model = _bert()
    surgery.apply(model, mixout=0.1, dropout=0.0)
    rec = surgery.Record.from_dict(model.config.to_dict()["surgery"])
    assert rec.to_dict() == surgery.get_record(model).to_dict()
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["surgery"]["mixout"][0]["p"] == 0.1 and cfg["hidden_dropout_prob"] == 0.0
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    snap = _snapshot(loaded)
    with pytest.raises(surgery.AlreadySurgeredError, match="loaded from a checkpoint saved with surgery"):
        surgery.apply(loaded, mixout=0.1)
    _assert_same(loaded, snap)


def test_record_rejects_foreign_or_newer_data():
    with pytest.raises(ValueError, match="not a surgery record"):
        surgery.Record.from_dict({"version": 1})
    with pytest.raises(ValueError, match="version 99 is not supported"):
        surgery.Record.from_dict({"format": "surgery", "version": 99})
    with pytest.raises(ValueError, match="not valid JSON"):
        surgery.Record.from_dict("{oops")


def test_revert_refuses_a_model_whose_layers_were_replaced_and_changes_nothing():
    model = _bert()
    surgery.apply(model, mixout=0.1, dropout=0.0)
    model.classifier = nn.Linear(16, 2)
    with pytest.raises(surgery.SurgeryError, match="'classifier' is missing or was replaced"):
        surgery.revert(model)
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, MixLinear)
    assert surgery.is_surgered(model)


def test_deepcopy_of_a_surgered_model_reverts_independently():
    model = _bert()
    surgery.apply(model, mixout=0.1, msd=2)
    twin = copy.deepcopy(model)
    surgery.revert(twin)
    assert type(twin.classifier) is nn.Linear and isinstance(model.classifier, MixLinear)
    assert twin.classifier.weight is not model.classifier.weight
