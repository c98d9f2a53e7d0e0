"""What hangs on a module, and surgery that overlaps surgery: each setup works exactly or is refused
before anything changes (issue 15, sections 1, 2 and 6)."""

from __future__ import annotations

import pytest
import torch
from accelerate import dispatch_model
from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
from conftest import assert_untouched, snapshot, tiny_bert
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune
from transformers import AutoConfig, AutoModelForCausalLM

import surgery
import surgery.layers.mixout
from surgery.layers.mixout import MixLinear

QUERY = "bert.encoder.layer.0.attention.self.query"
IDS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


# ---- 1. the swap keeps what hangs on a module ---------------------------------------------------------

def test_torch_hooks_of_every_kind_carry_over_and_back():
    model = tiny_bert(layers=1).eval()
    query = model.get_submodule(QUERY)
    seen = []
    query.register_forward_pre_hook(lambda m, args: (args[0] + 1.0,))
    query.register_forward_hook(lambda m, args, out: out * 2.0)
    query.register_forward_hook(lambda m, args, kwargs, out: out - 0.5, with_kwargs=True)
    query.register_full_backward_hook(lambda m, gin, gout: seen.append("backward"))
    query.register_state_dict_post_hook(lambda m, sd, prefix, local: sd.__setitem__(prefix + "extra", torch.ones(1)))
    ref = _logits(model)
    surgery.apply(model, mixout=0.3)
    layer = model.get_submodule(QUERY)
    assert isinstance(layer, MixLinear) and layer is not query
    assert torch.equal(_logits(model), ref)  # eval: the original layer, its hooks included, bitwise
    assert f"{QUERY}.extra" in model.state_dict()
    model.train()
    model(IDS).logits.sum().backward()
    assert seen == ["backward"]
    # a hook registered while the Mixout layer stands in stays after revert; its handle removes it from both
    extra = layer.register_forward_hook(lambda m, args, out: out + 0.0)
    gone = layer.register_forward_hook(lambda m, args, out: out * 0.0)
    gone.remove()
    surgery.revert(model)
    assert model.get_submodule(QUERY) is query and type(query) is nn.Linear
    assert len(query._forward_hooks) == 3 and len(query._forward_pre_hooks) == 1 and extra.id in query._forward_hooks
    assert torch.equal(_logits(model.eval()), ref)


class _Scale(ModelHook):
    """An accelerate hook that changes the output, so its absence shows."""

    def post_forward(self, module, output):
        return output * 3.0


@pytest.mark.parametrize("how", ["add_hook_to_module", "dispatch_model(force_hooks=True)"])
def test_accelerate_hooks_carry_over_and_the_layer_still_mixes(how, monkeypatch):
    model = tiny_bert(layers=1).eval()
    if how == "add_hook_to_module":
        add_hook_to_module(model.get_submodule(QUERY), _Scale())
    else:  # what device_map loading across devices leaves on every module; one CPU "device" here
        model = dispatch_model(model, device_map={"": "cpu"}, force_hooks=True)
    hooked = {n for n, m in model.named_modules() if hasattr(m, "_hf_hook")}
    assert QUERY in hooked
    query = model.get_submodule(QUERY)
    ref = _logits(model)
    surgery.apply(model, mixout=0.5)
    layer = model.get_submodule(QUERY)
    assert isinstance(layer, MixLinear) and layer._hf_hook is query._hf_hook
    assert torch.equal(_logits(model), ref)
    draws = []
    real = surgery.layers.mixout._scale
    monkeypatch.setattr(surgery.layers.mixout, "_scale", lambda *a: draws.append(a) or real(*a))
    model.train()(IDS)
    assert len(draws) == len(surgery.get_record(model).mixout)  # the hook's wrapper runs the Mixout layer
    surgery.revert(model)
    assert model.get_submodule(QUERY) is query and {n for n, m in model.named_modules() if hasattr(m, "_hf_hook")} \
        == hooked
    assert torch.equal(_logits(model.eval()), ref)
    remove_hook_from_module(query)
    assert not hasattr(query, "_hf_hook")  # accelerate can still take its hook off the original layer


def test_accelerate_offload_is_refused_naming_the_module(tmp_path):
    from transformers import AutoModelForSequenceClassification

    tiny_bert(layers=1).save_pretrained(tmp_path / "m")
    model = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "m", device_map={"bert.embeddings": "cpu", "bert.encoder": "disk", "bert.pooler": "cpu",
                                    "classifier": "cpu", "dropout": "cpu"}, offload_folder=str(tmp_path / "off"))
    check = snapshot(model)
    with pytest.raises(surgery.SurgeryError, match=r"'bert.encoder.*' is offloaded by accelerate.*without offloading"):
        surgery.apply(model, mixout=0.1)
    assert_untouched(model, check)


def _pruned(m):
    prune.l1_unstructured(m, "weight", amount=0.3)


def _old_weight_norm(m):
    torch.nn.utils.weight_norm(m)


def _parametrized(m):
    parametrizations.weight_norm(m)


def _compiled(m):
    m.compile()


def _lambda_forward(m):
    m.forward = lambda x: nn.Linear.forward(m, x)


UNSWAPPABLE = [
    (_pruned, "prune"), (_old_weight_norm, "weight_norm"), (_parametrized, "parametriz"),
    (_compiled, r"compile\(\)"), (_lambda_forward, "forward is replaced on the instance"),
]


@pytest.mark.parametrize("train_first", [False, True], ids=["before a forward", "after a training forward"])
@pytest.mark.parametrize("make, why", UNSWAPPABLE, ids=[u[1] for u in UNSWAPPABLE])
def test_a_layer_whose_swap_cannot_be_exact_is_refused_with_the_real_reason(make, why, train_first):
    model = tiny_bert(layers=1)
    make(model.get_submodule(QUERY))
    if train_first and make is not _compiled:
        model.train()(IDS)
    check = snapshot(model)
    with pytest.raises(surgery.SurgeryError, match=rf"mixout cannot mix '{QUERY}': .*{why}.*exclude=\['{QUERY}'\]"):
        surgery.apply(model, mixout=0.1)
    assert_untouched(model, check)
    surgery.apply(model, mixout=0.1, exclude=[QUERY])  # the fix the message names
    surgery.revert(model)


# ---- 2. surgery that overlaps surgery -------------------------------------------------------------------

class _Pair(nn.Module):
    def __init__(self, shared):
        super().__init__()
        self.shared, self.head = shared, nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.shared(x))


def _shared():
    return nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.1))


def test_two_models_sharing_a_module_refuse_a_second_surgery_naming_both_places():
    torch.manual_seed(0)
    shared = _shared()
    a, b = _Pair(shared), _Pair(shared)
    surgery.apply(a, mixout=0.1, dropout=0.0)
    check = snapshot(b)
    with pytest.raises(surgery.AlreadySurgeredError, match=r"'shared.*' was changed by the surgery applied to _Pair "
                                                           r"\(where it is 'shared.*'\).*revert that model first"):
        surgery.apply(b, dropout=0.0)
    assert_untouched(b, check)
    surgery.revert(a)
    assert shared[1].p == 0.1 and type(shared[0]) is nn.Linear
    surgery.apply(b, dropout=0.0)  # free again once the first surgery is reverted
    surgery.revert(b)
    assert shared[1].p == 0.1


@pytest.mark.parametrize("order", ["sub-model first", "whole model first"])
def test_a_sub_model_and_its_parent_refuse_a_second_surgery(order):
    model = tiny_bert(layers=1)
    first, second = (model.bert, model) if order == "sub-model first" else (model, model.bert)
    surgery.apply(first, dropout=0.0)
    check = snapshot(second)
    with pytest.raises(surgery.AlreadySurgeredError, match=r"surgery|surgered"):
        surgery.apply(second, dropout=0.0, mixout=0.1)
    assert_untouched(second, check)
    surgery.revert(first)
    assert all(m.p == 0.1 for m in model.modules() if isinstance(m, nn.Dropout))


def test_revert_gives_back_the_config_objects_sub_models_share():
    model = tiny_bert(layers=1)
    assert model.bert.config is model.config
    surgery.apply(model.bert, dropout=0.0)
    assert model.bert.config is not model.config and model.config.hidden_dropout_prob == 0.1  # the parent's: untouched
    surgery.revert(model.bert)
    assert model.bert.config is model.config
    model.config.output_hidden_states = True  # reaches the backbone again
    assert model(IDS).hidden_states is not None


def test_what_the_user_set_on_the_config_during_surgery_stays_after_revert():
    model = tiny_bert(layers=1)
    original = model.config
    surgery.apply(model, dropout=0.0)
    model.config.output_hidden_states = True
    model.config.label2id = {"a": 0, "b": 1, "c": 2}
    surgery.revert(model)
    assert model.config is original and original.output_hidden_states is True
    assert original.label2id == {"a": 0, "b": 1, "c": 2} and original.hidden_dropout_prob == 0.1
    assert "surgery" not in original.to_dict()


# ---- 6. clear errors ---------------------------------------------------------------------------------------

def test_resize_token_embeddings_after_mixing_the_tied_head_says_what_happened():
    cfg = AutoConfig.for_model("gpt2", vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    surgery.apply(model, mixout=0.1, mixout_tied=True)
    model.resize_token_embeddings(60)
    with pytest.raises(surgery.SurgeryError, match=r"weight was replaced after surgery.apply "
                                                   r"\(model.resize_token_embeddings.*Resize before apply"):
        model.train()(IDS)
