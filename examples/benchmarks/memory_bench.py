"""Peak memory of a training step with Mixout against plain, and what ``target_dtype`` saves.

    python examples/benchmarks/memory_bench.py                  # MiniLM, batch 32 x 128 tokens
    python examples/benchmarks/memory_bench.py --seq 32

Each variant runs in its own process (Linux: peak RSS from ``/proc/self/status``, reset
with ``/proc/self/clear_refs`` before the measured step; glibc's mmap threshold is pinned
so freed tensors leave RSS at once). In each process: load the pretrained
all-MiniLM-L6-v2 (regression head), apply the variant, AdamW (fused), one warm-up step
(optimizer state allocated), drop the gradients, then measure:

* ``resident``: RSS before the step: weights, Mixout targets, optimizer state;
* ``step peak``: the highest RSS during one step (forward, backward, optimizer step)
  above ``resident``: activations, mixed weights kept for backward, gradients.

The analytic cost next to it: the targets are one copy of every mixed weight (in
``target_dtype``); the default mode also keeps one mixed weight per layer alive from its
forward to its backward, which ``low_memory=True`` recomputes instead.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
from pathlib import Path

VARIANTS = {
    "plain": {},
    "mixout": {"mixout": 0.1},
    "mixout, target_dtype=bfloat16": {"mixout": 0.1, "target_dtype": "bfloat16"},
    "mixout, low_memory": {"mixout": 0.1, "low_memory": True},
    "mixout, bfloat16 targets + low_memory": {"mixout": 0.1, "target_dtype": "bfloat16", "low_memory": True},
}


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) * 1024


def child(spec: dict, batch: int, seq: int, model_path) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import finetune as ft

    import surgery
    from surgery.layers.mixout import MixLinear

    _, model = ft.load_model(model_path, seed=0)
    kw = dict(spec)
    if "target_dtype" in kw:
        kw["target_dtype"] = getattr(torch, kw["target_dtype"])
    if kw:
        surgery.apply(model, **kw)
    model.train()
    opt = ft.adamw(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    b = {"input_ids": torch.randint(1000, 30000, (batch, seq), generator=g),
         "attention_mask": torch.ones(batch, seq, dtype=torch.long), "labels": torch.randn(batch, generator=g)}

    def step():
        opt.zero_grad(set_to_none=True)
        model(**b).loss.backward()
        opt.step()

    step()
    opt.zero_grad(set_to_none=True)
    gc.collect()
    targets = surgery.describing.target_bytes(model)[0] if surgery.is_surgered(model) else 0  # frozen Parameters
    mixed = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, MixLinear))
    peaks = []
    for _ in range(3):  # the lowest of three peaks: allocator noise only ever adds
        gc.collect()
        resident = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        step()
        peaks.append((_status("VmHWM") - resident, resident))
        opt.zero_grad(set_to_none=True)
    peak, resident = min(peaks)
    return {"resident": resident, "step_peak": peak, "targets": targets, "mixed_weights": mixed}


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--model", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child), args.batch, args.seq, args.model)))
        return
    from common import machine_line, table

    print(machine_line())
    print(f"all-MiniLM-L6-v2 training step, batch {args.batch} x {args.seq} tokens, AdamW, fp32 weights; "
          "one process per variant\n")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    res = {}
    for name, spec in VARIANTS.items():
        cmd = [sys.executable, __file__, "--batch", str(args.batch), "--seq", str(args.seq), "--child", json.dumps(spec)]
        if args.model:
            cmd += ["--model", args.model]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode:
            raise SystemExit(f"{name}: child failed\n{out.stderr}")
        res[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"done {name}", flush=True)
    p = res["plain"]
    rows = []
    for name, r in res.items():
        expected_step = 0 if name == "plain" or "low_memory" in name else r["mixed_weights"]
        rows.append([name, mib(r["resident"]), mib(r["resident"] - p["resident"]),
                     mib(r["targets"]), mib(r["step_peak"]), mib(r["step_peak"] - p["step_peak"]),
                     mib(expected_step), mib(r["resident"] + r["step_peak"] - p["resident"] - p["step_peak"])])
    print()
    print(table(rows, ["variant", "resident before step", "vs plain", "targets (analytic)", "step peak above resident",
                       "vs plain", "mixed weights kept (analytic)", "total peak vs plain"]))


if __name__ == "__main__":
    main()
