"""Mixout under DDP, FSDP2 and DeepSpeed ZeRO-2/ZeRO-3 on 2 gloo ranks: plain vs Mixout with buffer targets (the
storage before frozen-Parameter targets) vs Mixout now, side by side.

    python examples/benchmarks/dist_bench.py                       # BERT-base shape (109M params), DDP and FSDP2
    python examples/benchmarks/dist_bench.py --engines ddp --rounds 3
    python examples/benchmarks/dist_bench.py --engines zero2 zero3 # DeepSpeed (DS_ACCELERATOR=cpu is set for you)
    python examples/benchmarks/dist_bench.py --quick               # a tiny model, seconds

The model is ``BertForSequenceClassification`` with BERT-base dimensions and random weights (12 layers,
hidden 768; the content does not change the cost); Mixout p=0.1 on every Linear. Each rank trains on
its own batch with SGD. Per engine and variant it reports, per rank:

* bytes sent by broadcasts per training step (DDP re-broadcasts buffers at every forward; counted by
  wrapping ``torch.distributed._broadcast_coalesced``, which DDP uses for that), and at wrap time (DDP and
  FSDP2 only: DeepSpeed broadcasts through its own communication layer, shown as "-");
* Mixout target bytes this rank holds (FSDP2 and ZeRO-3 shard parameters, not buffers; for ZeRO-3 the size
  of DeepSpeed's own partitions, ``ds_tensor``; ZeRO-2 keeps every parameter whole on every rank);
* peak resident memory of the rank (``ru_maxrss``; every run is a fresh pair of processes) above its
  memory after importing torch and transformers;
* step time, median over steps (and rounds), and its ratio to plain (runs alternate ABC, CBA, ...).

``--buffer-targets`` is the variant ``mixout-buffer``: after ``surgery.apply`` every target is
re-registered as a persistent buffer, which is how surgery stored them before.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_line, table  # noqa: E402

import surgery  # noqa: E402
from surgery.layers.mixout import MixLinear  # noqa: E402

VARIANTS = ("plain", "mixout-buffer", "mixout")
TARGET = "mixout_target"


def as_buffer_targets(model: nn.Module) -> nn.Module:
    """Store every Mixout target as a persistent buffer: the storage before this change."""
    for m in model.modules():
        if isinstance(m, MixLinear):
            t = m._parameters.pop(TARGET)
            m.register_buffer(TARGET, t.detach())
    return model


def build(variant: str, args):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    dims = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                vocab_size=1000) if args.quick else {}
    cfg = AutoConfig.for_model("bert", num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **dims)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(cfg)
    if variant != "plain":
        surgery.apply(model, mixout=0.1)
    if variant == "mixout-buffer":
        as_buffer_targets(model)
    return model


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def zero_engine(model: nn.Module, opt, stage: int, args):
    """``deepspeed.initialize`` with ZeRO ``stage`` (3: every parameter partitioned, whatever its size) and the
    engine's training step."""
    import deepspeed

    zo = {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config={
        "train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1, "zero_optimization": zo,
        "zero_allow_untested_optimizer": True})  # the same SGD as the DDP and FSDP2 columns

    def step(loss):
        engine.backward(loss)
        engine.step()

    return engine, step


def run_variant(engine: str, variant: str, args, rank: int, sent: list) -> dict:
    from surgery.describing import target_bytes

    model = build(variant, args).train()
    total = sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if n.endswith(TARGET))
    n_params = sum(p.numel() for n, p in model.named_parameters() if not n.endswith(TARGET))
    sent.clear()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    step = None
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        wrapped = DDP(model)
    elif engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard
        for layer in model.bert.encoder.layer:
            fully_shard(layer)
        wrapped = fully_shard(model)
    else:
        wrapped, step = zero_engine(model, opt, int(engine[-1]), args)
    at_wrap = sum(sent)
    if engine == "zero3":  # DeepSpeed's own partition sizes (a buffer target is not partitioned)
        held = sum((t.ds_tensor if hasattr(t, "ds_tensor") else t).numel() * t.element_size()
                   for n, t in [*model.named_parameters(), *model.named_buffers()] if n.endswith(TARGET))
    else:
        held = target_bytes(model)[1] if variant == "mixout" else None
    if held is None:
        held = total  # a buffer (or an unsharded copy) is whole on every rank
    g = torch.Generator().manual_seed(rank)
    b = {"input_ids": torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g),
         "labels": torch.randint(0, 2, (args.batch,), generator=g)}
    times, per_step = [], []
    for i in range(args.warmup + args.steps):
        sent.clear()
        t0 = time.perf_counter()
        if step is not None:
            step(wrapped(**b).loss)
        else:
            wrapped(**b).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(dt)
            per_step.append(sum(sent))
    return {"params": n_params, "targets": total, "held": held, "at_wrap": at_wrap,
            "per_step": statistics.median(per_step), "times": times}


def worker(rank: int, world: int, tmp: str, args, engine: str, variant: str, tag: str):
    import resource

    torch.set_num_threads(args.threads)
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method="file://" + os.path.join(tmp, f"rdv-{tag}"), rank=rank,
                            world_size=world)
    sent: list[int] = []
    real = dist._broadcast_coalesced

    def counting(group, tensors, *a, **k):
        sent.append(sum(t.numel() * t.element_size() for t in tensors))
        return real(group, tensors, *a, **k)

    dist._broadcast_coalesced = counting
    import transformers  # noqa: F401  (imported before the baseline: not part of the variant's memory)
    if engine.startswith("zero"):
        import deepspeed  # noqa: F401  (the same)
    base = rss()
    out = run_variant(engine, variant, args, rank, sent)
    out["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base  # Linux: KiB
    with open(os.path.join(tmp, f"{tag}-rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


def mib(n) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engines", nargs="+", default=["ddp", "fsdp2"], choices=["ddp", "fsdp2", "zero2", "zero3"])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--quick", action="store_true", help="a tiny BERT instead of the BERT-base shape")
    args = ap.parse_args(argv)
    print(machine_line(), f"| 2 gloo ranks x {args.threads} thread(s), batch {args.batch}x{args.seq} per rank")
    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for engine in args.engines:
            for r in range(args.rounds):  # one fresh pair of processes per run; the order alternates per round
                for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
                    tag = f"{engine}-{v}-{r}"
                    mp.spawn(worker, args=(2, tmp, args, engine, v, tag), nprocs=2, join=True)
                    for rank in range(2):
                        res.setdefault(engine, {}).setdefault(v, []).append(
                            json.load(open(os.path.join(tmp, f"{tag}-rank{rank}.json"))))
    for engine in args.engines:
        rows = []
        base = None
        for v in VARIANTS:
            runs = res[engine][v]
            t = statistics.median([x for run in runs for x in run["times"]])
            base = t if v == "plain" else base
            r0 = runs[0]
            counted = engine in ("ddp", "fsdp2")  # DeepSpeed's broadcasts do not go through _broadcast_coalesced
            rows.append([v, f"{r0['params'] / 1e6:.1f}M", mib(r0["targets"]),
                         mib(max(run["held"] for run in runs)),
                         mib(statistics.median(run["per_step"] for run in runs)) if counted else "-",
                         mib(statistics.median(run["at_wrap"] for run in runs)) if counted else "-",
                         mib(max(run["peak"] for run in runs)),
                         f"{t * 1000:.0f} ms", f"{t / base:.3f}x"])
        print(f"\n{engine}:")
        print(table(rows, ["variant", "params", "targets (all)", "targets held per rank", "broadcast per step",
                           "broadcast at wrap", "peak RSS per rank (over imports)", "step (median)", "step / plain"]))


if __name__ == "__main__":
    main()
