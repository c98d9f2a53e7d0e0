"""The MSD loss on models that pool their head's output: GPT-2 / Llama sequence classifiers (``score`` on every
token, the last real token returned) and multiple choice (one score per choice, returned as ``(B, choices)``).
The per-sample outputs are pooled as the model pooled their mean: the loss equals the one computed with the
model's own pooling written out by hand (``postprocess=``), through ``compute_loss`` and the Trainer."""

import pytest
import torch
from conftest import tiny_bert_config
from transformers import BertForMultipleChoice
from zoo import build

import surgery
from training_setup import trainer_args

PAD = 1


def _padded(name):
    model = build(name, pad_token_id=PAD).train()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 60, (4, 7), generator=g)
    ids[0, 4:] = PAD  # rows of different lengths: the model pools each row's last real token
    ids[2, 6:] = PAD
    mask = (ids != PAD).long()
    return model, {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1, 0])}


def _last_real(batch):
    ids = batch["input_ids"]
    last = (torch.arange(ids.shape[1]) * (ids != PAD)).argmax(-1)  # transformers' own rule
    return lambda s: s[:, torch.arange(ids.shape[0]), last]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_msd_loss_pools_the_last_real_token_as_the_model_does(name):
    model, batch = _padded(name)
    surgery.apply(model, msd=4, msd_p=0.3)
    torch.manual_seed(0)
    auto = surgery.compute_loss(model, batch)  # msd_loss by default: the model has an MSD head
    torch.manual_seed(0)
    by_hand, _ = surgery.msd_loss(model, batch, postprocess=_last_real(batch))
    assert torch.equal(auto.loss, by_hand)
    torch.manual_seed(0)
    both = surgery.compute_loss(model, batch, rdrop_alpha=1.0)  # R-Drop's two passes pooled the same way
    assert torch.isfinite(both.loss) and both.consistency is not None


def test_trainer_trains_a_gpt2_classifier_with_the_msd_loss(tmp_path):
    model, batch = _padded("gpt2")
    surgery.apply(model, msd=4)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(4)] * 2
    trainer = surgery.SurgeryTrainer(model=model, args=trainer_args(str(tmp_path), 2), train_dataset=rows)
    assert trainer.msd_loss is True
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))


def test_multiple_choice_msd_loss_scores_each_choice():
    torch.manual_seed(0)
    model = BertForMultipleChoice(tiny_bert_config()).train()
    surgery.apply(model, msd=4)
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(5, 50, (3, 4, 6), generator=g), "labels": torch.tensor([0, 3, 2])}
    torch.manual_seed(0)
    auto = surgery.compute_loss(model, batch)
    torch.manual_seed(0)
    by_hand, _ = surgery.msd_loss(model, batch, postprocess=lambda s: s.view(s.shape[0], -1, 4))
    assert torch.equal(auto.loss, by_hand)


def test_one_output_classification_names_both_fixes():
    with pytest.raises(surgery.SurgeryError, match=r"task='regression'.*multiple choice.*postprocess="):
        surgery.msd_sample_loss(torch.randn(4, 6, 1), torch.tensor([0, 1, 0, 1, 0, 1]))
