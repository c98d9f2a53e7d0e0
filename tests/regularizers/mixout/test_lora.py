"""surgery composed with PEFT/LoRA, in both orders, and with merge_and_unload.

* ``apply(peft_model, mixout=p)``: frozen layers are left alone (a general rule: a weight that
  does not train is never mixed), LoRA adapters are mixed on their layer's effective weight
  ``W0 + s B A`` toward ``W0`` (checked against that formula with the same mask), the head's
  trainable copy is an ordinary Mixout layer; revert restores everything.
* ``apply(model)`` then ``get_peft_model``: one warning at the first training forward, and
  revert works on the PEFT model and on the inner model.
* ``merge_and_unload()`` in either order keeps the record; revert gives plain Linear layers
  holding the merged weights.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from zoo import batch, build

import surgery
from surgery import SurgeryError
from surgery.layers.mixout import LoraMixout, MixLinear

SELF = "bert.encoder.layer.{}.attention.self.{}"
LORA_A = [SELF.format(i, f"{n}.lora_A.default") for i in (0, 1) for n in ("query", "value")]
FROZEN = ([SELF.format(i, n) for i in (0, 1) for n in ("query.base_layer", "key", "value.base_layer")]
          + [f"bert.encoder.layer.{i}.{n}" for i in (0, 1) for n in ("attention.output.dense", "intermediate.dense",
                                                                       "output.dense")]
          + ["bert.pooler.dense", "classifier.original_module"])
FROZEN_REASON = "weight frozen, requires_grad=False: Mixout would not change it"


def _lora(**kw):
    return LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"], **kw)


def _peft(seed=0, dtype=None, **kw):
    model = build("bert", seed=seed)
    if dtype is not None:
        model = model.to(dtype)
    return get_peft_model(model, _lora(**kw))


def _inner(peft_model):
    return peft_model.base_model.model


def _randomize_lora_b(peft_model):
    """LoRA initialises B to zero; give it values so W0 + s B A differs from W0."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


def _classes(model):
    return [(n, type(m)) for n, m in model.named_modules()]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _train_step(model, b):
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**b).loss.backward()
    opt.step()
    opt.zero_grad()


def _no_surgery_layers(model):
    return not any(isinstance(m, (MixLinear, LoraMixout)) for m in model.modules())


# ---- apply(peft_model) --------------------------------------------------------------------

def test_apply_on_peft_model_mixes_only_what_trains():
    pm = _peft()
    surgery.apply(pm, mixout=0.1)
    rec = surgery.get_record(pm)
    assert [m.name for m in rec.mixout] == [LORA_A[0], LORA_A[1], LORA_A[2], LORA_A[3],
                                               "classifier.modules_to_save.default"]
    assert [m.kind for m in rec.mixout] == ["lora"] * 4 + [None]
    assert sorted(s.name for s in rec.skipped) == sorted(FROZEN)
    assert {s.reason for s in rec.skipped} == {FROZEN_REASON}
    # one target only: the head copy's (LoRA entries mix toward the frozen base weight)
    inner = _inner(pm)
    assert [k for k in inner.state_dict() if k.endswith("mixout_target")] == \
        ["classifier.modules_to_save.default.mixout_target"] == rec.target_keys
    assert all(isinstance(inner.get_submodule(n), LoraMixout) for n in LORA_A)
    # the record lives on the innermost model and is found from every wrapper
    assert "_surgery" in vars(inner) and "_surgery" not in vars(pm) and "_surgery" not in vars(pm.base_model)
    assert surgery.is_surgered(pm) and surgery.is_surgered(pm.base_model) and surgery.is_surgered(inner)
    assert surgery.describe(pm).splitlines()[:6] == [
        "BertForSequenceClassification: surgery (record v1)",
        "  mixout p=0.1 on 5 layers, targets 0.0 MiB:",
        "    bert.encoder.layer.{0-1}.attention.self.query.lora_A.default  (x2)",
        "    bert.encoder.layer.{0-1}.attention.self.value.lora_A.default  (x2)",
        "    classifier.modules_to_save.default",
        "  LoRA: 4 lora_A layers mix their layer's W0 + s*B@A toward the frozen base weight W0 (no target copy)",
    ]
    assert f"  left alone ({FROZEN_REASON}):" in surgery.describe(pm).splitlines()


def test_frozen_weights_are_left_alone_on_any_model():
    """The general rule, without PEFT: a frozen backbone gets no Mixout, only the head does."""
    model = build("bert")
    model.bert.requires_grad_(False)
    surgery.apply(model, mixout=0.1)
    rec = surgery.get_record(model)
    assert [m.name for m in rec.mixout] == ["classifier"]
    assert len(rec.skipped) == 13 and {s.reason for s in rec.skipped} == {FROZEN_REASON}
    model.classifier.requires_grad_(False)
    surgery.revert(model)
    with pytest.raises(SurgeryError) as e:
        surgery.apply(model, mixout=0.1)
    assert str(e.value) == ("mixout=0.1 selected no nn.Linear/Conv1D layer (skipped: bert.encoder.layer.0.attention."
                            "self.query, bert.encoder.layer.0.attention.self.key, bert.encoder.layer.0.attention.self."
                            "value, bert.encoder.layer.0.attention.output.dense, bert.encoder.layer.0.intermediate."
                            "dense); check include/exclude")
    assert not surgery.is_surgered(model)


@pytest.mark.parametrize("p", [0.3, 0.9])
def test_lora_mixout_is_the_paper_formula_with_the_same_mask(p):
    """W_mix = W0 + s B A diag(M/(1-p)), M one Bernoulli(1-p) per input neuron shared by the batch;
    output and the gradients of A, B and x match autograd through that formula."""
    pm = _peft(dtype=torch.float64)
    _randomize_lora_b(pm)
    surgery.apply(pm, mixout=p)
    pm.train()
    layer = _inner(pm).bert.encoder.layer[0].attention.self.query
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    W0, b0, s = layer.base_layer.weight, layer.base_layer.bias, layer.scaling["default"]
    x = torch.randn(3, 7, 32, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 7, 32, dtype=torch.float64)
    torch.manual_seed(11)
    y = layer(x)
    gA, gB, gx = torch.autograd.grad((y * g).sum(), (A, B, x))

    torch.manual_seed(11)
    mask = torch.empty(32, dtype=torch.float64).bernoulli_(1 - p).div_(1 - p)  # the same draw
    assert 0 < int((mask == 0).sum()) < 32  # the mask really drops some input neurons and keeps others
    A2, B2, x2 = (t.detach().clone().requires_grad_() for t in (A, B, x))
    y_ref = F.linear(x2, W0 + s * B2 @ A2 @ torch.diag(mask), b0)
    rA, rB, rx = torch.autograd.grad((y_ref * g).sum(), (A2, B2, x2))
    for got, want in ((y, y_ref), (gA, rA), (gB, rB), (gx, rx)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert not torch.equal(y, F.linear(x, W0 + s * B @ A, b0))  # not the unmixed layer


def test_lora_mixout_scale_is_not_rounded_to_bf16():
    """A bf16 LoRA input is scaled by the float32 M/(1-p) and rounded once: 1/(1-p) rounded to bf16
    first would bias E[W_mix] by 0.16% at p = 0.1."""
    layer = LoraMixout.from_module(nn.Linear(64, 8, bias=False).to(torch.bfloat16), 0.1)
    layer.train()
    x = torch.randn(4, 64).to(torch.bfloat16)
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    scale = torch.empty(64).bernoulli_(0.9).div_(0.9)  # float32, the same draw
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.linear((x * scale).to(torch.bfloat16), layer.weight))
    assert not torch.equal(y, F.linear(x * scale.to(torch.bfloat16), layer.weight))


def test_lora_mixout_eval_is_plain_lora_bitwise_and_p1_is_the_base_layer():
    plain = _peft()
    _randomize_lora_b(plain)
    pm = copy.deepcopy(plain)
    surgery.apply(pm, mixout=0.3)
    b = batch("bert")
    b.pop("labels")
    plain.eval(), pm.eval()
    assert torch.equal(pm(**b).logits, plain(**b).logits)
    surgery.revert(pm)
    surgery.apply(pm, mixout=1.0)
    layer = _inner(pm).bert.encoder.layer[1].attention.self.value
    layer.train()
    x = torch.randn(2, 5, 32)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_revert_of_peft_model_restores_everything_and_keeps_training():
    pm = _peft()
    _randomize_lora_b(pm)  # so that lora_A gets a gradient too
    classes, state, params = _classes(pm), _state(pm), [id(p) for p in pm.parameters()]
    cfg = _inner(pm).config.to_dict()
    surgery.apply(pm, mixout=0.1, dropout=0.0)
    assert _inner(pm).config.hidden_dropout_prob == 0.0
    surgery.revert(pm)
    assert _classes(pm) == classes and [id(p) for p in pm.parameters()] == params
    after = pm.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], v) for k, v in state.items())
    assert _inner(pm).config.to_dict() == cfg and not surgery.is_surgered(pm)
    # trained in between: the trained LoRA weights stay, the frozen ones are bitwise untouched
    surgery.apply(pm, mixout=0.1)
    _train_step(pm, batch("bert"))
    surgery.revert(pm)
    after = pm.state_dict()
    assert _classes(pm) == classes and list(after) == list(state)
    changed = sorted(k for k in state if not torch.equal(after[k], state[k]))
    assert changed == sorted(k for k, p in pm.named_parameters() if p.requires_grad)


def test_merge_and_unload_after_apply_keeps_the_record_and_reverts_to_merged_weights():
    pm = _peft()
    surgery.apply(pm, mixout=0.1)
    _train_step(pm, batch("bert"))
    q = _inner(pm).bert.encoder.layer[0].attention.self.query
    merged_q = (q.base_layer.weight + q.lora_B["default"].weight @ q.lora_A["default"].weight * q.scaling["default"])
    head = _inner(pm).classifier.modules_to_save["default"].weight.detach().clone()
    pm.eval()
    b = batch("bert")
    b.pop("labels")
    want = pm(**b).logits
    merged = pm.merge_and_unload()
    assert surgery.is_surgered(merged)
    assert type(merged.classifier) is MixLinear  # the trained head copy took its wrapper's place
    surgery.revert(merged)
    assert _no_surgery_layers(merged) and not surgery.is_surgered(merged)
    plain = build("bert")
    assert _classes(merged) == _classes(plain) and list(merged.state_dict()) == list(plain.state_dict())
    torch.testing.assert_close(merged.bert.encoder.layer[0].attention.self.query.weight, merged_q.detach(),
                               rtol=0, atol=1e-7)
    assert torch.equal(merged.classifier.weight, head)
    torch.testing.assert_close(merged(**b).logits, want, rtol=0, atol=1e-5)


# ---- apply(model) then get_peft_model ------------------------------------------------------

FROZEN_WARNING = (
    "surgery: Mixout layer 'bert.encoder.layer.0.attention.self.query' (and maybe others) holds a frozen weight "
    "(requires_grad=False): Mixout does not train it, and on an untrained weight it is the identity. This happens "
    "when the model is frozen or wrapped by get_peft_model after surgery.apply: call surgery.revert(model) first, "
    "then surgery.apply(peft_model, mixout=p), which mixes the LoRA adapters and leaves frozen layers alone")


def test_peft_after_apply_warns_once_at_the_first_training_forward():
    model = build("bert")
    surgery.apply(model, mixout=0.1)
    pm = get_peft_model(model, _lora())
    b = batch("bert")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm.eval()
        pm(**b)  # eval: Mixout is off, nothing to say
        assert [str(w.message) for w in caught if "surgery" in str(w.message)] == []
        pm.train()
        pm(**b)
        pm(**b)
    assert [str(w.message) for w in caught if "surgery" in str(w.message)] == [FROZEN_WARNING]


@pytest.mark.parametrize("target", ["peft", "inner"])
def test_revert_finds_layers_through_peft_wrappers(target):
    model = build("bert")
    surgery.apply(model, mixout=0.1, dropout=0.0)
    pm = get_peft_model(model, _lora())
    assert surgery.is_surgered(pm) and surgery.is_surgered(model)
    assert type(_inner(pm).bert.encoder.layer[0].attention.self.query.base_layer) is MixLinear
    reference = get_peft_model(build("bert"), _lora())  # the same PEFT model, never surgered
    surgery.revert(pm if target == "peft" else model)
    assert not surgery.is_surgered(pm) and _no_surgery_layers(pm)
    assert _classes(pm) == _classes(reference)
    assert list(pm.state_dict()) == list(reference.state_dict())
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in pm.state_dict().items())
    assert model.config.hidden_dropout_prob == 0.15


def test_merge_and_unload_of_a_surgered_model_reverts_to_plain_merged_layers():
    model = build("bert")
    surgery.apply(model, mixout=0.1)
    pm = get_peft_model(model, _lora())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _train_step(pm, batch("bert"))
    q = _inner(pm).bert.encoder.layer[1].attention.self.value
    merged_w = (q.base_layer.weight + q.lora_B["default"].weight @ q.lora_A["default"].weight * q.scaling["default"])
    merged = pm.merge_and_unload()
    assert merged is model and surgery.is_surgered(merged)
    assert type(merged.bert.encoder.layer[1].attention.self.value) is MixLinear
    surgery.revert(merged)
    plain = build("bert")
    assert _no_surgery_layers(merged) and _classes(merged) == _classes(plain)
    assert list(merged.state_dict()) == list(plain.state_dict())
    torch.testing.assert_close(merged.bert.encoder.layer[1].attention.self.value.weight, merged_w.detach(),
                               rtol=0, atol=1e-7)


# ---- refusals: nothing changes ----------------------------------------------------------------

def _refused(pm, message, **kw):
    classes, state = _classes(pm), _state(pm)
    with pytest.raises(SurgeryError) as e:
        surgery.apply(pm, mixout=0.1, **kw)
    assert str(e.value) == message
    assert not surgery.is_surgered(pm) and _classes(pm) == classes
    assert all(torch.equal(v, state[k]) for k, v in pm.state_dict().items())


def test_dora_is_refused():
    _refused(_peft(use_dora=True),
             "mixout cannot mix LoRA layer 'bert.encoder.layer.0.attention.self.query': its adapter 'default' uses a "
             "LoRA variant (DoraLinearVariant); Mixout is defined here for vanilla, unmerged LoRA adapters on a frozen "
             "base layer. Pass exclude=['bert.encoder.layer.0.attention.self.query'] to leave it alone")


def test_merged_adapter_is_refused():
    pm = _peft()
    pm.merge_adapter()
    _refused(pm, "mixout cannot mix LoRA layer 'bert.encoder.layer.0.attention.self.query': its adapters are merged "
                 "into the base weight (call unmerge_adapter() before apply); Mixout is defined here for vanilla, "
                 "unmerged LoRA adapters on a frozen base layer. Pass exclude=['bert.encoder.layer.0.attention.self."
                 "query'] to leave it alone")


def test_trainable_base_layer_under_an_adapter_is_refused():
    pm = _peft()
    _inner(pm).bert.encoder.layer[1].attention.self.value.base_layer.requires_grad_(True)
    _refused(pm, "mixout cannot mix 'bert.encoder.layer.1.attention.self.value.base_layer': it trains inside PEFT "
                 "layer 'bert.encoder.layer.1.attention.self.value' (peft.tuners.lora.layer.Linear), for which Mixout "
                 "is not defined (surgery mixes plain layers and vanilla LoRA adapters of Linear layers). Pass "
                 "exclude=['bert.encoder.layer.1.attention.self.value'] to leave it alone")


def test_excluding_the_refused_layer_works():
    pm = _peft(use_dora=True)
    surgery.apply(pm, mixout=0.1, exclude=["query", "value"])
    assert [m.name for m in surgery.get_record(pm).mixout] == ["classifier.modules_to_save.default"]
    surgery.revert(pm)
    assert _no_surgery_layers(pm)


def test_lora_fa_frozen_a_trainable_b_is_mixed():
    """LoRA-FA freezes A and trains B: the layer's effective weight still trains, so it is mixed."""
    pm = _peft()
    for n, p in pm.named_parameters():
        if "lora_A" in n:
            p.requires_grad_(False)
    surgery.apply(pm, mixout=0.1)
    assert [m.name for m in surgery.get_record(pm).mixout][:4] == LORA_A
    assert isinstance(_inner(pm).bert.encoder.layer[0].attention.self.query.lora_A["default"], nn.Linear)


def test_rdrop_runs_two_forwards_with_lora_mixout():
    """A LoRA Mixout mask is shared by the batch, so R-Drop's halves of [x; x] would share it."""
    pm = _peft()
    surgery.apply(pm, mixout=0.1)
    pm.train()
    strategy, why = surgery.rdrop_strategy(pm)
    assert (strategy, why) == ("separate", "Mixout bert.encoder.layer.0.attention.self.query.lora_A.default and 4 "
                                           "more draw noise once per forward for the whole batch")


# ---- every adapter: several LoRA adapters, other tuners ------------------------------------------------

def _two_adapters():
    """A PEFT model with adapters 'default' (query, value) and 'b' (query only, rank 2), each with its
    own head copy; B randomised so every adapter changes its layer."""
    pm = _peft()
    pm.add_adapter("b", LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=6, target_modules=["query"]))
    _randomize_lora_b(pm)
    return pm


LORA_A_B = [SELF.format(i, "query.lora_A.b") for i in (0, 1)]


def test_every_lora_adapter_is_mixed_and_an_activated_one_trains_mixed():
    pm = _two_adapters()
    assert pm.active_adapter == "default" and not any(p.requires_grad for n, p in pm.named_parameters() if ".b." in n)
    classes, state, params = _classes(pm), _state(pm), [id(p) for p in pm.parameters()]
    surgery.apply(pm, mixout=0.4)
    rec = surgery.get_record(pm)
    assert sorted(m.name for m in rec.mixout) == sorted(LORA_A + LORA_A_B + ["classifier.modules_to_save.default",
                                                                              "classifier.modules_to_save.b"])
    inner = _inner(pm)
    assert all(isinstance(inner.get_submodule(n), LoraMixout) for n in LORA_A + LORA_A_B)
    assert type(inner.classifier.modules_to_save["b"]) is MixLinear  # the inactive head copy too
    assert not any("lora_A.b" in s.name or "modules_to_save.b" in s.name for s in rec.skipped)

    # PEFT makes adapter b (and its head copy) train; its training forward is Mixout on W0 + s_b B_b A_b exactly
    pm.set_adapter("b")
    pm.train()
    layer = inner.bert.encoder.layer[0].attention.self.query
    assert layer.active_adapters == ["b"] and layer.lora_A["b"].weight.requires_grad
    A, B = layer.lora_A["b"].weight, layer.lora_B["b"].weight
    W0, b0, s = layer.base_layer.weight, layer.base_layer.bias, layer.scaling["b"]
    layer.lora_dropout["b"].p = 0.0  # PEFT's own dropout on the adapter input, off for the comparison
    x = torch.randn(3, 7, 32)
    torch.manual_seed(11)
    y = layer(x)
    torch.manual_seed(11)
    mask = torch.empty(32).bernoulli_(0.6).div_(0.6)
    assert 0 < int((mask == 0).sum()) < 32
    torch.testing.assert_close(y, F.linear(x, W0 + s * B @ A @ torch.diag(mask), b0), rtol=0, atol=1e-6)
    assert not torch.allclose(y, F.linear(x, W0 + s * B @ A, b0))
    head = inner.classifier.modules_to_save["b"]
    b = batch("bert")
    _train_step(pm, b)  # trains adapter b; its head copy's target stays frozen and untouched
    assert not head.mixout_target.requires_grad and torch.equal(head.mixout_target, state[
        "base_model.model.classifier.modules_to_save.b.weight"])

    # revert gives back every adapter's Linear and head copy, the same Parameters
    layer.lora_dropout["b"].p = 0.1
    surgery.revert(pm)
    assert _classes(pm) == classes and [id(p) for p in pm.parameters()] == params and list(pm.state_dict()) == list(state)
    assert _no_surgery_layers(pm)


def test_frozen_active_adapter_is_left_alone():
    """An adapter loaded for inference (active, frozen) is left alone, like every frozen weight."""
    pm = _peft()
    for n, p in pm.named_parameters():
        if "lora_" in n:
            p.requires_grad_(False)
    surgery.apply(pm, mixout=0.1)
    rec = surgery.get_record(pm)
    assert [m.name for m in rec.mixout] == ["classifier.modules_to_save.default"]
    assert {s.name for s in rec.skipped} >= set(LORA_A)


def _tuner(kind):
    from peft import AdaLoraConfig, IA3Config, LoHaConfig
    return {
        "adalora": AdaLoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"], total_step=10),
        "ia3": IA3Config(task_type="SEQ_CLS", target_modules=["query", "value", "output.dense"],
                         feedforward_modules=["output.dense"]),
        "loha": LoHaConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]),
        "lora_embedding": LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["word_embeddings", "query"]),
    }[kind]


def _tuner_message(what, layer, more, exclude, them="them"):
    return (f"mixout cannot mix PEFT adapter 'default' ({what}) of layer {layer!r}{more}: it trains, but Mixout is "
            "defined here only for plain layers and vanilla LoRA adapters (lora_A/lora_B Linear layers), which this "
            f"adapter is not. Pass exclude={exclude!r} to leave {them} alone (describe then lists {them})")


Q0 = "bert.encoder.layer.0.attention.self.query"
TUNERS = [
    ("adalora", _tuner_message("peft.tuners.adalora.layer.SVDLinear, trainable lora_A, lora_B, lora_E", Q0,
                               " (and 3 more PEFT layers like it)", ["query", "value"]), ["query", "value"]),
    ("ia3", _tuner_message("peft.tuners.ia3.layer.Linear, trainable ia3_l", Q0, " (and 7 more PEFT layers like it)",
                           ["self.query", "self.value", "output.dense"]), ["self.query", "self.value", "output.dense"]),
    ("loha", _tuner_message("peft.tuners.loha.layer.Linear, trainable hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b", Q0,
                            " (and 3 more PEFT layers like it)", ["query", "value"]), ["query", "value"]),
    ("lora_embedding", _tuner_message("peft.tuners.lora.layer.Embedding, trainable lora_embedding_A, lora_embedding_B",
                                      "bert.embeddings.word_embeddings", "", ["word_embeddings"], them="it"),
     ["word_embeddings"]),
]


@pytest.mark.parametrize("kind, message, exclude", TUNERS, ids=[t[0] for t in TUNERS])
def test_other_tuners_are_refused_then_excluded_and_named(kind, message, exclude):
    """Adapters held in ParameterDicts (AdaLoRA, IA3, LoHa, LoRA on an embedding) have no Linear to swap:
    refused before anything changes; excluded, they are named in the record and by describe."""
    pm = get_peft_model(build("bert"), _tuner(kind))
    _refused(pm, message)
    classes = _classes(pm)
    surgery.apply(pm, mixout=0.1, exclude=exclude)
    rec = surgery.get_record(pm)
    left = [s for s in rec.skipped if "not selected by include/exclude" in s.reason]
    from peft.tuners.tuners_utils import BaseTunerLayer
    trained = {n for n, m in _inner(pm).named_modules()
               if isinstance(m, BaseTunerLayer) and any(p.requires_grad for p in m.parameters())
               and not any(isinstance(c, LoraMixout) for c in m.modules())}  # LoRA Linear layers are mixed
    assert trained and {s.name for s in left} == trained  # every trainable adapter layer, each named
    assert any(line.startswith("  left alone (PEFT adapter 'default'") or line.startswith("  left alone: ")
               and "PEFT adapter 'default'" in line for line in surgery.describe(pm).splitlines())
    surgery.revert(pm)
    assert _classes(pm) == classes


def test_an_inactive_adapter_of_another_tuner_is_refused():
    """An inactive IA3 adapter is frozen now, but set_adapter() would make it train without Mixout."""
    from peft import IA3Config
    pm = get_peft_model(build("bert"), IA3Config(task_type="SEQ_CLS", target_modules=["query"], feedforward_modules=[]))
    pm.add_adapter("b", IA3Config(task_type="SEQ_CLS", target_modules=["query"], feedforward_modules=[]))
    for n, p in pm.named_parameters():
        if "ia3_l" in n:
            p.requires_grad_(False)  # the active adapter frozen (loaded for inference): left alone
    with pytest.raises(SurgeryError) as e:
        surgery.apply(pm, mixout=0.1)
    assert str(e.value) == (
        f"mixout cannot mix PEFT adapter 'b' (peft.tuners.ia3.layer.Linear) of layer {Q0!r} (and 1 more PEFT layers "
        "like it): it is inactive and would train after set_adapter(), but Mixout is defined here only for plain "
        "layers and vanilla LoRA adapters (lora_A/lora_B Linear layers), which this adapter is not. Pass "
        "exclude=['query'] to leave them alone (describe then lists them)")
    pm.delete_adapter("b")
    surgery.apply(pm, mixout=0.1)
    assert {s.reason for s in surgery.get_record(pm).skipped if s.name.endswith("query")} == {
        "PEFT adapter 'default' (peft.tuners.ia3.layer.Linear): frozen, requires_grad=False: Mixout would not change it"}
