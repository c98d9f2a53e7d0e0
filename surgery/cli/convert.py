"""``surgery convert SRC DST``: a surgered checkpoint to a plain one, streaming and atomic."""

from __future__ import annotations

import argparse
import sys
import textwrap
import time

from .. import interrupts
from ..checkpoint import execute, plan_convert
from ..checkpoint.common import fmt_bytes, one_line, printable
from ._subcommand import Subcommand


class Convert(Subcommand):
    name = "convert"
    help = "write a plain checkpoint (no Mixout targets, original config) from a surgered one"
    usage = ("surgery convert SRC DST [--overwrite] [--dry-run] [--require-surgery] [--follow-external-symlinks] "
             "[--allow-external-hard-links] [--quiet] [--debug]")
    description = textwrap.dedent("""\
        Convert a checkpoint saved with surgery applied into a plain one that loads with plain
        transformers / torch, on machines that never heard of surgery.

        SRC is a .safetensors file, a .bin/.pt/.pth state dict (its pickle read without running it,
        as torch.load(weights_only=True) would), or a transformers model / Trainer checkpoint
        directory (model.safetensors, sharded with model.safetensors.index.json, or
        pytorch_model.bin[.index.json]). DST gets the same layout:
        sharded stays sharded with a valid index, .bin/.pt becomes safetensors, config.json is restored
        (original dropout values, no 'surgery' record), other files (tokenizer, generation config) are
        copied and Trainer training state (optimizer.pt, scheduler.pt, rng_state.pth ...) is not.

        Every tensor is copied bit for bit, one at a time, so memory stays flat. DST is written beside
        itself under a temporary name and renamed at the end: an error or Ctrl-C leaves no DST.
        SRC is only read.

        SRC may come from someone else: files are read only where they resolve inside SRC (or, for a
        Hugging Face cache snapshot, inside its repository folder); a symbolic link leading elsewhere
        is refused unless --follow-external-symlinks, and so is a file with hard links (other names)
        outside SRC unless --allow-external-hard-links; FIFOs, devices and symlinked folders are never
        read (a warning names them); headers, indexes, config.json and the change record are
        validated before anything is written. DST's files get SRC's permission bits as cp gives them:
        under the umask, never setuid/setgid/sticky, no execute bit on weights and config.""")
    epilog = textwrap.dedent("""\
        examples:
          # a save_pretrained / Trainer checkpoint directory (sharded or not)
          $ surgery convert out/checkpoint-500 plain-model
          # a state dict saved with torch.save: written as safetensors
          $ surgery convert run/model.pt plain.safetensors
          # only show what would be written
          $ surgery convert out/checkpoint-500 plain-model --dry-run
          # replace an earlier conversion; fail if SRC holds no surgery
          $ surgery convert out/checkpoint-500 plain-model --overwrite --require-surgery
          # a Hugging Face cache snapshot (its links into ../../blobs are inside the repository: allowed)
          $ surgery convert ~/.cache/huggingface/hub/models--org--name/snapshots/<rev> plain-model

        exit status: 0 DST is the new checkpoint (a warning names anything left that could not be
        removed after it was in place), 2 bad input or a failed write (one line on stderr naming the
        file; DST is as it was), 130 interrupted (Ctrl-C or SIGTERM: DST as it was, no temporary).""")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("src", metavar="SRC", help="surgered checkpoint: file or directory")
        parser.add_argument("dst", metavar="DST", help="plain checkpoint to write (a directory for a directory SRC, "
                                                       "a .safetensors file for a file SRC)")
        parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
        parser.add_argument("--dry-run", action="store_true", help="validate SRC and print what would be written; "
                                                                   "write nothing")
        parser.add_argument("--require-surgery", action="store_true",
                            help="fail (exit 2) when SRC holds no surgery record and no Mixout targets")
        parser.add_argument("--follow-external-symlinks", action="store_true",
                            help="read files of SRC that are symbolic links to places outside SRC (refused by "
                                 "default: DST would publish them)")
        parser.add_argument("--allow-external-hard-links", action="store_true",
                            help="read files of SRC that have hard links (other names) outside SRC (refused by "
                                 "default: DST would publish them)")
        parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")

    def run(self, args: argparse.Namespace) -> int:
        t0 = time.perf_counter()
        plan = plan_convert(args.src, args.dst, overwrite=args.overwrite, require_surgery=args.require_surgery,
                            follow_external_symlinks=args.follow_external_symlinks,
                            allow_external_hard_links=args.allow_external_hard_links)
        try:
            if args.dry_run:
                print(plan.describe())
                print("dry run: nothing written")
                return 0
            for w in plan.warnings:
                print(f"surgery convert: warning: {one_line(w)}", file=sys.stderr)
            if args.quiet or not sys.stderr.isatty():
                notes = execute(plan, overwrite=args.overwrite, state=interrupts.STATE)
            else:
                from tqdm.auto import tqdm

                with tqdm(total=plan.kept_bytes, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                          desc="convert", delay=0.5) as bar:
                    notes = execute(plan, overwrite=args.overwrite, progress=bar.update, state=interrupts.STATE)
        finally:
            plan.ck.close()
        for note in notes:  # DST is the new checkpoint; what could not be finished after that is named
            print(f"surgery convert: warning: {one_line(note)}", file=sys.stderr)
        if not args.quiet:
            n = sum(len(k) for _, _, k, _ in plan.files)
            what = (f"dropped {len(plan.dropped)} Mixout targets ({fmt_bytes(plan.dropped_bytes)})" if plan.surgered
                    else "no surgery found, plain copy")
            cfg = ""
            if plan.config is not None:
                cfg = f"; config.json: {len(plan.config_changes)} dropout fields restored"
            print(f"wrote {printable(str(plan.dst))}: {n} tensors ({fmt_bytes(plan.kept_bytes)}), {what}{cfg}, "
                  f"{len(plan.ck.copies)} files copied, in {time.perf_counter() - t0:.1f} s")
        return 0
