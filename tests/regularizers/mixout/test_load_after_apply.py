"""Build, apply, then load: a plain state dict loaded into a surgered model brings the targets along (the target of
each layer whose weight it loads is that weight, as if apply had run after the load); a surgered one its own."""

import pytest
import torch
from conftest import tiny_bert
from zoo import build

import surgery


def _targets(model):
    sd = model.state_dict()
    return {k[: -len("mixout_target")]: v for k, v in sd.items() if k.endswith("mixout_target")}


@pytest.mark.parametrize("strict", [False, True])
def test_targets_follow_a_plain_state_dict_loaded_after_apply(strict):
    pretrained = tiny_bert(0).state_dict()
    model = surgery.apply(tiny_bert(1), mixout=0.1)  # built from a config: random weights, random targets
    before = {k: v.clone() for k, v in pretrained.items()}
    model.load_state_dict(pretrained, strict=strict)
    assert all(torch.equal(before[k], pretrained[k]) for k in before)  # the caller's dict is not changed
    targets = _targets(model)
    assert len(targets) >= 7  # every Linear of the encoder, the pooler and the head
    for prefix, t in targets.items():
        assert torch.equal(t, pretrained[prefix + "weight"]), prefix  # max |target - weight| = 0
    reference = surgery.apply(tiny_bert(0), mixout=0.1)  # the same as loading first, then applying
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())


def test_a_partial_plain_load_moves_only_the_targets_of_the_weights_it_loads():
    model = surgery.apply(tiny_bert(1), mixout=0.1)
    old = {k: v.clone() for k, v in _targets(model).items()}
    head = {k: v for k, v in tiny_bert(0).state_dict().items() if k.startswith("classifier.")}
    model.load_state_dict(head, strict=False)
    new = _targets(model)
    assert torch.equal(new["classifier."], head["classifier.weight"])
    assert all(torch.equal(new[k], old[k]) for k in old if k != "classifier.")


def test_a_surgered_state_dict_brings_its_own_targets():
    source = surgery.apply(tiny_bert(0), mixout=0.1)
    with torch.no_grad():
        for n, p in source.named_parameters():
            if not n.endswith("mixout_target"):
                p.add_(1.0)  # trained: weights moved away from their targets
    model = surgery.apply(tiny_bert(1), mixout=0.1)
    model.load_state_dict(source.state_dict())
    for prefix, t in _targets(model).items():
        assert torch.equal(t, tiny_bert(0).state_dict()[prefix + "weight"])


def test_fused_experts_targets_follow_a_plain_load():
    pretrained = build("mixtral").state_dict()
    model = surgery.apply(build("mixtral", seed=1), mixout=0.1)
    model.load_state_dict(pretrained)
    reference = surgery.apply(build("mixtral"), mixout=0.1).state_dict()
    assert any("experts" in k for k in _targets(model))
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
