"""``surgery.apply`` / ``revert`` on a 1.1B-parameter Llama-shaped model.

    python examples/benchmarks/apply_bench.py                   # tiny-width structure + real bf16 weights
    python examples/benchmarks/apply_bench.py --dtype float32    # real fp32 weights (~13 GB RAM)
    python examples/benchmarks/apply_bench.py --skip-real        # tiny-width structure only

The model is ``LlamaForCausalLM`` with TinyLlama-1.1B's shape (22 layers, hidden 2048,
MLP 5632, 32 heads, 4 KV heads, vocabulary 32000, untied LM head): 1.10B parameters, 155
Linear layers. ``apply(model, mixout=0.1, dropout=0.0)`` swaps every Linear for a
``MixLinear`` (the LM head too) and copies each weight once as its Mixout target.

* the same module tree at width 64 (22 layers, 155 Linear layers, the same names; 4 MB of
  weights): the time is the overhead of planning, validating, swapping and recording, which
  grows with the number of modules, not their size (goal < 1 s each). (Mixout refuses a
  model on the meta device: its targets would copy nothing.)
* real weights: apply against cloning every Linear weight once (the floor: apply must
  make that copy), interleaved over rounds with a revert after each apply (goal <= 1.5x).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
from torch import nn

from common import machine_line, set_threads, table

import surgery


def llama(device: str, dtype: torch.dtype, width: int | None = None):
    """TinyLlama-1.1B's module tree; ``width`` shrinks every dimension (same modules and names)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    full = width is None
    cfg = LlamaConfig(vocab_size=32000 if full else 256, hidden_size=2048 if full else width,
                      intermediate_size=5632 if full else 2 * width, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                      tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(dtype)
    if device != "meta":
        model = model.to_empty(device=device)
        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                p.fill_(0.01 * (i % 7 + 1))  # touch every page, so memory is really resident
    return model


def linear_weights(model) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if type(m) is nn.Linear]


def timed(fn) -> float:
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-real", action="store_true")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(machine_line())

    n = sum(p.numel() for p in llama("meta", dtype).parameters())
    model = llama("cpu", dtype, width=64)
    ws = linear_weights(model)
    print(f"LlamaForCausalLM, TinyLlama-1.1B shape: {n / 1e9:.2f}B parameters, {len(ws)} Linear layers; "
          f"overhead measured on the same tree at width 64")
    rows = []
    ta, tr = [], []
    for _ in range(args.rounds):
        ta.append(timed(lambda: surgery.apply(model, mixout=0.1, dropout=0.0)))
        tr.append(timed(lambda: surgery.revert(model)))
    rows.append(["width 64, same tree", "apply(mixout=0.1, dropout=0.0)", f"{statistics.median(ta) * 1e3:.0f} ms",
                 "goal < 1 s"])
    rows.append(["width 64, same tree", "revert", f"{statistics.median(tr) * 1e3:.0f} ms", "goal < 1 s"])
    del model
    gc.collect()

    if not args.skip_real:
        model = llama("cpu", dtype)
        ws = linear_weights(model)
        gb = sum(w.numel() * w.element_size() for w in ws) / 1e9
        tc, ta, tr, ratios = [], [], [], []
        for r in range(args.rounds + 1):  # round 0 is a warm-up
            order = ["clone", "apply"] if r % 2 == 0 else ["apply", "clone"]
            got = {}
            for what in order:
                if what == "clone":
                    copies = []
                    got["clone"] = timed(lambda: copies.extend(w.detach().clone() for w in ws))
                    del copies
                else:
                    got["apply"] = timed(lambda: surgery.apply(model, mixout=0.1, dropout=0.0))
                    got["revert"] = timed(lambda: surgery.revert(model))
            if r:
                tc.append(got["clone"])
                ta.append(got["apply"])
                tr.append(got["revert"])
                ratios.append(got["apply"] / got["clone"])
        label = f"real {args.dtype} weights"
        rows.append([label, f"clone every Linear weight once ({gb:.2f} GB)", f"{statistics.median(tc) * 1e3:.0f} ms", "1.00x (the floor)"])
        rows.append([label, "apply(mixout=0.1, dropout=0.0)", f"{statistics.median(ta) * 1e3:.0f} ms",
                     f"{statistics.median(ratios):.2f}x clone (goal <= 1.5x)"])
        rows.append([label, "revert", f"{statistics.median(tr) * 1e3:.0f} ms", ""])
    print(f"\nmedian over {args.rounds} rounds (real weights: clone and apply interleaved, order alternating)\n")
    print(table(rows, ["weights", "operation", "median time", "ratio / goal"]))


if __name__ == "__main__":
    main()
