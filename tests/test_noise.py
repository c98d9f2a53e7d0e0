"""``surgery.train_noise`` is a diagnostic: it leaves the model bitwise as it found it (parameters,
gradients, buffers such as BatchNorm's running statistics, module attributes, config fields,
train/eval flags, generators), and on every zoo model it agrees with ``describe``'s left-on list."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from agreement import check_agreement
from torch import nn
from zoo import NAMES, batch, build

import surgery
from surgery import train_noise


def state(model: nn.Module) -> dict:
    """Everything a diagnostic must leave as it was, in comparable form."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "objects": {k: id(v) for k, v in model.state_dict(keep_vars=True).items()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "attrs": [(n, sorted(vars(m)), [id(v) for v in vars(m).values()]) for n, m in model.named_modules()],
        "flags": [m.training for m in model.modules()],
        "config": model.config.to_json_string() if hasattr(model, "config") else None,
        "rng": (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()),
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["tensors"].keys() == b["tensors"].keys() and a["objects"] == b["objects"]
    for k, v in a["tensors"].items():  # bitwise, NaN included
        w = b["tensors"][k]
        assert v.dtype == w.dtype and v.shape == w.shape and torch.equal(v.view(-1).view(torch.uint8),
                                                                          w.view(-1).view(torch.uint8)), k
    assert a["grads"].keys() == b["grads"].keys()
    for k, g in a["grads"].items():
        assert (g is None) == (b["grads"][k] is None) and (g is None or torch.equal(g, b["grads"][k])), k
    assert a["attrs"] == b["attrs"] and a["flags"] == b["flags"] and a["config"] == b["config"]
    assert torch.equal(a["rng"][0], b["rng"][0]) and (a["rng"][1] == b["rng"][1]).all() and a["rng"][2] == b["rng"][2]


class Counter(nn.Module):
    """What a forward can change besides BatchNorm: an attribute, a cache, an in-place parameter write
    (``nn.Embedding(max_norm=)`` renormalises its rows), ``.data`` swapped, a generator it holds."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8, max_norm=0.5)
        self.bn = nn.BatchNorm1d(8)
        self.lin = nn.Linear(8, 3)
        self.calls, self.cache = 0, {}
        self.gen = torch.Generator().manual_seed(3)
        self.rng = np.random.default_rng(0)

    def forward(self, ids):
        self.calls += 1
        self.cache[self.calls] = ids.shape
        x = self.bn(self.emb(ids).mean(1))
        x = x + torch.rand(x.shape, generator=self.gen) * 0  # a draw from the module's own generator
        x = x + float(self.rng.random()) * 0
        self.lin.bias.data = self.lin.bias.data + 1  # replaced, not written
        return self.lin(x)


def test_batchnorm_statistics_and_eval_predictions_stay():
    """The issue's case: a training forward updates running_mean/var and num_batches_tracked."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 2)).eval()
    x = torch.randn(16, 4) * 3 + 1
    before, predictions = state(model), model(x)
    assert train_noise(model, x) == ["dropout(p=0.2)"]
    assert_same(before, state(model))
    assert torch.equal(model(x), predictions) and not model.training


def test_attributes_caches_parameters_and_held_generators_stay():
    torch.manual_seed(0)
    model = Counter().train()
    with torch.no_grad():
        model.emb.weight.mul_(3)  # rows above max_norm: the forward renormalises them in place
    ids = torch.randint(0, 10, (4, 5))
    model.lin.weight.grad = torch.ones_like(model.lin.weight)
    before = state(model)
    gen, rng = model.gen.get_state(), model.rng.bit_generator.state
    assert train_noise(model, ids) == ["rand", "Counter.rng advanced"]
    assert_same(before, state(model))
    assert model.calls == 0 and model.cache == {} and model.training
    assert torch.equal(model.gen.get_state(), gen) and model.rng.bit_generator.state == rng


def test_the_model_is_put_back_when_the_forward_raises():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.BatchNorm1d(5), nn.Linear(4, 3)).eval(), torch.randn(8, 5)
    before = state(model)
    with pytest.raises(RuntimeError):
        train_noise(model, x)  # BatchNorm runs, the Linear refuses the width
    assert_same(before, state(model))


def test_one_point_draws_are_not_noise():
    """A draw that gives a constant (jitter at 0.0 still drawn: ``uniform_(1.0, 1.0)``) is not listed."""
    class Jitter(nn.Module):
        def __init__(self, eps):
            super().__init__()
            self.eps = eps

        def forward(self, x):
            return x * torch.empty_like(x).uniform_(1.0 - self.eps, 1.0 + self.eps)
    x = torch.randn(3, 4)
    assert train_noise(Jitter(0.1), x) == ["uniform_"]
    assert train_noise(Jitter(0.0), x) == []


ZOO_PARAMS = [n if n in ("bert", "swin", "wav2vec2") else pytest.param(n, marks=pytest.mark.slow) for n in NAMES]


@pytest.mark.parametrize("name", ZOO_PARAMS)
def test_zoo_model_stays_bitwise(name):
    model, inputs = build(name, drop=0.1), batch(name)
    before = state(model)
    assert train_noise(model, **inputs)
    assert_same(before, state(model))


@pytest.mark.parametrize("name", ZOO_PARAMS)
def test_describe_and_train_noise_agree_on_the_zoo(name):
    model, inputs = build(name, drop=0.1), batch(name)
    model(**inputs)  # the first call may fill config fields (problem_type)
    check_agreement(model, lambda: train_noise(model, **inputs))


def test_functional_dropout_with_a_float_rate_is_reported():
    """Sanity: the recorder still sees functional dropout in a plain module."""
    class F1(nn.Module):
        def forward(self, x):
            return F.dropout(x, 0.3, self.training)
    assert train_noise(F1(), torch.randn(2, 3)) == ["dropout(p=0.3)"]


def test_lazy_model_is_refused_before_the_forward():
    """A forward would materialise a lazy module: the diagnostic refuses instead of changing the model."""
    model = nn.Sequential(nn.LazyLinear(3), nn.Dropout(0.1))
    with pytest.raises(surgery.SurgeryError, match="would materialise the lazy module owning '0.weight'"):
        train_noise(model, torch.randn(2, 4))
    assert isinstance(model[0].weight, nn.parameter.UninitializedParameter)
    model(torch.randn(2, 4))
    assert train_noise(model, torch.randn(2, 4)) == ["dropout(p=0.1)"]
