"""What the plans of one ``apply`` share: the one walk of the model, the checked options, the task head
(looked up once), and what earlier plans freeze.

Plans read the model only through :attr:`Context.view` (never walking it again). A unit that reads what
another unit resolved names it in its ``after`` (:mod:`surgery.regularizers.unit`), so the engine plans
that one first: the MSD head resolves the task head (:meth:`Context.task_head`, possibly refined to the
Linear inside a classification head) and a layer-weighted head freezes the layers it bypasses
(:attr:`Context.freezes`); Mixout reads both.
"""

from __future__ import annotations

from typing import Any

from ..options import Options
from ..patterns import find_head
from ..view import View

__all__ = ["Context"]

_UNSET = object()


class Context:
    """Attributes:
        view: the walk of the model (:class:`surgery.view.View`); ``root`` and ``title`` are its.
        opts: the checked options.
        freezes: parameter name -> why, for every parameter a plan made so far freezes.
    """

    def __init__(self, view: View, opts: Options):
        self.view, self.opts = view, opts
        self.root, self.title = view.root, view.title
        self.freezes: dict[str, str] = {}
        self._head: Any = _UNSET

    def task_head(self, required: bool = False) -> str | None:
        """The task head: ``head=`` (validated), what a plan resolved it to, or the module found by name
        (:func:`surgery.patterns.find_head`); the one lookup of ``apply``.

        Raises:
            HeadError: ``head=`` names no module; ``required`` and none found, or several.
        """
        if self._head is _UNSET or (self._head is None and required):
            self._head = find_head(self.view.modules, self.title, self.opts.head, required=required)
        return self._head

    def resolve_head(self, name: str) -> None:
        """A plan resolved the task head to ``name`` (a layer-weighted head: the Linear inside the head)."""
        self._head = name

    def module(self, name: str) -> Any:
        """The module now at ``name`` (after the plans installed so far: a swapped-in layer)."""
        return self.root.get_submodule(name) if name else self.root
