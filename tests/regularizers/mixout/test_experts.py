"""Mixout on fused mixture-of-experts tensors and routers (surgery.layers.experts, surgery.regularizers.experts).

The tiny MoE models of the zoo (Mixtral, Qwen3-MoE, OLMoE, DeepSeek-V3, GPT-OSS with its ``(E, in, out)``
layout and biases). A training forward of a surgered experts module or router is its own forward with
``T + s * (W - T)`` in place of each mixed Parameter, ``s`` one value per expert and input neuron: checked
bitwise against ``torch.func.functional_call`` of the plain module with the same mask, for every experts
implementation transformers dispatches to, with the exact gradient ``s * dL/dW_mix``.
"""

from __future__ import annotations

import copy
import io
import pickle
import threading
import weakref

import pytest
import torch
import transformers
from torch import nn
from zoo import ZOO, batch, build

import surgery
import surgery.layers.experts as experts_layer
from surgery import SurgeryError
from surgery.layers.experts import MixoutParams
from surgery.layers.mixout import _mix
from surgery.record import TARGET_SUFFIX
from surgery.regularizers.mixout.experts import UNDECLARED, classify
from surgery.layers.mixout import MixLinear

MOE = ["mixtral", "qwen3-moe", "olmoe", "deepseek-v3", "gpt-oss"]
IMPLS = ["eager", "grouped_mm", "batched_mm"]  # transformers' experts forwards (config._experts_implementation)


def mixed_modules(model) -> dict[str, MixoutParams]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MixoutParams)}


@pytest.fixture
def masks(monkeypatch):
    """Every mask the experts layers draw, in order."""
    drawn = []
    real = experts_layer._scale

    def record(p, n, like):
        drawn.append(real(p, n, like))
        return drawn[-1]

    monkeypatch.setattr(experts_layer, "_scale", record)
    return drawn


def moved(model, scale=0.05, seed=3):
    """Move every trainable Parameter away from its target, so mixing is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model


def experts_inputs(e: nn.Module, tokens: int = 9, k: int = 2, seed: int = 5):
    """Hidden states, top-k expert ids and routing weights for an experts module."""
    g = torch.Generator().manual_seed(seed)
    hidden = e.config.hidden_size
    x = torch.randn(tokens, hidden, generator=g, requires_grad=True)
    idx = torch.stack([torch.randperm(e.num_experts, generator=g)[:k] for _ in range(tokens)])
    w = torch.rand(tokens, k, generator=g)
    return x, idx, w / w.sum(-1, keepdim=True)


def surgered_part(name: str, kind: str, p: float = 0.3, **kw):
    model = build(name)
    surgery.apply(model, mixout=p, **kw)
    moved(model)
    part = next(m for n, m in mixed_modules(model).items() if classify(vars(m)["_original"]).kind == kind)
    return model, part.train()


def reference(part: MixoutParams, drawn: list[torch.Tensor], args):
    """The plain module's forward with ``T + s * (W - T)`` as leaves, from the masks the layer drew."""
    plain = vars(part)["_original"]
    leaves = {}
    for (name, _), target, s in zip(part.mixout_layout, part.targets().values(), drawn):
        w = part._parameters[name].detach()
        leaves[name] = _mix(target, w, s.view([n if d in dict(part.mixout_layout)[name] else 1
                                               for d, n in enumerate(w.shape)])).detach().requires_grad_()
    return torch.func.functional_call(plain, leaves, args), leaves


# ---- found by structure, recorded ------------------------------------------------------------------

@pytest.mark.parametrize("name", MOE)
def test_every_fused_expert_tensor_and_router_is_mixed_and_recorded(name):
    model = build(name)
    fused = {n for n, p in model.named_parameters() if p.dim() == 3}
    surgery.apply(model, mixout=0.1)
    rec = surgery.get_record(model)
    entries = {m.name: m for m in rec.mixout if m.params is not None}
    transposed = name == "gpt-oss"
    assert {f"{n}.{k}" for n, m in entries.items() if m.kind == "experts" for k in m.params} == fused
    for n, m in entries.items():
        layer = model.get_submodule(n)
        assert isinstance(layer, MixoutParams) and layer.orig == m.orig
        if m.kind == "experts":
            assert m.params == ["gate_up_proj", "down_proj"] and m.transposed is transposed
            axes = (0, 1) if transposed else (0, 2)  # (E, in, out) or (E, out, in): the experts dim and the input dim
            assert layer.mixout_layout == (("gate_up_proj", axes), ("down_proj", axes))
        else:
            assert m.kind == "router" and m.params == ["weight"] and layer.mixout_layout == (("weight", (1,)),)
    assert sum(m.kind == "router" for m in entries.values()) == sum(m.kind == "experts" for m in entries.values())
    assert not rec.skipped
    targets = [k for k in model.state_dict() if k.endswith("." + TARGET_SUFFIX)]
    assert len(targets) == len(rec.mixout) and set(targets) == set(rec.target_keys)
    for n in entries:  # one target per module, experts dim first (FSDP2 shards it with the weights)
        layer = model.get_submodule(n)
        t = layer.mixout_target
        assert not t.requires_grad and t.shape[0] == layer._parameters[layer.mixout_layout[0][0]].shape[0]
        for (k, _), view in zip(layer.mixout_layout, layer.targets().values()):
            assert torch.equal(view, layer._parameters[k]) and view.shape == layer._parameters[k].shape


# ---- the math ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["mixtral", "gpt-oss", "qwen3-moe", "deepseek-v3"])
def test_training_forward_is_the_plain_forward_with_the_mixed_tensors_and_the_gradient_is_exact(name, impl, masks):
    model, part = surgered_part(name, "experts")
    model.set_experts_implementation(impl)
    args = experts_inputs(part)
    out = part(*args)
    ref, leaves = reference(part, masks, args)
    assert len(masks) == 2 and torch.equal(out, ref)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    for (k, axes), s in zip(part.mixout_layout, masks):
        w = part._parameters[k]
        shape = [n if d in axes else 1 for d, n in enumerate(w.shape)]
        assert torch.equal(w.grad, leaves[k].grad * s.view(shape)), k  # s * dL/dW_mix, bitwise
        assert w.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["mixtral", "gpt-oss", "deepseek-v3"])
def test_router_is_mixed_per_input_neuron_with_the_exact_gradient(name, masks):
    model, router = surgered_part(name, "router")
    x = torch.randn(9, model.config.hidden_size)
    logits = router(x)[0]
    ref, leaves = reference(router, masks, (x,))
    assert masks[0].numel() == model.config.hidden_size and torch.equal(logits, ref[0])
    g = torch.randn_like(logits)
    (logits * g).sum().backward()
    (ref[0] * g).sum().backward()
    assert torch.equal(router.weight.grad, leaves["weight"].grad * masks[0].view(1, -1))


@pytest.mark.parametrize("name", ["mixtral", "gpt-oss"])
def test_mask_is_one_value_per_expert_and_input_neuron(name, masks, monkeypatch):
    p = 0.4
    model, part = surgered_part(name, "experts", p=p)
    made = []
    real = experts_layer._MixParam.apply
    monkeypatch.setattr(experts_layer._MixParam, "apply", lambda *a: made.append(real(*a)) or made[-1])
    part(*experts_inputs(part))
    for (k, axes), t, s, mixed in zip(part.mixout_layout, part.targets().values(), masks, made):
        w = part._parameters[k].detach()
        shape = [n if d in axes else 1 for d, n in enumerate(w.shape)]
        assert shape[0] == part.num_experts and shape[axes[1]] == w.shape[axes[1]] and shape.count(1) == 1
        s = s.view(shape)  # one value per expert and input neuron, shared by every output neuron and token
        assert set((s * (1 - p)).round(decimals=5).unique().tolist()) <= {0.0, 1.0}
        assert torch.allclose(mixed.double(), t.double() + s.double() * (w.double() - t.double()), atol=1e-7)
        assert not all(torch.equal(s[0], s[e]) for e in range(1, part.num_experts))  # each expert its own mask


def test_the_forward_reads_the_mixed_tensor_and_only_the_forward():
    model, part = surgered_part("mixtral", "experts")
    model.set_experts_implementation("eager")
    inside = []
    part.act_fn.register_forward_hook(lambda *a: inside.append(part.gate_up_proj))
    part(*experts_inputs(part))
    assert inside and not any(isinstance(t, nn.Parameter) for t in inside)
    assert inside[0].grad_fn is not None and inside[0].shape == part._parameters["gate_up_proj"].shape
    assert part.gate_up_proj is part._parameters["gate_up_proj"]  # outside the forward: the Parameter


def test_expectation_of_the_mixed_tensor_is_the_weight():
    model, part = surgered_part("mixtral", "experts", p=0.3)
    w, t = part.gate_up_proj.detach(), part.targets()["gate_up_proj"]
    torch.manual_seed(0)
    n, acc = 4000, torch.zeros_like(w, dtype=torch.float64)
    for _ in range(n):
        s = experts_layer._scale(0.3, w.shape[0] * w.shape[2], w).view(w.shape[0], 1, w.shape[2])
        acc += _mix(t, w, s).double()
    assert torch.allclose(acc / n, w.double(), atol=0.03 * w.abs().max().item())


@pytest.mark.parametrize("kind", ["experts", "router"])
def test_eval_and_p0_are_the_plain_module_bitwise_and_draw_nothing(kind):
    model, part = surgered_part("gpt-oss", kind)
    plain = vars(part)["_original"]
    args = experts_inputs(part) if kind == "experts" else (torch.randn(5, model.config.hidden_size),)
    part.eval()
    assert torch.equal(part(*args)[0], plain(*args)[0])
    zero = MixoutParams.from_module(plain, 0.0, part.mixout_layout).train()
    plain.train()
    state = torch.get_rng_state()
    assert torch.equal(zero(*args)[0], plain(*args)[0])
    assert torch.equal(torch.get_rng_state(), state)


def test_p1_uses_the_targets_alone_and_the_weights_get_zero_gradient():
    model, part = surgered_part("mixtral", "experts", p=1.0)
    args = experts_inputs(part)
    out = part(*args)
    ref = torch.func.functional_call(vars(part)["_original"], part.targets(), args)
    assert torch.equal(out, ref)
    out.sum().backward()
    assert all(torch.count_nonzero(part._parameters[k].grad) == 0 for k, _ in part.mixout_layout)


@pytest.mark.parametrize("impl", IMPLS)
def test_low_memory_gives_the_same_gradients_and_keeps_no_mixed_tensor(impl, monkeypatch):
    real = experts_layer._MixParam.apply

    def run(low_memory):
        model, part = surgered_part("mixtral", "experts", low_memory=low_memory)
        model.set_experts_implementation(impl)
        made = []
        monkeypatch.setattr(experts_layer._MixParam, "apply", lambda *a: made.append(real(*a)) or made[-1])
        args = experts_inputs(part)
        torch.manual_seed(7)
        out = part(*args)
        alive = [weakref.ref(t) for t in made]
        made.clear()
        kept = [r() is not None for r in alive]  # between forward and backward
        out.sum().backward()
        return [part._parameters[k].grad for k, _ in part.mixout_layout], args[0].grad, kept

    grads, gx, kept_default = run(False)
    low, lx, kept_low = run(True)
    assert all(torch.equal(a, b) for a, b in zip(grads, low)) and torch.equal(gx, lx)
    assert not any(kept_low)  # no mixed tensor is kept for backward in low-memory mode
    if impl == "grouped_mm":  # the counter-check: grouped_mm keeps the mixed weights for backward by default
        assert all(kept_default)


def test_low_memory_recomputes_for_a_second_backward():
    model, part = surgered_part("mixtral", "experts", low_memory=True)
    args = experts_inputs(part)
    torch.manual_seed(1)
    out = part(*args)
    out.sum().backward(retain_graph=True)
    first = part.gate_up_proj.grad.clone()
    part.gate_up_proj.grad = None
    out.sum().backward()  # recomputes again: the same gradient
    assert torch.equal(part.gate_up_proj.grad, first)


def test_target_dtype_keeps_a_smaller_target_and_mixes_toward_it(masks):
    model, part = surgered_part("qwen3-moe", "experts", target_dtype=torch.bfloat16)
    assert part.mixout_target.dtype == torch.bfloat16
    assert torch.equal(part.targets()["down_proj"], vars(part)["_original"].down_proj.detach().to(torch.bfloat16)
                       ) is False  # moved since apply: the target is the value at apply time
    args = experts_inputs(part)
    out = part(*args)
    ref, _ = reference(part, masks, args)
    assert torch.equal(out, ref)
    model.train()
    surgery_loss = model(**batch("qwen3-moe")).loss
    surgery_loss.backward()
    assert torch.isfinite(part.gate_up_proj.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_targets_follow_dtype_moves(dtype):
    model = build("gpt-oss")
    model.set_experts_implementation("eager")  # grouped_mm has no float64 kernel on CPU (plain models neither)
    surgery.apply(model, mixout=0.2)
    before = {n: m.mixout_target.clone() for n, m in mixed_modules(model).items()}
    model.to(dtype).train()
    for n, m in mixed_modules(model).items():
        assert m.mixout_target.dtype == dtype and torch.equal(m.mixout_target, before[n].to(dtype))
    out = model(**batch("gpt-oss"))
    out.loss.backward()
    assert out.logits.dtype == dtype
    part = next(iter(mixed_modules(model).values()))
    assert all(part._parameters[k].grad.dtype == dtype for k, _ in part.mixout_layout)
    surgery.revert(model)
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_bf16_gradient_is_the_float32_product_rounded_once(masks):
    model, part = surgered_part("mixtral", "experts")
    part.to(torch.bfloat16)
    x, idx, w = experts_inputs(part)
    args = (x.detach().bfloat16().requires_grad_(), idx, w.bfloat16())
    out = part(*args)
    ref, leaves = reference(part, masks, args)
    assert torch.equal(out, ref)
    out.float().sum().backward()
    ref.float().sum().backward()
    for (k, axes), s in zip(part.mixout_layout, masks):
        shape = [n if d in axes else 1 for d, n in enumerate(leaves[k].shape)]
        assert torch.equal(part._parameters[k].grad, (leaves[k].grad.float() * s.view(shape)).bfloat16())


# ---- swap and revert ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MOE)
def test_train_then_revert_gives_the_original_classes_objects_and_keys(name):
    model = build(name)
    classes = [(n, type(m)) for n, m in model.named_modules()]
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    calls = []
    part_name = next(n for n, m in model.named_modules() if classify(m) and classify(m).kind == "experts")
    model.get_submodule(part_name).register_forward_hook(lambda *a: calls.append(1))  # before apply
    surgery.apply(model, mixout=0.2, dropout=0.0)
    swapped = model.get_submodule(part_name)
    swapped.register_forward_pre_hook(lambda *a: calls.append(2))  # while surgered
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(**batch(name)).loss.backward()
    opt.step()
    assert calls == [2, 1]
    surgery.revert(model)
    assert [(n, type(m)) for n, m in model.named_modules()] == classes
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    model.eval()
    model(**batch(name))
    assert calls == [2, 1, 2, 1]  # both hooks stay on the original module
    assert not any(isinstance(m, MixoutParams) for m in model.modules())


def test_a_parameter_replaced_after_apply_is_the_one_revert_gives_back():
    model = build("olmoe")
    surgery.apply(model, mixout=0.1)
    part = model.model.layers[0].mlp.experts
    new = nn.Parameter(part.down_proj.detach() * 2)
    part.down_proj = new
    surgery.revert(model)
    assert model.model.layers[0].mlp.experts.down_proj is new
    assert TARGET_SUFFIX not in dict(model.model.layers[0].mlp.experts.named_parameters())


def test_revert_refuses_a_replaced_experts_module_and_changes_nothing(untouched):
    model = build("mixtral")
    surgery.apply(model, mixout=0.1)
    plain = vars(model.model.layers[1].mlp.experts)["_original"]
    model.model.layers[1].mlp.experts = plain
    check = untouched(model)
    with pytest.raises(SurgeryError, match=r"Mixout layer 'model.layers.1.mlp.experts' is missing or was replaced"):
        surgery.revert(model)
    check()


def test_deepcopy_and_pickle_keep_a_working_surgered_model():
    model = build("mixtral")
    surgery.apply(model, mixout=0.3)
    moved(model)
    inputs = batch("mixtral")
    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for m in (twin, loaded):
        assert type(m.model.layers[0].mlp.experts) is type(model.model.layers[0].mlp.experts)
        m.eval()
        model.eval()
        with torch.no_grad():
            assert torch.equal(m(**inputs).logits, model(**inputs).logits)
        m.train()
        model.train()
        torch.manual_seed(4)
        a = m(**inputs).logits
        torch.manual_seed(4)
        b = model(**inputs).logits
        assert torch.equal(a, b)  # the same masks: the copy mixes like the original
        surgery.revert(m)
        assert type(m.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    assert pickle.loads(pickle.dumps(model.model.layers[0].mlp.gate)).mixout_p == 0.3


def test_another_thread_reads_the_parameter_while_a_forward_runs():
    model, part = surgered_part("mixtral", "experts")
    inside, done = threading.Event(), threading.Event()
    read = {}

    def slow_act(m, a, o):
        inside.set()
        done.wait(30)

    part.act_fn.register_forward_hook(slow_act)
    model.set_experts_implementation("eager")
    t = threading.Thread(target=lambda: part(*experts_inputs(part)))
    t.start()
    assert inside.wait(30)
    read["w"] = part.gate_up_proj  # from this thread, during the other thread's forward
    done.set()
    t.join(30)
    assert read["w"] is part._parameters["gate_up_proj"]


# ---- left alone, refused ---------------------------------------------------------------------------

class Undeclared(nn.Module):
    """Fused experts without transformers' experts-interface flags (as Llama 4's and remote code's)."""

    def __init__(self, e=3, h=6, i=4):
        super().__init__()
        self.num_experts = e
        self.gate_up_proj = nn.Parameter(torch.randn(e, h, 2 * i))
        self.down_proj = nn.Parameter(torch.randn(e, i, h))

    def forward(self, x):
        return x


class Holder(nn.Module):
    def __init__(self, experts):
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.experts = experts

    def forward(self, x):
        return self.experts(self.proj(x))


def test_undeclared_layout_is_left_plain_and_named():
    model = Holder(Undeclared())
    surgery.apply(model, mixout=0.1)
    rec = surgery.get_record(model)
    assert [s.to_json() for s in rec.skipped] == [{"name": "experts", "reason": UNDECLARED}]
    assert type(model.experts) is Undeclared
    text = surgery.describe(model)
    assert "left alone: experts (fused experts whose layout the module does not declare" in text
    assert "expert tensors" in text  # and the coverage line counts them as left plain
    kinds = {e["kind"]: e for e in rec.coverage["left"]}
    assert kinds["expert tensors"]["weights"] == 3 * 6 * 8 + 3 * 4 * 6
    assert kinds["expert tensors"]["names"] == ["experts.gate_up_proj", "experts.down_proj"]


def test_llama4_experts_declare_no_layout_and_are_left_plain():
    cfg = transformers.Llama4TextConfig(hidden_size=8, intermediate_size=4, num_local_experts=3)
    model = Holder(transformers.models.llama4.modeling_llama4.Llama4TextExperts(cfg))
    model.proj = nn.Linear(6, 8)
    surgery.apply(model, mixout=0.1)
    assert [s.to_json() for s in surgery.get_record(model).skipped] == [{"name": "experts", "reason": UNDECLARED}]


def test_an_extra_fused_tensor_of_a_declared_module_is_left_plain_and_named():
    model = build("mixtral")
    e = model.model.layers[0].mlp.experts
    e.scales = nn.Parameter(torch.ones(e.num_experts, 2, 3))
    surgery.apply(model, mixout=0.1)
    rec = surgery.get_record(model)
    assert [s.name for s in rec.skipped] == ["model.layers.0.mlp.experts"]
    assert "scales" in rec.skipped[0].reason
    assert isinstance(model.model.layers[0].mlp.experts, MixoutParams)  # its projections are still mixed


@pytest.mark.parametrize("pattern, experts, routers", [
    ({"exclude": ["experts"]}, False, True),
    ({"exclude": ["gate"]}, True, False),
    ({"include": ["mlp.experts"]}, True, False),  # experts only: no Linear layer selected, and that is fine
])
def test_include_and_exclude_select_experts_and_routers(pattern, experts, routers):
    model = build("mixtral")
    surgery.apply(model, mixout=0.1, **pattern)
    layers = model.model.layers
    assert all(isinstance(layer.mlp.experts, MixoutParams) is experts for layer in layers)
    assert all(isinstance(layer.mlp.gate, MixoutParams) is routers for layer in layers)
    surgery.revert(model)


def test_frozen_experts_are_left_alone_with_the_reason():
    model = build("mixtral")
    for layer in model.model.layers:
        layer.mlp.experts.requires_grad_(False)
    surgery.apply(model, mixout=0.1)
    assert {s.name: s.reason for s in surgery.get_record(model).skipped} == {
        f"model.layers.{i}.mlp.experts": "weight frozen, requires_grad=False: Mixout would not change it"
        for i in (0, 1)}


def test_rdrop_runs_two_forwards_when_only_experts_are_mixed():
    model = build("mixtral")
    surgery.apply(model, mixout=0.1, include=["mlp.experts"])
    model.train()
    strategy, why = surgery.rdrop_strategy(model)
    assert strategy == "separate" and "Mixout model.layers.0.mlp.experts" in why


# ---- coverage ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, kwargs, kinds", [
    ("mixtral", {}, {"embeddings", "norms"}),
    ("gpt-oss", {}, {"embeddings", "norms", "biases", "other"}),  # attention sinks
    ("gpt2-lm", {}, {"tied heads", "norms", "biases", "embeddings"}),
    ("vit", {}, {"convolutions", "norms", "biases", "embeddings"}),
    ("bert", {"exclude": ["classifier"], "msd": 4}, {"embeddings", "norms", "biases", "linear layers"}),
    ("mixtral", {"exclude": ["experts"]}, {"embeddings", "norms", "expert tensors"}),
])
def test_coverage_counts_every_trainable_weight_once(name, kwargs, kinds):
    model = build(name)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    surgery.apply(model, mixout=0.1, **kwargs)
    rec = surgery.get_record(model)
    cov = rec.coverage
    assert cov["trainable"] == trainable
    assert cov["mixout"] + sum(e["weights"] for e in cov["left"]) == trainable
    assert {e["kind"] for e in cov["left"]} == kinds
    mixed = sum(p.numel() for n, m in model.named_modules() if isinstance(m, (MixLinear, MixoutParams))
                for k, p in m.named_parameters(recurse=False) if k != TARGET_SUFFIX and "bias" not in k)
    assert cov["mixout"] == mixed
    if kwargs.get("msd"):
        assert cov["msd"] == sum(p.numel() for p in model.classifier.parameters())
    text = surgery.describe(model)
    line = next(x for x in text.splitlines() if x.startswith("  coverage of the"))
    assert f"{trainable:,} trainable weights: mixout {100 * cov['mixout'] / trainable:.1f}%" in line
    assert all(k in text for k in kinds)
    back = surgery.Record.from_dict(rec.to_json())  # what a checkpoint carries: the same lines, without torch
    assert back.coverage == cov and line in surgery.describe(back).splitlines()


def test_a_malformed_coverage_is_refused_naming_the_field():
    model = build("bert")
    surgery.apply(model, mixout=0.1)
    d = surgery.get_record(model).to_dict()
    d["coverage"] = {"trainable": "many", "mixout": [1]}
    with pytest.raises(ValueError, match="record field coverage.trainable must be a non-negative integer"):
        surgery.describe(d)


# ---- checkpoints -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["qwen3-moe", "gpt-oss", "mixtral"])
def test_export_and_convert_drop_the_expert_targets(name, tmp_path):
    from surgery.checkpoint import convert

    model = build(name)
    inputs = batch(name)
    surgery.apply(model, mixout=0.2)
    moved(model).eval()
    with torch.no_grad():
        ref = model(**inputs).logits
    model.save_pretrained(tmp_path / "surgered")
    plan = convert(tmp_path / "surgered", tmp_path / "plain")
    if name != "mixtral":  # Mixtral's save_pretrained renames its MoE keys (mlp. -> block_sparse_moe.): see the notes
        assert not plan.warnings
    surgery.export(model, tmp_path / "exported")
    for d in ("plain", "exported"):
        loaded, info = getattr(transformers, ZOO[name].cls).from_pretrained(tmp_path / d, output_loading_info=True)
        assert not any(info.values()), info
        assert not any(k.endswith(TARGET_SUFFIX) for k in loaded.state_dict())
        with torch.no_grad():
            assert torch.equal(loaded.eval()(**inputs).logits, ref)


# ---- modules whose swap could not be exact: refused before anything changes ---------------------------------

class _Scale(nn.Module):
    def forward(self, w):
        return w * 1.0


@pytest.mark.parametrize("spoil, message", [
    ("copy", r"'model.layers.0.mlp.experts' is already a Mixout layer \(MixoutMixtralExperts\) that no live surgery"),
    ("compile", r"mixout cannot mix 'model.layers.0.mlp.experts': it was compiled on its own"),
    ("forward", r"mixout cannot mix 'model.layers.0.mlp.experts': its forward is replaced on the instance"),
    ("parametrize", r"mixout cannot mix 'model.layers.0.mlp.experts': its Parameters are parametrized"),
])
def test_an_experts_module_whose_swap_could_not_be_exact_is_refused(spoil, message, untouched):
    model = build("mixtral")
    e = model.model.layers[0].mlp.experts
    if spoil == "copy":
        other = build("mixtral")
        surgery.apply(other, mixout=0.1)
        model.model.layers[0].mlp.experts = copy.deepcopy(other.model.layers[0].mlp.experts)
        vars(model.model.layers[0].mlp.experts)["config"] = model.config  # not a record-carrying config
    elif spoil == "compile":
        e.compile()
    elif spoil == "forward":
        e.forward = lambda *a: a[0]
    else:
        torch.nn.utils.parametrize.register_parametrization(e, "down_proj", _Scale())
    check = untouched(model)
    with pytest.raises(SurgeryError, match=message):
        surgery.apply(model, mixout=0.1)
    check()
    surgery.apply(model, mixout=0.1, exclude=["model.layers.0.mlp.experts"])  # the fix the message names


def test_a_forward_bound_on_the_instance_is_pointed_at_the_swap_in(masks):
    import functools

    model = build("mixtral")
    e = model.model.layers[0].mlp.experts
    e._old_forward = e.forward  # how accelerate's add_hook_to_module wraps forward
    e.forward = functools.partial(lambda module, *a, **k: module._old_forward(*a, **k), e)
    surgery.apply(model, mixout=0.3)
    swapped = model.model.layers[0].mlp.experts
    assert vars(swapped)["forward"].args[0] is swapped and swapped._old_forward.__self__ is swapped
    swapped.train()(*experts_inputs(swapped))
    assert len(masks) == 2  # the swap-in's own forward ran, mixing
    surgery.revert(model)
    assert model.model.layers[0].mlp.experts is e and vars(e)["forward"].args[0] is e
