"""The layer-weighted multi-sample-dropout head (``apply(msd=K, msd_layers=True)``): equal to the QUEST solution's
CustomRoberta for the same masks, batched, the eval formula, the zoo encoders and a custom module, the
training integrations, bad input, revert/export/convert refusals, optimiser groups."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel, TrainingArguments

import surgery
import surgery.layers.msd
from surgery.layers.mixout import MixLinear
import zoo
from conftest import finish_worker, init_gloo, spawn_ranks

ENCODERS = ["bert", "roberta", "xlm-roberta", "deberta-v2", "electra", "albert"]
K, P, LAYER_P = 5, 0.5, 0.2  # the seed's head
LAYERED = dict(msd=K, msd_p=P, msd_layers=True, msd_layer_p=LAYER_P)


class Custom(nn.Module):
    """The seed blog's shape: an AutoModel backbone and a Linear head on its CLS vector."""

    def __init__(self, model_type="bert", positional=False, return_dict=True, proj=None, **cfg):
        super().__init__()
        kw = dict(zoo.ZOO[model_type].cfg)
        kw.update(cfg)
        self.backbone = AutoModel.from_config(AutoConfig.for_model(zoo.ZOO[model_type].model_type, **kw))
        hidden = self.backbone.config.hidden_size
        self.proj = nn.Linear(hidden, proj) if proj else None
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Linear(proj or hidden, 3)
        self.positional, self.return_dict = positional, return_dict

    def forward(self, input_ids, attention_mask=None, labels=None):
        if self.positional:
            out = self.backbone(input_ids, attention_mask)
        else:
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, return_dict=self.return_dict)
        h = out[0][:, 0]
        if self.proj is not None:
            h = self.proj(h)
        return self.classifier(self.dropout(h))


def custom(seed=0, **kw):
    torch.manual_seed(seed)
    return Custom(**kw).eval()


def build(name, seed=0):
    return custom(seed) if name == "custom" else zoo.build(name, seed)


def inputs(name, model, seed=1):
    b = zoo.batch("bert" if name == "custom" else name, model, seed)
    return {k: v for k, v in b.items() if k != "labels"}, b["labels"]


def parts(model):
    """(backbone, head, layer weights) as the record names them."""
    h = surgery.get_record(model).msd[0]
    return model.get_submodule(h.layers.backbone), model.get_submodule(h.name), model.layer_pool.layer_weights


def randomize_layer_weights(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.layer_pool.layer_weights.copy_(torch.randn(model.layer_pool.layer_weights.shape, generator=g))


class Recorder:
    """Wraps surgery.layers.msd.draw_masks: every mask the head draws, in order (layer mask, then the K sample masks)."""

    def __init__(self, monkeypatch):
        self.masks = []
        real = surgery.layers.msd.draw_masks

        def draw(x, k, p):
            m = real(x, k, p)
            self.masks.append(m)
            return m
        monkeypatch.setattr(surgery.layers.msd, "draw_masks", draw)


def custom_roberta(backbone, layer_weights, classifier, batch, layer_mask, sample_masks):
    """The seed's CustomRoberta forward (quest_qa_labeling model.py), written out, with its dropout masks given:
    each layer's CLS vector through its own dropout, stacked on dim 2, softmax-weighted sum, then K dropout
    samples into the classifier in a Python loop and the mean of the K outputs.
    Returns (logits, per-sample logits, the K head inputs)."""
    hidden_layers = backbone(**batch, output_hidden_states=True).hidden_states
    cls_outputs = torch.stack([layer[:, 0, :] * layer_mask[..., i] for i, layer in enumerate(hidden_layers)], dim=2)
    cls_output = (torch.softmax(layer_weights, dim=0) * cls_outputs).sum(-1)
    dropped = [cls_output * sample_masks[k] for k in range(len(sample_masks))]
    samples = torch.stack([F.linear(x, classifier.weight, classifier.bias) for x in dropped], dim=0)
    return torch.mean(samples, dim=0), samples, torch.stack(dropped).detach()


def eval_formula(backbone, layer_weights, head, batch):
    hs = backbone(**batch, output_hidden_states=True).hidden_states
    pooled = (torch.softmax(layer_weights, dim=0) * torch.stack([h[:, 0] for h in hs], dim=-1)).sum(-1)
    return F.linear(pooled, head.weight, head.bias)  # the head's own computation, without surgery's hooks


# ---- exactness against the seed, batched, eval ----------------------------------------------------------

@pytest.mark.parametrize("name", ENCODERS + ["custom"])
def test_training_forward_equals_the_seed_for_the_same_masks(name, monkeypatch):
    model = surgery.apply(build(name), **LAYERED)
    randomize_layer_weights(model)
    backbone, head, w = parts(model)
    batch, _ = inputs(name, model)
    calls = []
    head.register_forward_pre_hook(lambda m, a: calls.append(a[0].detach()))
    rec = Recorder(monkeypatch)
    model.train()
    torch.manual_seed(7)
    with surgery.msd_samples(model) as got:
        out = model(**batch)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    b = batch["input_ids"].shape[0]
    hidden = backbone.config.hidden_size
    n = backbone.config.num_hidden_layers + 1
    # batched: the head ran once on K*B rows; one mask for all layers, one for all K samples
    assert [tuple(c.shape) for c in calls] == [(K * b, hidden)]
    assert [tuple(m.shape) for m in rec.masks] == [(1, b, hidden, n), (K, b, hidden)]
    layer_mask, sample_masks = rec.masks[0][0], rec.masks[1]
    assert set(layer_mask.unique().tolist()) == {0.0, 1 / (1 - LAYER_P)}
    # the reference: the backbone replayed from the same RNG state (its own dropout masks), the head's masks injected
    torch.manual_seed(7)
    ref, ref_samples, ref_inputs = custom_roberta(backbone, w, head, batch, layer_mask, sample_masks)
    # what enters the head (the K dropped samples of the weighted CLS) is bitwise the QUEST solution's
    assert torch.equal(calls[0], ref_inputs.reshape(K * b, hidden))
    # one (K*B)-row matmul against K B-row matmuls: the same products, summed in another blocking order
    torch.testing.assert_close(logits, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got[0], ref_samples, rtol=1e-6, atol=1e-7)
    # eval: the deterministic formula, bitwise
    model.eval()
    out = model(**batch)
    with torch.no_grad():
        expect = eval_formula(backbone, w, head, batch)
    assert torch.equal(out if isinstance(out, torch.Tensor) else out.logits, expect)


def test_init_is_the_seed_init_and_hidden_states_stay_hidden_unless_asked():
    model = surgery.apply(zoo.build("bert"), **LAYERED)
    assert model.layer_pool.layer_weights.tolist() == [-3.0, -3.0, 0.0]
    batch, _ = inputs("bert", model)
    assert model(**batch).hidden_states is None
    asked = model(**batch, output_hidden_states=True).hidden_states
    assert asked is not None and len(asked) == 3


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_decoder_only_pools_the_last_non_padding_token(name):
    model = surgery.apply(zoo.build(name), **LAYERED, msd_pool="last")
    randomize_layer_weights(model)
    backbone, head, w = parts(model)
    batch, labels = inputs(name, model)
    mask = batch["attention_mask"].clone()
    mask[0, -2:] = 0  # right padding in row 0
    ids = batch["input_ids"].clone()
    ids[0, -2:] = model.config.pad_token_id  # so the model's own last-token pick agrees
    batch = {"input_ids": ids, "attention_mask": mask}
    out = model(**batch).logits
    with torch.no_grad():
        hs = backbone(**batch, output_hidden_states=True).hidden_states
        last = torch.tensor([4, 6, 6])
        rows = torch.arange(3)
        expect = F.linear((torch.softmax(w, 0) * torch.stack([h[rows, last] for h in hs], -1)).sum(-1), head.weight)
    assert torch.equal(out, expect)
    r = surgery.compute_loss(model.train(), dict(batch, labels=labels), msd_loss=True)  # (K, B, C) samples
    r.loss.backward()
    assert w.grad is not None and torch.isfinite(r.loss)


def test_custom_module_passing_the_mask_positionally_pools_with_it():
    model = surgery.apply(custom(positional=True), **LAYERED, msd_pool="last")
    backbone, head, w = parts(model)
    batch, _ = inputs("custom", model)
    batch["attention_mask"][1, -3:] = 0
    with torch.no_grad():
        hs = backbone(**batch, output_hidden_states=True).hidden_states
        last = torch.tensor([6, 3, 6])
        pooled = (torch.softmax(w, 0) * torch.stack([h[torch.arange(3), last] for h in hs], -1)).sum(-1)
        expect = F.linear(pooled, head.weight, head.bias)
    assert torch.equal(model(**batch), expect)


# ---- alongside the other options, losses, Trainer --------------------------------------------------------

@pytest.mark.filterwarnings("error")  # no warning about Mixout on a frozen layer: bypassed layers get no Mixout
def test_with_mixout_dropout_rdrop_and_the_losses():
    model = surgery.apply(zoo.build("roberta"), mixout=0.1, dropout=0.0, **LAYERED).train()
    text = surgery.describe(model)
    assert "mixout p=0.1" in text and "dropout -> 0.0" in text
    assert "layer-weighted multi-sample dropout: head 'classifier.out_proj', K=5 samples, p=0.5" in text
    assert "bypassed, frozen while installed: classifier.dense" in text
    assert "left alone: classifier.dense (bypassed by the layer-weighted MSD head, frozen)" in text
    assert type(model.classifier.dense) is nn.Linear and isinstance(model.classifier.out_proj, MixLinear)
    batch, labels = inputs("roberta", model)
    full = dict(batch, labels=labels)
    torch.manual_seed(3)
    a = surgery.compute_loss(model, full, msd_loss=True)
    torch.manual_seed(3)
    b, _ = surgery.msd_loss(model, full)
    torch.testing.assert_close(a.loss, b, rtol=0, atol=0)
    torch.manual_seed(3)
    with surgery.msd_samples(model) as got:
        model(**batch)
    torch.testing.assert_close(b, F.cross_entropy(got[0].reshape(-1, 3), labels.repeat(K)), rtol=1e-6, atol=1e-7)
    r = surgery.compute_loss(model, full, msd_loss=True, rdrop_alpha=1.0)
    r.loss.backward()
    assert r.consistency > 0 and model.layer_pool.layer_weights.grad is not None
    assert model.classifier.dense.weight.grad is None  # bypassed and frozen: no gradient


def test_record_and_describe_from_the_saved_record():
    model = surgery.apply(zoo.build("bert"), **LAYERED)
    rec = surgery.get_record(model)
    assert rec.args["msd_layers"] is True and rec.args["msd_layer_p"] == LAYER_P and rec.args["msd_pool"] == "first"
    assert [h.to_json() for h in rec.msd] == [{"name": "classifier", "k": K, "p": P,
                        "layers": {"backbone": "bert", "n": 3, "p": LAYER_P, "pool": "first", "init": -3.0,
                                   "param": "layer_pool.layer_weights",
                                   "frozen": ["bert.pooler.dense.weight", "bert.pooler.dense.bias"]}}]
    saved = json.loads(json.dumps(model.config.surgery))
    assert surgery.describe(saved).splitlines()[1:] == surgery.describe(model).splitlines()[1:]
    plain = surgery.apply(zoo.build("bert"), msd=4)  # the plain MSD head keeps its record and args
    assert "msd_layers" not in surgery.get_record(plain).args and surgery.get_record(plain).msd[0].layers is None and "layers" not in surgery.get_record(plain).msd[0].to_json()


def test_trainer_trains_the_layer_weights_and_saves_the_surgered_form(tmp_path):
    from surgery import SurgeryTrainer

    model = surgery.apply(zoo.build("bert"), **LAYERED)
    pooler = model.bert.pooler.dense.weight.detach().clone()
    w0 = model.layer_pool.layer_weights.detach().clone()
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(4, zoo.VOCAB, (7,), generator=g), "labels": i % 3} for i in range(12)]
    args = TrainingArguments(str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no")
    tr = SurgeryTrainer(model=model, args=args, train_dataset=data, msd_loss=True)
    tr.train()
    assert not torch.equal(model.layer_pool.layer_weights, w0)
    assert torch.equal(model.bert.pooler.dense.weight, pooler)  # bypassed: bitwise untouched
    tr.save_model(str(tmp_path / "final"))  # no plain form: the surgered form, layer weights and record inside
    cfg = json.loads((tmp_path / "final" / "config.json").read_text())
    sd = load_file(tmp_path / "final" / "model.safetensors")
    assert "surgery" in cfg and torch.equal(sd["layer_pool.layer_weights"], model.layer_pool.layer_weights)
    # what a deployer does (the refusals below say so): the pretrained model, the same apply, the weights
    fresh = surgery.apply(zoo.build("bert"), **LAYERED)
    fresh.load_state_dict(sd)
    batch, _ = inputs("bert", model)
    model.eval()
    assert torch.equal(fresh.eval()(**batch).logits, model(**batch).logits)


# ---- gradient checkpointing, torch.compile ---------------------------------------------------------------

def _grads(model, batch, seed):
    torch.manual_seed(seed)
    r = surgery.compute_loss(model, batch, msd_loss=True)
    r.loss.backward()
    root = getattr(model, "_orig_mod", model)
    g = {n: p.grad.clone() for n, p in root.named_parameters() if p.grad is not None}
    model.zero_grad()
    return r.loss.detach(), g


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    model = surgery.apply(zoo.build("bert"), **LAYERED).train()
    randomize_layer_weights(model)
    batch, labels = inputs("bert", model)
    batch = dict(batch, labels=labels)
    loss, ref = _grads(model, batch, 11)
    calls = []
    model.bert.encoder.layer[0].intermediate.dense.register_forward_hook(lambda *a: calls.append(1))
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": reentrant})
    loss_c, got = _grads(model, batch, 11)
    assert len(calls) == 2  # the layer ran again in backward: checkpointing is really on
    torch.testing.assert_close(loss_c, loss, rtol=0, atol=0)
    assert got.keys() == ref.keys() and "layer_pool.layer_weights" in got
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-7, msg=k)


def test_torch_compile_matches_eager():
    # dropout=0.0: the bypassed dropout between pooler and classifier is dead code that the compiled graph drops,
    # so at p > 0 eager would draw one mask more and the head's masks would come from another point of the stream
    torch._dynamo.reset()
    model = surgery.apply(zoo.build("bert"), dropout=0.0, **LAYERED).train()
    randomize_layer_weights(model)
    batch, labels = inputs("bert", model)
    batch = dict(batch, labels=labels)
    loss, ref = _grads(model, batch, 3)
    compiled = torch.compile(model, backend="aot_eager")
    loss_c, got = _grads(compiled, batch, 3)
    torch.testing.assert_close(loss_c, loss, rtol=1e-6, atol=1e-7)
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-7, msg=k)


# ---- DDP ---------------------------------------------------------------------------------------------------

def _ddp_worker(rank, world, tmp):
    init_gloo(rank, world, tmp)
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = surgery.apply(zoo.build("bert"), **LAYERED)
    ddp = DDP(model.train())  # default find_unused_parameters=False: the bypassed pooler is frozen, not unused
    surgery.seed_rank(100)
    opt = torch.optim.SGD(surgery.param_groups(ddp, lr=0.01, head_lr=0.5))
    grad_err = 0.0
    for i in range(3):
        batch, labels = inputs("bert", model, seed=10 * i + rank)
        b = dict(batch, labels=labels)
        state = torch.get_rng_state()
        with ddp.no_sync():
            surgery.compute_loss(ddp, b, msd_loss=True).loss.backward()
        local = [p.grad.clone() for p in ddp.parameters() if p.requires_grad]
        opt.zero_grad()
        torch.set_rng_state(state)
        surgery.compute_loss(ddp, b, msd_loss=True).loss.backward()
        for p, g in zip([p for p in ddp.parameters() if p.requires_grad], local):
            dist.all_reduce(g)
            grad_err = max(grad_err, (p.grad - g / world).abs().max().item())
        opt.step()
        opt.zero_grad()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    flats = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(flats, flat)
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump({"grad_err": grad_err, "params_equal": all(torch.equal(flats[0], x) for x in flats),
                   "weights": model.layer_pool.layer_weights.tolist(),
                   "pooler_untouched": torch.equal(model.bert.pooler.dense.weight,
                                                   zoo.build("bert").bert.pooler.dense.weight)}, f)
    dist.barrier()
    finish_worker()


@pytest.mark.slow
def test_ddp_two_processes_gloo():
    res = spawn_ranks(_ddp_worker, "rank")
    for r in res:
        assert r["grad_err"] < 1e-6 and r["params_equal"] and r["pooler_untouched"]
        assert r["weights"] != [-3.0, -3.0, 0.0]


# ---- optimiser groups ---------------------------------------------------------------------------------------

def test_param_groups_from_the_record():
    model = surgery.apply(zoo.build("roberta"), mixout=0.1, **LAYERED)
    backbone, head = surgery.param_groups(model, lr=1e-5, head_lr=5e-3, weight_decay=0.0)
    assert backbone["lr"] == 1e-5 and head["lr"] == 5e-3 and backbone["weight_decay"] == head["weight_decay"] == 0.0
    ids = {id(p) for p in head["params"]}
    assert ids == {id(model.classifier.out_proj.weight), id(model.classifier.out_proj.bias),
                   id(model.layer_pool.layer_weights)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(backbone["params"]) + len(head["params"]) == len(trainable)
    assert not ids & {id(p) for p in backbone["params"]}
    assert id(model.classifier.dense.weight) not in {id(p) for p in backbone["params"]}  # frozen: in no group
    torch.optim.AdamW(surgery.param_groups(model, lr=1e-5, head_lr=5e-3))  # a valid optimizer
    plain = surgery.apply(zoo.build("bert"), msd=4)  # the plain MSD head: the head alone
    assert len(surgery.param_groups(plain, lr=1, head_lr=2)[1]["params"]) == 2


@pytest.mark.parametrize("call, err, match", [
    (lambda: surgery.param_groups(surgery.apply(zoo.build("bert"), mixout=0.1), lr=1e-5, head_lr=1e-3),
     surgery.SurgeryError, r"no MSD head.*apply\(model, msd=K"),
    (lambda: surgery.param_groups(zoo.build("bert"), lr=1e-5, head_lr=1e-3), surgery.NotSurgeredError, "apply"),
    (lambda: surgery.param_groups(surgery.apply(zoo.build("bert"), **LAYERED), lr=0, head_lr=1e-3), ValueError,
     "lr must be a positive number"),
    (lambda: surgery.param_groups(surgery.apply(zoo.build("bert"), **LAYERED), lr=1e-5, head_lr=float("nan")),
     ValueError, "head_lr must be a positive number"),
])
def test_param_groups_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call()


# ---- bad input: one clear error each, the model untouched ---------------------------------------------------

def _snapshot(model):
    return {"classes": [(n, type(m)) for n, m in model.named_modules()],
            "state": {k: v.clone() for k, v in model.state_dict().items()},
            "grad": [p.requires_grad for p in model.parameters()],
            "config": model.config.to_dict() if hasattr(model, "config") else None,
            "dict": set(vars(model)),
            "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())}


def _assert_same(model, snap):
    now = _snapshot(model)
    assert now["state"].keys() == snap["state"].keys()
    assert all(torch.equal(now["state"][k], snap["state"][k]) for k in snap["state"])
    assert {k: v for k, v in now.items() if k != "state"} == {k: v for k, v in snap.items() if k != "state"}


class NoHiddenConfig(PretrainedConfig):
    model_type = "no-hidden-states"


class NoHiddenStates(PreTrainedModel):
    """A transformers model whose forward cannot return per-layer hidden states."""

    config_class = NoHiddenConfig

    def __init__(self, config):
        super().__init__(config)
        self.lin = nn.Linear(4, 4)
        self.post_init()

    def forward(self, x):
        return self.lin(x)


class HoldsNoHiddenStates(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = NoHiddenStates(NoHiddenConfig())
        self.classifier = nn.Linear(4, 2)

    def forward(self, x):
        return self.classifier(self.backbone(x))


class TorchEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2)
        self.classifier = nn.Linear(8, 2)

    def forward(self, x):
        return self.classifier(self.encoder(x)[:, 0])


class Clash(Custom):
    def __init__(self):
        super().__init__()
        self.layer_pool = nn.Identity()


BAD = [
    ("torch-encoder", lambda: TorchEncoder(), {}, surgery.SurgeryError,
     r"holds no transformers backbone .*per-layer hidden states.*plain msd=K"),
    ("no-hidden-states", lambda: HoldsNoHiddenStates(), {}, surgery.SurgeryError,
     r"cannot return per-layer hidden states"),
    ("decoder-only", lambda: zoo.build("gpt2"), {}, surgery.SurgeryError,
     r"decoder-only.*position 0 .*pass msd_pool='last'"),
    ("encoder-decoder", lambda: zoo.build("t5"), {}, surgery.SurgeryError, r"encoder-decoder.*get_encoder"),
    ("K=0", lambda: zoo.build("bert"), dict(msd=0), ValueError, r"msd_layers=True needs msd=K >= 1"),
    ("K negative", lambda: zoo.build("bert"), dict(msd=-2), ValueError, r"msd must be"),
    ("p > 1", lambda: zoo.build("bert"), dict(msd_p=1.5), ValueError, r"msd_p must be a probability in \[0, 1\]"),
    ("layer p < 0", lambda: zoo.build("bert"), dict(msd_layer_p=-0.1), ValueError,
     r"msd_layer_p must be a probability in \[0, 1\]"),
    ("layer p nan", lambda: zoo.build("bert"), dict(msd_layer_p=float("nan")), ValueError, r"msd_layer_p must be"),
    ("pool", lambda: zoo.build("bert"), dict(msd_pool="mean"), ValueError, r"msd_pool must be one of 'first', 'last'"),
    ("layers not bool", lambda: zoo.build("bert"), dict(msd_layers="yes"), surgery.SurgeryTypeError,
     r"msd_layers must be True or False"),
    ("layer options alone", lambda: zoo.build("bert"), dict(msd_layers=False, msd_layer_p=0.3), surgery.SurgeryError,
     r"pass msd_layers=True"),
    ("head not Linear", lambda: zoo.build("roberta"), dict(head="classifier"), surgery.HeadError,
     r"'classifier' is a RobertaClassificationHead, not an nn.Linear.*'classifier.out_proj'"),
    ("head width", lambda: custom(proj=16), {}, surgery.HeadError, r"takes 16 features but .* have 32"),
    ("name clash", lambda: Clash(), {}, surgery.SurgeryError, r"already has an attribute 'layer_pool'"),
]


@pytest.mark.parametrize("case, make, kw, err, match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_clear_error_and_leaves_the_model_untouched(case, make, kw, err, match):
    model = make()
    snap = _snapshot(model)
    with pytest.raises(err, match=match):
        surgery.apply(model, **{**LAYERED, **kw})
    _assert_same(model, snap)
    assert not surgery.is_surgered(model)


def test_a_backbone_called_for_a_tuple_is_a_clear_error_at_forward():
    model = surgery.apply(custom(return_dict=False), **LAYERED)
    batch, _ = inputs("custom", model)
    with pytest.raises(surgery.SurgeryError, match="returned no hidden_states .*return_dict=True"):
        model(**batch)


# ---- revert, export, convert: never drop the layer weights silently -----------------------------------------

def test_revert_refuses_and_drop_layer_weights_undoes_exactly():
    model = zoo.build("bert")
    snap = _snapshot(model)
    batch, _ = inputs("bert", model)
    ref = model(**batch).logits
    surgery.apply(model, mixout=0.1, **LAYERED)
    before = _snapshot(model)
    with pytest.raises(surgery.SurgeryError, match=r"cannot revert.*layer_pool.layer_weights.*drop_layer_weights=True"):
        surgery.revert(model)
    _assert_same(model, before)
    surgery.revert(model, drop_layer_weights=True)
    _assert_same(model, snap)
    assert torch.equal(model(**batch).logits, ref)


def test_export_and_convert_refuse_and_write_nothing(tmp_path):
    from surgery.cli import main

    model = surgery.apply(zoo.build("bert"), **LAYERED)
    for target in (tmp_path / "plain", ):
        with pytest.raises(surgery.SurgeryError, match=r"plain checkpoint.*cannot hold.*layer_pool.layer_weights"):
            surgery.export(model, target)
        assert not target.exists()
    with pytest.raises(surgery.SurgeryError, match="cannot hold"):
        surgery.export(surgery.apply(custom(), **LAYERED), tmp_path / "custom.safetensors")
    assert not (tmp_path / "custom.safetensors").exists()
    model.save_pretrained(tmp_path / "ckpt")
    surgery.checkpoint.save(model, tmp_path / "run.safetensors")
    assert main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 2
    assert main(["convert", str(tmp_path / "run.safetensors"), str(tmp_path / "out.safetensors")]) == 2
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.safetensors").exists()
    with pytest.raises(surgery.SurgeryError, match="surgery convert writes a plain checkpoint"):
        surgery.checkpoint.convert(tmp_path / "ckpt", tmp_path / "out")
    # the record stripped by hand: the layer weights in the file are refused all the same
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    del cfg["surgery"]
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(surgery.SurgeryError, match="holds 'layer_pool.layer_weights'"):
        surgery.checkpoint.convert(tmp_path / "ckpt", tmp_path / "out")


def test_bf16_model():
    """The layer weights stay float32 as in the QUEST solution; the mix is computed in float32 and the pooled vector
    enters the bf16 head in bf16."""
    model = surgery.apply(zoo.build("bert").to(torch.bfloat16), **LAYERED).train()
    assert model.layer_pool.layer_weights.dtype == torch.float32
    randomize_layer_weights(model)
    backbone, head, w = parts(model)
    batch, labels = inputs("bert", model)
    r = surgery.compute_loss(model, dict(batch, labels=labels), msd_loss=True)
    r.loss.backward()
    assert torch.isfinite(r.loss) and model.layer_pool.layer_weights.grad.dtype == torch.float32
    assert model.layer_pool.layer_weights.grad.abs().sum() > 0
    model.eval()
    out = model(**batch).logits
    with torch.no_grad():
        hs = backbone(**batch, output_hidden_states=True).hidden_states
        mix = (torch.softmax(w, 0) * torch.stack([h[:, 0] for h in hs], dim=-1)).sum(-1)  # float32
        expect = F.linear(mix.to(torch.bfloat16), head.weight, head.bias)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expect)


def test_a_deepcopy_of_the_surgered_model_computes_the_same():
    import copy

    model = surgery.apply(zoo.build("bert"), **LAYERED)
    randomize_layer_weights(model)
    clone = copy.deepcopy(model)
    batch, labels = inputs("bert", model)
    assert torch.equal(clone(**batch).logits, model(**batch).logits)
    assert clone.layer_pool is not model.layer_pool
    with surgery.msd_samples(clone.train()) as got:
        clone(**batch)
    assert len(got) == 1 and got[0].shape == (K, 3, 3)  # the copy's hooks read the copy's layer pool
