"""A model compiled and run before ``apply(msd=K)`` (``Trainer(torch_compile=True)``, Accelerate): the compiled
model runs the MSD head from the next call on, and stops running it after ``revert``."""

import copy

import torch
from conftest import tiny_bert

import surgery


def test_msd_takes_effect_on_a_model_compiled_before_apply():
    model = tiny_bert(0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
    plain = copy.deepcopy(model)
    x = torch.randint(5, 50, (4, 8))
    compiled = torch.compile(model, backend="eager")  # dynamo's guards decide; the backend does not matter
    compiled(input_ids=x)  # compiled and run once, as the Trainer does
    surgery.apply(model, msd=4, msd_p=0.5)
    for seed in range(2):
        torch.manual_seed(seed)
        got = compiled(input_ids=x).logits
        torch.manual_seed(seed)
        eager = model(input_ids=x).logits
        assert (eager - plain(input_ids=x).logits).abs().max() > 1e-3  # the head's dropout samples change it
        torch.testing.assert_close(got, eager)
    surgery.revert(model)
    torch.testing.assert_close(compiled(input_ids=x).logits, plain(input_ids=x).logits)
