"""Mixout on bf16/fp16 weights: the scale 1/(1-p) is applied in float32, so E[W_mix] = W up to the
rounding of W_mix itself (bf16 rounding of 1/(1-p) made it 0.16% short for p = 0.1); the mixed weight
stays in the weight's dtype and the gradient is exact for the scale used."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from surgery.layers.mixout import MixLinear, _mix, _scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_scale_is_float32_and_exact(dtype):
    torch.manual_seed(0)
    s = _scale(0.1, 1000, torch.zeros(2, 2, dtype=dtype))
    assert s.dtype == torch.float32
    kept = s[s != 0]
    assert kept.numel() > 800 and torch.all(kept == torch.tensor(1 / 0.9, dtype=torch.float32))
    assert _scale(0.1, 10, torch.zeros(2, 2, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("target_zero", [True, False], ids=["target0", "target-random"])
def test_expected_mixed_weight_has_no_scale_bias(dtype, target_zero):
    # E[W_mix] = T + (1 - p) * (W_kept - T): computed exactly from the all-kept mixed weight, no sampling noise
    torch.manual_seed(0)
    p = 0.1
    t = torch.zeros(256, 4096) if target_zero else torch.randn(256, 4096)
    t = t.to(dtype)
    w = (t.double() + torch.rand(256, 4096, dtype=torch.float64) + 0.1).to(dtype)
    s = torch.full((4096,), 1 / (1 - p))  # float32: every column kept
    d = w.double() - t.double()
    kept = _mix(t, w, s)
    assert kept.dtype == dtype
    bias = ((kept.double() - t.double()) * (1 - p)).sum() / d.sum() - 1
    assert abs(bias) < 2e-4, bias.item()
    # the old computation, a scale rounded to the weight's dtype, is 0.16% short for bf16: the test can tell
    old = torch.lerp(t, w, s.to(dtype))
    old_bias = ((old.double() - t.double()) * (1 - p)).sum() / d.sum() - 1
    if dtype == torch.bfloat16:
        assert old_bias < -1e-3, old_bias.item()


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("low_memory", [False, True])
@pytest.mark.parametrize("tokens", [3, 40])
def test_bf16_layer_forward_and_gradients_match_the_float64_reference(transposed, low_memory, tokens):
    torch.manual_seed(0)
    base = Conv1D(12, 10) if transposed else nn.Linear(10, 12)
    m = MixLinear.from_module(base.to(torch.bfloat16), 0.3, low_memory=low_memory)
    with torch.no_grad():
        m.weight.add_(0.1 * torch.randn_like(m.weight))
    m.train()
    x = torch.randn(tokens, 10, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(tokens, 12, dtype=torch.bfloat16)
    torch.manual_seed(5)
    y = m(x)
    y.backward(g)
    assert y.dtype == m.weight.grad.dtype == x.grad.dtype == torch.bfloat16
    # reference: the same mask, the mixed weight and all products in float64
    torch.manual_seed(5)
    n = 10
    s = _scale(0.3, n, m.weight).double()
    w = m.weight.detach().double().requires_grad_()
    t = m.target.double()
    wm = t + (s.unsqueeze(1) if transposed else s) * (w - t)
    xr = x.detach().double().requires_grad_()
    yr = F.linear(xr, wm.t() if transposed else wm, m.bias.detach().double())
    yr.backward(g.double())
    # the layer rounds the mixed weight to bf16 once, then runs bf16 kernels: bf16-level agreement
    torch.testing.assert_close(y.double(), yr, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(m.weight.grad.double(), w.grad, rtol=2e-2, atol=2e-2)
    # the weight gradient is the scale (in float32, not rounded) times dL/dW_mix: zero exactly where dropped
    dropped = (s == 0)
    col = m.weight.grad[dropped] if transposed else m.weight.grad[:, dropped]
    assert torch.all(col == 0)


@pytest.mark.parametrize("transposed", [False, True])
def test_bf16_gradient_equals_autograd_through_the_same_mixed_weight(transposed):
    # more tokens than output neurons: the layer scales dL/dW_mix by the float32 scale, as autograd does
    torch.manual_seed(0)
    base = Conv1D(12, 10) if transposed else nn.Linear(10, 12)
    m = MixLinear.from_module(base.to(torch.bfloat16), 0.3)
    with torch.no_grad():
        m.weight.add_(0.1 * torch.randn_like(m.weight))
    m.train()
    x = torch.randn(40, 10, dtype=torch.bfloat16)
    g = torch.randn(40, 12, dtype=torch.bfloat16)
    torch.manual_seed(5)
    m(x).backward(g)
    torch.manual_seed(5)
    s = _scale(0.3, 10, m.weight)
    s = s.unsqueeze(1) if transposed else s
    w = m.weight.detach().clone().requires_grad_()
    t = m.target
    wm = torch.addcmul(t, w - t, s).to(torch.bfloat16)  # float32 product, rounded once: what _mix computes
    assert torch.equal(wm, _mix(t, w.detach(), s))
    F.linear(x, wm.t() if transposed else wm, m.bias.detach()).backward(g)
    assert torch.equal(m.weight.grad, w.grad)
