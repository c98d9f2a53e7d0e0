"""The tiny "pretrained" model, its surgered form, a dataset and Trainer arguments the training tests share
(training/, test_distributed.py, test_exporting.py, and the subprocesses they start)."""

from __future__ import annotations

import torch
from conftest import tiny_bert_config
from transformers import AutoModelForSequenceClassification, TrainerCallback, TrainingArguments

import surgery

SURGERY = dict(mixout=0.3, msd=4, dropout=0.1)

def tiny_config(num_labels=3, layers=1, **kw):
    return tiny_bert_config(num_labels=num_labels, layers=layers, **kw)


def pretrained(seed=0, **kw):
    """The 'pretrained' tiny model: the same weights for the same seed, in every process."""
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(tiny_config(**kw))


def surgered(seed=0, **kw):
    return surgery.apply(pretrained(seed, **kw), **SURGERY)


def dataset(n=24, seq=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(5, 50, (seq,), generator=g), "labels": int(torch.randint(0, 3, (1,), generator=g))}
            for _ in range(n)]


def batch(n=4, seq=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(5, 50, (n, seq), generator=g), "labels": torch.randint(0, 3, (n,), generator=g)}


def trainer_args(out, steps, save_steps=0, **kw):
    return TrainingArguments(out, max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2, seed=1,
                             save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
                             logging_steps=2, report_to=[], use_cpu=True, disable_tqdm=True, **kw)


class StopAt(TrainerCallback):
    """Ends training after ``step`` optimizer steps: an interrupted run (the checkpoint at ``step`` is written)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def perturb(model, scale=0.5, seed=123):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


def targets(model):
    return {k: v for k, v in model.state_dict().items() if k.endswith(".mixout_target")}


def assert_targets_are_pretrained(model, seed=0):
    ref = pretrained(seed).state_dict()
    t = targets(model)
    assert t
    for k, v in t.items():
        assert torch.equal(v, ref[k[: -len(".mixout_target")] + ".weight"]), k
