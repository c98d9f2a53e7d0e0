"""Multi-sample dropout heads: one batched call, eval equivalence, batched == looped."""

import pytest
import torch
from torch import nn
from conftest import tiny_bert

import surgery
from surgery.layers.msd import draw_masks, msd_forward


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
        self.classifier = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        return self.classifier(self.body(x))


def _bert(num_labels=3):
    return tiny_bert(num_labels=num_labels)


def test_batched_equals_looped_for_the_same_masks():
    torch.manual_seed(0)
    head = Net().classifier
    x = torch.randn(5, 16)
    masks = draw_masks(x, 8, 0.3)
    batched = msd_forward(head, x, 8, 0.3, masks)
    looped = torch.stack([head(x * masks[i]) for i in range(8)]).mean(0)
    torch.testing.assert_close(batched, looped, rtol=1e-6, atol=1e-6)


def test_training_forward_calls_the_head_once_with_k_samples_and_averages():
    torch.manual_seed(0)
    net = Net()
    calls = []
    surgery.apply(net, msd=4, msd_p=0.5)
    net.classifier[0].register_forward_pre_hook(lambda m, a: calls.append(a[0].shape))
    x = torch.randn(3, 6)
    torch.manual_seed(11)
    y = net(x)
    assert y.shape == (3, 3)
    assert calls == [(12, 16)]  # one call, K*B rows: no Python loop over samples
    # the same seed and masks drawn the same way give the same result through msd_forward
    with torch.no_grad():
        h = net.body(x)
    torch.manual_seed(11)
    net.eval()
    ref = msd_forward(net.classifier, h, 4, 0.5)
    assert torch.equal(y, ref)


def test_eval_is_the_unwrapped_head_bitwise():
    net = Net()
    x = torch.randn(4, 6)
    net.eval()
    ref = net(x)
    surgery.apply(net, msd=8)
    assert torch.equal(net(x), ref)
    surgery.revert(net)
    assert not net.classifier._forward_hooks and not net.classifier._forward_pre_hooks


def test_msd_on_a_transformers_model_works_with_its_own_loss():
    model = _bert()
    surgery.apply(model, msd=8, msd_p=0.2, dropout=0.0)
    assert [h.to_json() for h in surgery.get_record(model).msd] == [{"name": "classifier", "k": 8, "p": 0.2}]
    ids = torch.randint(0, 50, (4, 7))
    out = model(input_ids=ids, labels=torch.tensor([0, 1, 2, 1]))
    assert out.logits.shape == (4, 3) and out.loss.requires_grad
    out.loss.backward()
    assert model.classifier.weight.grad is not None


def test_msd_samples_exposes_the_per_sample_outputs():
    net = Net()
    surgery.apply(net, msd=5)
    x = torch.randn(3, 6)
    with surgery.msd_samples(net) as got:
        y = net(x)
    assert len(got) == 1 and got[0].shape == (5, 3, 3)
    torch.testing.assert_close(got[0].mean(0), y)
    net(x)
    assert len(got) == 1  # nothing collected outside the block


def test_msd_samples_without_a_head_is_an_error_telling_to_apply_msd():
    net = Net()
    surgery.apply(net, dropout=0.0)
    with pytest.raises(surgery.SurgeryError, match=r"apply\(model, msd=K\)"):
        with surgery.msd_samples(net):
            pass


def test_head_errors_name_the_candidates():
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    with pytest.raises(surgery.HeadError, match="no task head found.*'0', '1'"):
        surgery.apply(net, msd=4)
    with pytest.raises(surgery.HeadError, match="close names: .*'classifier'"):
        surgery.apply(Net(), msd=4, head="clasifier")

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier, self.score = nn.Linear(3, 2), nn.Linear(3, 2)

    with pytest.raises(surgery.HeadError, match="ambiguous.*'classifier', 'score'"):
        surgery.apply(Two(), msd=4)
    surgery.apply(Two(), msd=4, head="score")  # naming it resolves the ambiguity


def test_head_can_be_a_nested_module():
    net = Net()
    surgery.apply(net, msd=3, head="classifier.2")
    assert surgery.get_record(net).msd[0].name == "classifier.2"
    assert net(torch.randn(2, 6)).shape == (2, 3)
