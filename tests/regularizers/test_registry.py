"""A regularizer is one registered unit: a toy sixth one, written here alone (one unit and one registration
line), goes through apply, a training step, describe, inspect, export, convert and revert like the built-in
ones; its options and record section are checked by the registry as theirs are."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch
from conftest import tiny_bert
from transformers import AutoModelForSequenceClassification

import surgery
from surgery.cli import main
from surgery.entry import Entry, Field
from surgery.options import Option, check_p
from surgery.regularizers import Plan, Regularizer, Undo, register, unregister
from surgery.schema import PROB, STR


# ---- the toy: Gaussian noise on the input of every FFN layer in training --------------------------------

class NoiseEntry(Entry):
    """One layer whose input gets noise: ``name``, ``sigma``."""

    name = Field(STR, required=True)
    sigma = Field(PROB, required=True)


class NoiseUndo(Undo):
    def __init__(self, handles):
        self.handles = handles

    def undo(self, view, rec):
        for h in self.handles:
            h.remove()


@dataclass
class NoisePlan(Plan):
    sigma: float = 0.0
    names: list[str] = field(default_factory=list)

    def install(self, ctx, rec):
        def noisy(module, args):
            return (args[0] + self.sigma * torch.randn_like(args[0]),) if module.training else None

        handles = [ctx.module(n).register_forward_pre_hook(noisy) for n in self.names]
        rec.input_noise += [NoiseEntry(name=n, sigma=self.sigma) for n in self.names]
        return NoiseUndo(handles)


class InputNoise(Regularizer):
    """Toy: ``apply(model, input_noise=sigma)`` adds N(0, sigma^2) noise to the input of every FFN output layer
    (``*.output.dense``) in training."""

    name = "input_noise"
    options = (Option("input_noise", 0.0, check_p, json=PROB, doc="noise on the FFN layers' input (toy)",
                      recorded=lambda opts: opts.input_noise > 0),)
    sections = {"input_noise": NoiseEntry}

    def describe(self, rec, measured=None):
        if not rec.input_noise:
            return []
        return [f"  input noise sigma={rec.input_noise[0].sigma} on {len(rec.input_noise)} layers"]

    def plan(self, ctx):
        if ctx.opts.input_noise == 0.0:
            return None
        names = [n for n in ctx.view.modules if n.endswith("output.dense") and ".attention." not in n]
        return NoisePlan(changes=names, sigma=ctx.opts.input_noise, names=names)


@pytest.fixture
def toy():
    unit = register(InputNoise())  # the one registration line
    yield unit
    unregister(unit.name)


LINE = "  input noise sigma=0.05 on 2 layers"


def _ids():
    return torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(1))


def test_a_sixth_regularizer_registered_from_a_test_file(toy, tmp_path, capsys):
    plain, model = tiny_bert(layers=2), tiny_bert(layers=2)
    surgery.apply(model, input_noise=0.05, dropout=0.0)
    rec = surgery.get_record(model)
    assert [e.to_json() for e in rec.input_noise] == [
        {"name": f"bert.encoder.layer.{i}.output.dense", "sigma": 0.05} for i in (0, 1)]
    assert rec.args["input_noise"] == 0.05 and LINE in surgery.describe(model).splitlines()
    x, y = _ids(), torch.tensor([0, 1, 2, 0])
    # training: the noise is on (dropout is off, so it is the only randomness), one optimizer step
    model.train()
    assert not torch.equal(model(x).logits, model(x).logits)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x, labels=y).loss.backward()
    opt.step()
    # eval: the plain model's computation, on the trained weights
    model.eval()
    plain.load_state_dict(model.state_dict())
    assert torch.equal(model(x).logits, plain.eval()(x).logits)

    # the record on disk carries the toy's section: inspect describes it, convert and export give plain models
    model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())["surgery"]
    assert saved["input_noise"] == [e.to_json() for e in rec.input_noise]
    assert main(["inspect", str(tmp_path / "ckpt")]) == 0
    assert "  " + LINE in capsys.readouterr().out.splitlines()
    assert main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "plain"), "--quiet"]) == 0
    surgery.export(model, tmp_path / "exported")
    for d in ("plain", "exported"):
        back = AutoModelForSequenceClassification.from_pretrained(tmp_path / d).eval()
        assert back.config.hidden_dropout_prob == 0.1 and not hasattr(back.config, "surgery")
        assert torch.equal(back(x).logits, plain(x).logits)

    # revert: the hooks are gone, the model is the plain one
    surgery.revert(model)
    model.train()
    torch.manual_seed(0)
    a = model(x).logits
    torch.manual_seed(0)
    assert torch.equal(a, plain.train()(x).logits)
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_its_option_and_section_are_checked_like_the_built_in_ones(toy, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"input_noise must be a probability in \[0, 1\], got 2.0"):
        surgery.apply(tiny_bert(), input_noise=2.0)
    model = surgery.apply(tiny_bert(), input_noise=0.05)
    model.save_pretrained(tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["surgery"]["input_noise"][0]["sigma"] = "loud"
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    assert main(["inspect", str(tmp_path / "ckpt")]) == 2
    assert "record entry input_noise[0].sigma must be a number in [0, 1], not str 'loud'" in capsys.readouterr().err


def test_unregistered_its_option_is_unknown():
    with pytest.raises(surgery.SurgeryTypeError, match="unexpected keyword argument 'input_noise'"):
        surgery.apply(tiny_bert(), input_noise=0.05)


def test_a_module_replaced_by_two_regularizers_is_refused(untouched):
    """Claims are enforced: two units may not replace one module (Mixout and a toy that swaps the head)."""

    class Swapper(Regularizer):
        name = "swapper"
        options = (Option("swap_head", False, lambda v, n: v, json=PROB, doc="toy"),)

        def plan(self, ctx):
            return Plan(replaces=["classifier"]) if ctx.opts.swap_head else None

    model = tiny_bert()
    check = untouched(model)
    register(Swapper())
    try:
        with pytest.raises(surgery.SurgeryError, match="regularizers 'mixout' and 'swapper' both replace module "
                                                       "'classifier'"):
            surgery.apply(model, mixout=0.1, swap_head=True)
    finally:
        unregister("swapper")
    check()
