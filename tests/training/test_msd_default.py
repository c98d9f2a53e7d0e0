"""A model with an MSD head trains on the paper's loss (the mean of the K per-sample losses) through
``compute_loss`` and the Trainer by default; ``msd_loss=False`` opts out to the head's averaged output."""

import pytest
import torch
from training_setup import batch, dataset, pretrained, surgered, trainer_args
from transformers import Trainer

import surgery


def test_compute_loss_defaults_to_the_paper_loss_with_an_msd_head():
    m = surgered().train()
    b = batch()
    torch.manual_seed(0)
    default = surgery.compute_loss(m, b).loss
    torch.manual_seed(0)
    assert torch.equal(default, surgery.msd_loss(m, b)[0])
    torch.manual_seed(0)
    opted_out = surgery.compute_loss(m, b, msd_loss=False).loss
    torch.manual_seed(0)
    assert torch.equal(opted_out, m(**b).loss)  # the model's own loss on the averaged output
    assert not torch.equal(default, opted_out)
    m.eval()
    assert torch.equal(surgery.compute_loss(m, b).loss, m(**b).loss)  # eval: the head is the plain head
    with pytest.raises(surgery.SurgeryTypeError, match="msd_loss must be"):
        surgery.compute_loss(m, b, msd_loss="yes")


def test_without_an_msd_head_the_default_is_the_models_own_loss():
    m = surgery.apply(pretrained(), mixout=0.1).train()
    torch.manual_seed(0)
    got = surgery.compute_loss(m, batch()).loss
    torch.manual_seed(0)
    assert torch.equal(got, m(**batch()).loss)


def test_trainer_defaults_to_the_paper_loss_and_opts_out(tmp_path):
    args = trainer_args(str(tmp_path), 1)
    assert surgery.SurgeryTrainer(model=surgered(), args=args, train_dataset=dataset(8)).msd_loss is True
    assert surgery.SurgeryTrainer(model=surgered(), args=args, train_dataset=dataset(8), msd_loss=False).msd_loss is False
    plain = surgery.apply(pretrained(), mixout=0.1)
    assert surgery.SurgeryTrainer(model=plain, args=args, train_dataset=dataset(8)).msd_loss is False


class OwnLoss(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch) * 2


def test_a_trainer_with_its_own_loss_keeps_it_unless_msd_loss_is_asked_for(tmp_path):
    args = trainer_args(str(tmp_path), 1)
    cls = surgery.trainer_class(OwnLoss)
    assert cls(model=surgered(), args=args, train_dataset=dataset(8)).msd_loss is False
    with pytest.raises(surgery.SurgeryError, match="not the model's own"):
        cls(model=surgered(), args=args, train_dataset=dataset(8), msd_loss=True)
