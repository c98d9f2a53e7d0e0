"""Plain saves from every framework, and which saves are surgered.

Plain (no Mixout target, no record; loads with plain PEFT / transformers / torch and predicts
exactly what the surgered model predicts in eval):

* ``surgery.export(peft_model, DIR)``: the adapter checkpoint, every adapter, bitwise what revert
  then ``save_pretrained`` writes;
* ``surgery.export(accelerator_prepared_model, DIR_or_FILE)`` and
  ``accelerator.save(surgery.exporting.plain_state_dict(model), FILE)``;
* the ``save_model()`` you call on a ``SurgeryTrainer`` of a PEFT model.

Surgered (what resume needs, or what a framework writes by itself): ``peft_model.save_pretrained``,
``accelerator.save_model``, the Trainer's periodic checkpoints (for a PEFT model: the adapter with
the head copy's target, the record beside it in ``surgery.json``, resumed bitwise).
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from zoo import batch, build

import surgery
from surgery import SurgeryError
from surgery.exporting import plain_state_dict

SURGERY = dict(mixout=0.3, dropout=0.0)


def _lora(**kw):
    return LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"], **kw)


def _trained_peft(adapters=("default",), seed=0):
    """A PEFT model with the given adapters, surgered and trained one step on each adapter."""
    pm = get_peft_model(build("bert", seed=seed), _lora())
    for name in adapters[1:]:
        pm.add_adapter(name, LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query"]))
    surgery.apply(pm, **SURGERY)
    for name in reversed(adapters):
        pm.set_adapter(name)
        _step(pm)
    return pm


def _step(model, b=None):
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    torch.manual_seed(0)
    model(**(b or batch("bert"))).loss.backward()
    opt.step()
    opt.zero_grad()


def _logits(model):
    model.eval()
    b = batch("bert")
    b.pop("labels")
    with torch.no_grad():
        return model(**b).logits


def _files(path):
    """Every file's bytes; an adapter_config.json parsed, lists sorted: PEFT writes set-valued fields
    (target_modules, modules_to_save) in the set's iteration order, which depends on the hash seed and
    on how the set was built (a deepcopy rebuilds it), not on the save."""
    out = {}
    for root, _, names in os.walk(path):
        for n in names:
            full = os.path.join(root, n)
            data = open(full, "rb").read()
            if n == "adapter_config.json":
                data = {k: sorted(v) if isinstance(v, list) else v for k, v in json.loads(data).items()}
            out[os.path.relpath(full, path)] = data
    return out


def _assert_plain_files(path):
    """No Mixout target in any weights file and no record in any JSON file under ``path``."""
    for rel in _files(path):
        full = os.path.join(path, rel)
        if rel.endswith(".safetensors"):
            assert not [k for k in load_file(full) if k.endswith("mixout_target")], rel
        if rel.endswith(".json"):
            assert "surgery" not in json.loads(open(full).read()), rel


# ---- PEFT ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("adapters", [("default",), ("default", "b")], ids=["one-adapter", "two-adapters"])
def test_export_of_a_peft_model_is_the_plain_adapter_checkpoint(tmp_path, adapters):
    pm = _trained_peft(adapters)
    pm.set_adapter("default")
    surgery.export(pm, tmp_path / "plain")
    assert surgery.is_surgered(pm)
    _assert_plain_files(tmp_path / "plain")
    assert not (tmp_path / "plain" / "config.json").exists()
    # bitwise what revert then PEFT's save_pretrained writes
    reverted = surgery.revert(copy.deepcopy(pm))
    reverted.save_pretrained(str(tmp_path / "reverted"))
    assert _files(tmp_path / "plain") == _files(tmp_path / "reverted")
    # plain PEFT loads it and predicts what the surgered model predicts, every adapter
    loaded = PeftModel.from_pretrained(build("bert"), str(tmp_path / "plain"))
    for name in adapters[1:]:
        loaded.load_adapter(str(tmp_path / "plain" / name), name)
    for name in adapters:
        pm.set_adapter(name)
        loaded.set_adapter(name)
        assert torch.equal(_logits(loaded), _logits(pm)), name


def test_peft_save_pretrained_is_not_plain(tmp_path):
    """PEFT's own save writes the head copy's target (its state_dict); it is not a plain save."""
    pm = _trained_peft()
    pm.save_pretrained(str(tmp_path / "peft"))
    keys = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert [k for k in keys if k.endswith("mixout_target")] == ["base_model.model.classifier.mixout_target"]


def test_export_of_a_peft_model_refuses_a_file_and_sharding(tmp_path):
    pm = _trained_peft()
    (tmp_path / "f").write_text("x")
    with pytest.raises(SurgeryError, match="is a file; export of a PEFT model writes an adapter directory"):
        surgery.export(pm, tmp_path / "f")
    with pytest.raises(SurgeryError, match="leave max_shard_size out"):
        surgery.export(pm, tmp_path / "d", max_shard_size="1MB")


# ---- Accelerate and any framework that saves a state_dict ---------------------------------------------------

@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def test_accelerate_saves(tmp_path, accelerator):
    from transformers import AutoModelForSequenceClassification
    m = surgery.apply(build("bert"), **SURGERY)
    model = accelerator.prepare(m)
    _step(model)
    # accelerator.save_model writes what the model's state_dict holds: the targets (surgered)
    accelerator.save_model(model, str(tmp_path / "acc"))
    assert any(k.endswith("mixout_target") for k in load_file(tmp_path / "acc" / "model.safetensors"))
    # the plain ways: export (a from_pretrained directory) and plain_state_dict (any save of a state_dict)
    surgery.export(model, tmp_path / "plain")
    _assert_plain_files(tmp_path / "plain")
    plain = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "plain"))
    assert torch.equal(_logits(plain), _logits(model))
    accelerator.save(plain_state_dict(model), str(tmp_path / "plain.pt"))
    fresh = build("bert", seed=1)
    fresh.load_state_dict(torch.load(tmp_path / "plain.pt"), strict=True)
    assert torch.equal(_logits(fresh), _logits(model))


def test_plain_state_dict_of_any_module():
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3))
    fresh = copy.deepcopy(net)
    surgery.apply(net, mixout=0.5, dropout=0.0)
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.3)
    net(torch.randn(4, 6)).sum().backward()
    opt.step()
    sd = plain_state_dict(net)
    own = {n: p for n, p in net.named_parameters()}
    assert list(sd) == list(fresh.state_dict()) and all(sd[k].data_ptr() == own[k].data_ptr() for k in sd)  # no copies
    fresh.load_state_dict(sd, strict=True)
    x = torch.randn(5, 6)
    assert torch.equal(fresh.eval()(x), net.eval()(x))
    with pytest.raises(surgery.SurgeryTypeError):
        plain_state_dict({"a": 1})


def test_plain_state_dict_refuses_a_layer_weighted_head():
    m = surgery.apply(build("bert"), msd=2, msd_layers=True)
    with pytest.raises(SurgeryError, match="surgery.exporting.plain_state_dict writes a plain checkpoint"):
        plain_state_dict(m)


# ---- the Trainer with a PEFT model: plain final save, surgered checkpoints that resume bitwise ----------------

def _trainer(out, steps, save_steps=0, stop=None):
    from training_setup import StopAt, dataset, pretrained, trainer_args
    pm = surgery.apply(get_peft_model(pretrained(), _lora()), **SURGERY)
    return pm, surgery.SurgeryTrainer(model=pm, args=trainer_args(str(out), steps, save_steps=save_steps),
                                      train_dataset=dataset(), callbacks=[] if stop is None else [StopAt(stop)])


@pytest.mark.slow
def test_trainer_of_a_peft_model_saves_plain_and_resumes_bitwise(tmp_path):
    from training_setup import pretrained
    full, tr = _trainer(tmp_path / "full", 6)
    tr.train()
    tr.save_model(str(tmp_path / "final"))
    _assert_plain_files(tmp_path / "final")
    loaded = PeftModel.from_pretrained(pretrained(), str(tmp_path / "final"))
    b = {"input_ids": torch.randint(5, 50, (3, 8), generator=torch.Generator().manual_seed(2))}
    full.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(**b).logits, full(**b).logits)

    _, tr = _trainer(tmp_path / "cut", 6, save_steps=3, stop=3)
    tr.train()
    ckpt = tmp_path / "cut" / "checkpoint-3"  # surgered: the head copy's target, the record beside the adapter
    assert "base_model.model.classifier.mixout_target" in load_file(ckpt / "adapter_model.safetensors")
    assert json.loads((ckpt / "surgery.json").read_text())["args"]["mixout"] == 0.3
    resumed, tr = _trainer(tmp_path / "cut", 6, save_steps=3)
    tr.train(resume_from_checkpoint=str(ckpt))
    ref, got = full.state_dict(), resumed.state_dict()
    assert ref.keys() == got.keys() and [k for k in ref if not torch.equal(ref[k], got[k])] == []
    other = surgery.apply(get_peft_model(pretrained(), _lora()), mixout=0.5)
    from training_setup import dataset, trainer_args
    with pytest.raises(SurgeryError, match="same arguments"):
        surgery.SurgeryTrainer(model=other, args=trainer_args(str(tmp_path / "cut"), 6, save_steps=3),
                               train_dataset=dataset()).train(resume_from_checkpoint=str(ckpt))
