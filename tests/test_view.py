"""The one walk of ``apply`` (surgery/view.py): every module once, every name of a shared module or tied
Parameter, the configs the model holds (nested ones included, each once)."""

from __future__ import annotations

from conftest import tiny_bert
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from surgery.view import View


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = self.a  # one module under two names
        self.c = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
        self.register_buffer("scale", nn.Parameter(nn.init.ones_(nn.Linear(1, 1).weight)).detach())


def test_every_module_once_every_name_kept():
    view = View(_Shared())
    assert list(view.modules) == ["", "a", "c", "c.0", "c.1"]
    assert view.names[id(view.modules["a"])] == ["a", "b"]
    assert view.tied("a.weight") == ["b.weight"] and view.tied("c.0.weight") == []
    assert [n for n, _ in view.under("c")] == ["c", "c.0", "c.1"]
    assert len(view.params_under("")) == 4 and len(view.params_under("c")) == 2  # a tied Parameter once
    assert list(view.buffers) == ["scale"]
    assert [(kind, name) for kind, name, _ in view.tensors()][-1] == ("buffer", "scale")


def test_tied_lm_head_and_the_configs_a_model_holds():
    cfg = AutoConfig.for_model("gpt2", vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    view = View(AutoModelForCausalLM.from_config(cfg))
    assert view.tied("lm_head.weight") == ["transformer.wte.weight"]
    assert [(name, attr) for name, _, attr, _ in view.held][:2] == [("", "config"), ("transformer", "config")]
    assert len({id(c) for *_, c in view.held}) == 1  # every module holds the model's one config object
    assert [(name, path) for name, path, _ in view.configs()] == [("", [])]  # listed once


def test_nested_configs_are_listed_once_with_their_path():
    model = tiny_bert()
    model.config.text_config = AutoConfig.for_model("bert", num_hidden_layers=1)
    assert [path for _, path, _ in View(model).configs()] == [[], ["text_config"]]
