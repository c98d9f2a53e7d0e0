"""Mixout on a fused-experts layer: forward+backward against the plain layer, side by side.

    python examples/benchmarks/experts_bench.py                      # 8 experts, hidden 1024, width 2816
    python examples/benchmarks/experts_bench.py --scale 0.5 --rounds 3 --tokens 512 4096
    python examples/benchmarks/experts_bench.py --impl eager          # transformers' per-expert loop

The layer is transformers' ``MixtralExperts`` (the shapes of a small real MoE model by default: 8 experts,
hidden 1024, expert width 2816, 2 experts per token) with fixed random routing; each call is one training
forward and backward (``experts_implementation`` ``grouped_mm`` by default, what transformers picks).
Variants, timed interleaved (see common.py), ratios to the plain layer (the median of per-round ratios,
and the ratio of each variant's fastest run, the least disturbed on a shared machine):

* ``plain``: the layer as transformers ships it.
* ``mixout``: ``surgery`` Mixout, p=0.1 (the mixed weights kept for backward).
* ``mixout low_memory``: the mixed weights recomputed in backward instead.

Memory (``--memory``, after one untimed step, from the profiler's allocation events): what one
forward+backward allocates above the Parameters, targets and inputs that exist before it: the bytes still
allocated when backward starts (kept for backward: what each layer of a deep model adds) and the peak of
the step, each next to the plain layer's. The goal: beyond its targets (allocated at apply), Mixout keeps
at most the layer's mixed weights for backward, ``low_memory`` at most the masks (and recomputes the mixed
weights in backward, one layer at a time).
"""

from __future__ import annotations

import argparse
import json

import torch

from common import interleaved, machine_line, mib, set_threads, table

from surgery.layers.experts import MixoutParams

P = 0.1
VARIANTS = ("plain", "mixout", "mixout low_memory")


def layer(scale: float, impl: str, experts: int):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    cfg = MixtralConfig(hidden_size=int(1024 * scale), intermediate_size=int(2816 * scale),
                        num_local_experts=experts, num_experts_per_tok=2)
    cfg._experts_implementation = impl
    torch.manual_seed(0)
    m = MixtralExperts(cfg)
    with torch.no_grad():
        m.gate_up_proj.normal_(0, 0.02)
        m.down_proj.normal_(0, 0.02)
    return m.train()


def variant(name: str, scale: float, impl: str, experts: int):
    m = layer(scale, impl, experts)
    if name == "plain":
        return m
    mixed = MixoutParams.from_module(m, P, (("gate_up_proj", (0, 2)), ("down_proj", (0, 2))),
                                     low_memory=name.endswith("low_memory"))
    with torch.no_grad():  # a fine-tuned weight: away from its target
        mixed.gate_up_proj.add_(torch.randn_like(mixed.gate_up_proj) * 1e-3)
    return mixed.train()


def inputs(m, tokens: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    e = m.num_experts
    x = torch.randn(tokens, m.hidden_dim, generator=g, requires_grad=True)  # hidden states, as in a model
    idx = torch.stack([torch.randperm(e, generator=g)[:2] for _ in range(tokens)])
    w = torch.rand(tokens, 2, generator=g)
    return x, idx, w / w.sum(-1, keepdim=True)


def step(m, args):
    def run():
        for p in [*m.parameters(), args[0]]:
            p.grad = None
        m(*args).sum().backward()
    return run


def sizes(scale: float, experts: int) -> dict[str, int]:
    h, i = int(1024 * scale), int(2816 * scale)
    weights = experts * (2 * i * h + h * i) * 4
    return {"targets": weights, "mixed weight": experts * 2 * i * h * 4, "mask": experts * (h + i) * 4}


def measure(name: str, scale: float, impl: str, experts: int, tokens: int) -> dict[str, int]:
    """Bytes torch allocates in one forward+backward, above what exists before it (Parameters, targets,
    inputs): ``held``, still allocated when backward starts (kept for backward), and ``peak``, the most at
    any time of the step (the profiler's allocation events, summed in order; any device)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    m = variant(name, scale, impl, experts)
    args = inputs(m, tokens)
    step(m, args)()  # warm up, then leave no gradients
    for p in [*m.parameters(), args[0]]:
        p.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = m(*args).sum()
        with record_function("experts_bench_backward"):
            out.backward()
    events = sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns())
    mark = next(e.start_ns() for e in events if e.name() == "experts_bench_backward")
    cur = peak = held = 0
    for e in events:
        if e.name() == "[memory]":
            if e.start_ns() >= mark and not held:
                held = cur
            cur += e.nbytes()
            peak = max(peak, cur)
    return {"held": held, "peak": peak}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--scale", type=float, default=1.0, help="scale hidden and expert width (1.0: 1024 and 2816)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--impl", default="grouped_mm", choices=["grouped_mm", "eager", "batched_mm"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--memory", action="store_true", help="also measure peak memory, one process per variant")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--_measure", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    set_threads(a.threads)
    if a._measure:
        print(measure(a._measure[0], a.scale, a.impl, a.experts, int(a._measure[1])))
        return
    print(machine_line())
    h, i = int(1024 * a.scale), int(2816 * a.scale)
    print(f"layer: MixtralExperts, {a.experts} experts, hidden {h}, width {i}, top-2, {a.impl}, p={P}, "
          f"{a.rounds} rounds")
    rows, out = [], {}
    for tokens in a.tokens:
        mods = {n: variant(n, a.scale, a.impl, a.experts) for n in VARIANTS}
        args = inputs(mods["plain"], tokens)
        res = interleaved({n: step(m, args) for n, m in mods.items()}, rounds=a.rounds, warmup=1, reference="plain")
        for n in VARIANTS:
            r = res[n]
            rows.append([tokens, n, f"{r['median_s'] * 1e3:.0f} ms", f"{r['ratio']:.3f}",
                         f"{r['ratio_q1']:.3f}-{r['ratio_q3']:.3f}",
                         f"{r['min_s'] / res['plain']['min_s']:.3f}"])
        out[tokens] = {n: res[n] for n in VARIANTS}
        del mods
    print(table(rows, ["tokens", "variant", "median", "ratio to plain", "ratio IQR", "ratio of fastest runs"]))
    if a.memory:
        s = sizes(a.scale, a.experts)
        print(f"the layer's targets {mib(s['targets'])} (= its mixed weights, gate_up_proj + down_proj), "
              f"one mask {s['mask']} bytes")
        mrows = []
        for tokens in a.tokens:
            mem = {n: measure(n, a.scale, a.impl, a.experts, tokens) for n in VARIANTS}
            for n in VARIANTS:
                mrows.append([tokens, n, mib(mem[n]["held"]), mib(mem[n]["held"] - mem["plain"]["held"]),
                              mib(mem[n]["peak"]), mib(mem[n]["peak"] - mem["plain"]["peak"])])
            out.setdefault("memory", {})[tokens] = mem
        print(table(mrows, ["tokens", "variant", "kept for backward", "over plain", "peak of a step",
                            "over plain"]))
    if a.json:
        print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
