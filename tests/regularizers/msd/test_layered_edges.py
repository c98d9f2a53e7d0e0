"""The layer-weighted MSD head outside its happy path: a model that calls its backbone twice per forward,
the head or the backbone called by themselves, ``msd_pool="last"`` without an attention mask, float32 layer
weights, and per-group optimizer options."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel

import surgery
import surgery.layers.msd as msd
import zoo

K, P = 5, 0.5
LAYERED = dict(msd=K, msd_p=P, msd_layers=True)


def _backbone():
    return AutoModel.from_config(AutoConfig.for_model("bert", **zoo.ZOO["bert"].cfg))


class TwoTowers(nn.Module):
    """Question and answer through the same backbone, their CLS vectors summed into one Linear."""

    def __init__(self):
        super().__init__()
        self.backbone = _backbone()
        self.classifier = nn.Linear(zoo.HIDDEN, 3)

    def forward(self, q, a):
        hq = self.backbone(input_ids=q).last_hidden_state[:, 0]
        ha = self.backbone(input_ids=a).last_hidden_state[:, 0]
        return self.classifier(hq + ha)


class OneTower(nn.Module):
    def __init__(self, pool_positional=False):
        super().__init__()
        self.backbone = _backbone()
        self.classifier = nn.Linear(zoo.HIDDEN, 3)
        self.positional = pool_positional

    def forward(self, input_ids, attention_mask=None):
        if self.positional:
            out = self.backbone(input_ids, attention_mask)
        else:
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        return self.classifier(out.last_hidden_state[:, 0])


def _ids(seed=1, b=3, t=7):
    return torch.randint(3, zoo.VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def _pooled(model, hs, idx):
    w = torch.softmax(model.layer_pool.layer_weights, 0)
    rows = torch.arange(hs[0].shape[0])
    return (w * torch.stack([h[rows, idx] for h in hs], -1)).sum(-1)


# ---- one backbone call per forward ------------------------------------------------------------------------

@pytest.mark.parametrize("train", [False, True])
def test_a_second_backbone_call_in_one_forward_is_refused_at_that_call(train):
    torch.manual_seed(0)
    model = surgery.apply(TwoTowers(), **LAYERED).train(train)
    calls = []
    model.backbone.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    with pytest.raises(surgery.SurgeryError, match=r"TwoTowers called its backbone 'backbone' a second time in one "
                                                   r"forward \(two towers.*plain msd=K head"):
        model(_ids(1), _ids(2))
    assert len(calls) == 1  # refused before the second tower ran
    # the failed forward left nothing behind: the head by itself runs on its own input
    x = torch.randn(2, zoo.HIDDEN)
    model.eval()
    assert torch.equal(model.classifier(x), F.linear(x, model.classifier.weight, model.classifier.bias))


def test_the_head_by_itself_after_a_forward_sees_its_own_input():
    torch.manual_seed(0)
    model = surgery.apply(OneTower().eval(), **LAYERED)
    with torch.no_grad():
        model.layer_pool.layer_weights.copy_(torch.tensor([0.3, -1.0, 0.5]))
    ids = _ids()
    logits = model(ids)  # leaves nothing for a later head call
    head = model.classifier
    x = torch.randn(4, zoo.HIDDEN)
    assert torch.equal(head(x), F.linear(x, head.weight, head.bias))  # eval: the plain Linear on x
    head.train()
    torch.manual_seed(5)
    with surgery.msd_samples(model) as got:
        out = head(x)
    torch.manual_seed(5)
    masks = msd.draw_masks(x, K, P)
    samples = F.linear(msd.stack_samples(x, K, P, masks), head.weight, head.bias).view(K, 4, 3)
    assert torch.equal(out, samples.mean(0)) and torch.equal(got[0], samples)  # train: MSD of its own input
    with torch.no_grad():  # and the model's own forward read the pooled hidden states
        hs = model.backbone(input_ids=ids, output_hidden_states=True).hidden_states
    assert torch.equal(logits, F.linear(_pooled(model, hs, torch.zeros(3, dtype=torch.long)), head.weight, head.bias))


@pytest.mark.parametrize("how", ["model.forward", "backbone then head"])
def test_backbone_and_head_outside_a_call_of_the_model_are_refused(how):
    torch.manual_seed(0)
    model = surgery.apply(OneTower().eval(), **LAYERED)
    ids = _ids()
    with pytest.raises(surgery.SurgeryError, match=r"the head 'classifier' ran after a forward of the backbone "
                                                   r"'backbone', both outside a call of OneTower.*model\(\.\.\.\)"):
        if how == "model.forward":
            model.forward(ids)
        else:
            model.classifier(model.backbone(input_ids=ids).last_hidden_state[:, 0])
    ref = model(ids)  # a call of the model afterwards is the head's usual forward
    with torch.no_grad():
        hs = model.backbone(input_ids=ids, output_hidden_states=True).hidden_states
    assert torch.equal(ref, F.linear(_pooled(model, hs, torch.zeros(3, dtype=torch.long)), model.classifier.weight,
                                     model.classifier.bias))


def test_a_backbone_call_by_itself_returns_the_plain_output():
    torch.manual_seed(0)
    model = surgery.apply(OneTower().eval(), **LAYERED)
    ids = _ids()
    out = model.backbone(input_ids=ids)
    assert out.hidden_states is None
    surgery.revert(model, drop_layer_weights=True)
    assert torch.equal(model.backbone(input_ids=ids).last_hidden_state, out.last_hidden_state)


# ---- msd_pool="last" without a mask --------------------------------------------------------------------

def _transformers_last(ids, pad):
    """transformers' GPT-2/Llama sequence-classification rule: the rightmost token that is not padding."""
    return (torch.arange(ids.shape[1]) * (ids != pad).int()).argmax(-1)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_last_without_a_mask_pools_the_last_non_pad_token(name):
    model = surgery.apply(zoo.build(name), **LAYERED, msd_pool="last")
    with torch.no_grad():
        model.layer_pool.layer_weights.copy_(torch.tensor([0.2, -0.5, 0.1]))
    pad = model.config.pad_token_id
    ids = _ids(3)
    ids[0, -2:] = pad  # right padding
    ids[1, :3] = pad  # left padding
    idx = _transformers_last(ids, pad)
    assert idx.tolist() == [4, 6, 6]
    out = model(input_ids=ids).logits
    backbone = model.get_submodule(surgery.get_record(model).msd[0].layers.backbone)
    with torch.no_grad():
        hs = backbone(input_ids=ids, output_hidden_states=True).hidden_states
    assert torch.equal(out, F.linear(_pooled(model, hs, idx), model.score.weight))
    assert not torch.equal(out, F.linear(_pooled(model, hs, torch.full((3,), 6)), model.score.weight))


def test_last_without_a_mask_reads_input_ids_passed_positionally():
    torch.manual_seed(0)
    model = surgery.apply(OneTower(pool_positional=True).eval(), **LAYERED, msd_pool="last")
    ids = _ids(4)
    ids[2, -3:] = model.backbone.config.pad_token_id
    with torch.no_grad():
        hs = model.backbone(ids, output_hidden_states=True).hidden_states
    expect = F.linear(_pooled(model, hs, torch.tensor([6, 6, 3])), model.classifier.weight, model.classifier.bias)
    assert torch.equal(model(ids), expect)


@pytest.mark.parametrize("case", ["no pad token id", "inputs_embeds"])
def test_last_without_a_mask_and_without_pad_information_is_refused_for_several_rows(case):
    cfg = dict(zoo.ZOO["gpt2"].cfg)
    if case == "no pad token id":
        cfg.pop("pad_token_id")
    torch.manual_seed(0)
    model = zoo.build("gpt2") if case == "inputs_embeds" else \
        getattr(__import__("transformers"), zoo.ZOO["gpt2"].cls)(AutoConfig.for_model("gpt2", num_labels=3, **cfg))
    surgery.apply(model.eval(), **LAYERED, msd_pool="last")
    ids = _ids(5)
    batch = {"inputs_embeds": model.transformer.wte(ids)} if case == "inputs_embeds" else {"input_ids": ids}
    why = "no pad token id in the config" if case == "no pad token id" else r"inputs_embeds, no input_ids"
    with pytest.raises(surgery.SurgeryError, match=rf"msd_pool='last' .*3 rows has no attention_mask and {why}.*"
                                                   r"pass attention_mask"):
        model(**batch)
    one = {k: v[:1] for k, v in batch.items()}  # one row: its last position, as transformers' head takes it
    out = model(**one).logits
    with torch.no_grad():
        hs = model.transformer(**one, output_hidden_states=True).hidden_states
    assert torch.equal(out, F.linear(_pooled(model, hs, torch.tensor([6])), model.score.weight))
    if case == "inputs_embeds":  # with a mask: fine (without a pad token id GPT-2's own head refuses several rows)
        mask = torch.ones(3, 7, dtype=torch.long)
        assert model(**batch, attention_mask=mask).logits.shape == (3, 3)


# ---- float32 layer weights ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_layer_weights_are_at_least_float32(dtype):
    model = surgery.apply(zoo.build("bert").to(dtype), **LAYERED)
    assert model.layer_pool.layer_weights.dtype == torch.promote_types(torch.float32, dtype)
    batch = {k: v for k, v in zoo.batch("bert", model).items() if k != "labels"}
    assert model(**batch).logits.dtype == dtype


# ---- optimizer groups -----------------------------------------------------------------------------------

def _model():
    return surgery.apply(zoo.build("roberta"), mixout=0.1, **LAYERED)


def test_layer_weights_get_their_own_group_and_options():
    model = _model()
    groups = surgery.param_groups(model, lr=2e-5, head_lr=1e-2, weight_decay=0.01,
                                  head_options={"betas": (0.9, 0.98)}, layer_weight_options={"weight_decay": 0.0})
    backbone, head, layers = groups
    assert [id(p) for p in layers["params"]] == [id(model.layer_pool.layer_weights)]
    assert {id(p) for p in head["params"]} == {id(model.classifier.out_proj.weight), id(model.classifier.out_proj.bias)}
    assert (backbone["lr"], backbone["weight_decay"], "betas" in backbone) == (2e-5, 0.01, False)
    assert (head["lr"], head["weight_decay"], head["betas"]) == (1e-2, 0.01, (0.9, 0.98))
    assert (layers["lr"], layers["weight_decay"], layers["betas"]) == (1e-2, 0.0, (0.9, 0.98))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    listed = [id(p) for g in groups for p in g["params"]]
    assert len(listed) == len(set(listed)) and set(listed) == trainable
    own = surgery.param_groups(model, lr=2e-5, head_lr=1e-2, layer_weight_options={"lr": 1e-1})
    assert own[2]["lr"] == 1e-1 and own[1]["lr"] == 1e-2
    torch.optim.AdamW(groups)


def _steps_with_zero_gradient(model, groups, n=20):
    opt = torch.optim.AdamW(groups)
    for _ in range(n):
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        opt.step()


def test_the_originals_optimizer_leaves_the_layer_weights_alone_without_gradient():
    """QUEST 2nd place: AdamW, backbone at lr, classifier + layer weights at 500 lr, weight_decay=0 everywhere."""
    model = _model()
    w0 = model.layer_pool.layer_weights.detach().clone()
    _steps_with_zero_gradient(model, surgery.param_groups(model, lr=2e-5, head_lr=500 * 2e-5, weight_decay=0.0))
    assert torch.equal(model.layer_pool.layer_weights, w0)
    # AdamW's default weight decay (0.01) moves them with no gradient at all; per-group options keep it off them
    model = _model()
    _steps_with_zero_gradient(model, surgery.param_groups(model, lr=2e-5, head_lr=500 * 2e-5))
    assert not torch.equal(model.layer_pool.layer_weights, w0)
    model = _model()
    _steps_with_zero_gradient(model, surgery.param_groups(model, lr=2e-5, head_lr=500 * 2e-5, weight_decay=0.01,
                                                          layer_weight_options={"weight_decay": 0.0}))
    assert torch.equal(model.layer_pool.layer_weights, w0)


def test_options_of_any_loaded_optimizer_class_are_accepted():
    from transformers.optimization import Adafactor

    model = _model()
    groups = surgery.param_groups(model, lr=1e-3, head_lr=1e-2, scale_parameter=False, relative_step=False)
    Adafactor(groups)


@pytest.mark.parametrize("kw, err, match", [
    (dict(weight_decy=0.0), surgery.SurgeryError, r"keyword arguments: unknown optimizer option 'weight_decy'"),
    (dict(head_options={"wd": 0.0}), surgery.SurgeryError, r"head_options: unknown optimizer option 'wd'"),
    (dict(head_options={"lr": 1.0}), surgery.SurgeryError, r"head_options sets 'lr'.*head_lr="),
    (dict(layer_weight_options={"params": []}), surgery.SurgeryError, r"sets 'params'"),
    (dict(head_options=[("weight_decay", 0.0)]), surgery.SurgeryTypeError, r"head_options must be a dict"),
    (dict(layer_weight_options_={"weight_decay": 0.0}), surgery.SurgeryError, r"unknown optimizer option "
                                                                              r"'layer_weight_options_'"),
])
def test_param_groups_option_errors(kw, err, match):
    with pytest.raises(err, match=match):
        surgery.param_groups(_model(), lr=1e-5, head_lr=1e-3, **kw)


def test_layer_weight_options_without_a_layer_weighted_head_are_refused():
    with pytest.raises(surgery.SurgeryError, match=r"layer_weight_options .* has none .*msd_layers=True"):
        surgery.param_groups(surgery.apply(zoo.build("bert"), msd=4), lr=1e-5, head_lr=1e-3,
                             layer_weight_options={"weight_decay": 0.0})
