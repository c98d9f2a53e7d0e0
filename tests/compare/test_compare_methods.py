"""``surgery compare`` method specs: what each parses to, sweeps and combinations, and every spec that
does not parse is one error naming the problem (and the close knob names)."""

from __future__ import annotations

import pytest

from surgery.compare.methods import DEFAULT_METHODS, parse_methods
from surgery.compare.settings import CompareError


@pytest.mark.parametrize("spec, label, knobs, apply, alpha, msd_loss", [
    ("no_dropout", "no_dropout", {"dropout": 0.0}, {"dropout": 0.0}, 0.0, False),
    ("no_drop_path", "no_drop_path", {"drop_path": 0.0}, {"drop_path": 0.0}, 0.0, False),
    ("mixout", "mixout=0.1", {"mixout": 0.1}, {"mixout": 0.1}, 0.0, False),
    ("mixout=0.3", "mixout=0.3", {"mixout": 0.3}, {"mixout": 0.3}, 0.0, False),
    ("msd", "msd=8", {"msd": 8}, {"msd": 8, "msd_p": 0.2}, 0.0, True),
    ("msd=4+msd_p=0.5", "msd=4+msd_p=0.5", {"msd": 4, "msd_p": 0.5}, {"msd": 4, "msd_p": 0.5}, 0.0, True),
    ("msd_layers", "msd_layers", {"msd_layers": True},
     {"msd": 5, "msd_p": 0.5, "msd_layers": True, "msd_layer_p": 0.2}, 0.0, True),
    ("msd_layers+msd=3+msd_layer_p=0.1", "msd_layers+msd=3+msd_layer_p=0.1",
     {"msd": 3, "msd_layers": True, "msd_layer_p": 0.1},
     {"msd": 3, "msd_p": 0.5, "msd_layers": True, "msd_layer_p": 0.1}, 0.0, True),
    ("rdrop", "rdrop=1", {"rdrop": 1.0}, {}, 1.0, False),
    ("rdrop=0.5+msd=8", "rdrop=0.5+msd=8", {"msd": 8, "rdrop": 0.5}, {"msd": 8, "msd_p": 0.2}, 0.5, True),
    ("mixout=0.1+no_dropout", "mixout=0.1+no_dropout", {"dropout": 0.0, "mixout": 0.1},
     {"mixout": 0.1, "dropout": 0.0}, 0.0, False),
    (" dropout = 0.05 ", "dropout=0.05", {"dropout": 0.05}, {"dropout": 0.05}, 0.0, False),
])
def test_a_spec_is_the_surgery_it_names(spec, label, knobs, apply, alpha, msd_loss):
    base, m = parse_methods([spec])
    assert base.label == "baseline" and base.is_baseline and base.apply_kwargs() == {} and base.rdrop_alpha == 0
    assert m.label == label and m.knobs == knobs
    assert m.apply_kwargs() == apply and m.rdrop_alpha == alpha and m.msd_loss is msd_loss


def test_the_layer_weighted_head_pools_the_last_token_of_a_decoder():
    (_, m) = parse_methods(["msd_layers"])
    assert m.apply_kwargs(last_token=True)["msd_pool"] == "last" and "msd_pool" not in m.apply_kwargs()


def test_a_sweep_is_one_method_per_value_and_baseline_comes_first_once():
    methods = parse_methods(["mixout=0.1,0.3,0.5+no_dropout", "baseline", "rdrop=0.5,1"])
    assert [m.label for m in methods] == ["baseline", "mixout=0.1+no_dropout", "mixout=0.3+no_dropout",
                                          "mixout=0.5+no_dropout", "rdrop=0.5", "rdrop=1"]
    assert methods[2].knobs == {"dropout": 0.0, "mixout": 0.3}


def test_the_default_set_parses():
    assert [m.label for m in parse_methods(DEFAULT_METHODS)] == list(DEFAULT_METHODS)


@pytest.mark.parametrize("specs, message", [
    (["mixot=0.1"], "unknown knob 'mixot'; did you mean 'mixout'?"),
    (["no_dropuot"], "did you mean 'no_dropout'"),
    (["msd_layer"], "did you mean 'msd_layers' or 'msd_layer_p'"),
    (["zzz"], "unknown knob 'zzz'; known: baseline, drop_path, dropout, mixout, msd"),
    (["mixout=abc"], "mixout='abc' is not a number (e.g. mixout=0.1)"),
    (["mixout=1"], "mixout=1 must be in (0, 1)"),
    (["mixout=0"], "0 is baseline"),
    (["dropout=1.5"], "dropout=1.5 must be a probability in [0, 1]"),
    (["msd=2.5"], "msd=2.5 must be a whole number >= 1"),
    (["msd=0"], "msd=0 must be a whole number >= 1"),
    (["rdrop=-1"], "rdrop=-1 must be > 0"),
    (["rdrop=nan"], "is not a finite number"),
    (["dropout"], "dropout needs a value, e.g. dropout=0"),
    (["no_dropout=0.1"], "'no_dropout' takes no value"),
    (["msd_layers=1"], "'msd_layers' takes no value"),
    (["mixout=0.1,0.2+msd=2,4"], "sweep one knob at a time (mixout and msd both list several values)"),
    (["mixout=0.1,0.1"], "mixout lists a value twice"),
    (["mixout=0.1+mixout=0.2"], "mixout is set twice"),
    (["no_dropout+dropout=0.1"], "dropout is set twice"),
    (["msd_p=0.5"], "msd_p needs an MSD head: add msd=K or msd_layers"),
    (["msd=8+msd_layer_p=0.1"], "msd_layer_p needs msd_layers"),
    (["mixout++no_dropout"], "an empty part between '+' signs"),
    ([""], "an empty method spec"),
    (["baseline"], "only baseline to run"),
    (["no_dropout", "dropout=0"], "methods 'no_dropout' and 'dropout=0' are the same setup"),
    ([3], "a method spec must be a string, got int"),
])
def test_a_spec_that_does_not_parse_is_one_clear_error(specs, message):
    with pytest.raises(CompareError) as e:
        parse_methods(specs)
    assert message in str(e.value) and "\n" not in str(e.value)
