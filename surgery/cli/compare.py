"""``surgery compare --model DIR --data FILE``: which regularizer helps on your data, at what cost."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import textwrap

from ._subcommand import Subcommand

NEEDS = ("datasets", "sklearn", "scipy", "matplotlib", "tqdm", "accelerate")
FORMATS = ("csv", "tsv", "jsonl", "json", "parquet", "disk")


class Compare(Subcommand):
    name = "compare"
    help = "fine-tune your model on your data with each regularizer, same seeds: what helps, at what cost"
    usage = ("surgery compare --model DIR --data FILE [--methods SPEC ...] [--seeds N] [--out DIR] [--quick] "
             "[options]")
    description = textwrap.dedent("""\
        Fine-tune a pretrained model on your data once per method and seed, with surgery.SurgeryTrainer,
        and report per method: the validation score (mean and spread over seeds, at the best and the last
        evaluation), the paired difference to baseline with its 95% t interval and a verdict in words,
        the constant predictor's score, and the costs (time per step relative to baseline, peak memory,
        the exported checkpoint's size). Writes results.json, results.csv, report.md and figure.png.

        MODEL: a folder AutoModelForSequenceClassification loads (BERT, RoBERTa, DeBERTa-v2, ELECTRA,
        DistilBERT, GPT-2 / Llama ...) with its tokenizer, or a sentence-transformers folder. DATA: CSV,
        TSV, JSON lines, parquet, or a folder saved with Dataset(Dict).save_to_disk; a text column (and
        optionally a pair column) and a label column. The task (classification or regression) is found
        from the labels; --task overrides.

        METHODS (knobs joined by '+', one knob may list several values: a sweep):
          baseline               the model as it is (always run: differences are to it)
          no_dropout             every dropout probability set to 0 (= dropout=0)
          no_drop_path           stochastic depth / LayerDrop off (= drop_path=0)
          mixout[=P]             Mixout toward the pretrained weights (default P=0.1)
          msd[=K], msd_p=P       multi-sample-dropout head, K samples (8), p (0.2), the paper's loss
          msd_layers             the layer-weighted MSD head (K=5, p=0.5, layer p=0.2; msd=, msd_p=,
                                 msd_layer_p= change them)
          rdrop[=A]              R-Drop with alpha A (default 1)
          dropout=P, drop_path=P every dropout / stochastic-depth rate set to P
        default: baseline no_dropout mixout=0.1 msd=8 msd_layers rdrop=1 (+ no_drop_path where the model
        has stochastic depth).

        Every method gets the same seeds (per seed: the same split, head initialisation and data order),
        steps, optimizer and schedule. Each finished run is saved in --out as it ends: Ctrl-C stops, the
        same command resumes; a different command on the same --out is refused.""")
    epilog = textwrap.dedent("""\
        examples:
          # the default methods, 5 seeds, on a CSV with 'text' and 'label' columns
          $ surgery compare --model my-model --data train.csv --out cmp
          # a sweep of Mixout's p, and Mixout replacing dropout; 10 seeds
          $ surgery compare --model my-model --data train.csv --seeds 10 \\
              --methods mixout=0.1,0.3,0.5 mixout=0.1+no_dropout
          # sentence pairs, given validation data, macro F1
          $ surgery compare --model my-model --data train.jsonl --validation dev.jsonl --text-column premise \\
              --pair-column hypothesis --metric macro_f1
          # a TSV without a header row, 5-fold cross-validation, a smoke run of every method
          $ surgery compare --model my-model --data words.tsv --columns text,label --folds 5 --quick

        exit status: 0 done, 2 bad input (one line on stderr), 130 interrupted (finished runs are saved).""")

    def __init__(self, subparsers, parents):
        super().__init__(subparsers, parents)

        def error(message):  # usage errors as one line, like every other bad input of compare
            sys.stderr.write(f"surgery compare: error: {message} (see surgery compare --help)\n")
            raise SystemExit(2)
        self.parser.error = error

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("what to compare")
        g.add_argument("--model", required=True, metavar="DIR",
                       help="model folder (with its tokenizer) or sentence-transformers folder")
        g.add_argument("--data", required=True, metavar="FILE",
                       help="CSV, TSV, JSON lines, parquet file or saved datasets folder")
        g.add_argument("--methods", nargs="+", metavar="SPEC", help="methods to compare with baseline (see above)")
        g.add_argument("--seeds", type=int, metavar="N", help="seeds per method (default 5; --quick: 1)")
        g.add_argument("--out", default="surgery-compare", metavar="DIR", help="output folder (default: %(default)s)")
        g.add_argument("--quick", action="store_true",
                       help="1 seed, 1 epoch of at most 100 steps, 3 evaluations, at most 1000 validation rows")
        g.add_argument("--overwrite", action="store_true", help="delete the runs of another comparison in --out")
        d = parser.add_argument_group("data")
        d.add_argument("--validation", metavar="FILE", help="validation data (same format); default: split DATA")
        d.add_argument("--text-column", metavar="NAME",
                       help="default: text, sentence, sentence1, premise, question or query")
        d.add_argument("--pair-column", metavar="NAME", help="second text of a pair (default: text_pair, sentence2 "
                                                             "or hypothesis beside text, sentence1 or premise)")
        d.add_argument("--label-column", metavar="NAME", help="default: label, labels, score or target")
        d.add_argument("--columns", metavar="A,B,...",
                       help="comma-separated column names of a CSV/TSV without a header row")
        d.add_argument("--format", choices=FORMATS, help="default: from the file name")
        d.add_argument("--task", choices=("auto", "classification", "regression"), default="auto")
        d.add_argument("--metric", choices=("accuracy", "macro_f1", "mse", "mae", "pearson", "spearman"),
                       help="default: accuracy (classification), mse (regression)")
        d.add_argument("--validation-fraction", type=float, default=0.2, metavar="F",
                       help="held out when no --validation (default %(default)s)")
        d.add_argument("--folds", type=int, default=0, metavar="K", help="k-fold cross-validation instead of one split")
        d.add_argument("--split-seed", type=int, default=0, metavar="N", help="seed of the split (default %(default)s)")
        d.add_argument("--train-size", type=int, metavar="N",
                       help="train on only this many rows (the small-data regime)")
        d.add_argument("--max-validation", type=int, metavar="N", help="score on at most this many validation rows")
        t = parser.add_argument_group("training (the same for every method)")
        t.add_argument("--epochs", type=float, metavar="E", help="default 3 (--quick: 1)")
        t.add_argument("--max-steps", type=int, metavar="N", help="at most this many optimizer steps (--quick: 100)")
        t.add_argument("--batch-size", type=int, default=32, metavar="N", help="default %(default)s")
        t.add_argument("--lr", type=float, default=5e-5, metavar="LR", help="AdamW learning rate (default %(default)s)")
        t.add_argument("--weight-decay", type=float, default=0.01, metavar="W", help="default %(default)s")
        t.add_argument("--warmup", type=float, default=0.1, metavar="F",
                       help="warm-up fraction of the steps, then linear decay (default %(default)s)")
        t.add_argument("--max-length", type=int, default=128, metavar="N", help="tokens per row (default %(default)s)")
        t.add_argument("--evals", type=int, metavar="N",
                       help="evaluations spread over each run (default 5; --quick: 3)")
        t.add_argument("--head", metavar="NAME",
                       help="the task head module for the MSD methods (default: found by name: classifier, score ...)")
        t.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="auto: a GPU where torch sees one (default %(default)s)")
        t.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(self, args: argparse.Namespace) -> int:
        from ..compare.settings import CompareError, Settings

        missing = [m for m in NEEDS if not _importable(m)]
        if missing:
            raise CompareError(f"surgery compare needs {', '.join(missing)}: pip install \"finetune-surgery[compare]\"")
        from ..compare import compare

        options = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings) if hasattr(args, f.name)}
        options.update(methods=tuple(args.methods or ()), progress=False if args.no_progress else None,
                       columns=tuple(c.strip() for c in args.columns.split(",")) if args.columns is not None else None,
                       command=self.command(args))
        compare(Settings(**options))
        return 0

    def command(self, args: argparse.Namespace) -> str:
        """The command line that gives these settings (the options that differ from their defaults)."""
        words = ["surgery", "compare"]
        for action in self.parser._actions:
            if not action.option_strings or action.dest in ("help", "debug", "overwrite", "no_progress"):
                continue
            value = getattr(args, action.dest, None)
            if value is None or value is False or value == action.default:
                continue
            flag = action.option_strings[-1]
            if value is True:
                words.append(flag)
            elif isinstance(value, list):
                words += [flag, *map(str, value)]
            else:
                words += [flag, str(value)]
        return shlex.join(words)


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
