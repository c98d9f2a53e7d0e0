"""Mixout targets under DDP and FSDP2 (2 gloo processes on CPU): synced once, sharded like weights.

The targets are frozen Parameters. These tests guard what that buys at scale, with the storage
before this change (persistent buffers, reproduced by ``as_buffer_targets``) as the counter-check
that each measurement can fail:

* DDP sends no target bytes in a training step (only the model's real buffers, e.g. BatchNorm
  statistics, are broadcast each forward), replicas' targets agree after wrapping even when
  every rank initialised its head differently, and each rank draws its own masks by default.
* FSDP2 holds about 1/world of the targets per rank, trains exactly like one process on the full
  batch (same seed on every rank: same masks), with ``target_dtype``/``low_memory`` too; the full
  state dict and torch.distributed.checkpoint carry the targets; resuming from DCP equals an
  uninterrupted run; ``surgery convert`` turns the gathered checkpoint into a plain one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

import surgery
import surgery.layers.mixout
from surgery import SurgeryError, compute_loss
from training_setup import batch, pretrained
from conftest import finish_worker, init_gloo, run_python, spawn, spawn_ranks

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "benchmarks"))
from dist_bench import as_buffer_targets  # noqa: E402  (the storage before this change, as the benchmark reproduces it)

TARGET = "mixout_target"


class BNNet(nn.Module):
    """A body that is the same on every rank, a BatchNorm (real buffers DDP must keep syncing), a head."""

    def __init__(self, rank):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        torch.manual_seed(100 + rank)  # per-rank random head init: DDP must make the heads and their targets agree
        self.classifier = nn.Linear(16, 4)

    def forward(self, x):
        return self.classifier(torch.relu(self.bn(self.body(x))))


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _ddp_worker(rank, world, tmp):
    init_gloo(rank, world, tmp)
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    sent, reduced = [], []
    real = dist._broadcast_coalesced

    def counting(group, tensors, *a, **k):  # DDP's construction sync and its per-forward buffer sync
        sent.append(_nbytes(tensors))
        return real(group, tensors, *a, **k)

    dist._broadcast_coalesced = counting

    def counting_allreduce(state, bucket):  # the gradient buckets
        reduced.append(_nbytes([bucket.buffer()]))
        return allreduce_hook(state, bucket)

    out = {}
    for storage in ("parameter", "buffer", "bf16_low_memory"):
        torch.manual_seed(0)
        extra = dict(target_dtype=torch.bfloat16, low_memory=True) if storage == "bf16_low_memory" else {}
        model = surgery.apply(BNNet(rank), mixout=0.3, **extra)
        if storage == "buffer":
            as_buffer_targets(model)
        targets = [t for n, t in model.state_dict().items() if n.endswith(TARGET)]
        sent.clear()
        ddp = DDP(model.train())
        ddp.register_comm_hook(None, counting_allreduce)
        at_wrap = sum(sent)
        # after wrapping every rank holds rank 0's head and rank 0's head target
        mine = torch.cat([t.reshape(-1) for t in targets] + [model.classifier.weight.detach().reshape(-1)])
        all_ = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(all_, mine)
        head_t = model.classifier.mixout_target
        head_target_is_head = torch.equal(head_t, model.classifier.weight.detach().to(head_t.dtype))
        bn_seen = []
        model.bn.register_forward_pre_hook(lambda m, a: bn_seen.append(m.running_mean.clone()))
        drawn, real_scale = [], surgery.layers.mixout._scale
        surgery.layers.mixout._scale = lambda p, n, like: drawn.append(real_scale(p, n, like)) or drawn[-1]
        surgery.seed_rank(7)  # the default policy: every rank draws its own masks
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
        sent.clear()
        reduced.clear()
        steps = 3
        for i in range(steps):
            g = torch.Generator().manual_seed(10 * i + rank)  # each rank its own data
            x, y = torch.randn(6, 8, generator=g), torch.randint(0, 4, (6,), generator=g)
            torch.nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()
            opt.zero_grad()
        surgery.layers.mixout._scale = real_scale
        masks = [torch.empty_like(drawn[0]) for _ in range(world)]
        dist.all_gather(masks, drawn[0])
        bn = torch.cat(bn_seen[-1:])  # running stats as the last forward saw them, after DDP's buffer sync
        bns = [torch.empty_like(bn) for _ in range(world)]
        dist.all_gather(bns, bn)
        out[storage] = {
            "at_wrap": at_wrap, "per_step": sum(sent) / steps, "grad_per_step": sum(reduced) / steps,
            "targets": _nbytes(targets), "bn_buffers": _nbytes(model.bn.buffers()),
            "params": _nbytes(p for n, p in model.named_parameters() if not n.endswith(TARGET)),
            "trainable": _nbytes(p for p in model.parameters() if p.requires_grad),
            "replicas_agree": all(torch.equal(all_[0], a) for a in all_),
            "head_target_is_head": head_target_is_head,
            "bn_synced": all(torch.equal(bns[0], b) for b in bns),
            "masks_differ": not torch.equal(masks[0], masks[1]),
            "optimizer_states": len(opt.state),
            "n_trainable": sum(1 for p in model.parameters() if p.requires_grad),
        }
    with open(os.path.join(tmp, f"ddp{rank}.json"), "w") as f:
        json.dump(out, f)
    finish_worker()


@pytest.mark.slow
def test_ddp_syncs_targets_once_and_never_again():
    res = spawn_ranks(_ddp_worker, "ddp")
    for r in res:
        now, before, low = r["parameter"], r["buffer"], r["bf16_low_memory"]
        # target_dtype and low_memory under DDP: bf16 targets (half the bytes) are synced once and never sent again
        assert low["per_step"] == low["bn_buffers"] and low["targets"] * 2 == now["targets"]
        assert low["replicas_agree"] and low["head_target_is_head"] and low["bn_synced"]
        assert low["at_wrap"] == low["params"] + low["targets"] + low["bn_buffers"]
        # guards: a training step broadcasts the real buffers (BatchNorm statistics) and nothing else; the
        # buffer storage of before sent every target each step, which is what this measurement must catch
        assert now["per_step"] == now["bn_buffers"] > 0
        assert before["per_step"] == before["bn_buffers"] + before["targets"]
        # the gradient all-reduce carries the trainable parameters only, never a target
        assert now["grad_per_step"] == now["trainable"] == now["params"]
        # at construction DDP syncs everything once: parameters, targets and buffers
        assert now["at_wrap"] == now["params"] + now["targets"] + now["bn_buffers"]
        assert now["replicas_agree"] and now["head_target_is_head"]  # rank 0's head and its target everywhere
        assert now["bn_synced"]  # BatchNorm statistics still follow rank 0 at every forward
        assert now["masks_differ"]  # seed_rank: each rank draws its own Mixout masks
        assert now["optimizer_states"] == now["n_trainable"]  # AdamW keeps no state for the frozen targets


# ---- FSDP2 ---------------------------------------------------------------------------------------------

VARIANTS = {"default": {}, "bf16_low_memory": {"target_dtype": torch.bfloat16, "low_memory": True}}


def _model(variant):
    return surgery.apply(pretrained(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), mixout=0.3,
                         **VARIANTS[variant])


def _train(model, opt, steps, rank=None):
    full = batch(n=8)
    b = full if rank is None else {k: v[4 * rank:4 * rank + 4] for k, v in full.items()}
    for _ in range(steps):
        compute_loss(model.train(), b, rdrop_alpha=1.0).loss.backward()
        opt.step()
        opt.zero_grad()


def _fsdp_worker(rank, world, tmp):
    init_gloo(rank, world, tmp)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)
    from torch.distributed.fsdp import fully_shard

    from surgery.describing import target_bytes

    def sharded(variant):
        m = _model(variant)
        for layer in m.bert.encoder.layer:
            fully_shard(layer)
        fully_shard(m)
        # momentum: optimizer state to resume (AdamW would amplify the round-off of the ~0 key-bias gradients)
        return m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    out = {}
    for variant in VARIANTS:
        m, opt = sharded(variant)
        total, local = target_bytes(m)
        locals_ = [None] * world
        dist.all_gather_object(locals_, local)
        torch.manual_seed(5)  # the same seed on every rank: the same masks as one process on the full batch
        _train(m, opt, 2, rank)
        ckpt = os.path.join(tmp, f"dcp-{variant}")
        dcp.save({"model": get_model_state_dict(m), "optim": get_optimizer_state_dict(m, opt)}, checkpoint_id=ckpt)
        rng = torch.get_rng_state()
        _train(m, opt, 2, rank)
        uninterrupted = get_model_state_dict(m, options=full)
        states = len(opt.state)
        # resume in a fresh model: the pretrained model, the same surgery, the same sharding, then load
        m2, opt2 = sharded(variant)
        sd = {"model": get_model_state_dict(m2), "optim": get_optimizer_state_dict(m2, opt2)}
        dcp.load(sd, checkpoint_id=ckpt)
        set_model_state_dict(m2, sd["model"])
        set_optimizer_state_dict(m2, opt2, sd["optim"])
        torch.set_rng_state(rng)
        _train(m2, opt2, 2, rank)
        resumed = get_model_state_dict(m2, options=full)
        saved_keys = list(dcp.FileSystemReader(ckpt).read_metadata().state_dict_metadata)
        if rank == 0:
            torch.save(uninterrupted, os.path.join(tmp, f"{variant}.pt"))
            out[variant] = {
                "total": total, "locals": locals_, "optimizer_states": states,
                "trainable": sum(1 for p in m.parameters() if p.requires_grad),
                "resumed_equal": uninterrupted.keys() == resumed.keys()
                and all(torch.equal(uninterrupted[k], resumed[k]) for k in resumed),
                "dcp_targets": sum(1 for k in saved_keys if k.startswith("model.") and k.endswith(TARGET)),
                "describe": surgery.describe(m),
            }
    if rank == 0:
        with open(os.path.join(tmp, "fsdp.json"), "w") as f:
            json.dump(out, f)
    dist.barrier()
    finish_worker()


@pytest.mark.slow
def test_fsdp2_shards_targets_trains_like_one_process_and_resumes_from_dcp():
    with tempfile.TemporaryDirectory() as tmp:
        spawn(_fsdp_worker, args=(2, tmp), nprocs=2)
        res = json.load(open(os.path.join(tmp, "fsdp.json")))
        gathered = {v: torch.load(os.path.join(tmp, f"{v}.pt")) for v in VARIANTS}
        # `surgery convert` turns the gathered full state dict into a plain checkpoint
        src, dst = os.path.join(tmp, "default.pt"), os.path.join(tmp, "plain.safetensors")
        p = subprocess.run([sys.executable, "-m", "surgery", "convert", src, dst], capture_output=True, text=True,
                           timeout=300, env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(
                               os.path.abspath(surgery.__file__)))})
        assert p.returncode == 0, p.stderr
        plain = load_file(dst)
    for variant, r in res.items():
        # guards: each rank holds its shard of the targets (about 1/world), not a full copy
        assert sum(r["locals"]) == r["total"] > 0
        assert max(r["locals"]) <= 0.6 * r["total"]
        assert "sharded:" in r["describe"]
        assert r["optimizer_states"] == r["trainable"]  # no optimizer state for the frozen targets
        assert r["dcp_targets"] == 8  # the DCP checkpoint carries every target (8 Mixout layers)
        assert r["resumed_equal"]  # resume from DCP == uninterrupted, bitwise
        ref = _model(variant)
        opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
        torch.manual_seed(5)
        _train(ref, opt, 4)
        sd = gathered[variant]
        assert sd.keys() == ref.state_dict().keys()  # the full state dict carries the targets
        for k, v in ref.state_dict().items():
            assert sd[k].dtype == v.dtype, k
            torch.testing.assert_close(sd[k], v, rtol=1e-4, atol=1e-6, msg=k)
            if k.endswith(TARGET):  # targets never move
                assert torch.equal(sd[k], v), k
    ref = gathered["default"]
    assert plain.keys() == {k for k in ref if not k.endswith(TARGET)}
    assert all(torch.equal(plain[k], ref[k]) for k in plain)


# ---- engines surgery refuses -----------------------------------------------------------------------------

def _apply_after_fully_shard_worker(rank, world, tmp):
    init_gloo(rank, world, tmp)
    from torch.distributed.fsdp import fully_shard
    m = pretrained()
    for layer in m.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(m)
    before = {k: v.full_tensor() for k, v in m.state_dict().items()}
    msg = ""
    try:
        surgery.apply(m, mixout=0.3)
    except SurgeryError as e:
        msg = str(e)
    unchanged = m.state_dict().keys() == before.keys() and not surgery.is_surgered(m)
    s = surgery.apply(pretrained(), mixout=0.3)
    fully_shard(s)
    msg_revert = ""
    try:
        surgery.revert(s)
    except SurgeryError as e:
        msg_revert = str(e)
    if rank == 0:
        with open(os.path.join(tmp, "after.json"), "w") as f:
            json.dump({"msg": msg, "unchanged": unchanged, "revert": msg_revert, "still": surgery.is_surgered(s)}, f)
    finish_worker()


@pytest.mark.slow
def test_apply_and_revert_after_fully_shard_are_refused_with_what_to_do():
    with tempfile.TemporaryDirectory() as tmp:
        spawn(_apply_after_fully_shard_worker, args=(2, tmp), nprocs=2)
        r = json.load(open(os.path.join(tmp, "after.json")))
    assert "already sharded with fully_shard" in r["msg"] and "then fully_shard(layer)" in r["msg"]
    assert r["unchanged"]
    assert "cannot revert a model sharded with fully_shard" in r["revert"] and "export_sharded" in r["revert"]
    assert r["still"]


class DeepSpeedEngine(nn.Module):
    """Stands in for deepspeed's engine class: surgery recognises it by name (real DeepSpeed: tests/test_deepspeed.py)."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def test_apply_on_a_deepspeed_engine_is_refused_before_anything_changes():
    m = DeepSpeedEngine(pretrained())
    keys = list(m.state_dict())
    with pytest.raises(SurgeryError, match="DeepSpeed engine") as e:
        surgery.apply(m, mixout=0.3)
    assert "before deepspeed.initialize" in str(e.value) and "FSDP2" in str(e.value)
    assert list(m.state_dict()) == keys and not surgery.is_surgered(m)


def test_an_engine_that_partitions_the_weight_after_apply_is_one_clear_error():
    m = surgery.apply(pretrained(), mixout=0.3).train()
    layer = m.classifier
    layer.weight = nn.Parameter(torch.empty(0))  # what ZeRO-3-like partitioning leaves on a rank
    with pytest.raises(SurgeryError, match=r"partitioned the weight without gathering the target.*supports"):
        layer(torch.randn(2, 16))
    layer.weight.ds_id, layer.weight.ds_shape = 0, torch.Size([3, 16])  # a ZeRO-3 shard DeepSpeed did not gather
    with pytest.raises(SurgeryError, match="ZeRO-3 shard.*before deepspeed.initialize"):
        layer(torch.randn(2, 16))


@pytest.mark.parametrize("p", [0.3, 1.0])
def test_an_unfrozen_target_is_frozen_again_and_never_trained(p):
    m = surgery.apply(pretrained(), mixout=p).train()
    before = {k: v.clone() for k, v in m.state_dict().items() if k.endswith(TARGET)}
    m.requires_grad_(True)  # "unfreeze everything" (PEFT's modules_to_save does it to its copy of the head too)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(**batch()).loss.backward()
    opt.step()
    targets = {n: t for n, t in m.named_parameters() if n.endswith(TARGET)}
    assert targets and not any(t.requires_grad or t.grad is not None for t in targets.values())
    assert all(torch.equal(t, before[n]) for n, t in targets.items())


def test_targets_are_frozen_parameters_and_counted_as_such():
    m = pretrained()
    n_before = m.num_parameters()
    surgery.apply(m, mixout=0.3)
    targets = {n: p for n, p in m.named_parameters() if n.endswith(TARGET)}
    assert len(targets) == 8 and not any(p.requires_grad for p in targets.values())
    assert not any(n.endswith(TARGET) for n, _ in m.named_buffers())
    assert m.num_parameters() == n_before + sum(p.numel() for p in targets.values())  # documented
    assert m.num_parameters(only_trainable=True) == n_before


# ---- the HF Trainer and Accelerate with their FSDP2 plugin, under torchrun -------------------------------

LAUNCHER_SCRIPT = """
import json, os, sys, torch
sys.path.insert(0, {tests!r})
import accelerate.state as st
from accelerate.utils import DistributedType
import surgery
from surgery.describing import target_bytes
from training_setup import surgered, dataset, trainer_args

# Accelerate turns its FSDP plugin on only with accelerators (on CPU it runs DDP instead); force it, so that its
# FSDP2 code path (fsdp2_prepare_model, the full-state-dict gather) runs here on gloo
real_init = st.AcceleratorState.__init__
def init(self, *a, **k):
    real_init(self, *a, **k)
    plugin = k.get("fsdp_plugin")
    if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, plugin
st.AcceleratorState.__init__ = init

out, mode, rank = {out!r}, {mode!r}, int(os.environ["RANK"])
m = surgered()
if mode == "trainer":
    args = trainer_args(out, 3, ddp_backend="gloo", fsdp=True,
                        fsdp_config={{"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"],
                                     "state_dict_type": "FULL_STATE_DICT"}})
    tr = surgery.SurgeryTrainer(model=m, args=args, train_dataset=dataset(), rdrop_alpha=1.0, msd_loss=True)
    tr.train()
    total, local = target_bytes(m)
    tr.save_model(os.path.join(out, "final"))
else:
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    acc = Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["BertLayer"]))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    loader = torch.utils.data.DataLoader(dataset(8), batch_size=2)
    model, opt, loader = acc.prepare(m, opt, loader)
    for b in loader:
        acc.backward(surgery.compute_loss(model.train(), b, rdrop_alpha=1.0, msd_loss=True).loss)
        opt.step()
        opt.zero_grad()
    total, local = target_bytes(m)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # collective
    if acc.is_main_process:
        torch.save(sd, os.path.join(out, "full.pt"))
from torch.distributed.fsdp import FSDPModule
with open(os.path.join(out, f"rank{{rank}}.json"), "w") as f:
    json.dump({{"fsdp2": isinstance(m, FSDPModule), "total": total, "local": local}}, f)
import torch.distributed as dist
if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["trainer", "accelerate"])
def test_trainer_and_accelerate_fsdp2_under_torchrun_shard_targets_and_save_plain(mode, tmp_path):
    from transformers import AutoModelForSequenceClassification
    script = tmp_path / "train.py"
    script.write_text(LAUNCHER_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)), out=str(tmp_path),
                                             mode=mode))
    rc, err = run_python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
                         timeout=600)
    assert rc == 0, err
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in res:
        assert r["fsdp2"]
        assert r["local"] is not None and r["local"] <= 0.6 * r["total"]  # each rank holds a shard of the targets
    assert sum(r["local"] for r in res) == res[0]["total"]
    if mode == "trainer":  # the final save_model is plain: no record, no targets, loads with plain transformers
        final = tmp_path / "final"
        assert "surgery" not in json.loads((final / "config.json").read_text())
        weights = load_file(final / "model.safetensors")
        assert weights and not any(k.endswith(TARGET) for k in weights)
        assert (final / "training_args.bin").is_file()
        plain = AutoModelForSequenceClassification.from_pretrained(str(final))
        torch.testing.assert_close(plain.classifier.weight, weights["classifier.weight"], rtol=0, atol=0)
        assert not any(n.endswith(TARGET) for n, _ in plain.named_parameters())
    else:  # the gathered state dict carries the targets; `surgery convert` makes it plain
        full = torch.load(tmp_path / "full.pt")
        assert sum(k.endswith(TARGET) for k in full) == 8
        p = subprocess.run([sys.executable, "-m", "surgery", "convert", str(tmp_path / "full.pt"),
                            str(tmp_path / "plain.safetensors")], capture_output=True, text=True, timeout=300,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(surgery.__file__))))
        assert p.returncode == 0, p.stderr
        plain = load_file(tmp_path / "plain.safetensors")
        assert plain.keys() == {k for k in full if not k.endswith(TARGET)}
