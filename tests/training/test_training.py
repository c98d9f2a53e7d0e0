"""Training integration: compute_loss in a plain loop, transformers Trainer (R-Drop + MSD loss,
checkpoints, plain final save, resume in a fresh process), plain-loop resume, DDP and FSDP2 on
CPU/gloo, Accelerate, gradient checkpointing, torch.compile, bf16 and CPU autocast."""

from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from conftest import ROOT, finish_worker, init_gloo, run_python, spawn
from torch import nn
from training_setup import (SURGERY, StopAt, assert_targets_are_pretrained, batch, dataset, perturb, pretrained,
                            surgered, targets, tiny_config, trainer_args)
from transformers import AutoModelForSequenceClassification

import surgery
import surgery.layers.mixout
from surgery import SurgeryError, compute_loss

TESTS = os.path.join(ROOT, "tests")  # conftest's folder


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState, PartialState
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


# ---- compute_loss ------------------------------------------------------------------------------------

def test_compute_loss_in_a_plain_loop():
    m = surgered().train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    for step in range(3):
        r = compute_loss(m, batch(seed=step), rdrop_alpha=1.0, msd_loss=True)
        assert torch.isfinite(r.loss) and r.consistency.item() > 0 and r.outputs.logits.shape == (4, 3)
        r.loss.backward()
        opt.step()
        opt.zero_grad()
    after = m.state_dict()
    assert not torch.equal(after["classifier.weight"], before["classifier.weight"])
    for k in targets(m):
        assert torch.equal(after[k], before[k])  # targets are frozen: the optimizer never moves them
    assert_targets_are_pretrained(m)


def test_compute_loss_variants_reduce_to_their_parts():
    m = surgered().train()
    perturb(m)
    b = batch()
    torch.manual_seed(3)
    plain = compute_loss(m, b, msd_loss=False)  # opted out: the model's own loss on the head's averaged output
    torch.manual_seed(3)
    torch.testing.assert_close(plain.loss, m(**b).loss)
    torch.manual_seed(4)
    msd = compute_loss(m, b)  # the default for a model with an MSD head: the paper's loss
    torch.manual_seed(4)
    torch.testing.assert_close(msd.loss, surgery.msd_loss(m, b)[0])
    torch.manual_seed(5)
    rd = compute_loss(m, b, rdrop_alpha=2.0, msd_loss=False)
    torch.manual_seed(5)
    o1, o2 = surgery.rdrop_forward(m, b)
    torch.testing.assert_close(rd.task_loss, (o1.loss + o2.loss).detach() / 2)
    torch.testing.assert_close(rd.loss, (o1.loss + o2.loss) / 2 + 2.0 * surgery.rdrop_loss(o1, o2))


def test_compute_loss_bad_input():
    m = pretrained().train()
    with pytest.raises(SurgeryError, match="labels"):
        compute_loss(m, {"input_ids": batch()["input_ids"]})
    with pytest.raises(surgery.NotSurgeredError):
        compute_loss(m, batch(), msd_loss=True)
    with pytest.raises(SurgeryError, match="alpha"):
        compute_loss(m, batch(), rdrop_alpha=-0.5)
    ml = pretrained(problem_type="multi_label_classification").train()
    with pytest.raises(SurgeryError, match="multi-label"):
        compute_loss(ml, batch(), rdrop_alpha=1.0)


# ---- transformers Trainer ----------------------------------------------------------------------------

def test_trainer_with_rdrop_and_msd_loss_checkpoints_and_a_plain_final_save(tmp_path):
    m = surgered()
    tr = surgery.SurgeryTrainer(model=m, args=trainer_args(str(tmp_path / "run"), 4, save_steps=2),
                                train_dataset=dataset(), rdrop_alpha=1.0, msd_loss=True)
    tr.train()
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert logs and all(h["rdrop_consistency"] > 0 and h["task_loss"] > 0 for h in logs)
    # periodic checkpoints keep the surgered form that resume needs
    ckpt = tmp_path / "run" / "checkpoint-2"
    sd = load_file(ckpt / "model.safetensors")
    assert sum(k.endswith(".mixout_target") for k in sd) == len(surgery.get_record(m).mixout)
    assert "surgery" in json.loads((ckpt / "config.json").read_text())
    # the save_model you call writes a plain checkpoint; the model stays surgered
    tr.save_model(str(tmp_path / "final"))
    assert surgery.is_surgered(m)
    cfg = json.loads((tmp_path / "final" / "config.json").read_text())
    assert "surgery" not in cfg and cfg["hidden_dropout_prob"] == tiny_config().hidden_dropout_prob
    plain, info = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "final"), output_loading_info=True)
    assert not any(info.values()), info
    b = batch()
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(input_ids=b["input_ids"]).logits, m(input_ids=b["input_ids"]).logits,
                                   rtol=0, atol=0)


def test_trainer_refuses_bad_setups(tmp_path):
    with pytest.raises(SurgeryError, match=r"apply\(model, msd=K\)"):
        surgery.SurgeryTrainer(model=surgery.apply(pretrained(), mixout=0.1), args=trainer_args(str(tmp_path), 1),
                               train_dataset=dataset(), msd_loss=True)
    with pytest.raises(SurgeryError, match="alpha"):
        surgery.SurgeryTrainer(model=surgered(), args=trainer_args(str(tmp_path), 1), train_dataset=dataset(),
                               rdrop_alpha=float("nan"))
    with pytest.raises(SurgeryError, match=r"label_smoothing_factor=0.1 \(the Trainer's label smoothing\) would be "
                                           "silently dropped"):  # R-Drop trains on the model's own loss
        surgery.SurgeryTrainer(model=surgered(), args=trainer_args(str(tmp_path), 1, label_smoothing_factor=0.1),
                               train_dataset=dataset(), rdrop_alpha=1.0)
    surgery.SurgeryTrainer(model=surgered(), args=trainer_args(str(tmp_path / "a"), 1, save_steps=1),
                           train_dataset=dataset(4)).train()
    ckpt = str(tmp_path / "a" / "checkpoint-1")
    other = surgery.apply(pretrained(), mixout=0.5)
    with pytest.raises(SurgeryError, match="same arguments"):
        surgery.SurgeryTrainer(model=other, args=trainer_args(str(tmp_path / "a"), 2, save_steps=1),
                               train_dataset=dataset(4)).train(resume_from_checkpoint=ckpt)
    with pytest.raises(SurgeryError, match=r"surgery.apply"):
        surgery.SurgeryTrainer(model=pretrained(), args=trainer_args(str(tmp_path / "a"), 2, save_steps=1),
                               train_dataset=dataset(4)).train(resume_from_checkpoint=True)


RESUME_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
import surgery
from training_setup import surgered, dataset, trainer_args, assert_targets_are_pretrained
m = surgered()
tr = surgery.SurgeryTrainer(model=m, args=trainer_args({out!r}, 6, save_steps=3), train_dataset=dataset(),
                            rdrop_alpha=1.0, msd_loss=True)
tr.train(resume_from_checkpoint={ckpt!r})
assert_targets_are_pretrained(m)  # Mixout still mixes toward the pretrained weights
torch.save(m.state_dict(), {result!r})
"""


@pytest.mark.slow
def test_trainer_resume_in_a_fresh_process_is_bitwise(tmp_path):
    kw = dict(train_dataset=dataset(), rdrop_alpha=1.0, msd_loss=True)
    full = surgered()
    surgery.SurgeryTrainer(model=full, args=trainer_args(str(tmp_path / "full"), 6), **kw).train()
    cut = surgered()
    surgery.SurgeryTrainer(model=cut, args=trainer_args(str(tmp_path / "cut"), 6, save_steps=3), callbacks=[StopAt(3)],
                           **kw).train()
    ckpt = tmp_path / "cut" / "checkpoint-3"
    assert ckpt.is_dir() and not (tmp_path / "cut" / "checkpoint-6").exists()
    result = tmp_path / "resumed.pt"
    code = RESUME_SCRIPT.format(tests=TESTS, out=str(tmp_path / "cut"), ckpt=str(ckpt), result=str(result))
    rc, err = run_python(["-c", code])
    assert rc == 0, err
    resumed = torch.load(result)
    ref = full.state_dict()
    assert resumed.keys() == ref.keys()
    differ = [k for k in ref if not torch.equal(ref[k], resumed[k])]
    assert not differ, differ[:5]  # bitwise: same data order, same RNG stream, same arithmetic
    assert not torch.equal(resumed["classifier.weight"], pretrained().state_dict()["classifier.weight"])


@pytest.mark.slow
def test_plain_loop_resume_is_bitwise(tmp_path):
    def step(model, opt, i):
        compute_loss(model, batch(seed=i), rdrop_alpha=1.0, msd_loss=True).loss.backward()
        opt.step()
        opt.zero_grad()

    m = surgered().train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for i in range(3):
        step(m, opt, i)
    surgery.save_training_state(tmp_path / "state.pt", m, opt, step=3, note="x")
    for i in range(3, 6):
        step(m, opt, i)
    # a fresh start: the pretrained model, the same surgery, then the checkpoint
    m2 = surgered().train()
    torch.manual_seed(999)  # a different RNG state, which the load must replace
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    info = surgery.load_training_state(tmp_path / "state.pt", m2, opt2)
    assert info == {"step": 3, "note": "x"}
    for i in range(3, 6):
        step(m2, opt2, i)
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    assert_targets_are_pretrained(m2)
    with pytest.raises(SurgeryError, match="same arguments"):
        surgery.load_training_state(tmp_path / "state.pt", surgery.apply(pretrained(), mixout=0.3))
    with pytest.raises(SurgeryError, match=r"surgery.apply"):
        surgery.load_training_state(tmp_path / "state.pt", pretrained())


# ---- distributed: DDP and FSDP2 on CPU with gloo -------------------------------------------------------

def _ddp_worker(rank, world, tmp):
    init_gloo(rank, world, tmp)
    from torch.nn.parallel import DistributedDataParallel as DDP
    m = surgered()
    if rank == 1:  # a different start: DDP must broadcast rank 0's parameters (the targets too)
        perturb(m, seed=7)
    ddp = DDP(m.train())
    surgery.seed_rank(100)  # each rank draws its own masks from here on
    drawn = []
    real = surgery.layers.mixout._scale
    surgery.layers.mixout._scale = lambda p, n, like: drawn.append(real(p, n, like)) or drawn[-1]
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    grad_err = 0.0
    for i in range(3):
        b = batch(seed=10 * i + rank)  # each rank its own data
        state = torch.get_rng_state()
        with ddp.no_sync():  # local gradients only
            compute_loss(ddp, b, rdrop_alpha=1.0, msd_loss=True).loss.backward()
        trainable = [p for p in ddp.parameters() if p.requires_grad]  # not the frozen targets
        local = [p.grad.clone() for p in trainable]
        opt.zero_grad()
        torch.set_rng_state(state)  # the same masks again, now with gradient averaging
        compute_loss(ddp, b, rdrop_alpha=1.0, msd_loss=True).loss.backward()
        for p, g in zip(trainable, local):
            dist.all_reduce(g)
            grad_err = max(grad_err, (p.grad - g / world).abs().max().item())
        opt.step()
        opt.zero_grad()
    flat = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    flats = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(flats, flat)
    first = drawn[0]
    masks = [torch.empty_like(first) for _ in range(world)]
    dist.all_gather(masks, first)
    if surgery.rank() == 0:  # the plain export happens once
        surgery.export(ddp, os.path.join(tmp, "plain"))
        with open(os.path.join(tmp, "exports.txt"), "a") as f:
            f.write(f"{rank}\n")
    dist.barrier()
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump({"grad_err": grad_err, "params_equal": all(torch.equal(flats[0], x) for x in flats),
                   "masks_equal": torch.equal(masks[0], masks[1]),
                   "targets_pretrained": all(torch.equal(v, pretrained().state_dict()[k[:-14] + ".weight"])
                                             for k, v in targets(m).items())}, f)
    finish_worker()


@pytest.mark.slow
def test_ddp_two_processes_gloo():
    with tempfile.TemporaryDirectory() as tmp:
        spawn(_ddp_worker, args=(2, tmp), nprocs=2)
        res = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(2)]
        for r in res:
            assert r["grad_err"] < 1e-6  # DDP's gradient is the mean of the ranks' local gradients
            assert r["params_equal"]  # so the replicas stay identical
            assert not r["masks_equal"]  # each rank drew its own Mixout masks
            assert r["targets_pretrained"]  # rank 1's perturbed start was replaced by rank 0's broadcast
        assert open(os.path.join(tmp, "exports.txt")).read() == "0\n"
        cfg = json.load(open(os.path.join(tmp, "plain", "config.json")))
        assert "surgery" not in cfg
        assert not any(k.endswith("mixout_target") for k in load_file(os.path.join(tmp, "plain", "model.safetensors")))


TRAINER_DDP_SCRIPT = """
import json, os, sys, torch
sys.path.insert(0, {tests!r})
import surgery, surgery.layers.mixout
from training_setup import surgered, dataset, trainer_args
out = {out!r}
drawn, real = [], surgery.layers.mixout._scale
surgery.layers.mixout._scale = lambda p, n, like: drawn.append(real(p, n, like)) or drawn[-1]
import surgery.exporting as export_module
real_export = export_module.export
def counting_export(*a, **k):
    with open(os.path.join(out, "exports.txt"), "a") as f:
        f.write(os.environ["RANK"] + "\\n")
    return real_export(*a, **k)
export_module.export = counting_export
m = surgered()
tr = surgery.SurgeryTrainer(model=m, args=trainer_args(out, 3, ddp_backend="gloo"), train_dataset=dataset(),
                            rdrop_alpha=1.0, msd_loss=True)
tr.train()
tr.save_model(os.path.join(out, "final"))
flat = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
with open(os.path.join(out, "rank" + os.environ["RANK"] + ".json"), "w") as f:
    json.dump({{"world": tr.args.world_size, "mask": drawn[0].tolist(), "params": flat.tolist()}}, f)
# tear the process group down before exit: a gloo group left to interpreter shutdown can abort the process
# ("terminate called without an active exception")
import torch.distributed as dist
if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
"""


@pytest.mark.slow
def test_trainer_under_ddp_two_processes(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAINER_DDP_SCRIPT.format(tests=TESTS, out=str(tmp_path)))
    rc, err = run_python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)])
    assert rc == 0, err
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["world"] == r1["world"] == 2
    assert r0["params"] == r1["params"]  # gradients averaged: identical replicas
    assert r0["mask"] != r1["mask"]  # RankSeedCallback: each rank draws its own Mixout masks
    assert (tmp_path / "exports.txt").read_text() == "0\n"  # the plain export happens once, on rank 0
    cfg = json.loads((tmp_path / "final" / "config.json").read_text())
    assert "surgery" not in cfg


def _fsdp_worker(rank, world, tmp):
    init_gloo(rank, world, tmp)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    m = surgery.apply(pretrained(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), mixout=0.3)
    for layer in m.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    torch.manual_seed(5)  # the same seed on both ranks: the same Mixout masks as one process on the full batch
    full = batch(n=8)
    half = {k: v[4 * rank:4 * rank + 4] for k, v in full.items()}
    for _ in range(2):
        compute_loss(m.train(), half, rdrop_alpha=1.0).loss.backward()
        opt.step()
        opt.zero_grad()
    sd = get_model_state_dict(m, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save(sd, os.path.join(tmp, "fsdp.pt"))
    dist.barrier()
    finish_worker()


@pytest.mark.slow
def test_fsdp2_trains_a_surgered_model_like_one_process():
    with tempfile.TemporaryDirectory() as tmp:
        spawn(_fsdp_worker, args=(2, tmp), nprocs=2)
        sd = torch.load(os.path.join(tmp, "fsdp.pt"))
    ref = surgery.apply(pretrained(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), mixout=0.3).train()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    torch.manual_seed(5)
    for _ in range(2):
        compute_loss(ref, batch(n=8), rdrop_alpha=1.0).loss.backward()
        opt.step()
        opt.zero_grad()
    assert sd.keys() == ref.state_dict().keys()  # the full state dict carries the targets
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(sd[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert_targets_are_pretrained(ref)


def test_accelerate_trains_a_surgered_model(tmp_path, fresh_accelerate_state):
    from accelerate import Accelerator
    acc = Accelerator(cpu=True)
    m = surgered()
    loader = torch.utils.data.DataLoader(dataset(12), batch_size=4)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    model, opt, loader = acc.prepare(m, opt, loader)
    before = m.classifier.weight.detach().clone()
    model.train()
    for b in loader:
        r = compute_loss(model, b, rdrop_alpha=1.0, msd_loss=True)
        acc.backward(r.loss)
        opt.step()
        opt.zero_grad()
    assert not torch.equal(m.classifier.weight, before)
    assert surgery.get_record(model) is surgery.get_record(acc.unwrap_model(model))
    assert_targets_are_pretrained(acc.unwrap_model(model))
    if acc.is_main_process:
        surgery.export(acc.unwrap_model(model), tmp_path / "plain")
    plain = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "plain"))
    torch.testing.assert_close(plain.classifier.weight, m.classifier.weight, rtol=0, atol=0)


# ---- gradient checkpointing, torch.compile, mixed precision ------------------------------------------

def _grads(model, b, seed):
    torch.manual_seed(seed)
    r = compute_loss(model, b, rdrop_alpha=1.0, msd_loss=True)
    r.loss.backward()
    root = getattr(model, "_orig_mod", model)  # torch.compile's wrapper prefixes parameter names
    g = {n: p.grad.clone() for n, p in root.named_parameters() if p.grad is not None}
    model.zero_grad()
    return r.loss.detach(), g


@pytest.mark.slow
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    m = surgery.apply(pretrained(layers=2), **SURGERY).train()
    perturb(m, 0.2)
    b = batch()
    loss, ref = _grads(m, b, seed=11)
    calls = []
    m.bert.encoder.layer[0].intermediate.dense.register_forward_hook(lambda *a: calls.append(1))
    enable = getattr(m, "activation_checkpointing_enable", None) or m.gradient_checkpointing_enable
    enable({"use_reentrant": reentrant})
    loss_ckpt, got = _grads(m, b, seed=11)
    assert len(calls) == 4  # 2 passes, each recomputed in backward: checkpointing is really on
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    assert got.keys() == ref.keys()
    for k in ref:  # the recomputation redraws the same Mixout and dropout masks (RNG state restored)
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-7, msg=k)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 16), nn.Tanh())
        self.classifier = nn.Linear(16, 3)

    def forward(self, x):
        return self.classifier(self.body(x))


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager():
    import torch._inductor.config as inductor_config
    # draw masks with eager's RNG, to compare; config.patch (not monkeypatch, whose undo deletes the entry)
    with inductor_config.patch(fallback_random=True):
        _inductor_matches_eager()


def _inductor_matches_eager():
    torch.manual_seed(0)
    m = surgery.apply(_Net(), mixout=0.3, msd=4).train()
    perturb(m, 0.1)
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])

    def run(model):
        torch.manual_seed(5)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        g = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
        m.zero_grad()
        return loss.detach(), g

    loss, ref = run(m)
    compiled = torch.compile(m)
    loss_c, got = run(compiled)
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6, msg=k)
    assert surgery.get_record(compiled) is surgery.get_record(m)


@pytest.mark.slow
def test_torch_compile_of_a_surgered_transformers_model():
    # the dynamo + AOT-autograd path through a surgered BERT (hooks, MixLinear, the MSD loss and R-Drop);
    # the inductor code generation itself is covered by the test above (tiny model: 80 s for BERT on 2 cores)
    torch._dynamo.reset()
    m = surgered().train()
    perturb(m, 0.2)
    b = batch()
    loss, ref = _grads(m, b, seed=3)
    compiled = torch.compile(m, backend="aot_eager")
    loss_c, got = _grads(compiled, b, seed=3)
    torch.testing.assert_close(loss_c, loss)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-7, msg=k)


def test_bf16_weights_and_cpu_autocast():
    b = batch()
    # bf16 weights: targets in bf16, masks and the loss computed, gradients in bf16
    m = surgery.apply(pretrained().to(torch.bfloat16), **SURGERY).train()
    assert all(v.dtype == torch.bfloat16 for v in targets(m).values())
    r = compute_loss(m, b, rdrop_alpha=1.0, msd_loss=True)
    r.loss.backward()
    assert torch.isfinite(r.loss) and m.classifier.weight.grad.dtype == torch.bfloat16
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    # fp32 weights under CPU autocast: close to the fp32 loss for the same masks
    m = surgered().train()
    perturb(m, 0.2)
    loss32, g32 = _grads(m, b, seed=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, g16 = _grads(m, b, seed=8)
    assert loss16.dtype == torch.float32
    torch.testing.assert_close(loss16, loss32, rtol=5e-2, atol=5e-2)
    assert all(torch.isfinite(g).all() and g.dtype == torch.float32 for g in g16.values())
