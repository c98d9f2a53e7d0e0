"""Training helpers across setups: gradient accumulation under every transformers scaling rule, the
decoder's padding mask for R-Drop on encoder-decoder models, training states read with weights_only."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import tiny_bert
from transformers import TrainingArguments
from zoo import batch, build

import surgery
from surgery.training.compute import consistency_mask


def _dataset(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(5, 50, (8,), generator=g), "labels": int(torch.randint(0, 3, (1,), generator=g))}
            for _ in range(n)]


def _one_step(out, per_device, accumulation, rule):
    model = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model.accepts_loss_kwargs = True  # the Trainer would then trust a model-normalised loss (transformers >= 4.46)
    surgery.apply(model, msd=3, msd_p=0.0)  # p = 0: no noise, so both runs see the same loss
    args = TrainingArguments(str(out), max_steps=1, per_device_train_batch_size=per_device,
                             gradient_accumulation_steps=accumulation, learning_rate=0.5, optim="sgd",
                             lr_scheduler_type="constant", weight_decay=0.0, seed=1, report_to=[], use_cpu=True,
                             disable_tqdm=True, save_strategy="no")
    trainer = surgery.SurgeryTrainer(model=model, args=args, train_dataset=_dataset(), msd_loss=True)
    assert trainer.model_accepts_loss_kwargs is False and trainer.loss_is_scaled_for_ga is False
    if rule == "4.46-4.57":  # no loss_is_scaled_for_ga: the Trainer falls back to model_accepts_loss_kwargs
        del trainer.loss_is_scaled_for_ga
        assert trainer.loss_is_scaled_for_ga is None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    return {k: v - before[k] for k, v in model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["5.x", "4.46-4.57"])
def test_gradient_accumulation_matches_one_big_batch(tmp_path, rule):
    # 2 micro-batches of 2 accumulated = one batch of 4 (equal sizes: the mean of the per-batch means)
    big = _one_step(tmp_path / "big", 4, 1, rule)
    acc = _one_step(tmp_path / "acc", 2, 2, rule)
    assert any(v.abs().max() > 0 for v in big.values())
    for k in big:
        torch.testing.assert_close(acc[k], big[k], rtol=1e-4, atol=1e-6, msg=k)


def test_decoder_logits_never_take_the_encoder_attention_mask():
    ids = torch.randint(4, 99, (3, 7))
    enc_mask = torch.ones(3, 7, dtype=torch.long)
    enc_mask[:, 5:] = 0  # encoder padding
    labels = torch.randint(4, 99, (3, 7))
    labels[0, 6] = -100
    logits = torch.randn(3, 7, 11)  # decoder logits, the same length as the encoder input
    inputs = {"input_ids": ids, "attention_mask": enc_mask, "labels": labels}
    assert torch.equal(consistency_mask(inputs, logits, decoder=True), labels != -100)
    dec_mask = torch.ones(3, 7, dtype=torch.long)
    dec_mask[1, 4:] = 0
    assert consistency_mask({**inputs, "decoder_attention_mask": dec_mask}, logits) is dec_mask  # decoder_* seen
    assert consistency_mask(inputs, logits) is enc_mask  # an encoder-only batch: its own mask
    assert consistency_mask(inputs, torch.randn(3, 11), decoder=True) is None


def test_compute_loss_on_an_encoder_decoder_model_masks_with_the_labels():
    model = surgery.apply(build("t5-gen"), dropout=0.1).train()
    b = batch("t5-gen", model)
    b["labels"] = torch.randint(4, 99, (3, 7))  # decoder length = encoder length (7)
    b["labels"][:, 5:] = -100
    b["attention_mask"][:, :2] = 0  # an encoder mask that differs from the labels' one
    torch.manual_seed(0)
    r = surgery.compute_loss(model, b, rdrop_alpha=1.0)
    torch.manual_seed(0)
    out1, out2 = surgery.rdrop_forward(model, b)
    right = surgery.rdrop_loss(out1, out2, task="classification", alpha=1.0, mask=b["labels"] != -100)
    wrong = surgery.rdrop_loss(out1, out2, task="classification", alpha=1.0, mask=b["attention_mask"])
    assert torch.equal(r.consistency, right) and not torch.equal(right, wrong)


def test_training_state_is_plain_data_and_restores_every_generator(tmp_path):
    model = surgery.apply(tiny_bert(), mixout=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.randint(5, 50, (2, 6)), labels=torch.tensor([0, 1])).loss.backward()
    opt.step()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    surgery.save_training_state(tmp_path / "s.pt", model, opt, step=7, history=[0.5, 0.25], note="x")
    want = (random.random(), np.random.rand(), torch.rand(1))
    raw = torch.load(tmp_path / "s.pt", weights_only=True)  # nothing but tensors and plain data
    assert raw["step"] == 7 and isinstance(raw["rng"]["numpy"], list)
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    fresh = surgery.apply(tiny_bert(seed=5), mixout=0.1)
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    info = surgery.load_training_state(tmp_path / "s.pt", fresh, opt2)
    assert info == {"step": 7, "history": [0.5, 0.25], "note": "x"}
    assert (random.random(), np.random.rand()) == want[:2] and torch.equal(torch.rand(1), want[2])
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
