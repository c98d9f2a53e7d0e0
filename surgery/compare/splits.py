"""Training / validation parts of ``surgery compare``: the validation data given, a fixed fraction, or k
folds; stratified by class for classification (scikit-learn's splitters), from one split seed, so
every method and every seed sees the same parts.
"""

from __future__ import annotations

from dataclasses import dataclass

from .settings import CompareError

__all__ = ["Fold", "make_folds"]


@dataclass
class Fold:
    """One training/validation part: row indices into the training table and, when the validation
    data was given separately, into the validation table (``separate``)."""

    train: list
    validation: list
    separate: bool = False


def _check_stratifiable(labels: list, names: list, need: int, what: str) -> None:
    counts: dict[int, int] = {}
    for y in labels:
        counts[y] = counts.get(y, 0) + 1
    rare = min(counts, key=lambda c: counts[c])
    if counts[rare] < need:
        raise CompareError(
            f"class {names[rare]!r} has {counts[rare]} row{'s' * (counts[rare] != 1)}; a stratified {what} needs at "
            f"least {need} of each class: add rows, drop that class, or give the validation data with --validation")


def make_folds(n_train: int, labels, settings, *, n_validation: int | None = None) -> list[Fold]:
    """The parts to train and score on.

    Args:
        n_train: rows of the training table.
        labels: the encoded labels (:class:`~surgery.compare.labels.Labels`).
        n_validation: rows of a separately given validation table, or None to split the training table.

    Raises:
        CompareError: too few rows for the fraction or the folds, a class too rare to stratify.
    """
    import numpy as np
    from sklearn.model_selection import KFold, StratifiedKFold, train_test_split

    rows = np.arange(n_train)
    classify = labels.task == "classification"
    y = np.asarray(labels.train)
    if n_validation is not None:
        shuffle = np.random.RandomState(settings.split_seed)  # --train-size / --max-validation take random rows
        folds = [Fold(shuffle.permutation(n_train).tolist(), shuffle.permutation(n_validation).tolist(), separate=True)]
    elif settings.folds:
        k = settings.folds
        if n_train < 2 * k:
            raise CompareError(f"--folds {k} needs at least {2 * k} rows, the data has {n_train}")
        if classify:
            _check_stratifiable(labels.train, labels.names, k, f"{k}-fold split")
            splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=settings.split_seed)
        else:
            splitter = KFold(n_splits=k, shuffle=True, random_state=settings.split_seed)
        folds = [Fold(np.random.RandomState(settings.split_seed + i).permutation(tr).tolist(), va.tolist())
                 for i, (tr, va) in enumerate(splitter.split(rows, y))]
    else:
        n_val = round(n_train * settings.validation_fraction)
        if n_val < 1 or n_train - n_val < 2:
            raise CompareError(f"--validation-fraction {settings.validation_fraction:g} of {n_train} rows leaves "
                               f"{n_val} for validation and {n_train - n_val} for training; use more data, another "
                               "fraction, or --validation")
        stratify = None
        if classify:
            _check_stratifiable(labels.train, labels.names, 2, "validation split")
            stratify = y
        try:
            tr, va = train_test_split(rows, test_size=n_val, random_state=settings.split_seed, stratify=stratify)
        except ValueError as e:  # e.g. fewer validation rows than classes
            raise CompareError(f"cannot make a stratified validation split of {n_val} rows: {e}; use a larger "
                               "--validation-fraction or --validation") from None
        folds = [Fold(tr.tolist(), va.tolist())]
    for f in folds:
        if settings.train_size is not None:
            if settings.train_size > len(f.train):
                raise CompareError(f"--train-size {settings.train_size} is more than the {len(f.train)} training rows")
            f.train = f.train[:settings.train_size]
        if settings.max_validation is not None:
            f.validation = f.validation[:settings.max_validation]
        if classify and len({labels.train[i] for i in f.train}) < 2:
            raise CompareError("a training part holds one class only; use more data or a larger --train-size")
    return folds
