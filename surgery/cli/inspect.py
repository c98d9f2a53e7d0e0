"""``surgery inspect SRC``: what surgery a checkpoint holds."""

from __future__ import annotations

import argparse
import json
import textwrap

from ..checkpoint import CheckpointError, format_inspect, inspect
from ._subcommand import Subcommand


class Inspect(Subcommand):
    name = "inspect"
    help = "show what surgery a checkpoint holds (Mixout layers and p, MSD heads, dropout, sizes)"
    usage = ("surgery inspect SRC [--json] [--require-surgery] [--follow-external-symlinks] "
             "[--allow-external-hard-links] [--debug]")
    description = textwrap.dedent("""\
        Show what surgery a checkpoint holds, without the model class: the change record (from
        config.json or the safetensors header metadata), the Mixout layers and their p, multi-sample
        dropout heads, dropout overrides and the config values convert restores, and sizes (all
        tensors, Mixout targets, what a plain checkpoint keeps, the largest tensor).
        SRC takes every layout `surgery convert` takes. Nothing is written.""")
    epilog = textwrap.dedent("""\
        examples:
          $ surgery inspect out/checkpoint-500
          $ surgery inspect run/model.safetensors --json | jq .mixout_targets.count
          # exit status 2 when the checkpoint holds no surgery
          $ surgery inspect plain-model --require-surgery""")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("src", metavar="SRC", help="checkpoint: file or directory")
        parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
        parser.add_argument("--require-surgery", action="store_true",
                            help="fail (exit 2) when SRC holds no surgery record and no Mixout targets")
        parser.add_argument("--follow-external-symlinks", action="store_true",
                            help="read files of SRC that are symbolic links to places outside SRC")
        parser.add_argument("--allow-external-hard-links", action="store_true",
                            help="read files of SRC that have hard links (other names) outside SRC")

    def run(self, args: argparse.Namespace) -> int:
        info = inspect(args.src, follow_external_symlinks=args.follow_external_symlinks,
                       allow_external_hard_links=args.allow_external_hard_links)
        if args.require_surgery and not info["surgered"]:
            raise CheckpointError(args.src, "holds no surgery (no change record, no Mixout targets)")
        # strict JSON: ASCII (control characters of names escaped as \u001b), no NaN or Infinity
        print(json.dumps(info, indent=2, allow_nan=False) if args.json else format_inspect(info))
        return 0
