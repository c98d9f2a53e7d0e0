"""Dropout control: ``apply(model, dropout=0.0, drop_path=0.0, router_noise=0.0)`` makes
training-mode forwards deterministic and equal to eval, for every zoo architecture (mixture-of-experts
models included: their router jitter is ``router_noise``) and the plain torch dropout modules;
``revert`` restores every original value (modules, attributes, config)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from zoo import NAMES, batch, build, drop_fields

import surgery
from surgery.regularizers.rates import DROP_PATH, DROPOUT, ROUTER_NOISE
from surgery.regularizers.rates.kinds import find_probs
from surgery import train_noise


def tensors(out) -> list[torch.Tensor]:
    """Every tensor of a (nested) model output: logits, hidden states, encoder states..."""
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "keys"):
        return [t for k in out.keys() for t in tensors(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in tensors(o)]
    return []


def forward(model: nn.Module, inputs: dict, *, train: bool, grad: bool = False) -> list[torch.Tensor]:
    model.train(train)
    with torch.set_grad_enabled(grad):
        out = tensors(model(**inputs))
    return [t.detach() for t in out]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def dropout_values(model: nn.Module) -> list[tuple[str, float]]:
    return [(n, m.p) for n, m in model.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)]


def probabilities(model: nn.Module) -> list[tuple[str, str, float]]:
    """Every dropout, stochastic-depth and router-noise level on the modules, and every "drop" config field."""
    mods = [(n, a, v) for kind in (DROPOUT, DROP_PATH, ROUTER_NOISE) for n, a, v in find_probs(model, kind)]
    return mods + [(type(c).__name__, k, getattr(c, k)) for c, k in drop_fields(model.config)]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_dropout_and_drop_path_zero_make_train_forward_equal_eval(name):
    """Acceptance: every config field containing "drop" at 0.1 (LayerDrop and drop-path included);
    ``dropout=0.0, drop_path=0.0, router_noise=0.0`` leaves no random call in a train forward, two
    train forwards are bitwise equal to each other and to eval, and revert restores every value exactly."""
    model = build(name, drop=0.1)
    inputs = {**batch(name), "output_hidden_states": True}
    first = forward(model, inputs, train=False)  # first call may fill config fields (problem_type)
    cfg_json, cfg, probs = model.config.to_json_string(), model.config.to_dict(), probabilities(model)
    assert len(first) > 3  # logits, loss and the hidden states are compared
    # depth schedules: 0.1 * i / (n - 1); a MoE entry's router jitter keeps the zoo's value
    assert {v for _, attr, v in probs if "jitter" not in attr} == {0.1} or name in ("swin", "convnext")
    torch.manual_seed(0)  # LayerDrop: which layers run, so which calls are made, depends on the generator
    noise = train_noise(model, **inputs)
    assert noise and not same(forward(model, inputs, train=True), forward(model, inputs, train=True))

    surgery.apply(model, dropout=0.0, drop_path=0.0, router_noise=0.0)
    assert train_noise(model, **inputs) == []  # no dropout-family call with p > 0, no random draw
    # grad on and off separately: autograd may pick another (equally valid) SDPA kernel
    for grad in (False, True):
        a = forward(model, inputs, train=True, grad=grad)
        b = forward(model, inputs, train=True, grad=grad)
        e = forward(model, inputs, train=False, grad=grad)
        assert same(a, b), f"two train() forwards differ after dropout/drop_path/router_noise=0.0 (grad={grad})"
        assert same(a, e), f"train() forward differs from eval() after dropout/drop_path/router_noise=0.0 (grad={grad})"
    assert same(forward(model, inputs, train=False), first)  # and eval itself is unchanged

    surgery.revert(model)
    assert probabilities(model) == probs
    assert model.config.to_dict() == cfg
    assert model.config.to_json_string() == cfg_json  # what save_pretrained writes
    torch.manual_seed(0)
    assert train_noise(model, **inputs) == noise
    assert not same(forward(model, inputs, train=True), forward(model, inputs, train=True))
    assert same(forward(model, inputs, train=False), first)


# attributes read at call time (functional dropout / attention kernels' dropout_p)
FUNCTIONAL = {
    "bart": ["model.encoder.layers.0.dropout", "model.encoder.layers.0.activation_dropout",
             "model.decoder.layers.1.self_attn.dropout", "model.decoder.layers.1.encoder_attn.dropout"],
    "llama": ["model.layers.0.self_attn.attention_dropout", "model.layers.1.self_attn.attention_dropout"],
    "t5": ["transformer.encoder.block.0.layer.0.SelfAttention.dropout",
           "transformer.decoder.block.1.layer.1.EncDecAttention.dropout"],
    "falcon": ["transformer.h.0.hidden_dropout", "transformer.h.0.self_attention.hidden_dropout"],
    "x-clip": ["prompts_generator.decoder.0.cross_attn.attn_drop"],
}


def _attr(model: nn.Module, dotted: str):
    mod, _, attr = dotted.rpartition(".")
    return getattr(model.get_submodule(mod), attr)


@pytest.mark.parametrize("name", sorted(FUNCTIONAL))
def test_functional_dropout_attributes_set_and_restored(name):
    model = build(name)
    paths = FUNCTIONAL[name]
    old = [_attr(model, p) for p in paths]
    assert all(type(v) is float and v > 0 for v in old)
    surgery.apply(model, dropout=0.0)
    assert [_attr(model, p) for p in paths] == [0.0] * len(paths)
    recorded = {f"{c.module}.{c.attr}" for c in surgery.get_record(model).dropout}
    assert set(paths) <= recorded
    surgery.revert(model)
    assert [_attr(model, p) for p in paths] == old


def test_config_fields_read_in_forward_falcon():
    """Falcon's attention passes ``self.config.attention_dropout`` to SDPA at call time."""
    model = build("falcon")
    inputs = batch("falcon")
    surgery.apply(model, dropout=0.0)
    assert model.config.attention_dropout == 0.0
    assert {tuple(c.path) for c in surgery.get_record(model).config} >= {("attention_dropout",)}
    model.config.attention_dropout = 0.5  # only the config is touched: forwards become random again
    assert not same(forward(model, inputs, train=True), forward(model, inputs, train=True))
    model.config.attention_dropout = 0.0
    assert same(forward(model, inputs, train=True), forward(model, inputs, train=False))


class ConfigReader(nn.Module):
    """Reads its dropout probabilities from its config (and a nested sub-config) at call time."""

    def __init__(self):
        super().__init__()
        self.config = PretrainedConfig(hidden_dropout_prob=0.3, attn_pdrop=0.2)
        self.config.text_config = PretrainedConfig(attention_dropout=0.4)
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        x = F.dropout(self.lin(x), self.config.hidden_dropout_prob, self.training)
        x = F.dropout(x, self.config.attn_pdrop, self.training)
        return F.dropout(x, self.config.text_config.attention_dropout, self.training)


def test_config_fields_and_nested_configs_read_in_forward():
    model = ConfigReader()
    x = torch.randn(4, 8)
    assert not torch.equal(model.train()(x), model(x))
    surgery.apply(model, dropout=0.0)
    assert (model.config.hidden_dropout_prob, model.config.attn_pdrop, model.config.text_config.attention_dropout) \
        == (0.0, 0.0, 0.0)
    assert torch.equal(model.train()(x), model(x)) and torch.equal(model(x), model.eval()(x))
    surgery.revert(model)
    assert (model.config.hidden_dropout_prob, model.config.attn_pdrop, model.config.text_config.attention_dropout) \
        == (0.3, 0.2, 0.4)
    assert "surgery" not in model.config.to_dict()
    assert not torch.equal(model.train()(x), model(x))


class DropoutFamily(nn.Module):
    """Every member of the nn.Dropout family, each on an input of the shape it expects."""

    def __init__(self, p: float = 0.3):
        super().__init__()
        self.lin = nn.Linear(24, 24)
        self.d = nn.Dropout(p)
        self.d1 = nn.Dropout1d(p)
        self.d2 = nn.Dropout2d(p)
        self.d3 = nn.Dropout3d(p)
        self.alpha = nn.AlphaDropout(p)
        self.falpha = nn.FeatureAlphaDropout(p)

    def forward(self, x):  # x: (N, 24)
        x = self.d(self.lin(x))
        x = self.d1(x.view(-1, 4, 6)).flatten(1)  # (N, C, L)
        x = self.d2(x.view(-1, 4, 2, 3)).flatten(1)  # (N, C, H, W)
        x = self.d3(x.view(-1, 4, 2, 3, 1)).flatten(1)  # (N, C, D, H, W)
        x = self.alpha(x)
        return self.falpha(x.view(-1, 4, 6)).flatten(1)


def _check_plain(model: nn.Module, *args):
    def run(train):
        model.train(train)
        out = model(*args)
        return out[0] if isinstance(out, tuple) else out

    before = [(n, m.p) for n, m in model.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    attrs = {n: m.dropout for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    assert not torch.equal(run(True), run(True))
    surgery.apply(model, dropout=0.0)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd))
    a, b, e = run(True), run(True), run(False)
    assert torch.equal(a, b) and torch.equal(a, e)
    surgery.revert(model)
    assert [(n, m.p) for n, m in model.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)] == before
    assert {n: m.dropout for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)} == attrs
    assert not torch.equal(run(True), run(True))


def test_dropout_family_on_plain_module():
    model = DropoutFamily()
    kinds = {type(m) for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)}
    assert kinds == {nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout}
    surgery.apply(model, dropout=0.0)
    assert len(surgery.get_record(model).dropout) == 6
    surgery.revert(model)
    _check_plain(model, torch.randn(5, 24))


def test_multihead_attention_dropout_attribute():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, dropout=0.3)  # a float attribute passed to F.multi_head_attention_forward
    x = torch.randn(5, 3, 16)
    _check_plain(mha, x, x, x)


@pytest.mark.parametrize("batch_first", [False, True])
def test_transformer_encoder_layer(batch_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.3, batch_first=batch_first)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    x = torch.randn(5, 3, 16).requires_grad_()  # grad-enabled input keeps eval off the fused fast path
    _check_plain(encoder, x)
