"""Copies that pair parameters by position with the model: an averaging copy (``AveragedModel``, timm's
``ModelEmaV3``) made before ``apply(mixout=p)`` is refused, naming the order that works; made after apply, it
pairs exactly, and ``revert`` / ``is_surgered`` see through it."""

import pytest
import torch
from conftest import import_timm, tiny_bert
from torch.optim.swa_utils import AveragedModel

import surgery


def _ema_v3(model):
    import_timm()
    from timm.utils.model_ema import ModelEmaV3
    return ModelEmaV3(model, decay=0.5)


@pytest.mark.parametrize("make, kind", [(AveragedModel, "AveragedModel"), (_ema_v3, "ModelEmaV3")])
def test_an_averaging_copy_made_before_apply_is_refused(make, kind, untouched):
    model = tiny_bert(0)
    copy = make(model)
    check = untouched(model)
    with pytest.raises(surgery.SurgeryError, match=rf"^{kind} \(.*\) holds a copy of this model made before surgery.apply"
                                                   rf".*surgery.apply\(model, \.\.\.\), then {kind}\(model\)"):
        surgery.apply(model, mixout=0.1)
    check()
    surgery.apply(model, msd=2)  # adds no Parameter: nothing to shift
    surgery.revert(model)
    del copy
    surgery.apply(model, mixout=0.1)  # the old copy is gone


def test_averaged_model_made_after_apply_pairs_exactly_and_reverts():
    model = surgery.apply(tiny_bert(0), mixout=0.1)
    swa = AveragedModel(model)
    assert surgery.is_surgered(swa)
    snaps = []
    for step in range(2):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(0.01 * (step + 1))
        snaps.append({k: v.clone() for k, v in model.state_dict().items()})
        swa.update_parameters(model)
    averaged = dict(swa.module.named_parameters())
    for name, p in averaged.items():  # every parameter averaged with its own partner
        torch.testing.assert_close(p, (snaps[0][name] + snaps[1][name]) / 2, rtol=0, atol=1e-7)
    surgery.revert(swa)
    assert not surgery.is_surgered(swa) and surgery.is_surgered(model)
    assert not any("mixout" in k for k in swa.module.state_dict())


def test_model_ema_v3_made_after_apply_pairs_exactly():
    model = surgery.apply(tiny_bert(0), mixout=0.1)
    ema = _ema_v3(model)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    ema.update(model)
    now = model.state_dict()
    for k, v in ema.module.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, (before[k] + now[k]) / 2, rtol=0, atol=1e-6)
    assert surgery.is_surgered(ema)


FIRST_APPLY = """
import torch, surgery
from torch.optim.swa_utils import AveragedModel
model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False))  # square: no shape error
swa = AveragedModel(model)  # before surgery watches anything: found when the first apply starts watching
try:
    surgery.apply(model, mixout=0.1)
except surgery.SurgeryError as e:
    assert str(e).startswith("AveragedModel (torch.optim.swa_utils) holds a copy of this model"), e
else:
    raise SystemExit("not refused")
"""


@pytest.mark.slow
def test_a_copy_made_before_the_first_apply_of_the_process_is_found():
    from conftest import run_python

    rc, err = run_python(["-c", FIRST_APPLY], timeout=120)
    assert rc == 0, err
