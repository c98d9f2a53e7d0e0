"""Mixout math: expectation, mask structure, exact gradient, p=0 / p=1, eval, Conv1D layout."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from surgery.layers.mixout import MixLinear, _scale, mixout_weight


def _layer(p, in_f=7, out_f=5, seed=0, bias=True, **kw):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    m = MixLinear.from_module(lin, p, **kw)
    with torch.no_grad():  # move away from the target so mixing is visible
        m.weight.add_(torch.randn_like(m.weight))
    return lin, m


def test_from_linear_shares_parameters_and_to_linear_gives_back_the_same_object():
    lin, m = _layer(0.3)
    assert m.weight is lin.weight and m.bias is lin.bias
    assert isinstance(m, nn.Linear) and m.in_features == 7 and m.out_features == 5
    assert not m.target.requires_grad and m.target.dtype == m.weight.dtype
    assert set(m.state_dict()) == {"weight", "bias", "mixout_target"}
    back = m.to_module()
    assert back is lin and type(back) is nn.Linear and back.weight is m.weight


def test_p0_is_nn_linear_bitwise_in_training():
    lin, m = _layer(0.0)
    m.train()
    x = torch.randn(4, 3, 7, requires_grad=True)
    y = m(x)
    ref = F.linear(x, lin.weight, lin.bias)
    assert torch.equal(y, ref)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, m.weight), g)
    rx, rw = torch.autograd.grad(ref, (x, lin.weight), g)
    assert torch.equal(gx, rx) and torch.equal(gw, rw)


def test_eval_is_the_original_layer_bitwise():
    lin, m = _layer(0.9)
    m.eval()
    x = torch.randn(6, 7)
    assert torch.equal(m(x), F.linear(x, lin.weight, lin.bias))


def test_p1_uses_the_target_alone_and_weight_gets_zero_gradient():
    lin, m = _layer(1.0)
    m.train()
    x = torch.randn(4, 7)
    y = m(x)
    assert torch.equal(y, F.linear(x, m.target, m.bias))
    (gw,) = torch.autograd.grad(y.sum(), (m.weight,))
    assert torch.count_nonzero(gw) == 0


@pytest.mark.parametrize("transposed", [False, True])
def test_mask_is_one_value_per_input_neuron(transposed):
    p = 0.4
    torch.manual_seed(1)
    w = torch.randn(6, 9)  # (out, in), or (in, out) when transposed
    t = torch.randn(6, 9)
    wm = mixout_weight(w, t, p, transposed=transposed)
    cols = wm.t() if transposed else wm  # view as (out, in)
    wl, tl = (w.t(), t.t()) if transposed else (w, t)
    kept = 0
    for j in range(cols.shape[1]):  # each input neuron: all rows target, or all rows rescaled
        if torch.equal(cols[:, j], tl[:, j]):
            continue
        torch.testing.assert_close(cols[:, j], tl[:, j] + (wl[:, j] - tl[:, j]) / (1 - p))
        kept += 1
    assert 0 < kept < cols.shape[1]


def test_mask_is_shared_by_the_whole_batch():
    _, m = _layer(0.5, in_f=64, out_f=8)
    m.train()
    x = torch.randn(1, 64).expand(5, 64).contiguous()
    y = m(x)
    assert all(torch.equal(y[0], y[i]) for i in range(1, 5))


def test_expectation_of_the_mixed_weight_is_the_weight():
    torch.manual_seed(0)
    p, n = 0.3, 40000
    w, t = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    acc = torch.zeros_like(w)
    for _ in range(n // 1000):  # 1000 draws at a time: mix a stacked weight with 1000 x 4 columns
        wb, tb = w.repeat(1, 1000), t.repeat(1, 1000)
        acc += mixout_weight(wb, tb, p).view(3, 1000, 4).sum(1)
    mean = acc / n
    # std of one draw is |w - t| * sqrt(p / (1 - p)); allow 5 standard errors
    tol = 5 * (w - t).abs() * (p / (1 - p)) ** 0.5 / n ** 0.5
    assert ((mean - w).abs() <= tol).all()


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_gradient_is_exact_not_the_reference_m_times_grad(p):
    _, m = _layer(p, in_f=32, out_f=6)
    m.train()
    x = torch.randn(10, 32)
    torch.manual_seed(123)
    y = m(x)
    g = torch.randn_like(y)
    (gw,) = torch.autograd.grad(y, (m.weight,), g)
    # replay the same mask and differentiate through an explicit mixed weight
    torch.manual_seed(123)
    s = _scale(p, 32, m.weight)
    wmix = torch.lerp(m.target, m.weight.detach(), s).requires_grad_()
    (gmix,) = torch.autograd.grad(F.linear(x, wmix, m.bias), (wmix,), g)
    torch.testing.assert_close(gw, s * gmix, rtol=1e-6, atol=1e-6)  # dL/dW = M/(1-p) dL/dW_mix
    mask = (s != 0).to(gmix.dtype)
    assert not torch.allclose(gw, mask * gmix)  # the widely copied reference's M * grad is (1-p) too small


@pytest.mark.parametrize("p", [0.2, 0.7])
def test_low_memory_mode_matches_default_mode(p):
    lin, m = _layer(p, in_f=16, out_f=12)
    lm = MixLinear.from_module(lin, p, target=m.target.clone(), low_memory=True)
    x = torch.randn(3, 5, 16, requires_grad=True)
    outs = []
    for layer in (m, lm):
        layer.train()
        torch.manual_seed(7)
        y = layer(x)
        outs.append((y, *torch.autograd.grad(y, (x, layer.weight, layer.bias), torch.ones_like(y))))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_conv1d_eval_and_p0_are_bitwise_and_training_mixes_per_input_row():
    torch.manual_seed(0)
    conv = Conv1D(5, 7)  # nf=out 5, nx=in 7; weight (7, 5)
    x = torch.randn(2, 3, 7)
    ref = conv(x)
    m = MixLinear.from_module(conv, 0.0)
    assert m.transposed and m.weight is conv.weight and (m.in_features, m.out_features) == (7, 5)
    m.eval()
    assert torch.equal(m(x), ref)
    m.train()
    assert torch.equal(m(x), ref)
    m.mixout_p = 0.5
    with torch.no_grad():
        m.weight.add_(1.0)
    torch.manual_seed(3)
    y = m(x)
    torch.manual_seed(3)
    s = _scale(0.5, 7, m.weight)
    torch.testing.assert_close(y, x @ torch.lerp(m.target, m.weight, s[:, None]) + m.bias)
    assert m.to_module() is conv and type(conv) is Conv1D


def test_target_dtype_keeps_a_smaller_target_and_still_mixes():
    lin, m = _layer(0.3, target_dtype=torch.bfloat16)
    assert m.target.dtype == torch.bfloat16 and m.weight.dtype == torch.float32
    m.train()
    y = m(torch.randn(2, 7))
    assert y.dtype == torch.float32
    y.sum().backward()
    assert m.weight.grad is not None


def test_targets_follow_dtype_and_device_moves():
    _, m = _layer(0.3)
    m.to(torch.float64)
    assert m.target.dtype == m.weight.dtype == torch.float64
    m.bfloat16()
    assert m.target.dtype == m.weight.dtype == torch.bfloat16
    m.train()
    assert m(torch.randn(2, 7, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_bad_p_is_a_clear_error():
    lin = nn.Linear(3, 3)
    for bad in (-0.1, 1.5, float("nan"), "0.1", None, True):
        with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\]"):
            MixLinear.from_module(lin, bad)


def test_extra_repr_names_p():
    _, m = _layer(0.25)
    assert "p=0.25" in repr(m)
