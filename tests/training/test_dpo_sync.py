"""TRL's DPO with ``sync_ref_model=True`` mixes the policy's parameters into the reference model's, pair by pair
by position. A plain reference beside a surgered policy is refused
at construction, naming the order that works; a reference copied after apply pairs exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from test_trl import llama, tokenizer
from transformers import LlamaForCausalLM
from trl import DPOConfig, DPOTrainer
from trl.trainer.callbacks import SyncRefModelCallback

import surgery

DPO = surgery.trainer_class(DPOTrainer)


def _data():
    return Dataset.from_dict({"prompt": ["the cat", "a dog", "the mat", "a big"] * 2,
                              "chosen": [" sat on", " ran far", " is red", " dog"] * 2,
                              "rejected": [" blue", " mat", " and", " the"] * 2})


def _args(out):
    return DPOConfig(str(out), sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5, max_steps=1,
                     per_device_train_batch_size=4, report_to=[], use_cpu=True, bf16=False, disable_tqdm=True,
                     save_strategy="no")


@pytest.fixture
def policy(tmp_path):
    llama().save_pretrained(tmp_path / "pre")  # DPO loads its reference from the policy's checkpoint path
    return surgery.apply(LlamaForCausalLM.from_pretrained(tmp_path / "pre"), mixout=0.2)


def test_a_plain_reference_synced_by_position_is_refused(policy, tmp_path):
    with pytest.raises(surgery.SurgeryError, match=r"sync_ref_model=True mixes .* by position.*"
                                                   r"ref_model=copy.deepcopy\(model\) made after surgery.apply"):
        DPO(model=policy, args=_args(tmp_path / "run"), train_dataset=_data(), processing_class=tokenizer())


def test_a_reference_copied_after_apply_syncs_pair_by_pair(policy, tmp_path):
    ref = copy.deepcopy(policy)
    trainer = DPO(model=policy, ref_model=ref, args=_args(tmp_path / "run"), train_dataset=_data(),
                  processing_class=tokenizer())
    trainer.train()
    assert not ref.training  # the reference runs in eval mode: its Mixout layers are the plain layers
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    SyncRefModelCallback.sync_target_model(policy, ref, 0.5)
    mine = policy.state_dict()
    for k, v in ref.state_dict().items():  # each tensor mixed with its own partner, by name
        torch.testing.assert_close(v, 0.5 * before[k] + 0.5 * mine[k], rtol=0, atol=1e-6)
