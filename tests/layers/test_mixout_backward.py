"""The one-pass Mixout backward (``_MixoutLinear``): exact gradients in every branch.

The backward scales either the input columns (fewer tokens than output neurons) or the
weight gradient; both must equal autograd through an explicit mixed weight, for the
(out, in) and the transposed (in, out, Conv1D) layouts, in both memory modes, and under
bf16 autocast.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from surgery.layers.mixout import MixLinear, _scale


def _reference(m: MixLinear, x, g, seed):
    """Gradients of F.linear through an explicit lerp mixed weight with the same mask."""
    torch.manual_seed(seed)
    n = m.weight.shape[0] if m.transposed else m.weight.shape[1]
    s = _scale(m.mixout_p, n, m.weight)
    w = m.weight.detach().clone().requires_grad_()
    b = m.bias.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    wm = torch.lerp(m.target, w, s.unsqueeze(1) if m.transposed else s)
    y = F.linear(xr, wm.t() if m.transposed else wm, b)
    y.backward(g)
    return y, xr.grad, w.grad, b.grad


@pytest.mark.parametrize("tokens", [3, 40])  # fewer / more tokens than output neurons (12)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("low_memory", [False, True])
def test_backward_matches_autograd_through_the_mixed_weight(tokens, transposed, low_memory):
    torch.manual_seed(0)
    base = Conv1D(12, 10) if transposed else nn.Linear(10, 12)
    m = MixLinear.from_module(base, 0.4, low_memory=low_memory)
    with torch.no_grad():
        m.weight.add_(torch.randn_like(m.weight))
    m.train()
    x = torch.randn(tokens, 10, requires_grad=True)
    g = torch.randn(tokens, 12)
    torch.manual_seed(5)
    y = m(x)
    y.backward(g)
    ry, rgx, rgw, rgb = _reference(m, x, g, 5)
    torch.testing.assert_close(y, ry)
    torch.testing.assert_close(x.grad, rgx)
    torch.testing.assert_close(m.weight.grad, rgw)
    torch.testing.assert_close(m.bias.grad, rgb)
    assert m.weight.grad.is_contiguous() and m.weight.grad.shape == m.weight.shape


def test_batched_3d_input_and_no_bias():
    torch.manual_seed(1)
    m = MixLinear.from_module(nn.Linear(6, 4, bias=False), 0.3)
    m.train()
    x = torch.randn(2, 5, 6, requires_grad=True)
    torch.manual_seed(2)
    y = m(x)
    gx, gw = torch.autograd.grad(y.square().sum(), (x, m.weight))
    torch.manual_seed(2)
    s = _scale(0.3, 6, m.weight)
    w = m.weight.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    rgx, rgw = torch.autograd.grad(F.linear(xr, torch.lerp(m.target, w, s)).square().sum(), (xr, w))
    torch.testing.assert_close(gx, rgx)
    torch.testing.assert_close(gw, rgw)


def test_bf16_autocast_gives_gradients_in_the_parameter_dtype():
    torch.manual_seed(0)
    m = MixLinear.from_module(nn.Linear(8, 16), 0.2)
    m.train()
    x = torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert m.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert m.bias.grad.dtype == torch.float32 and torch.isfinite(m.weight.grad).all()


def test_double_backward_is_a_clear_error():
    m = MixLinear.from_module(nn.Linear(3, 2), 0.5)
    m.train()
    x = torch.randn(4, 3, requires_grad=True)
    (gx,) = torch.autograd.grad(m(x).sum(), (x,), create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()


def _saved(m, x):
    """Storages autograd keeps for backward of ``m(x)``: {data_ptr: (dtype, nbytes)}."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = (t.dtype, t.untyped_storage().nbytes())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = m(x)
    return y, seen


@pytest.mark.parametrize("low_memory", [False, True])
def test_bf16_targets_keep_no_weight_sized_fp32_copy_in_low_memory_mode(low_memory):
    torch.manual_seed(0)
    m = MixLinear.from_module(nn.Linear(64, 32), 0.3, target_dtype=torch.bfloat16, low_memory=low_memory)
    m.train()
    x = torch.randn(5, 64)
    y, seen = _saved(m, x)
    alive = {t.untyped_storage().data_ptr() for t in (x, m.weight, m.target, m.bias)}
    extra = sum(nb for ptr, (dt, nb) in seen.items() if ptr not in alive)
    weight_bytes = m.weight.numel() * 4
    # default mode keeps exactly one fp32 mixed weight (+ the mask vector); low-memory mode only the mask
    assert extra == (weight_bytes + 64 * 4 if not low_memory else 64 * 4)
    y.sum().backward()
    torch.manual_seed(0)
    ref = MixLinear.from_module(nn.Linear(64, 32), 0.3, target=m.target.float())
    ref.weight, ref.bias = nn.Parameter(m.weight.detach().clone()), nn.Parameter(m.bias.detach().clone())
    ref.train()
    x2 = x.clone()
    torch.manual_seed(9)
    ya = m(x2)
    torch.manual_seed(9)
    yb = ref(x2)
    torch.testing.assert_close(ya, yb)
