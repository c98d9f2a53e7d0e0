"""Mixout on expert tensors under PEFT's LoRA ``target_parameters`` (peft's ``ParamWrapper``).

``apply(peft_model, mixout=p)``: each wrapped expert tensor is mixed as its LoRA layer's effective weight
``W0 + delta`` toward the frozen base ``W0``, per expert and input neuron (the LoRA rule of
surgery.regularizers.lora), checked in float64 against ``W0 + s * delta`` with the same masks, gradients
of ``lora_A``/``lora_B`` included. Eval is the plain PEFT model bitwise; revert and merge_and_unload work;
a merged adapter or a base tensor that trains is refused naming the layer; ``apply`` then
``get_peft_model`` mixes the effective weight toward the copied target.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from zoo import batch, build

import surgery
import surgery.layers.experts as experts_layer
from surgery import SurgeryError
from surgery.layers.experts import MixoutParams

PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _peft(name="mixtral", params=PARAMS, dtype=None, seed=0):
    model = build(name)
    if dtype is not None:
        model.to(dtype)
        model.set_experts_implementation("eager")  # grouped_mm has no float64 kernel on CPU
    pm = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["q_proj"],
                                          target_parameters=list(params)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # LoRA starts with B = 0: move it, so the adapters change the weight
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    return pm


def _wrappers(pm, layer=0):
    outer = pm.base_model.model.model.layers[layer].mlp.experts
    return {w.parameter_name: w for w in (outer, outer.base_layer)}


@pytest.fixture
def masks(monkeypatch):
    drawn = []
    real = experts_layer._scale
    monkeypatch.setattr(experts_layer, "_scale", lambda p, n, like: drawn.append(real(p, n, like)) or drawn[-1])
    return drawn


def test_effective_weight_is_mixed_toward_the_frozen_base_with_exact_gradients(masks):
    pm = _peft(dtype=torch.float64)
    surgery.apply(pm, mixout=0.4)
    rec = surgery.get_record(pm)
    entries = [m for m in rec.mixout if m.params is not None]
    assert [(m.kind, m.params) for m in entries] == [("lora", ["gate_up_proj", "down_proj"])] * 2
    assert not any(k.endswith("experts.base_layer.base_layer.mixout_target") for k in pm.state_dict())  # no copy
    wrappers = _wrappers(pm)
    base = wrappers["down_proj"].get_base_layer()
    assert isinstance(base, MixoutParams) and base.mixout_base
    # no Linear rule on the wrappers' adapters: they stay plain Linear layers, mixed through the expert tensors
    assert all(type(w.lora_A["default"]) is nn.Linear for w in wrappers.values())
    pm.train()
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(9, 32, generator=g, dtype=torch.float64)
    idx = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(9)])
    w = torch.rand(9, 2, generator=g, dtype=torch.float64)
    outer = pm.base_model.model.model.layers[0].mlp.experts
    out = outer(hidden, idx, w)
    assert len(masks) == 2
    adapters = [p for wr in wrappers.values() for n, p in wr.named_parameters() if "lora_" in n]
    grads = torch.autograd.grad(out.sum(), adapters)
    plain = vars(base)["_original"]
    mixed = {}
    for (k, axes), s in zip(base.mixout_layout, masks):
        w0 = plain._parameters[k]
        shape = [n if d in axes else 1 for d, n in enumerate(w0.shape)]
        mixed[k] = w0 + s.double().view(shape) * wrappers[k].get_delta_weight("default")  # W0 + s * delta
    ref = torch.func.functional_call(plain, mixed, (hidden, idx, w))
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)
    ref_grads = torch.autograd.grad(ref.sum(), adapters)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(grads, ref_grads))
    assert all(gr.abs().sum() > 0 for gr in grads)


def test_eval_is_the_plain_peft_model_and_revert_restores_it():
    pm = _peft()
    inputs = batch("mixtral")
    with torch.no_grad():
        ref = pm.eval()(**inputs).logits
    classes = [(n, type(m)) for n, m in pm.named_modules()]
    params = {n: p for n, p in pm.named_parameters()}
    surgery.apply(pm, mixout=0.3)
    with torch.no_grad():
        assert torch.equal(pm.eval()(**inputs).logits, ref)
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    pm.train()
    pm(**inputs).loss.backward()
    opt.step()
    surgery.revert(pm)
    assert [(n, type(m)) for n, m in pm.named_modules()] == classes
    assert {n: id(p) for n, p in pm.named_parameters()} == {n: id(p) for n, p in params.items()}
    merged = pm.merge_and_unload()
    assert type(merged.model.layers[0].mlp.experts).__name__ == "MixtralExperts"


def test_merge_and_unload_then_revert_gives_the_plain_experts_holding_the_merged_weights():
    pm = _peft()
    inputs = batch("mixtral")
    surgery.apply(pm, mixout=0.3)
    pm.train()
    pm(**inputs).loss.backward()
    merged = pm.merge_and_unload()
    assert surgery.is_surgered(merged)
    with torch.no_grad():
        ref = merged.eval()(**inputs).logits
    surgery.revert(merged)
    experts = merged.model.layers[0].mlp.experts
    assert type(experts).__name__ == "MixtralExperts"
    with torch.no_grad():
        assert torch.equal(merged.eval()(**inputs).logits, ref)


def test_coverage_counts_the_expert_adapters():
    pm = _peft()
    surgery.apply(pm, mixout=0.3)
    cov = surgery.get_record(pm).coverage
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert cov["trainable"] == trainable == cov["mixout"] and "left" in cov and not cov["left"]


@pytest.mark.parametrize("spoil, message", [
    ("merge", r"mixout cannot mix LoRA layer 'model.layers.0.mlp.experts.*merged into the base weight"),
    ("unfreeze", r"mixout cannot mix LoRA layer 'model.layers.0.mlp.experts.*its base layer trains too"),
])
def test_merged_adapters_and_training_bases_are_refused_naming_the_layer(spoil, message, untouched):
    pm = _peft()
    if spoil == "merge":
        pm.merge_adapter()
    else:
        pm.base_model.model.model.layers[0].mlp.experts.get_base_layer().requires_grad_(True)
    check = untouched(pm.base_model.model)
    with pytest.raises(SurgeryError, match=message):
        surgery.apply(pm, mixout=0.3)
    check()


class Undeclared(nn.Module):
    """Fused experts whose layout is not declared (no experts-interface flags)."""

    def __init__(self):
        super().__init__()
        self.num_experts = 3
        self.gate_up_proj = nn.Parameter(torch.randn(3, 6, 8))

    def forward(self, x):
        return x @ self.gate_up_proj[0]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = Undeclared()
        self.classifier = nn.Linear(8, 2)

    def forward(self, x):
        return self.classifier(self.experts(x))


def test_lora_on_an_undeclared_layout_is_refused_naming_the_layer(untouched):
    pm = get_peft_model(Net(), LoraConfig(r=2, target_modules=[], target_parameters=["experts.gate_up_proj"]))
    check = untouched(pm.base_model.model)
    with pytest.raises(SurgeryError, match=r"mixout cannot mix PEFT adapter 'default' \(peft.tuners.lora.layer."
                                           r"ParamWrapper.* of layer 'experts'.*exclude=\['experts'\]"):
        surgery.apply(pm, mixout=0.3)
    check()
    pm.base_model.model.classifier.requires_grad_(True)
    surgery.apply(pm, mixout=0.3, exclude=["experts"])  # the fix the message names
    assert surgery.get_record(pm).mixout[0].name == "classifier"


def test_apply_then_get_peft_model_mixes_the_effective_weight_toward_the_copied_target(masks):
    model = build("mixtral")
    surgery.apply(model, mixout=0.4)
    pm = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=[],
                                          target_parameters=["mlp.experts.gate_up_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)
    wrapper = pm.base_model.model.model.layers[0].mlp.experts
    part = wrapper.get_base_layer()
    assert isinstance(part, MixoutParams) and not part.mixout_base
    pm.train()
    hidden = torch.randn(5, 32)
    idx = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2]])
    w = torch.full((5, 2), 0.5)
    with pytest.warns(UserWarning, match="holds a frozen weight"):  # down_proj: frozen, not a LoRA target
        out = wrapper(hidden, idx, w)
    s = masks[0].view(4, 1, 32)
    t = part.targets()["gate_up_proj"]
    w_eff = part._parameters["gate_up_proj"] + wrapper.get_delta_weight("default")
    mixed = {"gate_up_proj": t + s * (w_eff - t), "down_proj": t.new_zeros(0)}
    mixed["down_proj"] = experts_layer._mix(part.targets()["down_proj"], part._parameters["down_proj"],
                                            masks[1].view(4, 1, 24))
    ref = torch.func.functional_call(vars(part)["_original"], mixed, (hidden, idx, w))
    assert torch.allclose(out, ref, atol=1e-6)
    surgery.revert(pm)
    assert type(pm.base_model.model.model.layers[0].mlp.experts.get_base_layer()).__name__ == "MixtralExperts"


def test_an_inactive_adapter_is_mixed_too_so_set_adapter_trains_it_mixed(masks):
    pm = _peft()
    pm.add_adapter("b", LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["q_proj"],
                                   target_parameters=PARAMS))
    pm.set_adapter("default")
    surgery.apply(pm, mixout=0.3)
    assert [m.kind for m in surgery.get_record(pm).mixout if m.params is not None] == ["lora", "lora"]
    pm.set_adapter("b")
    pm.train()
    pm(**batch("mixtral")).loss.backward()
    assert len(masks) == 4  # two layers, two expert tensors each, mixed under adapter b
