"""Full training steps of the real MiniLM: Mixout, MSD and R-Drop against plain, side by side.

    python examples/benchmarks/step_bench.py                    # batch 32, 128 tokens, 10 rounds
    python examples/benchmarks/step_bench.py --seq 16 --rounds 20

One step = zero_grad, forward, loss, backward, AdamW step, on the pretrained
all-MiniLM-L6-v2 with a 1-output regression head (random token ids: the content does not
change the cost). Three groups, each timed interleaved (see common.py):

1. Mixout on every Linear (p=0.1, default and low-memory mode) against the plain model;
2. multi-sample dropout K=8 (surgery: one batched head call, the paper's per-sample loss)
   against the plain head, next to a Python-loop version (K dropout+head calls);
3. R-Drop with ``surgery.compute_loss(rdrop_alpha=1)`` (its ``auto`` strategy: one forward
   on ``[x; x]`` for this model) and with ``strategy="separate"`` (two forwards), against
   two plain passes with the loss written by hand, and a one-pass plain step;
4. the layer-weighted MSD head (``apply(msd=5, msd_p=0.5, msd_layers=True)``, the QUEST
   2nd-place head) against the plain MSD head with the same K and p, next to the QUEST solution's
   code (``CustomBert``: a per-layer dropout loop and a loop over the K samples).
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

from common import interleaved, machine_line, set_threads, table

import surgery


def load(args):
    import finetune as ft  # examples/finetune.py: the real model from the cache

    _, model = ft.load_model(args.model, seed=0)
    return model


def make_step(model, batch, loss_fn):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def run():
        opt.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        opt.step()
    run()  # optimizer state allocated before timing
    return run


def plain_loss(model, b):
    return model(**b).loss


def msd_loss(model, b):
    return surgery.compute_loss(model, b, msd_loss=True).loss


def msd_loop_loss(k, p):
    """The usual hand-written MSD head: K dropout + head calls in a Python loop, mean of the losses."""
    def loss(model, b):
        pooled = model.bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).pooler_output
        pooled = model.dropout(pooled)
        losses = [F.mse_loss(model.classifier(F.dropout(pooled, p, True)).squeeze(-1), b["labels"]) for _ in range(k)]
        return torch.stack(losses).mean()
    return loss


def seed_layers_loss(k, p, layer_p):
    """The QUEST solution's CustomBert head written as it is there: hidden states of all layers, a dropout call per
    layer on its CLS vector, softmax-weighted sum, K dropout + classifier calls in a loop; mean of the K
    per-sample losses (the paper's form, as surgery's)."""
    def loss(model, b):
        hs = model.bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True).hidden_states
        cls = torch.stack([F.dropout(h[:, 0], layer_p, True) for h in hs], dim=2)
        pooled = (torch.softmax(model.seed_layer_weights, dim=0) * cls).sum(-1)
        losses = [F.mse_loss(model.classifier(F.dropout(pooled, p, True)).squeeze(-1), b["labels"]) for _ in range(k)]
        return torch.stack(losses).mean()
    return loss


def seed_model(base):
    m = copy.deepcopy(base)
    w = torch.full((m.config.num_hidden_layers + 1,), -3.0)
    w[-1] = 0.0
    m.seed_layer_weights = torch.nn.Parameter(w)
    m.bert.pooler.requires_grad_(False)  # unused, as with surgery's head
    return m


def rdrop_loss(model, b):
    return surgery.compute_loss(model, b, rdrop_alpha=1.0).loss


def rdrop_separate_loss(model, b):
    return surgery.compute_loss(model, b, rdrop_alpha=1.0, strategy="separate").loss


def two_pass_loss(model, b):
    """R-Drop written by hand: two forwards, MSE averaged over them + alpha/2 * mean squared difference."""
    y = b["labels"]
    fwd = {k: v for k, v in b.items() if k != "labels"}
    o1 = model(**fwd).logits.squeeze(-1)
    o2 = model(**fwd).logits.squeeze(-1)
    return 0.5 * (F.mse_loss(o1, y) + F.mse_loss(o2, y)) + 1.0 * 0.5 * (o1 - o2).pow(2).mean()


def report(title, res, ref):
    rows = [[n, f"{r['median_s'] * 1e3:.0f} ms", f"{r['ratio']:.3f}x [{r['ratio_q1']:.3f}-{r['ratio_q3']:.3f}]"]
            for n, r in res.items()]
    print(f"\n{title}\n")
    print(table(rows, ["variant", "median step", f"ratio to {ref}"]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--p", type=float, default=0.1, help="Mixout p")
    ap.add_argument("--groups", nargs="+", default=["mixout", "msd", "rdrop", "layers"],
                    choices=["mixout", "msd", "rdrop", "layers"])
    ap.add_argument("--model", default=None)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    print(machine_line())
    print(f"all-MiniLM-L6-v2 training step, batch {args.batch} x {args.seq} tokens, AdamW, fp32; "
          f"median over {args.rounds} interleaved rounds; ratio = median of per-round ratios [quartiles]")
    base = load(args)
    base.train()
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 30000, (args.batch, args.seq), generator=g),
             "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long),
             "labels": torch.randn(args.batch, generator=g)}

    if "mixout" in args.groups:
        plain = copy.deepcopy(base)
        mix = surgery.apply(copy.deepcopy(base), mixout=args.p)
        low = surgery.apply(copy.deepcopy(base), mixout=args.p, low_memory=True)
        n_layers = len(surgery.get_record(mix).mixout)
        res = interleaved({"plain": make_step(plain, batch, plain_loss),
                           f"mixout p={args.p} ({n_layers} layers)": make_step(mix, batch, plain_loss),
                           "mixout low_memory": make_step(low, batch, plain_loss)}, rounds=args.rounds)
        report("1. Mixout on every Linear layer (goal <= 1.03x)", res, "plain")
        del plain, mix, low

    if "msd" in args.groups:
        plain = copy.deepcopy(base)
        msd = surgery.apply(copy.deepcopy(base), msd=8, msd_p=0.2)
        loop = copy.deepcopy(base)
        res = interleaved({"plain head": make_step(plain, batch, plain_loss),
                           "surgery MSD K=8": make_step(msd, batch, msd_loss),
                           "Python-loop MSD K=8": make_step(loop, batch, msd_loop_loss(8, 0.2))}, rounds=args.rounds)
        report("2. Multi-sample dropout head, K=8 (goal <= 1.02x)", res, "plain head")
        del plain, msd, loop

    if "rdrop" in args.groups:
        one = copy.deepcopy(base)
        helper = copy.deepcopy(base)
        two = copy.deepcopy(base)
        sep = copy.deepcopy(base)
        strategy = surgery.rdrop_strategy(helper)[0]
        res = interleaved({"two plain passes (by hand)": make_step(two, batch, two_pass_loss),
                           f"surgery.compute_loss(rdrop_alpha=1), auto = {strategy}": make_step(helper, batch, rdrop_loss),
                           "surgery.compute_loss(rdrop_alpha=1, strategy='separate')": make_step(sep, batch,
                                                                                                 rdrop_separate_loss),
                           "one plain pass (no R-Drop)": make_step(one, batch, plain_loss)}, rounds=args.rounds)
        report("3. R-Drop: the helper against two plain passes", res, "two plain passes")
        del one, helper, two, sep

    if "layers" in args.groups:
        plain = copy.deepcopy(base)
        msd = surgery.apply(copy.deepcopy(base), msd=5, msd_p=0.5)
        layers = surgery.apply(copy.deepcopy(base), msd=5, msd_p=0.5, msd_layers=True, msd_layer_p=0.2)
        seed = seed_model(base)
        res = interleaved({"surgery MSD K=5 p=0.5 (plain head)": make_step(msd, batch, msd_loss),
                           "surgery layer-weighted MSD K=5 (msd_layers=True)": make_step(layers, batch, msd_loss),
                           "QUEST CustomBert head (Python loops)": make_step(seed, batch, seed_layers_loss(5, 0.5, 0.2)),
                           "plain head": make_step(plain, batch, plain_loss)}, rounds=args.rounds)
        report("4. Layer-weighted MSD head against the plain MSD head", res, "surgery MSD K=5 p=0.5 (plain head)")


if __name__ == "__main__":
    main()
