"""``apply``'s keywords: made from the registered regularizers' options, checked in one place, and recorded
in a form ``load_pretrained`` turns back into the same call (surgery/options.py, surgery/regularizers/registry.py).
The refusals of each bad value are in test_bad_inputs.py."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import tiny_bert

import surgery
from surgery import regularizers

CALLS = [
    dict(mixout=0.1),
    dict(mixout=0.1, dropout=0.0, msd=8),
    dict(mixout=0.2, mixout_head=False, include=["query", "value", "classifier"], target_dtype=torch.bfloat16,
         low_memory=True),
    dict(mixout=0.1, exclude=r"bert\.pooler.*", mixout_tied=True),
    dict(msd=4, msd_p=0.5, head="classifier"),
    dict(msd=5, msd_p=0.5, msd_layers=True, msd_layer_p=0.1, msd_pool="first"),
    dict(dropout=0.0, drop_path=0.0, router_noise=0.0),
    dict(dropout=0.05),
]


def test_the_signature_is_every_registered_option():
    params = inspect.signature(surgery.apply).parameters
    assert list(params) == ["model"] + [o.name for o in regularizers.all_options()]
    assert all(params[o.name].default == o.default and params[o.name].kind is inspect.Parameter.KEYWORD_ONLY
               for o in regularizers.all_options())
    for o in regularizers.all_options():
        assert o.name in surgery.apply.__doc__  # each in the words of the regularizer that declares it


def test_an_unknown_keyword_is_refused_naming_the_close_one(untouched):
    model = tiny_bert()
    check = untouched(model)
    with pytest.raises(surgery.SurgeryTypeError, match=r"apply\(\) got an unexpected keyword argument 'mixotu'; "
                                                       r"did you mean 'mixout'\?"):
        surgery.apply(model, mixotu=0.1)
    check()


@pytest.mark.parametrize("kwargs", CALLS, ids=str)
def test_the_record_gives_back_the_call(kwargs):
    """``apply_kwargs(record_args(...))`` is the call (what was left at its default left out; ``head`` as it
    was resolved, passed where a regularizer reads it), and applying it writes the same record."""
    rec = surgery.get_record(surgery.apply(tiny_bert(layers=2), **kwargs))
    again = regularizers.apply_kwargs(rec.args, "here")
    expected = dict(kwargs)
    if "head" not in kwargs and (kwargs.get("msd") or kwargs.get("mixout_head") is False):
        expected["head"] = "classifier"  # found by name, then recorded
    if expected.get("msd_pool") == "first":
        del expected["msd_pool"]  # its default
    if "include" in expected:
        expected["include"] = list(expected["include"])
    assert again == expected
    rebuilt = surgery.get_record(surgery.apply(tiny_bert(layers=2), **again))
    assert rebuilt.to_dict() == rec.to_dict()


def test_a_record_argument_no_regularizer_has_is_refused():
    with pytest.raises(surgery.SurgeryError, match=r"where: the record has apply arguments this surgery does not "
                                                   r"know \(warp\); it was saved by a newer surgery"):
        regularizers.apply_kwargs({"mixout": 0.1, "warp": 9}, "where")
