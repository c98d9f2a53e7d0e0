"""Which modules Mixout selects (surgery/regularizers/mixout/selection.py): ``include``/``exclude`` (a regex on
dotted names, or names and dotted suffixes; a module is selected when it or a module containing it matches),
and the task head, mixed toward its initial weights unless ``mixout_head=False``."""

from __future__ import annotations

from conftest import tiny_bert
from torch import nn

import surgery
from surgery.layers.mixout import MixLinear


def _bert():
    return tiny_bert(layers=2, num_labels=2)


def test_selection_regex_list_and_exclude():
    model = _bert()
    surgery.apply(model, mixout=0.1, include=r"bert\.encoder\.layer\.1")  # an ancestor match selects its layers
    names = [m.name for m in surgery.get_record(model).mixout]
    assert names and all(n.startswith("bert.encoder.layer.1.") for n in names) and len(names) == 6
    surgery.revert(model)
    surgery.apply(model, mixout=0.1, include=["query", "value"], exclude=["layer.0"])
    names = [m.name for m in surgery.get_record(model).mixout]
    assert names == ["bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.value"]


def test_head_is_mixed_toward_its_init_by_default_and_can_be_left_alone():
    model = _bert()
    surgery.apply(model, mixout=0.1)
    assert isinstance(model.classifier, MixLinear)
    surgery.revert(model)
    surgery.apply(model, mixout=0.1, mixout_head=False)
    assert type(model.classifier) is nn.Linear
    assert "classifier (task head (mixout_head=False))" in surgery.describe(model)
