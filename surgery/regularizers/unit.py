"""What a regularizer is: one registered unit, from its options to its record, its description and its undo.

A :class:`Regularizer` has two parts, as a PEFT tuner or a torchao config and its handler do:

* the **torch-free face** (this class and its subclass in ``surgery/regularizers/<name>/__init__.py``):
  its options (:class:`~surgery.options.Option`: defaults, checks, recorded form) and the rules between
  them (:meth:`Regularizer.check`); the record sections it writes, as typed entries
  (:class:`~surgery.entry.Entry`, which also check a record read from disk); its ``describe`` lines;
  its plain-form rule (:meth:`Regularizer.no_plain_form`) and what ``export`` / ``surgery convert``
  drop or restore (:meth:`Regularizer.target_keys`, :meth:`Regularizer.config_changes`). Readers of a
  record (``describe``, ``surgery inspect``, ``surgery convert``, the record's own check) loop over the
  registry and need nothing else, so they never import torch.
* the **torch part** (``planner``, a module imported when ``apply`` runs): ``plan(unit, ctx)`` reads the
  one walk of the model (:class:`~surgery.regularizers.context.Context`) and returns a :class:`Plan`,
  or None when its options are off. A plan says what it changes (:attr:`Plan.replaces`,
  :attr:`Plan.changes`, :attr:`Plan.freezes`), allocates what can fail in :meth:`Plan.build`, and
  :meth:`Plan.install` carries it out, adds its entries to the record and returns its :class:`Undo`.

``apply`` (``surgery/engine.py``) plans every unit (a unit that reads what another resolved, the task
head or the parameters it freezes, names it in ``after``), checks the claims of the plans together
(a module is replaced by one plan at most), builds them all, then installs them: the plans that
replace modules first, so that hooks and attribute changes land on the module that stays. ``revert``
runs every undo's :meth:`Undo.check` before the first :meth:`Undo.undo`, in reverse install order.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from ..entry import Entry
from ..options import Option

__all__ = ["Regularizer", "Plan", "Undo"]


class Undo:
    """How one installed plan is taken back, read from its record entries (and what it keeps live: hooks).
    ``view`` is the walk ``revert`` made of the model before the first undo (:class:`surgery.view.View`);
    modules an undo changes are looked up live, ``view.root.get_submodule(name)``."""

    def check(self, view: Any, rec: Any) -> None:
        """Raise SurgeryError when the model changed since apply so that this cannot be undone exactly.
        Nothing may change here."""

    def undo(self, view: Any, rec: Any) -> None:
        """Take the plan back (every check of every undo passed)."""
        raise NotImplementedError


@dataclass
class Plan:
    """What one regularizer will change, checked; nothing is changed until :meth:`install`.

    Attributes:
        replaces: dotted names of the modules this plan swaps for new objects; a module is replaced by
            one plan at most (``apply`` refuses two).
        changes: dotted names of the modules this plan changes in place (hooks, attributes); installed
            after the plans that replace modules, so the change is on the module that stays.
        freezes: parameter name -> why; parameters this plan freezes (later plans leave them alone).
    """

    replaces: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    freezes: dict[str, str] = field(default_factory=dict)

    def build(self) -> None:
        """Allocate what can fail (Mixout targets), before the first change to the model."""

    def install(self, ctx: Any, rec: Any) -> Undo:
        """Carry the plan out on ``ctx.root``, add its entries to ``rec``, return its undo."""
        raise NotImplementedError

    def coverage(self, ctx: Any, rec: Any, trainable: dict[str, int], first: dict[str, str]) -> dict[str, Any]:
        """This plan's part of the record's ``coverage``: ``{key: weights covered, ...}`` (``trainable``:
        trainable parameter name -> elements; ``first``: every parameter name -> the name it is counted
        under). Default: nothing."""
        return {}


class Regularizer:
    """One regularizer of ``apply``; see the module doc. Subclass it, set the class attributes, override
    the readers it needs, and register an instance (``surgery.regularizers.register``)."""

    name: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    sections: ClassVar[dict[str, type[Entry]]] = {}  # record field -> entry type, in the record's order
    sections_always: ClassVar[bool] = False  # write its sections when empty too (records have always held them)
    after: ClassVar[tuple[str, ...]] = ()  # units planned before this one (it reads their head or freezes)
    planner: ClassVar[str] = ""  # module of the torch part: plan(unit, ctx), optionally noise(unit, module)
    coverage_label: ClassVar[str | None] = None  # describe's words for this unit's coverage key (its name)
    head_use: ClassVar[tuple[str, str] | None] = None  # (what head= names for it, how to turn that on)

    # ---- options ---------------------------------------------------------------------------------
    def check(self, opts: Any) -> None:
        """Refuse options of this unit that contradict each other (after every value was checked).

        Raises:
            SurgeryError / ValueError / SurgeryTypeError: naming the options and the fix.
        """

    def uses_head(self, opts: Any) -> bool:
        """Whether this unit, with ``opts``, reads the task head (``head=`` names it)."""
        return False

    # ---- the record, without torch -------------------------------------------------------------
    def describe(self, rec: Any, measured: dict[str, Any] | None = None) -> list[str]:
        """``describe``'s lines for this unit's part of ``rec`` (indented two spaces). ``measured``: what
        ``describe`` measured on a live model (``"target_bytes"``: all Mixout targets, and this rank's part
        when sharded); empty for a record read from disk."""
        return []

    def no_plain_form(self, rec: Any, action: str) -> str | None:
        """Why ``action`` (``"revert"``, ``"surgery.export"``, ``"surgery convert"``, ...) cannot give a plain
        model for this unit's part of ``rec``, or None."""
        return None

    def target_keys(self, rec: Any) -> list[str]:
        """State-dict keys this unit added (dropped by export and ``surgery convert``)."""
        return []

    def config_changes(self, rec: Any) -> list[Any]:
        """Config fields this unit changed (entries with ``module``, ``path``, ``old``), restored by
        ``surgery.configs.restore_config``."""
        return []

    # ---- the torch part --------------------------------------------------------------------------
    def torch_part(self):
        """The module named by ``planner`` (imported on first use: reading a record needs no torch)."""
        return importlib.import_module(self.planner)

    def plan(self, ctx: Any) -> Plan | None:
        """The checked plan for ``ctx.opts`` (None when this unit's options are off). Nothing may change here.

        Raises:
            SurgeryError (or a subclass): the options cannot be carried out on this model.
        """
        return self.torch_part().plan(self, ctx)

    def noise(self, module: Any) -> tuple[str, Callable[[], bool]] | None:
        """When ``module`` (one this unit installs) can draw noise once per training forward for the whole
        batch, so that R-Drop's concatenated halves ``[x; x]`` would share it: ``(what, draws_now)``, e.g.
        ``("Mixout", lambda: module.training and module.mixout_p > 0)``; None for any other module. Cheap:
        :func:`surgery.rdrop_strategy` asks it once per model and calls ``draws_now`` every step."""
        fn: Callable | None = getattr(self.torch_part(), "noise", None) if self.planner else None
        return fn(self, module) if fn is not None else None

    def __repr__(self) -> str:
        return f"<regularizer {self.name!r}>"
