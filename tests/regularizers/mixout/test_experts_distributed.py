"""Expert and router targets under DDP and FSDP2 (2 gloo processes on CPU), as for the Linear targets
(tests/test_distributed.py): DDP syncs them once at construction and never in a step (the
gradient all-reduce carries the trainable Parameters only); FSDP2 shards them along the experts dim with
the weights (each rank holds about half) and trains exactly like one process on the full batch, with
``target_dtype``/``low_memory`` too.
"""

from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from conftest import finish_worker, init_gloo, spawn, spawn_ranks
from zoo import build

import surgery

TARGET = "mixout_target"
VARIANTS = {"default": {}, "bf16_low_memory": {"target_dtype": torch.bfloat16, "low_memory": True}}


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _model(variant):
    model = build("mixtral", drop=0.0)
    return surgery.apply(model, mixout=0.3, **VARIANTS[variant])


def _batch(rows=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(4, 99, (rows, 7), generator=g), "labels": torch.randint(0, 3, (rows,), generator=g)}


def _train(model, opt, steps, rank=None):
    full = _batch()
    b = full if rank is None else {k: v[2 * rank:2 * rank + 2] for k, v in full.items()}
    for _ in range(steps):
        model.train()(**b).loss.backward()
        opt.step()
        opt.zero_grad()


def _ddp_worker(rank, world, tmp):
    init_gloo(rank, world, tmp)
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    sent, reduced = [], []
    real = dist._broadcast_coalesced
    dist._broadcast_coalesced = lambda group, tensors, *a, **k: sent.append(_nbytes(tensors)) or real(
        group, tensors, *a, **k)

    def counting_allreduce(state, bucket):
        reduced.append(_nbytes([bucket.buffer()]))
        return allreduce_hook(state, bucket)

    out = {}
    for variant in VARIANTS:
        torch.manual_seed(rank)  # per-rank differences DDP must remove at construction
        model = _model(variant)
        with torch.no_grad():
            model.model.layers[0].mlp.experts.mixout_target.add_(rank)
        targets = [t for n, t in model.state_dict().items() if n.endswith(TARGET)]
        sent.clear()
        ddp = DDP(model)
        ddp.register_comm_hook(None, counting_allreduce)
        at_wrap = sum(sent)
        mine = model.model.layers[0].mlp.experts.mixout_target.detach().float().reshape(-1)
        all_ = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(all_, mine)
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
        sent.clear()
        reduced.clear()
        torch.manual_seed(0)
        for i in range(2):
            b = _batch(seed=10 * i + rank)
            ddp.train()(**b).loss.backward()
            opt.step()
            opt.zero_grad()
        out[variant] = {
            "at_wrap": at_wrap, "per_step": sum(sent) / 2, "grad_per_step": sum(reduced) / 2,
            "targets": _nbytes(targets), "buffers": _nbytes(model.buffers()),
            "params": _nbytes(p for n, p in model.named_parameters() if not n.endswith(TARGET)),
            "trainable": _nbytes(p for p in model.parameters() if p.requires_grad),
            "replicas_agree": all(torch.equal(all_[0], a) for a in all_),
            "optimizer_states": len(opt.state), "n_trainable": sum(1 for p in model.parameters() if p.requires_grad),
        }
    with open(os.path.join(tmp, f"ddp{rank}.json"), "w") as f:
        json.dump(out, f)
    finish_worker()


@pytest.mark.slow
def test_ddp_syncs_expert_targets_once_and_never_again():
    res = spawn_ranks(_ddp_worker, "ddp")
    for r in res:
        for variant, v in r.items():
            assert v["at_wrap"] == v["params"] + v["targets"] + v["buffers"], variant  # everything once
            assert v["per_step"] == v["buffers"], variant  # a step sends the buffers only, never a target
            assert v["grad_per_step"] == v["trainable"] == v["params"], variant  # gradients: trainable only
            assert v["replicas_agree"], variant  # rank 0's expert targets on every rank
            assert v["optimizer_states"] == v["n_trainable"], variant
        assert r["bf16_low_memory"]["targets"] * 2 == r["default"]["targets"]


def _fsdp_worker(rank, world, tmp):
    init_gloo(rank, world, tmp)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    from surgery.describing import target_bytes

    out = {}
    for variant in VARIANTS:
        m = _model(variant)
        for layer in m.model.layers:
            fully_shard(layer)
        fully_shard(m)
        experts = m.model.layers[0].mlp.experts
        local_rows = experts.mixout_target.to_local().shape[0]
        total, local = target_bytes(m)
        locals_ = [None] * world
        dist.all_gather_object(locals_, local)
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        torch.manual_seed(5)  # the same seed on every rank: the same masks as one process on the full batch
        _train(m, opt, 2, rank)
        full = get_model_state_dict(m, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save(full, os.path.join(tmp, f"{variant}.pt"))
            out[variant] = {"total": total, "locals": locals_, "local_rows": local_rows,
                            "describe": surgery.describe(m)}
    if rank == 0:
        with open(os.path.join(tmp, "fsdp.json"), "w") as f:
            json.dump(out, f)
    dist.barrier()
    finish_worker()


@pytest.mark.slow
def test_fsdp2_shards_expert_targets_and_trains_like_one_process():
    with tempfile.TemporaryDirectory() as tmp:
        spawn(_fsdp_worker, args=(2, tmp), nprocs=2)
        res = json.load(open(os.path.join(tmp, "fsdp.json")))
        gathered = {v: torch.load(os.path.join(tmp, f"{v}.pt")) for v in VARIANTS}
    for variant, r in res.items():
        assert sum(r["locals"]) == r["total"] > 0 and max(r["locals"]) <= 0.6 * r["total"]
        assert r["local_rows"] == 2  # 4 experts: each rank holds the targets of 2, as it holds their weights
        assert "sharded:" in r["describe"]
        ref = _model(variant)
        opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
        torch.manual_seed(5)
        _train(ref, opt, 2)
        sd = gathered[variant]
        assert sd.keys() == ref.state_dict().keys()
        for k, v in ref.state_dict().items():
            assert sd[k].dtype == v.dtype, k
            torch.testing.assert_close(sd[k], v, rtol=1e-4, atol=1e-6, msg=k)
            if k.endswith(TARGET):
                assert torch.equal(sd[k], v), k
