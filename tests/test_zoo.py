"""The architecture zoo: apply -> train -> revert -> save_pretrained -> plain from_pretrained,
exact round trips, describe, tied weights, gradient checkpointing and dtype moves."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from torch import nn
import zoo
from zoo import NAMES, ZOO, batch, build

import surgery
from surgery.layers.mixout import is_conv1d
from surgery.regularizers.mixout.experts import classify
from surgery.record import TARGET_SUFFIX
from surgery.layers.mixout import MixLinear


def surgery_args(name: str) -> dict:
    return dict(mixout=0.1, dropout=0.0, msd=4 if ZOO[name].head else 0)


def logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return zoo.logits(model(**inputs))


def eval_logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    was = model.training
    model.eval()
    out = logits(model, inputs)
    model.train(was)
    return out


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def structure(model: nn.Module):
    """Module classes, per-module attribute names and hook counts: what revert must restore."""
    return [(n, type(m), sorted(vars(m)), len(m._forward_hooks), len(m._forward_pre_hooks),
             sorted(m._buffers)) for n, m in model.named_modules()]


def n_linear(model: nn.Module) -> int:
    """Linear-like layers, fused experts and routers: each is either mixed or listed as left alone, with its reason."""
    return sum(1 for _, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m) or classify(m))


def train_steps(model: nn.Module, inputs: dict, opt: torch.optim.Optimizer, steps: int = 3) -> list[float]:
    model.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", NAMES)
def test_apply_revert_without_training_is_exact(name):
    model = build(name)
    inputs = batch(name)
    out0 = eval_logits(model, inputs)  # first call: the model may fill config fields (problem_type)
    before, struct, cfg = snapshot(model), structure(model), model.config.to_dict()

    surgery.apply(model, **surgery_args(name))
    assert surgery.is_surgered(model)
    assert any(isinstance(m, MixLinear) for m in model.modules())
    targets = [k for k in model.state_dict() if k.endswith("." + TARGET_SUFFIX)]
    assert len(targets) == len(surgery.get_record(model).mixout) > 0
    assert set(model.state_dict()) == set(before) | set(targets)
    assert torch.equal(eval_logits(model, inputs), out0)  # eval: Mixout and MSD are exact no-ops

    assert surgery.revert(model) is model
    assert not surgery.is_surgered(model)
    assert structure(model) == struct
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    assert torch.equal(eval_logits(model, inputs), out0)
    assert model.config.to_dict() == cfg
    assert "surgery" not in model.config.to_dict()


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_train_revert_save_load(name, tmp_path):
    model = build(name)
    inputs = batch(name)
    classes = [(n, type(m)) for n, m in model.named_modules()]
    eval_logits(model, inputs)  # first call: the model may fill config fields (problem_type)
    model.save_pretrained(tmp_path / "orig")  # the config.json the reverted model must write again
    frozen_name, frozen = next(iter(model.named_parameters()))
    frozen.requires_grad_(False)  # one tensor that is not trained
    before = snapshot(model)
    buffers = {n for n, _ in model.named_buffers()}

    surgery.apply(model, **surgery_args(name))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    losses = train_steps(model, inputs, opt)
    assert all(torch.isfinite(torch.tensor(losses)))

    surgery.revert(model)
    assert [(n, type(m)) for n, m in model.named_modules()] == classes
    assert not any(k.endswith(TARGET_SUFFIX) for k in model.state_dict())
    # the optimizer still holds the model's own Parameters (same objects, not copies)
    params = [p for p in model.parameters() if p.requires_grad]
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in params]
    state = model.state_dict()
    assert list(state) == list(before)
    changed = [k for k in before if not torch.equal(state[k], before[k])]
    assert changed, "training changed nothing"
    for k in before:  # untrained tensors: the frozen parameter and every buffer
        if k == frozen_name or k in buffers:
            assert torch.equal(state[k], before[k]), k
    # a step after revert updates the same Parameters through the old optimizer
    w = params[-1].detach().clone()
    train_steps(model, inputs, opt, steps=1)
    assert not torch.equal(params[-1], w)

    out = eval_logits(model, inputs)
    model.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "surgery" not in saved
    assert saved == json.loads((tmp_path / "orig" / "config.json").read_text())
    loaded, info = getattr(transformers, ZOO[name].cls).from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert torch.equal(eval_logits(loaded, inputs), out)


@pytest.mark.parametrize("name", NAMES)
def test_describe(name):
    model = build(name)
    surgery.apply(model, **surgery_args(name))
    rec = surgery.get_record(model)
    text = surgery.describe(model)
    lines = text.splitlines()
    assert lines[0].startswith(type(model).__name__)
    assert f"mixout p=0.1 on {len(rec.mixout)} layers" in text
    assert len(rec.mixout) + len(rec.skipped) == n_linear(build(name))
    assert "dropout -> 0.0" in text
    if ZOO[name].head:
        assert f"multi-sample dropout: head {rec.args['head']!r}, K=4" in text
    assert len(lines) < 40 and all(len(line) < 160 for line in lines)
    # the same text from the record alone, as a checkpoint would carry it
    assert surgery.describe(rec.to_dict()).splitlines()[1:] == [
        line.split(", targets")[0] + (":" if ", targets" in line else "") for line in lines[1:]]


# ---- tied weights -------------------------------------------------------------------

def test_gpt2_tied_lm_head_left_alone_by_default():
    model = build("gpt2-lm")
    wte = model.transformer.wte.weight
    assert model.lm_head.weight is wte
    surgery.apply(model, mixout=0.1)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is wte
    assert any(isinstance(m, MixLinear) and m.transposed for m in model.modules())  # Conv1D mixed
    assert "left alone: lm_head (weight tied to transformer.wte.weight" in surgery.describe(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, batch("gpt2-lm"), opt)
    surgery.revert(model)
    assert model.lm_head.weight is wte and model.transformer.wte.weight is wte


def test_gpt2_tied_lm_head_mixed_when_asked_keeps_tie(tmp_path):
    model = build("gpt2-lm")
    inputs = batch("gpt2-lm")
    wte = model.transformer.wte.weight
    surgery.apply(model, mixout=0.1, mixout_tied=True)
    assert isinstance(model.lm_head, MixLinear)
    assert model.lm_head.weight is wte
    assert "lm_head" in [m.name for m in surgery.get_record(model).mixout]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, inputs, opt)
    assert model.lm_head.weight is model.transformer.wte.weight is wte
    assert not torch.equal(model.lm_head.target, wte)  # trained away from the target
    surgery.revert(model)
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is wte and model.transformer.wte.weight is wte
    out = eval_logits(model, inputs)
    model.save_pretrained(tmp_path)
    loaded, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert torch.equal(eval_logits(loaded, inputs), out)


# ---- gradient checkpointing -----------------------------------------------------------

def _enable_checkpointing(model):  # transformers 5 renamed gradient_checkpointing_enable
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()


def _grads(name: str, checkpointing: bool, seed: int, enable_first: bool = False, low_memory: bool = False):
    """Gradients of one training step with Mixout + MSD (+ the configs' own dropout), the loss,
    and how many module calls ran (checkpointing runs the layers again in backward).
    Checkpointing is enabled after apply (as Trainer does), or before with ``enable_first``."""
    model = build(name)
    if checkpointing and enable_first:
        _enable_checkpointing(model)
    surgery.apply(model, mixout=0.3, msd=4 if ZOO[name].head else 0, low_memory=low_memory)
    if checkpointing and not enable_first:
        _enable_checkpointing(model)
    calls = [0]
    for m in model.modules():
        m.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    model.train()
    torch.manual_seed(seed)
    loss = model(**batch(name)).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, loss.detach(), calls[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in NAMES if getattr(transformers, ZOO[n].cls).supports_gradient_checkpointing])
def test_gradient_checkpointing_recomputes_same_masks(name):
    plain, loss_plain, calls_plain = _grads(name, False, seed=0)
    ckpt, loss_ckpt, calls_ckpt = _grads(name, True, seed=0)
    assert calls_ckpt > calls_plain  # the checkpointed layers really ran again in backward
    assert torch.equal(loss_plain, loss_ckpt)
    assert plain.keys() == ckpt.keys() and plain
    for k in plain:  # recomputation redraws exactly the same masks: bitwise equal gradients
        assert torch.equal(ckpt[k], plain[k]), k
    other, _, _ = _grads(name, False, seed=1)  # the masks matter: another seed, other gradients
    assert any(not torch.equal(other[k], plain[k]) for k in plain)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_gradient_checkpointing_enabled_before_apply(name):
    plain, _, _ = _grads(name, False, seed=0)
    ckpt, _, calls = _grads(name, True, seed=0, enable_first=True)
    assert calls > _grads(name, False, seed=0)[2]
    assert all(torch.equal(ckpt[k], plain[k]) for k in plain)


@pytest.mark.parametrize("name", ["bert", "gpt2-lm", "mixtral", "gpt-oss"])  # Linear, Conv1D, fused experts
def test_low_memory_mixout_under_checkpointing_matches_plain(name):
    plain, loss, _ = _grads(name, False, seed=0)
    low, loss_low, _ = _grads(name, True, seed=0, low_memory=True)
    assert torch.equal(loss, loss_low)
    assert plain.keys() == low.keys() and all(torch.equal(low[k], plain[k]) for k in plain)


# ---- dtype changes after apply ---------------------------------------------------------

@pytest.mark.parametrize("move", ["bfloat16", "half", "double", "to"])
@pytest.mark.parametrize("name", ["bert", "gpt2-lm", "llama", "t5"])
def test_dtype_move_after_apply(name, move):
    model = build(name)
    inputs = batch(name)
    surgery.apply(model, mixout=0.1)
    originals = {n: m.target.clone() for n, m in model.named_modules() if isinstance(m, MixLinear)}
    dtype = {"bfloat16": torch.bfloat16, "half": torch.float16, "double": torch.float64, "to": torch.bfloat16}[move]
    model = model.to(dtype) if move == "to" else getattr(model, move)()
    for n, m in model.named_modules():
        if isinstance(m, MixLinear):
            assert m.target.dtype == m.weight.dtype == dtype, n
            assert torch.equal(m.target, originals[n].to(dtype)), n
    model.train()
    out = model(**inputs)
    assert zoo.logits(out).dtype == dtype and torch.isfinite(zoo.logits(out)).all()
    out.loss.backward()
    surgery.revert(model)
    assert not any(k.endswith(TARGET_SUFFIX) for k in model.state_dict())
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert all(type(m) is not MixLinear for m in model.modules())
