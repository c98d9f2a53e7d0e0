"""The ``surgery`` command line.

    surgery convert SRC DST     a surgered checkpoint -> a plain one
    surgery inspect SRC         what surgery a checkpoint holds

``main(argv)`` returns the exit status (the ``surgery`` console script and
``python -m surgery`` exit with it): 0 done, 2 bad input with one line on stderr naming
the file and the problem (``--debug`` adds the traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import signal
import sys
import textwrap
import threading
import traceback

from .convert import Convert
from .inspect import Inspect

__all__ = ["main", "build_parser"]

SUBCOMMANDS = (Convert, Inspect)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser = argparse.ArgumentParser(
        prog="surgery", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Checkpoints of models fine-tuned with surgery (Mixout, multi-sample dropout, dropout control).",
        epilog=textwrap.dedent("""\
            examples:
              # what surgery does this checkpoint hold?
              $ surgery inspect out/checkpoint-500
              # a plain checkpoint that loads with plain transformers
              $ surgery convert out/checkpoint-500 plain-model
              $ python -c "from transformers import AutoModel; AutoModel.from_pretrained('plain-model')"

            Run `surgery <command> --help` for the options and examples of each command."""))
    from .. import __version__
    parser.add_argument("--version", action="version", version=f"surgery {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="{convert,inspect}")
    for cls in SUBCOMMANDS:
        cls(sub, [common])
    return parser


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the ``surgery`` command line with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    from ..errors import SurgeryError, SurgeryTypeError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors (argparse prints them)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return 2
    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, _interrupt)  # clean up temporaries on `kill` as on Ctrl-C
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        done = "; nothing was written to DST" if args.command == "convert" else ""
        print(f"surgery {args.command}: interrupted{done}", file=sys.stderr)
        return 130
    except (SurgeryError, SurgeryTypeError, OSError) as e:
        if args.debug:
            traceback.print_exc()
        print(f"surgery {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug in surgery, not bad input
        if args.debug:
            traceback.print_exc()
        print(f"surgery {args.command}: internal error: {type(e).__name__}: {_one_line(e)} "
              "(rerun with --debug for the traceback and report it)", file=sys.stderr)
        return 1
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
