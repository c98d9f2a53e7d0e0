"""A Mixout layer replaced after apply (``resize_token_embeddings`` on an untied LM head builds a plain one) is
refused at the next training forward, before anything trains without it; eval forwards, PEFT wrapping the
layer, and the forwards after revert are not affected."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import surgery

CFG = dict(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32, tie_word_embeddings=False)


def _lm():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", **CFG))


def test_resized_untied_lm_head_is_refused_at_the_next_training_forward():
    model = surgery.apply(_lm(), mixout=0.1)
    model.resize_token_embeddings(60)  # a new, plain lm_head
    x = torch.randint(0, 50, (2, 5))
    model.eval()
    model(input_ids=x)  # eval: every Mixout layer is the plain layer anyway
    model.train()
    with pytest.raises(surgery.SurgeryError, match=r"Mixout layer 'lm_head' was replaced after surgery.apply "
                                                   r"\(it holds Linear now\).*exclude=\['lm_head'\]"):
        model(input_ids=x)


def test_peft_wrapping_a_mixout_layer_is_not_a_replacement():
    import peft
    model = surgery.apply(_lm(), mixout=0.1)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["c_attn"]))
    wrapped.train()
    wrapped(input_ids=torch.randint(0, 50, (2, 5)))  # the LoRA layer keeps the Mixout layer as base_layer


def test_revert_removes_the_check():
    model = surgery.apply(_lm(), mixout=0.1)
    hooks = dict(model._forward_pre_hooks)
    assert len(hooks) == 1
    surgery.revert(model)
    assert not model._forward_pre_hooks
    model.lm_head = torch.nn.Linear(16, 50, bias=False)
    model.train()(input_ids=torch.randint(0, 50, (2, 5)))
