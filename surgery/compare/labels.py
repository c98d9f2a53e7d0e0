"""The task of ``surgery compare`` found from the labels (or given), and the labels encoded for it.

Classification: text or bool labels, two distinct values, or the class ids 0..K-1 (K <= 20).
Regression: numbers with fractions, or other integers (scores such as -5..5). ``--task`` overrides.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from .settings import CompareError

__all__ = ["Labels", "encode_labels"]

MAX_CLASS_IDS = 20


@dataclass
class Labels:
    """Encoded labels: ``train``/``validation`` (class ids or floats), the ``task``, why it was chosen,
    and for classification the class ``names`` (``names[i]`` is class id i)."""

    task: str
    reason: str
    train: list
    validation: list | None
    names: list | None

    @property
    def num_labels(self) -> int:
        return len(self.names) if self.names is not None else 1


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _show(v) -> str:
    return repr(v) if isinstance(v, str) else (f"{v:g}" if isinstance(v, float) else str(v))


def _detect(values: list) -> tuple[str, str]:
    distinct = set(values)
    if not all(_is_number(v) for v in values):
        kinds = "true/false" if all(isinstance(v, bool) for v in values) else "text"
        return "classification", f"{kinds} labels"
    if any(float(v) != int(v) for v in distinct if math.isfinite(v)):
        return "regression", "labels are numbers with fractions"
    ints = sorted(int(v) for v in distinct)
    if len(ints) == 2:
        return "classification", f"two label values ({ints[0]}, {ints[1]})"
    if ints == list(range(len(ints))) and len(ints) <= MAX_CLASS_IDS:
        return "classification", f"labels are the class ids 0..{len(ints) - 1}"
    return "regression", (f"labels are {len(ints)} integers from {ints[0]} to {ints[-1]}, not the class ids 0..K-1; "
                          "--task classification makes them classes")


def _sort_key(v):
    return (0, float(v), "") if _is_number(v) else (1, 0.0, str(v))


def encode_labels(train: list, validation: list | None, task: str, source: str) -> Labels:
    """The labels of ``train`` (and ``validation``) for ``task`` (``"auto"`` to find it).

    Raises:
        CompareError: one label value in all rows, a label that is not a number for regression, a
            non-finite number, or a validation class that the training data never shows.
    """
    distinct = set(train)
    if len(distinct) < 2:
        only = next(iter(distinct)) if distinct else None
        raise CompareError(f"{source}: the label column holds one value ({_show(only)}) in all {len(train)} rows: "
                           "there is nothing to learn; check --label-column")
    for rows, where in ((train, source), (validation or [], "the validation data")):
        for i, v in enumerate(rows):
            if _is_number(v) and not math.isfinite(v):
                raise CompareError(f"{where}: row {i + 1} has the label {v}, not a finite number")
    if task == "auto":
        task, reason = _detect(list(train) + list(validation or []))
    else:
        reason = "--task " + task
    if task == "regression":
        for rows, where in ((train, source), (validation or [], "the validation data")):
            bad = next(((i, v) for i, v in enumerate(rows) if not _is_number(v)), None)
            if bad is not None:
                raise CompareError(f"{where}: row {bad[0] + 1} has the label {_show(bad[1])}, not a number; regression "
                                   "needs numeric labels (--task classification for classes)")
        return Labels(task, reason, [float(v) for v in train],
                      [float(v) for v in validation] if validation is not None else None, None)
    names = sorted(distinct, key=_sort_key)
    index = {v: i for i, v in enumerate(names)}
    val_ids = None
    if validation is not None:
        unseen = sorted({v for v in validation if v not in index}, key=_sort_key)
        if unseen:
            raise CompareError(f"the validation data has the class {_show(unseen[0])}, which no training row has; "
                               "a classifier cannot learn it (add training rows of it or drop those rows)")
        val_ids = [index[v] for v in validation]
    return Labels(task, reason, [index[v] for v in train], val_ids, names)
