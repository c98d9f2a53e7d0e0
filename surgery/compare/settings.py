"""The settings of one comparison: every option of ``surgery compare``, checked, with ``--quick`` resolved.

:class:`Settings` is what the command line and :func:`surgery.compare.compare` build; the fields
that decide the results (:meth:`Settings.fingerprint`) are stored beside the runs, so that the same
command resumes and a different one is refused.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import SurgeryError

__all__ = ["CompareError", "Settings", "TASKS", "DEVICES", "FORMATS", "QUICK"]

TASKS = ("auto", "classification", "regression")
DEVICES = ("auto", "cpu", "cuda")
FORMATS = ("csv", "tsv", "jsonl", "json", "parquet", "disk")

# --quick: a run that still learns something, in a few minutes on 2 CPU cores
QUICK = {"seeds": 1, "epochs": 1.0, "max_steps": 100, "evals": 3, "max_validation": 1000}
DEFAULTS = {"seeds": 5, "epochs": 3.0, "max_steps": None, "evals": 5, "max_validation": None}


class CompareError(SurgeryError):
    """Bad input to ``surgery compare``: one line naming the problem and the fix (exit status 2)."""


@dataclass
class Settings:
    """What to compare and how. ``None`` fields take their defaults (``--quick`` ones where it is set).

    Data: ``data`` (a CSV/TSV/JSON-lines/parquet file or a saved ``datasets`` folder) and optionally
    ``validation`` (the same); ``text_column``/``pair_column``/``label_column`` name the columns
    (found by their usual names when None); ``columns`` names the columns of a file without a header row.
    Split: ``validation_fraction`` of the data (stratified for classification), or ``folds`` (k-fold,
    stratified; each seed's score is the mean over the folds), from ``split_seed``; ``train_size``
    keeps only that many training items. Training: ``epochs`` (or ``max_steps``), ``batch_size``,
    ``lr``, ``weight_decay``, ``warmup`` (a fraction of the steps, then linear decay), ``max_length``
    tokens, ``evals`` evaluations spread over the run. ``head`` names the task head for the MSD methods
    (found by name when None).
    """

    model: str
    data: str
    methods: tuple = ()
    out: str = "surgery-compare"
    validation: str | None = None
    seeds: int | None = None
    text_column: str | None = None
    pair_column: str | None = None
    label_column: str | None = None
    columns: tuple | None = None
    format: str | None = None
    task: str = "auto"
    metric: str | None = None
    validation_fraction: float = 0.2
    folds: int = 0
    split_seed: int = 0
    train_size: int | None = None
    max_validation: int | None = None
    epochs: float | None = None
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup: float = 0.1
    max_length: int = 128
    evals: int | None = None
    device: str = "auto"
    head: str | None = None
    quick: bool = False
    overwrite: bool = False
    progress: bool | None = None  # None: a bar when stderr is a terminal
    command: str | None = None  # the command line, for the report

    def __post_init__(self):
        self.methods = tuple(self.methods or ())
        if self.columns is not None:
            self.columns = tuple(self.columns)
        preset = QUICK if self.quick else DEFAULTS
        for name, value in preset.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.quick and self.max_steps is None:
            self.max_steps = QUICK["max_steps"]
        self._check()

    def _check(self) -> None:
        def bad(flag, value, need):
            raise CompareError(f"--{flag.replace('_', '-')} {value}: {need}")

        for name in ("model", "data"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise CompareError(f"--{name} is required (a path)")
        if self.task not in TASKS:
            bad("task", self.task, f"use one of {', '.join(TASKS)}")
        if self.device not in DEVICES:
            bad("device", self.device, f"use one of {', '.join(DEVICES)}")
        if self.format is not None and self.format not in FORMATS:
            bad("format", self.format, f"use one of {', '.join(FORMATS)}")
        ints = {"seeds": (self.seeds, 1), "batch_size": (self.batch_size, 1), "max_length": (self.max_length, 2),
                "evals": (self.evals, 1), "split_seed": (self.split_seed, 0), "folds": (self.folds, 0)}
        for name, (v, low) in ints.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                bad(name, v, f"must be a whole number >= {low}")
        if self.folds == 1:
            bad("folds", 1, "k-fold needs at least 2 folds (0: one validation split)")
        for name in ("train_size", "max_validation", "max_steps"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                bad(name, v, "must be a whole number >= 1")
        for name, low, high in (("validation_fraction", 0.0, 1.0), ("warmup", -1e-12, 1.0)):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or math.isnan(v) or not low < v < high:
                bad(name, v, f"must be a number in ({max(low, 0):g}, {high:g})" if name != "warmup"
                    else "must be a fraction of the steps in [0, 1)")
        for name in ("epochs", "lr"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or math.isnan(v) or math.isinf(v) or v <= 0:
                bad(name, v, "must be a number > 0")
        if not isinstance(self.weight_decay, (int, float)) or not 0 <= self.weight_decay < math.inf:
            bad("weight_decay", self.weight_decay, "must be a number >= 0")
        if self.folds and self.validation:
            raise CompareError("--folds and --validation exclude each other: k-fold makes its own validation parts")
        if self.columns is not None and (not self.columns or len(set(self.columns)) != len(self.columns)
                                         or not all(isinstance(c, str) and c for c in self.columns)):
            bad("columns", ",".join(map(str, self.columns)), "must name each column once, e.g. --columns text,label")

    @staticmethod
    def defaults() -> dict:
        """The default of each field that has one (an identity leaves out what equals these: an option a later
        version adds, at its default, does not make an earlier comparison a different one)."""
        return {f.name: f.default for f in dataclasses.fields(Settings) if f.default is not dataclasses.MISSING}

    def fingerprint(self) -> dict:
        """The options that decide the results (not where they go, nor how progress shows)."""
        skip = {"out", "overwrite", "progress", "command", "quick", "model", "data", "validation"}
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        out["methods"] = list(out["methods"])
        if out["columns"] is not None:
            out["columns"] = list(out["columns"])
        return out
