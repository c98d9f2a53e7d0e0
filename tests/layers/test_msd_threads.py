"""Several threads through one multi-sample-dropout model at once (what nn.DataParallel does with
its replicas, and what a threaded server does): each call gets its own, correct result."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import tiny_bert
from torch import nn

import surgery
from surgery.layers.msd import msd_forward


class Head(nn.Module):
    """A head that waits inside its forward until ``parties`` threads are inside it at once."""

    def __init__(self, parties: int):
        super().__init__()
        self.lin = nn.Linear(8, 3)
        self.barrier = threading.Barrier(parties, timeout=60)
        self.fail_next = False

    def forward(self, x):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("head failed")
        self.barrier.wait()  # every thread has run the pre-hook; none has run the post-hook yet
        return self.lin(x)


class Net(nn.Module):
    def __init__(self, parties: int = 2):
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.classifier = Head(parties)

    def forward(self, x):
        return self.classifier(torch.tanh(self.body(x)))


def _run_threads(fns):
    results, errors = [None] * len(fns), []

    def run(i, fn):
        try:
            results[i] = fn()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return results


def _reference(net, x, k):
    """What the MSD head computes with p = 0 (every sample is the input itself), in one thread, without hooks."""
    with torch.no_grad():
        return msd_forward(net.classifier.lin, torch.tanh(net.body(x)), k, 0.0)


def test_two_threads_inside_the_head_at_once_each_get_their_own_mean():
    torch.manual_seed(0)
    net = surgery.apply(Net(), msd=4, msd_p=0.0).train()
    xa, xb = torch.randn(5, 6), torch.randn(3, 6)
    with torch.no_grad():
        a, b = _run_threads([lambda: net(xa), lambda: net(xb)])
    assert a.shape == (5, 3) and b.shape == (3, 3)  # not (20, 3): each post-hook averaged its own call
    assert torch.equal(a, _reference(net, xa, 4)) and torch.equal(b, _reference(net, xb, 4))


def test_each_thread_collects_only_its_own_samples():
    torch.manual_seed(0)
    net = surgery.apply(Net(), msd=4, msd_p=0.5).train()
    xa, xb = torch.randn(5, 6), torch.randn(3, 6)

    def collect(x):
        with surgery.msd_samples(net) as got:
            out = net(x)
        return out, got

    (oa, ga), (ob, gb) = _run_threads([lambda: collect(xa), lambda: collect(xb)])
    assert len(ga) == 1 and len(gb) == 1
    assert ga[0].shape == (4, 5, 3) and gb[0].shape == (4, 3, 3)
    assert torch.equal(ga[0].mean(0), oa) and torch.equal(gb[0].mean(0), ob)


def test_msd_loss_in_two_threads_at_once_equals_each_alone():
    torch.manual_seed(0)
    net = surgery.apply(Net(), msd=3, msd_p=0.0).train()
    xa, xb = torch.randn(5, 6), torch.randn(3, 6)
    ya, yb = torch.tensor([0, 1, 2, 0, 1]), torch.tensor([2, 2, 1])
    la, lb = _run_threads([lambda: surgery.msd_loss(net, xa, ya)[0], lambda: surgery.msd_loss(net, xb, yb)[0]])
    net.classifier.barrier = threading.Barrier(1)
    assert torch.equal(la, surgery.msd_loss(net, xa, ya)[0]) and torch.equal(lb, surgery.msd_loss(net, xb, yb)[0])


def test_a_head_call_that_raised_leaves_no_state_behind():
    torch.manual_seed(0)
    net = surgery.apply(Net(parties=1), msd=4, msd_p=0.0).train()
    x = torch.randn(5, 6)
    net.classifier.fail_next = True
    with pytest.raises(RuntimeError, match="head failed"):
        net(x)
    out = net(x)
    assert out.shape == (5, 3)
    net.eval()
    assert net(x).shape == (5, 3)  # eval: the plain head, not confused by the failed call
    net.train()
    with surgery.msd_samples(net) as got:
        net(x)
    assert len(got) == 1 and got[0].shape == (4, 5, 3)


def test_data_parallel_on_cpu_runs_msd_and_msd_loss():
    # without GPUs DataParallel calls the module itself; with several it runs replicas in threads, the case above
    torch.manual_seed(0)
    net = surgery.apply(Net(parties=1), msd=4, msd_p=0.0).train()
    dp = nn.DataParallel(net)
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])
    out = dp(x)
    assert out.shape == (5, 3) and torch.equal(out, _reference(net, x, 4))
    loss, _ = surgery.msd_loss(dp, x, y)
    assert torch.isfinite(loss) and surgery.is_surgered(dp)


def test_two_threads_through_a_transformers_model():
    torch.manual_seed(0)
    model = surgery.apply(tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), msd=4,
                          msd_p=0.0).train()
    gate = {"barrier": threading.Barrier(2, timeout=60)}
    # registered after surgery's pre-hook: both threads have stacked their samples before either head output
    def wait(module, args):
        gate["barrier"].wait()

    model.classifier.register_forward_pre_hook(wait)
    ia, ib = torch.randint(5, 50, (5, 7)), torch.randint(5, 50, (3, 9))
    a, b = _run_threads([lambda: model(input_ids=ia).logits, lambda: model(input_ids=ib).logits])
    gate["barrier"] = threading.Barrier(1)
    with torch.no_grad():
        ra, rb = model(input_ids=ia).logits, model(input_ids=ib).logits
    assert a.shape == (5, 3) and b.shape == (3, 3)
    assert torch.equal(a, ra) and torch.equal(b, rb)
