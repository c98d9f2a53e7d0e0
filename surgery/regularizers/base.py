"""The interface every regularizer of ``apply`` implements.

``apply`` checks its arguments, walks the model once into a :class:`~surgery.view.View`, asks
each regularizer of :data:`surgery.regularizers.REGULARIZERS` (in that order) for a
:class:`Plan`, checks the plans together, builds them (the allocations that can fail), then
installs them and records what changed. ``revert`` asks each regularizer, in reverse order, to
check that its record entries can be undone and to hand back the undo; only when every check
passed are the undos run.

A regularizer reads the view and the plans made before its own (the task head another plan
resolved, parameters another plan freezes, modules another plan already changes); it never
walks the model. What its record entries mean in words is written in ``surgery.describing``,
which reads records without importing torch (``surgery inspect``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    from ..arguments import Options
    from ..record import Record
    from ..view import View

__all__ = ["Regularizer", "Plan", "Undo"]

Undo = Callable[[], None]


@dataclass
class Plan:
    """What one regularizer will change, checked; nothing is changed until :meth:`install`.

    Attributes:
        claims: dotted names of the modules the plan replaces or changes; two plans may not claim
            one module.
        freezes: parameter name -> why; parameters this plan freezes (others leave them alone).
        head: the task head this plan resolved (recorded as ``args["head"]``), or None.
    """

    claims: list[str] = field(default_factory=list)
    freezes: dict[str, str] = field(default_factory=dict)
    head: str | None = None

    def build(self) -> None:
        """Allocate what can fail (Mixout targets), before the first change to the model."""

    def install(self, view: "View", rec: "Record") -> None:
        """Carry the plan out on ``view.root`` and add its entries (and live handles) to ``rec``."""
        raise NotImplementedError


class Regularizer:
    """One regularizer: plans from the view, installs through its plan, undoes from its record entries."""

    name = "regularizer"

    def plan(self, view: "View", opts: "Options", earlier: Sequence[Plan]) -> Plan | None:
        """The checked plan for ``opts`` (None when its options are off). Nothing may change here.

        Raises:
            SurgeryError (or a subclass): the options cannot be carried out on this model.
        """
        raise NotImplementedError

    def revert(self, root, rec: "Record") -> Undo | None:
        """Check that this regularizer's entries of ``rec`` can be undone on ``root``; return the undo
        (None when there is nothing to undo). Nothing may change here.

        Raises:
            SurgeryError: an entry cannot be undone (the model changed since apply).
        """
        return None
