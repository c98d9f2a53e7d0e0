"""MixLinear forward+backward against nn.Linear and a naive Mixout, side by side.

    python examples/benchmarks/mixlinear_bench.py              # 4 shapes of the issue, 15 rounds
    python examples/benchmarks/mixlinear_bench.py --rounds 5 --threads 2

Variants, all in training mode with p=0.1, timed interleaved (see common.py):

* ``nn.Linear``: the reference, ratio 1.
* ``naive``: the published formula as the widely copied reference code computes it: a
  weight-sized 0/1 mask (one Bernoulli draw per input column, repeated over the rows), a
  cloned weight as the target, the mixed weight built elementwise
  ``((1-M)*T + M*W - p*T) / (1-p)`` and the weight-sized mask kept for backward
  (gradient ``M/(1-p) * dL/dW_mix``, exact).
* ``lerp+autograd``: a straightforward vectorised version: ``torch.lerp(T, W, s)`` with a
  per-column scale vector ``s = M/(1-p)``, autograd doing the backward.
* ``MixLinear``: surgery's layer (default mode).
* ``MixLinear low_memory``: keeps only the input and the mask vector, recomputing the
  mixed weight in backward.

Also prints the bytes each keeps alive for backward (unique storages autograd saves),
in total and beyond the parameters, the target and the input (which are alive anyway).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch import nn

from common import interleaved, machine_line, mib, saved_bytes, set_threads, table

import surgery
from surgery.layers.mixout import MixLinear

SHAPES = [(4096, 768, 768), (4096, 768, 3072), (4096, 3072, 768), (256, 768, 3072)]


class _NaiveMixout(torch.autograd.Function):
    """The published formula with a weight-sized mask kept for backward."""

    @staticmethod
    def forward(ctx, weight, target, p):
        mask = torch.empty(1, weight.shape[1], dtype=weight.dtype, device=weight.device).bernoulli_(1 - p)
        mask = mask.repeat(weight.shape[0], 1)  # weight-sized
        ctx.save_for_backward(mask)
        ctx.p = p
        return ((1 - mask) * target + mask * weight - p * target) / (1 - p)

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        return g * mask / (1 - ctx.p), None, None


class NaiveMixLinear(nn.Linear):
    def __init__(self, linear: nn.Linear, p: float):
        super().__init__(linear.in_features, linear.out_features, device="meta")
        self.weight, self.bias = linear.weight, linear.bias
        self.register_buffer("target", linear.weight.detach().clone())
        self.p = p

    def forward(self, x):
        return F.linear(x, _NaiveMixout.apply(self.weight, self.target, self.p), self.bias)


class LerpMixLinear(NaiveMixLinear):
    def forward(self, x):
        s = torch.empty(self.in_features, dtype=x.dtype).bernoulli_(1 - self.p).div_(1 - self.p)
        return F.linear(x, torch.lerp(self.target, self.weight, s), self.bias)


def build(in_f: int, out_f: int, p: float) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f)
    mods = {
        "nn.Linear": lin,
        "naive": NaiveMixLinear(nn.Linear(in_f, out_f), p),
        "lerp+autograd": LerpMixLinear(nn.Linear(in_f, out_f), p),
        "MixLinear": MixLinear.from_module(nn.Linear(in_f, out_f), p),
        "MixLinear low_memory": MixLinear.from_module(nn.Linear(in_f, out_f), p, low_memory=True),
    }
    for m in mods.values():
        m.train()
    return mods


def step(m: nn.Module, x: torch.Tensor, g: torch.Tensor):
    def run():
        m.weight.grad = m.bias.grad = x.grad = None
        m(x).backward(g)
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--min-time", type=float, default=0.25,
                    help="repeat each timed call so one timing of nn.Linear lasts at least this many seconds")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    print(machine_line())
    print(f"forward+backward, training mode, p={args.p}, fp32; median over {args.rounds} interleaved rounds "
          f"(each timing >= {args.min_time} s of repeated calls); "
          "ratio = median of per-round time / nn.Linear time [quartiles]\n")
    rows, results = [], []
    for tokens, in_f, out_f in SHAPES:
        mods = build(in_f, out_f, args.p)
        x = torch.randn(tokens, in_f, requires_grad=True)
        g = torch.randn(tokens, out_f)
        res = interleaved({n: step(m, x, g) for n, m in mods.items()}, rounds=args.rounds, warmup=2,
                          min_time=args.min_time)
        for n, m in mods.items():
            alive = (x,) + tuple(m.parameters()) + tuple(m.buffers())
            with saved_bytes(alive) as sb:
                y = m(x)
            del y
            r = res[n]
            rows.append([f"({tokens}, {in_f}->{out_f})", n, f"{r['median_s'] * 1e3:.1f} ms",
                         f"{r['ratio']:.3f}x [{r['ratio_q1']:.2f}-{r['ratio_q3']:.2f}]",
                         mib(sb["total"]), mib(sb["extra"])])
            results.append({"tokens": tokens, "in": in_f, "out": out_f, "variant": n, **r,
                            "saved_total_bytes": sb["total"], "saved_extra_bytes": sb["extra"]})
        print(f"done ({tokens}, {in_f}->{out_f})", flush=True)
    print()
    print(table(rows, ["shape (tokens, in->out)", "variant", "median fwd+bwd", "ratio to nn.Linear",
                       "kept for backward", "beyond params/target/input"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_line(), "args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
