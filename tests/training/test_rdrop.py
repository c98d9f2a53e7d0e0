"""R-Drop: the loss against the paper's and fairseq's reductions, regression consistency,
bad input, and the two-pass helper's strategy (independent noise in both passes)."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_bert
from torch import nn
from transformers import AutoConfig
from transformers.modeling_outputs import SequenceClassifierOutput

import surgery
import surgery.layers.mixout
from surgery import SurgeryError, SurgeryTypeError, rdrop_forward, rdrop_loss, rdrop_strategy


def _bert(seed=0, **cfg):
    return tiny_bert(seed, **cfg)


def _batch(n=4, seq=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(5, 50, (n, seq), generator=g), "labels": torch.randint(0, 3, (n,), generator=g)}


def _perturb(model, scale=0.5):
    """Move weights away from the Mixout targets (as training would), so mixing changes outputs."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):  # not the frozen targets
            p.add_(scale * torch.randn(p.shape, generator=g))


# ---- the loss --------------------------------------------------------------------------------

def test_classification_is_half_the_paper_objective():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    y = torch.randint(0, 5, (6,), generator=g)
    alpha = 0.7
    kl_ab = F.kl_div(F.log_softmax(b, -1), F.log_softmax(a, -1), reduction="none", log_target=True).sum(-1)  # KL(Pa||Pb)
    kl_ba = F.kl_div(F.log_softmax(a, -1), F.log_softmax(b, -1), reduction="none", log_target=True).sum(-1)
    paper = (F.cross_entropy(a, y, reduction="none") + F.cross_entropy(b, y, reduction="none")
             + alpha * 0.5 * (kl_ab + kl_ba)).mean()
    torch.testing.assert_close(rdrop_loss(a, b, y, alpha=alpha), paper / 2)


def test_token_level_matches_fairseq_sum_reduction_over_the_doubled_batch():
    # fairseq's criterion: NLL summed over the concatenated batch [x; x] plus alpha * (sum KL + sum reverse KL) / 2,
    # padding masked, the gradient divided by the sample size (tokens of the doubled batch): the same number.
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 7, 11, generator=g), torch.randn(3, 7, 11, generator=g)
    y = torch.randint(0, 11, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 2:] = 0
    pad = (mask == 0).unsqueeze(-1)
    alpha = 5.0
    nll = sum(F.cross_entropy(x.reshape(-1, 11), y.reshape(-1), reduction="none")[mask.reshape(-1) == 1].sum()
              for x in (a, b))
    p_loss = F.kl_div(F.log_softmax(a, -1), F.softmax(b, -1), reduction="none").masked_fill(pad, 0).sum()
    q_loss = F.kl_div(F.log_softmax(b, -1), F.softmax(a, -1), reduction="none").masked_fill(pad, 0).sum()
    fairseq = (nll + alpha * (p_loss + q_loss) / 2) / (2 * mask.sum())
    torch.testing.assert_close(rdrop_loss(a, b, y, alpha=alpha, mask=mask), fairseq)


def test_consistency_is_zero_for_equal_passes_symmetric_and_positive_otherwise():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    assert rdrop_loss(a, a.clone()).item() == 0.0
    assert rdrop_loss(a, b).item() > 0
    torch.testing.assert_close(rdrop_loss(a, b), rdrop_loss(b, a))
    torch.testing.assert_close(rdrop_loss(a, b, alpha=3.0), 3 * rdrop_loss(a, b, alpha=1.0))
    assert rdrop_loss(a, b, alpha=0.0).item() == 0.0


def test_regression_consistency_is_mse_reaches_both_passes_and_the_blog_formula_is_zero():
    p1 = torch.tensor([[1.0], [2.0], [0.5]], requires_grad=True)
    p2 = torch.tensor([[1.5], [1.0], [0.5]], requires_grad=True)
    c = rdrop_loss(p1, p2, task="regression")
    assert c.item() == pytest.approx(0.5 * (0.25 + 1.0 + 0.0) / 3)
    c.backward()
    assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0
    torch.testing.assert_close(p1.grad, -p2.grad)  # pulls the two passes toward each other
    assert rdrop_loss(p1, p1.detach().clone(), task="regression").item() == 0.0
    # the widely read blog: KL on log_softmax of two scalar RMSEs. Softmax over one value is 1: always zero.
    rmse1, rmse2 = p1.pow(2).mean().sqrt().view(1), p2.pow(2).mean().sqrt().view(1)
    blog = F.kl_div(F.log_softmax(rmse1, -1), F.softmax(rmse2, -1), reduction="sum")
    assert blog.item() == 0.0 and rmse1.item() != rmse2.item()
    # and rdrop_loss refuses that shape for classification instead of silently returning zero
    with pytest.raises(SurgeryError, match="task='regression'"):
        rdrop_loss(p1, p2)


def test_regression_task_loss_and_target_shapes():
    p1, p2 = torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0], [2.0]])
    y = torch.tensor([2.0, 2.0])  # (B,) against (B, 1): accepted, no (B, B) broadcasting
    expected = 0.5 * (((p1 - 2) ** 2).mean() + ((p2 - 2) ** 2).mean()) + 2.0 * 0.5 * ((p1 - p2) ** 2).mean()
    torch.testing.assert_close(rdrop_loss(p1, p2, y, task="regression", alpha=2.0), expected)
    torch.testing.assert_close(rdrop_loss(p1.view(-1), p2.view(-1), y, task="regression", alpha=2.0), expected)
    with pytest.raises(SurgeryError, match="no broadcasting"):
        rdrop_loss(p1, p2, torch.zeros(2, 2), task="regression")


def test_task_loss_is_the_mean_over_passes_with_ignore_index_and_mask():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    y = torch.randint(0, 4, (2, 5), generator=g)
    y[0, 0] = -100
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    keep = (mask == 1) & (y != -100)
    ce = lambda x: F.cross_entropy(x[keep], y[keep])  # noqa: E731
    c = rdrop_loss(a, b, mask=mask)
    torch.testing.assert_close(rdrop_loss(a, b, y, mask=mask, alpha=1.0), 0.5 * (ce(a) + ce(b)) + c)
    # masked positions change nothing
    a2 = a.clone()
    a2[1, 4] += 100.0
    torch.testing.assert_close(rdrop_loss(a2, b, y, mask=mask), rdrop_loss(a, b, y, mask=mask))


def test_model_outputs_and_bf16_inputs():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(3, 3, generator=g), torch.randn(3, 3, generator=g)
    y = torch.tensor([0, 1, 2])
    ref = rdrop_loss(a, b, y)
    torch.testing.assert_close(rdrop_loss(SequenceClassifierOutput(logits=a), {"logits": b}, y), ref)
    low = rdrop_loss(a.bfloat16(), b.bfloat16(), y)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("call, match", [
    (lambda a: rdrop_loss(a, a[:2]), "different shapes"),
    (lambda a: rdrop_loss(a, a, torch.randn(3)), "integer class indices"),
    (lambda a: rdrop_loss(a, a, torch.tensor([0, 1])), "target shape"),
    (lambda a: rdrop_loss(a, a, task="ranking"), "unknown task"),
    (lambda a: rdrop_loss(a, a, alpha=-1.0), "alpha"),
    (lambda a: rdrop_loss(a, a, alpha=float("nan")), "alpha"),
    (lambda a: rdrop_loss(a, a, alpha=math.inf), "alpha"),
    (lambda a: rdrop_loss(a, a, alpha=True), "alpha"),
    (lambda a: rdrop_loss(a, a, mask=torch.ones(4)), "mask shape"),
    (lambda a: rdrop_loss(a, a, torch.ones(3, dtype=torch.bool), task="regression"), "real-valued"),
])
def test_bad_input_is_one_clear_error(call, match):
    a = torch.randn(3, 4)
    with pytest.raises(SurgeryError, match=match):
        call(a)


def test_output_without_logits_is_a_type_error():
    with pytest.raises(SurgeryTypeError, match="logits"):
        rdrop_loss([1.0], [1.0])


# ---- the two passes ------------------------------------------------------------------------------

def test_auto_strategy_follows_the_active_surgery():
    assert rdrop_strategy(_bert().train())[0] == "concat"  # plain dropout
    m = surgery.apply(_bert(), msd=4).train()
    assert rdrop_strategy(m)[0] == "concat"  # MSD masks are per row
    m = surgery.apply(_bert(), mixout=0.2).train()
    strategy, reason = rdrop_strategy(m)
    assert strategy == "separate" and "Mixout" in reason
    m.eval()
    assert rdrop_strategy(m)[0] == "concat"  # eval Mixout layers draw nothing
    bn = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).train()
    assert rdrop_strategy(bn)[0] == "separate"
    bart = AutoConfig.for_model("bart", vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1,
                                encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=20,
                                decoder_ffn_dim=20, max_position_embeddings=32, encoder_layerdrop=0.1)
    from transformers import BartForSequenceClassification
    assert rdrop_strategy(BartForSequenceClassification(bart).train())[1].startswith("LayerDrop")


def test_auto_strategy_walks_the_model_once_not_every_step(walks):
    """The per-step decision reads the training flags and rates of what one walk found; the module tree is
    walked again only when it changes (apply, revert, a module assigned anywhere)."""
    m = surgery.apply(_bert(layers=2), mixout=0.2).train()
    batch = {k: v for k, v in _batch().items() if k != "labels"}
    mixed = [x for x in m.modules() if isinstance(x, surgery.layers.mixout.MixLinear)]
    rdrop_forward(m, batch)  # the first step walks the model
    walks.clear()
    for _ in range(5):
        rdrop_forward(m, batch)
    assert walks == [] and rdrop_strategy(m)[0] == "separate"
    for layer in mixed:
        layer.eval()  # flags are read every step: an eval Mixout layer draws nothing
    m.bert.pooler.dense.train()
    assert rdrop_strategy(m) == ("separate", "Mixout bert.pooler.dense draw noise once per forward for the whole "
                                             "batch")
    m.bert.pooler.dense.eval()
    assert rdrop_strategy(m)[0] == "concat" and walks == []
    surgery.revert(m)  # the tree changed: walked again, and nothing shares noise now
    walks.clear()
    m.train()
    assert rdrop_strategy(m)[0] == "concat" and walks == ["BertForSequenceClassification"]
    m.classifier = nn.Sequential(nn.BatchNorm1d(16), m.classifier)  # a module assigned: walked again
    walks.clear()
    assert rdrop_strategy(m) == ("separate", "BatchNorm classifier.0 draw noise once per forward for the whole batch")
    assert walks == ["BertForSequenceClassification"]


def test_two_passes_see_independent_mixout_masks(monkeypatch):
    m = surgery.apply(_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), mixout=0.5).train()
    _perturb(m)
    drawn = []
    real = surgery.layers.mixout._scale
    monkeypatch.setattr(surgery.layers.mixout, "_scale", lambda p, n, like: drawn.append(real(p, n, like)) or drawn[-1])
    b = _batch()
    out1, out2 = rdrop_forward(m, b)  # auto: two forwards
    layers = len(surgery.get_record(m).mixout)
    assert len(drawn) == 2 * layers  # every layer drew a mask in each pass ...
    assert all(not torch.equal(drawn[i], drawn[i + layers]) for i in range(layers))  # ... and they differ
    assert not torch.allclose(out1.logits, out2.logits)
    assert rdrop_loss(out1, out2).item() > 1e-4
    # what the concatenated batch would do: one mask per layer for both halves, identical outputs, zero KL
    drawn.clear()
    c1, c2 = rdrop_forward(m, b, strategy="concat")
    assert len(drawn) == layers
    torch.testing.assert_close(c1.logits, c2.logits)
    assert rdrop_loss(c1, c2).item() < 1e-10


def test_concat_gives_independent_msd_and_dropout_noise_and_the_right_loss():
    m = surgery.apply(_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), msd=4, msd_p=0.5).train()
    _perturb(m)
    b = _batch()
    out1, out2 = rdrop_forward(m, b)  # auto: concat
    assert out1.logits.shape == (4, 3) and not torch.allclose(out1.logits, out2.logits)
    # the concatenated forward's loss is the mean of the two halves' losses
    torch.testing.assert_close(out1.loss, 0.5 * (F.cross_entropy(out1.logits, b["labels"])
                                                 + F.cross_entropy(out2.logits, b["labels"])))
    d = _bert().train()  # plain dropout only
    o1, o2 = rdrop_forward(d, b)
    assert not torch.allclose(o1.logits, o2.logits)


def test_concat_halves_equal_a_single_forward_without_noise():
    m = _bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
    b = _batch()
    ref = m(**b)
    o1, o2 = rdrop_forward(m, b, strategy="concat")
    torch.testing.assert_close(o1.logits, ref.logits)
    torch.testing.assert_close(o2.logits, ref.logits)
    torch.testing.assert_close(o1.loss, ref.loss)


def test_tensor_and_tuple_batches_for_plain_modules():
    net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2)).train()
    x = torch.randn(5, 4)
    a, b = rdrop_forward(net, x)
    assert a.shape == b.shape == (5, 2) and not torch.equal(a, b)
    a, b = rdrop_forward(net, (x,), strategy="separate")
    assert a.shape == (5, 2)


def test_two_pass_helper_bad_input():
    m = _bert()
    with pytest.raises(SurgeryError, match="eval mode"):
        rdrop_forward(m.eval(), _batch())
    with pytest.raises(SurgeryError, match="unknown strategy"):
        rdrop_forward(m.train(), _batch(), strategy="twice")
    with pytest.raises(SurgeryError, match="batched tensor"):
        rdrop_forward(nn.Identity().train(), {"x": 3}, strategy="concat")
