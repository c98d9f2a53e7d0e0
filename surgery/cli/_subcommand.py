"""Base class of a ``surgery`` subcommand (one subcommand per file, as torchtune's CLI does)."""

from __future__ import annotations

import argparse


class Subcommand:
    """Adds its parser to ``subparsers`` and runs with the parsed arguments.

    A subclass sets ``name``, ``help``, ``description`` and ``epilog`` (examples), adds its
    arguments in :meth:`add_arguments` and does its work in :meth:`run`, returning the exit
    status. Errors are raised (``SurgeryError``), never printed here: ``main`` prints them.
    """

    name = ""
    help = ""
    description = ""
    epilog = ""
    usage: str | None = None

    def __init__(self, subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]):
        self.parser = subparsers.add_parser(
            self.name, help=self.help, description=self.description, epilog=self.epilog, usage=self.usage,
            prog=f"surgery {self.name}", parents=parents, formatter_class=argparse.RawDescriptionHelpFormatter)
        self.add_arguments(self.parser)
        self.parser.set_defaults(func=self.run, command=self.name)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        raise NotImplementedError

    def run(self, args: argparse.Namespace) -> int:
        raise NotImplementedError
