"""The ``surgery`` command line.

    surgery convert SRC DST     a surgered checkpoint -> a plain one
    surgery inspect SRC         what surgery a checkpoint holds
    surgery compare ...         which regularizer helps on your data, at what cost

``main(argv)`` returns the exit status (the ``surgery`` console script and
``python -m surgery`` exit with it): 0 done (for ``convert``: DST is the new checkpoint,
even when something after that failed, which a warning line names), 2 bad input or a failed
write with one line on stderr naming the file and the problem (``--debug`` adds the
traceback; ``convert``: DST is as it was), 130 interrupted, 141 (what a
shell reports for a program ended by SIGPIPE, as ``cat`` or ``git log`` are) when the
reader of the output went away (``surgery inspect X | head -1``), without a message.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import textwrap
import traceback

from .. import interrupts
from ..checkpoint.common import os_error
from ..checkpoint.common import one_line
from .compare import Compare
from .convert import Convert
from .inspect import Inspect

__all__ = ["main", "build_parser"]

SUBCOMMANDS = (Convert, Inspect, Compare)
_NAMES = {c.name for c in SUBCOMMANDS}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser = argparse.ArgumentParser(
        prog="surgery", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Checkpoints of models fine-tuned with surgery (Mixout, multi-sample dropout, dropout control), "
                    "and a comparison of the regularizers on your own model and data.",
        epilog=textwrap.dedent("""\
            examples:
              # what surgery does this checkpoint hold?
              $ surgery inspect out/checkpoint-500
              # a plain checkpoint that loads with plain transformers
              $ surgery convert out/checkpoint-500 plain-model
              $ python -c "from transformers import AutoModel; AutoModel.from_pretrained('plain-model')"
              # which regularizer helps on your data, at what cost
              $ surgery compare --model my-model --data train.csv

            Run `surgery <command> --help` for the options and examples of each command."""))
    from .. import __version__
    parser.add_argument("--version", action="version", version=f"surgery {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="{convert,inspect,compare}")
    for cls in SUBCOMMANDS:
        cls(sub, [common])
    return parser


def _one_line(e: BaseException | str) -> str:
    """``str(e)`` on one line, control characters escaped (a file name cannot move the cursor)."""
    return one_line(str(e)) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the ``surgery`` command line with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    Ctrl-C (SIGINT) or SIGTERM at any moment before convert's final rename: exit 130, one
    line, no DST, no temporary (see :mod:`surgery.interrupts`)."""
    installed = interrupts.install()
    if argv is None:  # the program itself: a name the terminal's encoding lacks is escaped, not an error
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.reconfigure(errors="backslashreplace")
            except (AttributeError, ValueError, OSError):
                pass
    try:
        interrupts.arm()  # exit 130 now for a signal that came while Python was starting
        return _main(argv)
    except KeyboardInterrupt as e:
        cmd = _COMMAND[0] or next((a for a in (sys.argv[1:] if argv is None else argv) if a in _NAMES), "")
        done = {"convert": "; nothing was written to DST",
                "compare": "; the finished runs are saved: the same command resumes"}.get(cmd, "")
        left = f"; {_one_line(e)}" if str(e) else ""  # what the clean-up could not remove
        print(f"surgery{' ' + cmd if cmd else ''}: interrupted{done}{left}", file=sys.stderr)
        return 130
    finally:
        interrupts.disarm()
        if installed and argv is not None:  # called in process: give the caller its handlers back
            interrupts.restore()
        elif installed:  # the program is ending with its exit status decided: a late signal must not change it
            interrupts.ignore()
        interrupts.STATE.reset()
        _COMMAND[0] = ""


_COMMAND = [""]


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors (argparse prints them)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return 2
    _COMMAND[0] = args.command
    try:
        rc = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader that went away shows here, not in the interpreter's last flush
        if interrupts.STATE.interrupted and not interrupts.STATE.committed:
            raise KeyboardInterrupt  # a Ctrl-C that some library swallowed
        return rc
    except KeyboardInterrupt:
        raise
    except BrokenPipeError:
        return _reader_gone()
    except Exception as e:
        if interrupts.STATE.interrupted and not interrupts.STATE.committed:
            raise KeyboardInterrupt from None  # a Ctrl-C that a library turned into another error (an ImportError)
        if interrupts.STATE.committed:  # DST is already the new checkpoint: saying "error" would say it is not
            if args.debug:
                traceback.print_exc()
            print(f"surgery {args.command}: warning: DST was written, but then: {_one_line(e)}", file=sys.stderr)
            return 0
        return _report(args)


EXIT_SIGPIPE = 141  # 128 + SIGPIPE


def _reader_gone() -> int:
    """The reader of stdout closed the pipe: exit quietly, as a tool ended by SIGPIPE does.
    stdout is pointed at /dev/null so the interpreter's final flush has nowhere to fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass  # not a real file descriptor (called in process with a captured stdout)
    return EXIT_SIGPIPE


def _report(args: argparse.Namespace) -> int:
    """Print the error being handled as one line; its exit status."""
    from ..errors import SurgeryError, SurgeryTypeError

    try:
        raise
    except (SurgeryError, SurgeryTypeError) as e:
        if args.debug:
            traceback.print_exc()
        print(f"surgery {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        if args.debug:
            traceback.print_exc()
        name, problem = os_error(e)
        print(f"surgery {args.command}: error: {_one_line(name + ': ' + problem if name else problem)}",
              file=sys.stderr)
        return 2
    except Exception as e:  # a bug in surgery, not bad input
        if args.debug:
            traceback.print_exc()
        print(f"surgery {args.command}: internal error: {type(e).__name__}: {_one_line(e)} "
              "(rerun with --debug for the traceback and report it)", file=sys.stderr)
        return 1
