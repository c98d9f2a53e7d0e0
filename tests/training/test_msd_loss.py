"""The paper-form multi-sample-dropout loss: mean of the K per-sample losses, against a
looped reference, for classification, regression and token tasks; errors without a head."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_bert_config
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification

import surgery
from surgery import NotSurgeredError, SurgeryError, msd_loss, msd_sample_loss
from surgery.layers.msd import draw_masks


class Net(nn.Module):
    def __init__(self, out=3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
        self.classifier = nn.Linear(16, out)

    def forward(self, x):
        return self.classifier(self.body(x))


def _cfg(**kw):
    return tiny_bert_config(**{"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, **kw})


def test_mean_of_per_sample_losses_equals_a_looped_reference():
    torch.manual_seed(0)
    net = surgery.apply(Net(), msd=5, msd_p=0.4).train()
    x, y = torch.randn(4, 6), torch.tensor([0, 2, 1, 2])
    torch.manual_seed(7)
    loss, out = msd_loss(net, x, y)
    loss.backward()
    assert net.body[0].weight.grad.abs().sum() > 0
    # the same masks, drawn the same way, one sample at a time (eval: the head's hooks stay out of the way)
    net.eval()
    with torch.no_grad():
        h = net.body(x)
    torch.manual_seed(7)
    masks = draw_masks(h, 5, 0.4)
    ref = torch.stack([F.cross_entropy(net.classifier(h * masks[k]), y) for k in range(5)]).mean()
    torch.testing.assert_close(loss, ref)
    # the model's output is the mean of the samples, and the paper's loss is not the loss of that mean
    mean_out = torch.stack([net.classifier(h * masks[k]) for k in range(5)]).mean(0)
    torch.testing.assert_close(out, mean_out)
    assert loss.item() > F.cross_entropy(out, y).item()  # Jensen: CE is convex in the logits


def test_bert_classification_takes_labels_from_the_batch():
    torch.manual_seed(0)
    m = surgery.apply(AutoModelForSequenceClassification.from_config(_cfg(num_labels=3)), msd=4).train()
    b = {"input_ids": torch.randint(5, 50, (3, 8)), "labels": torch.tensor([0, 1, 2])}
    with surgery.msd_samples(m) as got:
        torch.manual_seed(3)
        ref_out = m(input_ids=b["input_ids"])
    ref = torch.stack([F.cross_entropy(got[0][k], b["labels"]) for k in range(4)]).mean()
    torch.manual_seed(3)
    loss, out = msd_loss(m, b)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(out.logits, ref_out.logits)
    assert out.loss is None  # labels were kept out of the forward: no wasted loss on the mean output
    assert "labels" in b  # the caller's batch is not modified


def test_regression_head():
    torch.manual_seed(0)
    m = surgery.apply(AutoModelForSequenceClassification.from_config(_cfg(num_labels=1)), msd=3).train()
    ids, y = torch.randint(5, 50, (4, 8)), torch.tensor([0.5, -1.0, 2.0, 0.0])
    with surgery.msd_samples(m) as got:
        torch.manual_seed(5)
        m(input_ids=ids)
    ref = torch.stack([F.mse_loss(got[0][k].view(-1), y) for k in range(3)]).mean()
    torch.manual_seed(5)
    loss, _ = msd_loss(m, {"input_ids": ids}, y, task="regression")
    torch.testing.assert_close(loss, ref)


def test_token_classification_with_ignored_positions():
    torch.manual_seed(0)
    m = surgery.apply(AutoModelForTokenClassification.from_config(_cfg(num_labels=5)), msd=3).train()
    ids = torch.randint(5, 50, (2, 6))
    y = torch.randint(0, 5, (2, 6))
    y[1, 3:] = -100
    with surgery.msd_samples(m) as got:
        torch.manual_seed(9)
        m(input_ids=ids)
    assert got[0].shape == (3, 2, 6, 5)
    ref = torch.stack([F.cross_entropy(got[0][k].reshape(-1, 5), y.reshape(-1)) for k in range(3)]).mean()
    torch.manual_seed(9)
    loss, _ = msd_loss(m, {"input_ids": ids, "labels": y})
    torch.testing.assert_close(loss, ref)


def test_custom_per_sample_loss_fn():
    torch.manual_seed(0)
    net = surgery.apply(Net(), msd=4).train()
    x, y = torch.randn(3, 6), torch.tensor([0, 1, 2])
    fn = lambda o, t: F.cross_entropy(o, t, label_smoothing=0.1)  # noqa: E731
    with surgery.msd_samples(net) as got:
        torch.manual_seed(2)
        net(x)
    torch.manual_seed(2)
    loss, _ = msd_loss(net, x, y, loss_fn=fn)
    torch.testing.assert_close(loss, torch.stack([fn(got[0][k], y) for k in range(4)]).mean())


def test_model_that_pools_after_the_head_is_pooled_the_same_way():
    cfg = AutoConfig.for_model("gpt2", vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32, num_labels=3,
                               pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    m = surgery.apply(AutoModelForSequenceClassification.from_config(cfg), msd=3).train()
    ids, y = torch.randint(5, 50, (2, 6)), torch.tensor([1, 2])
    last = lambda s: s[:, torch.arange(2), -1]  # no padding: the last token  # noqa: E731
    torch.manual_seed(4)
    loss, out = msd_loss(m, {"input_ids": ids, "labels": y}, postprocess=last)
    assert loss.ndim == 0 and out.logits.shape == (2, 3) and torch.isfinite(loss)
    torch.manual_seed(4)
    assert torch.equal(msd_loss(m, {"input_ids": ids, "labels": y})[0], loss)  # found from the model's logits


class _SumsTokens(nn.Module):
    """Pools its head's per-token output by a sum: no token and no reshape gives its logits."""

    def __init__(self):
        super().__init__()
        self.body, self.classifier = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.classifier(self.body(x)).sum(1)


def test_a_pooling_surgery_cannot_match_is_refused_naming_postprocess():
    m = surgery.apply(_SumsTokens(), msd=3).train()
    x, y = torch.randn(2, 5, 6), torch.tensor([1, 2])
    with pytest.raises(SurgeryError, match=r"postprocess=.*msd_loss=False"):
        msd_loss(m, x, y)
    loss, _ = msd_loss(m, x, y, postprocess=lambda s: s.sum(2))
    assert torch.isfinite(loss)


def test_errors_without_a_head_in_eval_and_without_labels():
    x, y = torch.randn(3, 6), torch.tensor([0, 1, 2])
    with pytest.raises(NotSurgeredError, match=r"apply\(model, msd=K\)"):
        msd_loss(Net().train(), x, y)
    with pytest.raises(SurgeryError, match=r"apply\(model, msd=K\)"):
        msd_loss(surgery.apply(Net(), mixout=0.1).train(), x, y)
    net = surgery.apply(Net(), msd=2)
    with pytest.raises(SurgeryError, match="eval mode"):
        msd_loss(net.eval(), x, y)
    with pytest.raises(SurgeryError, match="needs a target"):
        msd_loss(net.train(), x)
    with pytest.raises(SurgeryError, match="integer class indices"):
        msd_loss(net, x, torch.randn(3))
    with pytest.raises(SurgeryError, match="regression"):
        msd_loss(surgery.apply(Net(out=1), msd=2).train(), x, y)


def test_sample_loss_shape_checks():
    s = torch.randn(4, 3, 5)
    with pytest.raises(SurgeryError, match="target shape"):
        msd_sample_loss(s, torch.tensor([0, 1]))
    torch.testing.assert_close(msd_sample_loss(s, torch.tensor([0, 1, 4])),
                               torch.stack([F.cross_entropy(s[k], torch.tensor([0, 1, 4])) for k in range(4)]).mean())
