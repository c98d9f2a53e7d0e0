"""Bad input to apply, the losses and the training-state helpers: accept what is meant (numpy and
0-d tensor probabilities) or one clear error, raised before anything changes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_untouched, snapshot, tiny_bert
from torch import nn
from zoo import batch, build

import surgery
from surgery import HeadError, SurgeryError, SurgeryTypeError
from surgery.layers.mixout import MixLinear

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BAD_APPLY = [
    # flags must be real bools: "no" and "False" are truthy strings
    (dict(mixout=0.1, low_memory="no"), SurgeryTypeError, r"^low_memory must be True or False, got 'no' \(str\)$"),
    (dict(mixout=0.1, mixout_head="False"), SurgeryTypeError, r"^mixout_head must be True or False, got 'False' \(str\)$"),
    (dict(mixout=0.1, mixout_tied=1), SurgeryTypeError, r"^mixout_tied must be True or False, got 1 \(int\)$"),
    (dict(mixout=0.1, mixout_tied=np.bool_(True)), SurgeryTypeError, r"^mixout_tied must be True or False"),
    # probabilities: real numbers only
    (dict(mixout=np.bool_(True)), ValueError, r"^mixout must be a probability in \[0, 1\], got np.True_"),
    (dict(mixout=torch.tensor(True)), ValueError, r"^mixout must be a probability in \[0, 1\], got tensor\(True\)"),
    (dict(mixout=torch.tensor([0.1])), ValueError, r"^mixout must be a probability in \[0, 1\], got tensor\(\[0.1000\]\)"),
    (dict(mixout=np.float32(1.5)), ValueError, r"^mixout must be a probability in \[0, 1\], got 1.5$"),
    (dict(dropout=torch.tensor(-0.5)), ValueError, r"^dropout must be a probability in \[0, 1\], got -0.5$"),
    (dict(msd=4.0), ValueError, r"^msd must be the number of dropout samples, an int >= 0 \(0 = off\), got 4.0$"),
    (dict(msd=True), ValueError, r"^msd must be the number of dropout samples"),
    # an option that only matters with another one
    (dict(msd_p=0.3), SurgeryError, r"^msd_p=0.3 is the dropout probability of multi-sample dropout, which is off "
                                    r"\(msd=0\); pass msd=K \(e.g. msd=8\) or drop msd_p$"),
    (dict(head="classifier"), SurgeryError, r"^head='classifier' names the multi-sample-dropout head \(msd=K\) or the "
                                            r"head that mixout_head=False leaves a plain layer; with neither it has no "
                                            r"effect: pass msd=K, or mixout=p with mixout_head=False, or drop head$"),
    (dict(head="classifier", mixout=0.1), SurgeryError, r"^head='classifier' names the multi-sample-dropout head"),
    (dict(head="classifier", dropout=0.0), SurgeryError, r"^head='classifier' names the multi-sample-dropout head"),
    (dict(mixout_head=False), SurgeryError, r"^mixout_head=False only matters with Mixout, which is off \(mixout=0\); "
                                            r"pass mixout=p \(e.g. mixout=0.1\) or drop mixout_head$"),
    (dict(mixout_tied=True, dropout=0.0), SurgeryError, r"^mixout_tied=True only matters with Mixout"),
    (dict(low_memory=True, msd=2), SurgeryError, r"^low_memory=True only matters with Mixout"),
    (dict(target_dtype=torch.bfloat16), SurgeryError, r"^target_dtype=torch.bfloat16 only matters with Mixout"),
    # a head that is not a head
    (dict(msd=4, head="bert"), HeadError, r"^head 'bert' \(BertModel\) is not a task head: a multi-sample-dropout head "
                                          r"takes one feature tensor and returns the outputs, but its forward takes no "
                                          r"required input\. Point head= at the module that maps the backbone's "
                                          r"features to the outputs \(e.g. 'classifier', or an inner nn.Linear\)$"),
    (dict(msd=4, head="bert.embeddings"), HeadError, r"^head 'bert.embeddings' \(BertEmbeddings\) is not a task "
                                                     r"head.*forward takes no required input"),
    (dict(msd=4, head="dropout"), HeadError, r"^head 'dropout' \(Dropout\) holds no parameters, so it is not a task "
                                             r"head; point head= at"),
]


@pytest.mark.parametrize("kwargs,exc,msg", BAD_APPLY, ids=[repr(c[0]) for c in BAD_APPLY])
def test_bad_apply_is_one_clear_error_and_nothing_changes(kwargs, exc, msg):
    model = tiny_bert()
    snap = snapshot(model)
    with pytest.raises(exc, match=msg):
        surgery.apply(model, **kwargs)
    assert_untouched(model, snap)


class TwoInputHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x, gate):
        return self.lin(x) * gate


class WithTwoInputHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.classifier = TwoInputHead()

    def forward(self, x):
        return self.classifier(self.body(x), torch.ones(1))


def test_a_head_taking_two_required_inputs_is_refused():
    model = WithTwoInputHead()
    snap = snapshot(model)
    with pytest.raises(HeadError, match=r"^head 'classifier' \(TwoInputHead\) is not a task head: .* its forward takes "
                                        r"2 required inputs \(x, gate\)\."):
        surgery.apply(model, msd=2)
    assert_untouched(model, snap)


def test_any_module_mapping_one_feature_tensor_is_a_valid_head():
    # the rule refuses only what cannot work: no parameters, no required input (backbones) or several inputs
    model = tiny_bert()
    surgery.apply(model, msd=2, head="bert.encoder.layer.0.output.dense")
    assert [h.to_json() for h in surgery.get_record(model).msd] == [{"name": "bert.encoder.layer.0.output.dense", "k": 2, "p": 0.2}]


@pytest.mark.parametrize("p", [np.float32(0.1), np.float16(0.1), np.float64(0.1), torch.tensor(0.1),
                               torch.tensor(0.1, dtype=torch.bfloat16), torch.tensor(0.1, dtype=torch.float64)],
                         ids=["np.float32", "np.float16", "np.float64", "tensor", "tensor-bf16", "tensor-f64"])
def test_numpy_scalars_and_0d_tensors_are_the_probability_written(p):
    model = surgery.apply(tiny_bert(), mixout=p, dropout=p, msd=2, msd_p=p)
    rec = surgery.get_record(model)
    assert rec.args["mixout"] == rec.args["dropout"] == rec.args["msd_p"] == 0.1
    assert type(rec.args["mixout"]) is float
    assert {m.p for m in rec.mixout} == {0.1} and rec.msd[0].p == 0.1
    assert {m.mixout_p for m in model.modules() if isinstance(m, MixLinear)} == {0.1}
    assert "mixout p=0.1 on" in surgery.describe(model)
    json.dumps(rec.to_dict())  # plain JSON, no numpy/torch objects


def test_integer_counts_from_numpy_and_tensors():
    rec = surgery.get_record(surgery.apply(tiny_bert(), msd=np.int64(4)))
    assert rec.args["msd"] == 4 and type(rec.args["msd"]) is int and rec.msd[0].k == 4
    rec = surgery.get_record(surgery.apply(tiny_bert(), msd=torch.tensor(3)))
    assert rec.args["msd"] == 3 and type(rec.args["msd"]) is int


def test_head_with_mixout_head_false_names_the_layer_left_plain():
    model = surgery.apply(tiny_bert(), mixout=0.1, mixout_head=False, head="classifier")
    rec = surgery.get_record(model)
    assert {"name": "classifier", "reason": "task head (mixout_head=False)"} in [s.to_json() for s in rec.skipped]
    assert type(model.classifier) is nn.Linear


def test_msd_head_gets_a_clear_error_for_token_ids_at_the_first_forward():
    # a head whose forward takes one input but is handed token ids by the model: refused at the forward, in words
    class Ids(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 3)

        def forward(self, ids):
            return self.emb(ids)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = Ids()

        def forward(self, ids):
            return self.classifier(ids)

    model = surgery.apply(Model(), msd=2).train()
    with pytest.raises(SurgeryError, match=r"^the multi-sample-dropout head \(Ids\) got a torch.int64 input of shape "
                                           r"\(2, 3\), not features; point head= at the module"):
        model(torch.zeros(2, 3, dtype=torch.long))


_RECORD_SCRIPT = r"""
import torch.nn as nn
import surgery
names = ["query", "key", "value", "dense", "out", "gate", "up", "down", "classifier", "pooler"]
m = nn.ModuleDict({n: nn.Linear(2, 2) for n in names})
m = surgery.apply(m, mixout=0.1, include=set(names[:8]), exclude=frozenset(["out", "gate", "up"]))
print(surgery.get_record(m).to_json())
"""


@pytest.mark.slow
def test_sets_are_recorded_sorted_whatever_the_hash_seed():
    outs = []
    for seed in ("0", "1"):  # string hashing differs between these two seeds, so set order does
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=ROOT)
        r = subprocess.run([sys.executable, "-c", _RECORD_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(r.stdout)
    assert outs[0] == outs[1]
    args = json.loads(outs[0])["args"]
    assert args["include"] == ["dense", "down", "gate", "key", "out", "query", "up", "value"]
    assert args["exclude"] == ["gate", "out", "up"]


# ---- the losses -----------------------------------------------------------------------------------

class NoLabels(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.classifier = nn.Linear(8, 3)

    def forward(self, x):
        return self.classifier(torch.tanh(self.body(x)))


@pytest.mark.parametrize("alpha,how", [(0.0, r"loss = your_loss_fn\(model\(\*\*inputs\), labels\)"),
                                       (1.0, r"out1, out2 = surgery.rdrop_forward\(model, inputs\); loss = "
                                             r"surgery.rdrop_loss\(out1, out2, labels, task=..., alpha=...\)")])
def test_compute_loss_on_a_module_without_labels_is_one_clear_error(alpha, how):
    model = surgery.apply(NoLabels(), mixout=0.1).train()
    snap = snapshot(model)
    b = {"x": torch.randn(4, 6), "labels": torch.tensor([0, 1, 2, 0])}
    rng = torch.get_rng_state()
    with pytest.raises(SurgeryError, match=r"^NoLabels.forward takes no 'labels' argument, so the model computes no "
                                           r"loss of its own, and compute_loss without msd_loss=True trains on the "
                                           r"model's own loss\. Compute the task loss yourself from the batch without "
                                           rf"'labels': {how}; or, with a multi-sample-dropout head, pass "
                                           r"msd_loss=True \(surgery then computes cross-entropy or MSE against "
                                           r"batch\['labels'\], task=...\)$"):
        surgery.compute_loss(model, b, rdrop_alpha=alpha)
    assert_untouched(model, snap)
    assert torch.equal(torch.get_rng_state(), rng)  # refused before any forward


def test_compute_loss_with_msd_loss_works_on_a_module_without_labels():
    model = surgery.apply(NoLabels(), msd=4, msd_p=0.3).train()
    b = {"x": torch.randn(4, 6), "labels": torch.tensor([0, 1, 2, 0])}
    torch.manual_seed(0)
    r = surgery.compute_loss(model, b, msd_loss=True)
    torch.manual_seed(0)
    ref, _ = surgery.msd_loss(model, {"x": b["x"]}, b["labels"])
    assert torch.equal(r.loss, ref)


def test_msd_loss_with_a_float_multilabel_target_on_gpt2_names_the_target():
    model = surgery.apply(build("gpt2"), msd=4).train()
    snap = snapshot(model)
    b = batch("gpt2", model)
    b["labels"] = torch.rand(3, 3)
    with pytest.raises(SurgeryError, match=r"^the target is a torch.float32 tensor of shape \(3, 3\): float targets are "
                                           r"multi-label \(or soft\) labels, which msd_loss's built-in losses do not "
                                           r"cover .* Pass a per-sample loss, e.g. loss_fn=lambda out, y: "
                                           r"F.binary_cross_entropy_with_logits\(out, y\)$"):  # pooled as the model pools
        surgery.msd_loss(model, b)
    assert_untouched(model, snap)


def test_msd_loss_with_a_float_multilabel_target_and_the_loss_it_names():
    torch.manual_seed(0)
    model = surgery.apply(build("gpt2"), msd=4).train()
    b = batch("gpt2", model)
    y = torch.rand(3, 3)
    last = torch.full((3,), b["input_ids"].shape[1] - 1)  # no padding: the last token
    with pytest.raises(SurgeryError, match=r"^the target is a torch.float32 .* loss_fn=lambda out, y: "
                                           r"F.binary_cross_entropy_with_logits\(out, y\)$"):
        surgery.msd_loss(model, {**b, "labels": y}, postprocess=lambda s: s[:, torch.arange(3), last])
    torch.manual_seed(1)
    loss, _ = surgery.msd_loss(model, {**b, "labels": y}, postprocess=lambda s: s[:, torch.arange(3), last],
                               loss_fn=F.binary_cross_entropy_with_logits)
    torch.manual_seed(1)
    with surgery.msd_samples(model) as got:
        model(**{k: v for k, v in b.items() if k != "labels"})
    s = got[0][:, torch.arange(3), last]
    ref = torch.stack([F.binary_cross_entropy_with_logits(s[k], y) for k in range(4)]).mean()
    assert torch.equal(loss, ref)


# ---- training states ------------------------------------------------------------------------------

def test_save_training_state_refuses_extra_that_is_not_plain_data(tmp_path):
    model = surgery.apply(tiny_bert(), mixout=0.1)
    snap = snapshot(model)
    with pytest.raises(SurgeryTypeError, match=r"^extra\['history'\]\[1\] is a ndarray; training states hold only "
                                               r"tensors and plain data"):
        surgery.save_training_state(tmp_path / "s.pt", model, step=1, history=[1.0, np.zeros(2)])
    assert not (tmp_path / "s.pt").exists()
    assert_untouched(model, snap)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/surgery-evil-was-run",))


def test_load_training_state_runs_no_code_and_leaves_the_model(tmp_path):
    if os.path.exists("/tmp/surgery-evil-was-run"):
        os.remove("/tmp/surgery-evil-was-run")
    model = surgery.apply(tiny_bert(), mixout=0.1)
    torch.save({"model": model.state_dict(), "evil": _Evil()}, tmp_path / "s.pt")
    snap = snapshot(model)
    with pytest.raises(SurgeryError, match=r"holds objects other than tensors and plain data, so it is not unpickled "
                                           r"\(torch.load\(weights_only=True\) runs no code\): re-save it"):
        surgery.load_training_state(tmp_path / "s.pt", model)
    assert not os.path.exists("/tmp/surgery-evil-was-run")
    assert_untouched(model, snap)
