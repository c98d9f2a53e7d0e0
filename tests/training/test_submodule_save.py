"""Surgery on a sub-module, the Trainer on the whole model: the saves see the surgery where it lives."""

import pytest
import torch
from training_setup import dataset, pretrained, trainer_args
from transformers import AutoModelForSequenceClassification

import surgery


def test_trainer_saves_plain_when_a_submodule_is_surgered(tmp_path):
    model = pretrained()
    surgery.apply(model.bert, mixout=0.1, dropout=0.0)
    trainer = surgery.SurgeryTrainer(model=model, args=trainer_args(str(tmp_path), 2), train_dataset=dataset(8))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final")
    want = surgery.plain_state_dict(model)
    got = loaded.state_dict()
    assert not any("mixout" in k for k in got) and not hasattr(loaded.config, "surgery")
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert loaded.config.hidden_dropout_prob == 0.1  # the original value, not apply's 0.0
    surgery.revert(model.bert)
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())


def test_export_refuses_a_submodule_without_plain_form(tmp_path):
    outer = torch.nn.ModuleDict({"inner": pretrained()})
    surgery.apply(outer["inner"], msd=2, msd_layers=True)
    with pytest.raises(surgery.SurgeryError, match="layer-weighted"):
        surgery.export(outer, tmp_path / "out.safetensors")
    with pytest.raises(surgery.SurgeryError, match="layer-weighted"):
        surgery.plain_state_dict(outer)
    assert not (tmp_path / "out.safetensors").exists()
