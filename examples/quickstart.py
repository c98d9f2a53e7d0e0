"""Quickstart: apply surgery to a (tiny, randomly initialised) BERT, train a few steps,
revert, save, and reload with plain transformers. Runs in seconds, downloads nothing.

    python examples/quickstart.py [--out DIR]
"""

import argparse
import tempfile

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

import surgery


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="where to save the plain model (default: a temporary directory)")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("bert", vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=128, max_position_embeddings=64, num_labels=1)
    model = AutoModelForSequenceClassification.from_config(cfg)
    surgery.apply(model, mixout=0.1, dropout=0.0, msd=8)
    print(surgery.describe(model))

    ids = torch.randint(0, 200, (64, 16))
    y = ids.float().mean(1, keepdim=True) / 100 - 1  # a learnable regression target
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for step in range(args.steps):
        loss = model(input_ids=ids, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")

    surgery.revert(model)
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    out = args.out or tempfile.mkdtemp(prefix="surgery-quickstart-")
    model.save_pretrained(out)
    plain, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    with torch.no_grad():
        after = plain.eval()(input_ids=ids).logits
    missing, unexpected = info["missing_keys"], info["unexpected_keys"]
    print(f"saved plain model to {out}; reloaded: missing keys {len(missing)}, unexpected keys {len(unexpected)}, "
          f"predictions equal: {torch.equal(before, after)}")
    if missing or unexpected or not torch.equal(before, after):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
