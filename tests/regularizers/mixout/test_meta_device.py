"""Models whose weights hold no data (meta device, lazy modules, FakeTensorMode): Mixout is refused
before anything changes (its targets would copy nothing); dropout control and multi-sample dropout,
which touch no tensor data, work exactly on a meta model whose weights are loaded afterwards."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_untouched, snapshot, tiny_bert_config
from torch import nn
from transformers import AutoModelForSequenceClassification

import surgery
from surgery import SurgeryError

LOAD = (r"load the pretrained weights first \(from_pretrained, or load_state_dict\(state_dict, assign=True\) on a model "
        r"built on the meta device\), then call surgery.apply$")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 16)
        self.drop = nn.Dropout(0.3)
        self.classifier = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        return self.classifier(self.drop(torch.tanh(self.body(x))))


@pytest.mark.parametrize("kwargs", [dict(mixout=0.1), dict(mixout=0.1, dropout=0.0, msd=4),
                                    dict(mixout=0.2, include=["classifier"])])
def test_mixout_on_a_meta_model_is_refused_and_nothing_changes(kwargs):
    with torch.device("meta"):
        model = Net()
    snap = snapshot(model)
    with pytest.raises(SurgeryError, match=r"^parameter 'body.weight' is on the meta device, so it holds no weights: "
                                           r"Mixout copies the pretrained weights as its targets; " + LOAD):
        surgery.apply(model, **kwargs)
    assert_untouched(model, snap)


def test_a_transformers_model_built_on_meta_is_refused():
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(tiny_bert_config())
    snap = snapshot(model)
    with pytest.raises(SurgeryError, match=r"^parameter 'bert.embeddings.word_embeddings.weight' is on the meta "
                                           r"device, so it holds no weights: .*" + LOAD):
        surgery.apply(model, mixout=0.1)
    assert_untouched(model, snap)


def test_a_meta_buffer_is_refused_too():
    model = Net()
    model.register_buffer("scale", torch.empty(3, device="meta"))
    snap = snapshot(model)
    with pytest.raises(SurgeryError, match=r"^buffer 'scale' is on the meta device, so it holds no weights"):
        surgery.apply(model, mixout=0.1)
    assert_untouched(model, snap)


def test_a_lazy_module_before_its_first_forward_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.LazyLinear(3))
    classes = [(n, type(m)) for n, m in model.named_modules()]
    w0 = model[0].weight.detach().clone()
    with pytest.raises(SurgeryError, match=r"^parameter '1.weight' is uninitialized \(a lazy module before its first "
                                           r"forward\), so it holds no weights: Mixout copies the pretrained weights "
                                           r"as its targets; run one forward to materialise the lazy modules and "
                                           + LOAD):
        surgery.apply(model, mixout=0.1)
    assert [(n, type(m)) for n, m in model.named_modules()] == classes
    assert isinstance(model[1].weight, nn.parameter.UninitializedParameter)
    assert torch.equal(model[0].weight, w0) and not surgery.is_surgered(model)


def test_fake_tensor_weights_are_refused():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        model = Net()
    classes = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(SurgeryError, match=r"^parameter 'body.weight' is a fake tensor \(FakeTensorMode\), so it holds "
                                           r"no weights: Mixout copies the pretrained weights as its targets; apply "
                                           r"surgery to the real model, outside FakeTensorMode$"):
        surgery.apply(model, mixout=0.1)
    assert [(n, type(m)) for n, m in model.named_modules()] == classes
    assert not surgery.is_surgered(model)


def test_dropout_and_msd_on_a_meta_model_then_loading_the_weights_is_exact():
    # the big-model flow: build on meta (no memory), apply what needs no data, load the weights with assign=True
    torch.manual_seed(0)
    real = Net()
    pretrained = {k: v.clone() for k, v in real.state_dict().items()}
    with torch.device("meta"):
        meta = Net()
    surgery.apply(meta, dropout=0.0, msd=4, msd_p=0.3)
    meta.load_state_dict(pretrained, assign=True)
    surgery.apply(real, dropout=0.0, msd=4, msd_p=0.3)
    assert surgery.get_record(meta).to_json() == surgery.get_record(real).to_json()
    x = torch.randn(5, 6)
    outs = []
    for m in (meta, real):
        m.train()
        torch.manual_seed(3)
        outs.append(m(x))
    assert torch.equal(outs[0], outs[1])
    surgery.revert(meta)
    assert meta.drop.p == 0.3 and not surgery.is_surgered(meta)
    assert meta.state_dict().keys() == pretrained.keys()
    assert all(torch.equal(meta.state_dict()[k], v) for k, v in pretrained.items())
    assert torch.equal(meta.eval()(x), surgery.revert(real).eval()(x))


def test_mixout_after_loading_the_weights_into_a_meta_model_mixes_toward_them():
    torch.manual_seed(0)
    pretrained = Net().state_dict()
    with torch.device("meta"):
        model = Net()
    model.load_state_dict(pretrained, assign=True)
    surgery.apply(model, mixout=0.1)
    assert torch.equal(model.body.mixout_target, pretrained["body.weight"])
    assert model.body.weight is not model.body.mixout_target
