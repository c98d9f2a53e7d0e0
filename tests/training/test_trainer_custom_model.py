"""SurgeryTrainer on a module that is not a transformers model (a backbone plus a regression head,
the seed blog's shape): periodic checkpoints carry the record (resume, inspect and convert see the
surgery), the save you call writes the plain weights, and resuming in the same process equals an
uninterrupted run."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import tiny_bert_config
from safetensors import safe_open
from safetensors.torch import load_file
from training_setup import StopAt, trainer_args
from torch import nn
from transformers import AutoModel

import surgery
from surgery.cli import main as cli

SURGERY = dict(mixout=0.2, dropout=0.0, msd=4, head="regressor")


class Regressor(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.bert = AutoModel.from_config(tiny_bert_config())
        self.regressor = nn.Linear(16, 1)

    def forward(self, input_ids, labels=None):
        pred = self.regressor(self.bert(input_ids=input_ids).last_hidden_state[:, 0]).squeeze(-1)
        return {"loss": F.mse_loss(pred, labels), "logits": pred} if labels is not None else {"logits": pred}


def data(n=16):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(5, 50, (8,), generator=g), "labels": torch.randn((), generator=g)}
            for _ in range(n)]


def trainer(model, out, steps, callbacks=None, **kw):
    return surgery.SurgeryTrainer(model=model, args=trainer_args(str(out), steps, **kw), train_dataset=data(),
                                  callbacks=callbacks)


def test_checkpoints_carry_the_record_and_the_final_save_is_plain(tmp_path):
    m = surgery.apply(Regressor(), **SURGERY)
    trainer(m, tmp_path / "run", 2, save_steps=2).train()
    ckpt = tmp_path / "run" / "checkpoint-2"
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        assert surgery.Record.from_dict(f.metadata()["surgery"]).to_dict() == surgery.get_record(m).to_dict()
    assert sum(k.endswith(".mixout_target") for k in load_file(ckpt / "model.safetensors")) == \
        len(surgery.get_record(m).mixout)
    # the checkpoint converts to the plain weights, equal to the live model's
    assert cli(["convert", str(ckpt), str(tmp_path / "conv"), "--quiet"]) == 0
    trainer(m, tmp_path / "run", 2).save_model(str(tmp_path / "final"))
    assert surgery.is_surgered(m)
    final = load_file(tmp_path / "final" / "model.safetensors")
    plain = Regressor(seed=1)
    assert plain.load_state_dict(final, strict=True)  # no targets, no missing keys
    conv = load_file(tmp_path / "conv" / "model.safetensors")
    assert final.keys() == conv.keys() and all(torch.equal(final[k], conv[k]) for k in final)
    ids = torch.randint(5, 50, (3, 8))
    m.eval()
    with torch.no_grad():
        assert torch.equal(plain.eval()(ids)["logits"], m(ids)["logits"])


def test_resume_from_a_custom_model_checkpoint_equals_an_uninterrupted_run(tmp_path):
    full = surgery.apply(Regressor(), **SURGERY)
    trainer(full, tmp_path / "full", 4).train()
    cut = surgery.apply(Regressor(), **SURGERY)
    trainer(cut, tmp_path / "cut", 4, save_steps=2, callbacks=[StopAt(2)]).train()
    resumed = surgery.apply(Regressor(), **SURGERY)  # the pretrained model, surgered again, then the checkpoint
    trainer(resumed, tmp_path / "cut", 4, save_steps=2).train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2"))
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
