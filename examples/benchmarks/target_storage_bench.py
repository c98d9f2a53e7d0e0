"""One process: does storing Mixout targets as frozen Parameters (with the per-forward engine check) slow a
training step? Before (buffer targets, the forward without the check) vs now, side by side.

    python examples/benchmarks/target_storage_bench.py               # real MiniLM, batch 16 x 64, 15 rounds
    python examples/benchmarks/target_storage_bench.py --quick       # tiny random BERT, seconds

One step = zero_grad, forward, loss, backward, AdamW step with Mixout p=0.1 on every Linear. "before"
re-registers every target as a persistent buffer and runs the forward as it was before this change
(copied below); "now" is ``MixLinear`` as it is. Timed interleaved (see common.py). Since whole
steps on a shared machine are noisier than 1%, it also times the one thing "now" adds per layer forward
(the engine check) and prints its share of the step.
"""

from __future__ import annotations

import argparse
import types

import torch
import torch.nn.functional as F

from common import interleaved, machine_line, set_threads, table

import surgery
from surgery.layers.mixout import MixLinear, _MixoutLinear, _scale, mixout_weight

TARGET = "mixout_target"


def before_forward(self, x):
    """``MixLinear.forward`` before this change: no engine check."""
    if not self.training or self.mixout_p == 0.0:
        if self.transposed:
            out = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight) if self.bias is not None \
                else x.reshape(-1, x.size(-1)) @ self.weight
            return out.view(x.shape[:-1] + (self.out_features,))
        return F.linear(x, self.weight, self.bias)
    w, t = self.weight, self.target
    if self.mixout_p < 1.0:
        n = w.shape[0] if self.transposed else w.shape[1]
        s = _scale(self.mixout_p, n, w)
        return _MixoutLinear.apply(x, w, t, s.unsqueeze(1) if self.transposed else s, self.bias, self.transposed,
                                   not self.mixout_low_memory)
    wm = mixout_weight(w, t.to(w.dtype), self.mixout_p, transposed=self.transposed)
    return F.linear(x, wm.t() if self.transposed else wm, self.bias)


def as_before(model):
    for m in model.modules():
        if isinstance(m, MixLinear):
            m.register_buffer(TARGET, m._parameters.pop(TARGET).detach())
            m.forward = types.MethodType(before_forward, m)
    return model


def load(args):
    if args.quick:
        from transformers import AutoConfig, AutoModelForSequenceClassification
        torch.manual_seed(0)
        cfg = AutoConfig.for_model("bert", hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=128, vocab_size=1000, num_labels=1)
        return AutoModelForSequenceClassification.from_config(cfg)
    import finetune as ft  # examples/finetune.py: the real model from the cache
    return ft.load_model(None, seed=0)[1]


def make_step(model, b):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def run():
        opt.zero_grad(set_to_none=True)
        model(**b).loss.backward()
        opt.step()
    run()
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    print(machine_line())
    before = as_before(surgery.apply(load(args), mixout=0.1)).train()
    now = surgery.apply(load(args), mixout=0.1).train()
    g = torch.Generator().manual_seed(0)
    b = {"input_ids": torch.randint(1000 if not args.quick else 5, 20000 if not args.quick else 1000,
                                    (args.batch, args.seq), generator=g),
         "labels": torch.randn(args.batch, 1, generator=g)}
    res = interleaved({"before (buffer targets)": make_step(before, b), "now (frozen Parameter targets)":
                       make_step(now, b)}, rounds=args.rounds, warmup=1)
    # the only per-step work this change adds: one engine check per Mixout layer forward
    import timeit

    from surgery.distributed import layer_ok
    layers = [m for m in now.modules() if isinstance(m, MixLinear)]
    w, t = layers[0].weight, layers[0].target
    n = 20000
    check_s = min(timeit.repeat(lambda: torch.compiler.is_compiling() or layer_ok(w, t), number=n, repeat=5)) / n
    share = check_s * len(layers) / res["now (frozen Parameter targets)"]["median_s"]
    print(f"engine check: {check_s * 1e6:.2f} us per Mixout layer forward x {len(layers)} layers = "
          f"{share * 100:.4f}% of the median step")
    print(f"training step, batch {args.batch} x {args.seq}, AdamW, Mixout p=0.1 on every Linear; "
          f"median of {args.rounds} interleaved rounds")
    print(table([[n, f"{r['median_s'] * 1000:.1f} ms", f"{r['ratio']:.3f}x [{r['ratio_q1']:.3f}, {r['ratio_q3']:.3f}]"]
                 for n, r in res.items()], ["variant", "median step", "ratio to before [quartiles]"]))


if __name__ == "__main__":
    main()
