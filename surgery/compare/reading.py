"""Reading the data of ``surgery compare`` with ``datasets``: CSV, TSV, JSON lines, parquet, or a folder
written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``; finding the text, pair and label
columns. Everything comes back as plain Python lists (:class:`Table`), checked row by row.
"""

from __future__ import annotations

import csv
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .settings import CompareError

__all__ = ["Table", "read_tables", "detect_format"]

EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
              ".parquet": "parquet", ".pq": "parquet"}
TEXT_NAMES = ("text", "sentence", "sentence1", "premise", "question", "query")
PAIR_NAMES = {"text": "text_pair", "sentence1": "sentence2", "premise": "hypothesis"}
LABEL_NAMES = ("label", "labels", "score", "target")
VALIDATION_SPLITS = ("validation", "valid", "dev")


@dataclass
class Table:
    """The rows of one data source: ``texts``, ``pairs`` (None without a pair column) and raw ``labels``."""

    source: str
    texts: list
    pairs: list | None
    labels: list
    columns: dict

    def __len__(self) -> int:
        return len(self.labels)


def detect_format(path: Path, given: str | None) -> str:
    if given is not None:
        if given == "disk" and not path.is_dir():
            raise CompareError(f"{path}: --format disk needs a folder written by Dataset.save_to_disk")
        return given
    if path.is_dir():
        return "disk"
    fmt = EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise CompareError(f"{path}: cannot tell its format from the name; pass --format "
                           "csv, tsv, jsonl, parquet or disk (a saved datasets folder)")
    return fmt


def _quiet_datasets():
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return was


def _load_file(path: Path, fmt: str, columns):
    """A ``datasets.Dataset`` of a file, read into memory (the cache is a temporary folder, removed)."""
    import datasets

    if columns is not None and fmt not in ("csv", "tsv"):
        raise CompareError(f"--columns names the columns of a CSV/TSV file without a header row; {path} is {fmt}")
    if path.stat().st_size == 0:
        raise CompareError(f"{path} is empty")
    kwargs: dict = {}
    builder = {"csv": "csv", "tsv": "csv", "jsonl": "json", "json": "json", "parquet": "parquet"}[fmt]
    if builder == "csv":
        # every cell is text unless it reads as a number; only an empty cell is missing ("NA", "null" are words)
        kwargs.update(sep="\t" if fmt == "tsv" else ",", keep_default_na=False, na_values=[""])
        if fmt == "tsv":
            kwargs["quoting"] = csv.QUOTE_NONE  # a TSV cell is taken as written, quotes included
        if columns is not None:
            kwargs.update(column_names=list(columns), header=None)
    was = _quiet_datasets()
    try:
        with tempfile.TemporaryDirectory(prefix="surgery-compare-") as cache:
            return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache,
                                         keep_in_memory=True, **kwargs)
    except CompareError:
        raise
    except Exception as e:  # pandas / pyarrow / json errors: one line, the file named
        msg = " ".join(str(e).split()) or type(e).__name__
        if "corresponds to no data" in msg:  # a header and no rows
            raise CompareError(f"{path} holds no rows") from None
        raise CompareError(f"{path}: cannot be read as {fmt.upper()} ({msg[:200]})") from None
    finally:
        if was:
            datasets.enable_progress_bars()


def _load_disk(path: Path):
    """``(train, validation or None)`` of a saved ``datasets`` folder."""
    import datasets

    try:
        obj = datasets.load_from_disk(str(path), keep_in_memory=True)
    except Exception as e:
        raise CompareError(f"{path}: not a folder written by Dataset.save_to_disk ({' '.join(str(e).split())[:200]})") \
            from None
    if isinstance(obj, datasets.DatasetDict):
        if "train" not in obj:
            raise CompareError(f"{path} holds the splits {', '.join(obj)} but no 'train' split; save the training "
                               "rows as 'train'")
        val = next((obj[s] for s in VALIDATION_SPLITS if s in obj), None)
        return obj["train"], val
    return obj, None


def _pick(columns: list[str], given: str | None, names, what: str, flag: str, source: str) -> str:
    if given is not None:
        if given not in columns:
            raise CompareError(f"{source} has no column {given!r} (its columns: {', '.join(columns)}); "
                               f"fix {flag}")
        return given
    found = next((n for n in names if n in columns), None)
    if found is None:
        raise CompareError(f"{source} has no {what} column (looked for {', '.join(names)}; its columns: "
                           f"{', '.join(columns)}); name it with {flag}")
    return found


def _rows(ds, source: str, settings) -> Table:
    cols = list(ds.column_names)
    if len(ds) == 0:
        raise CompareError(f"{source} holds no rows")
    label = _pick(cols, settings.label_column, LABEL_NAMES, "label", "--label-column", source)
    text = _pick(cols, settings.text_column, TEXT_NAMES, "text", "--text-column", source)
    pair = settings.pair_column
    if pair is not None:
        pair = _pick(cols, pair, (), "pair", "--pair-column", source)
    elif settings.text_column is None and PAIR_NAMES.get(text) in cols:
        pair = PAIR_NAMES[text]
    if len({label, text, pair} - {None}) < 2 + (pair is not None):
        raise CompareError(f"{source}: the text, pair and label columns must differ (got {text!r}, {pair!r}, "
                           f"{label!r})")
    texts = _texts(ds[text], text, source)
    pairs = _texts(ds[pair], pair, source) if pair is not None else None
    labels = list(ds[label])
    for i, v in enumerate(labels):
        if v is None or (isinstance(v, float) and v != v) or (isinstance(v, str) and not v.strip()):
            raise CompareError(f"{source}: row {i + 1} has no label (column {label!r})")
        if isinstance(v, (list, dict)):
            raise CompareError(f"{source}: row {i + 1}: the label column {label!r} holds a {type(v).__name__}; "
                               "one label per row is needed (multi-label data is not supported)")
    return Table(source, texts, pairs, labels, {"text": text, "pair": pair, "label": label})


def _texts(values, column: str, source: str) -> list[str]:
    out = []
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and v != v):
            raise CompareError(f"{source}: row {i + 1} has no text in column {column!r}")
        if isinstance(v, (list, dict)):
            raise CompareError(f"{source}: row {i + 1}: column {column!r} holds a {type(v).__name__}, not a text")
        out.append(v if isinstance(v, str) else str(v))
    return out


def read_tables(settings) -> tuple[Table, Table | None, dict]:
    """``(train, validation or None, info)`` from ``settings.data`` (and ``settings.validation``).

    ``info`` names the files, formats and columns used.

    Raises:
        CompareError: a missing or empty file, a format that cannot be told or read, a missing
            column, a row without text or label.
    """
    path = Path(os.path.expanduser(settings.data))
    if not path.exists():
        raise CompareError(f"--data {path}: no such file or folder")
    fmt = detect_format(path, settings.format)
    if fmt == "disk":
        train_ds, val_ds = _load_disk(path)
        val_source = f"{path} (its validation split)" if val_ds is not None else None
    else:
        train_ds, val_ds, val_source = _load_file(path, fmt, settings.columns), None, None
    if settings.validation is not None:
        vpath = Path(os.path.expanduser(settings.validation))
        if not vpath.exists():
            raise CompareError(f"--validation {vpath}: no such file or folder")
        vfmt = detect_format(vpath, settings.format if settings.format != "disk" or vpath.is_dir() else None)
        val_ds = _load_disk(vpath)[0] if vfmt == "disk" else _load_file(vpath, vfmt, settings.columns)
        val_source = str(vpath)
    elif val_ds is not None and settings.folds:
        val_ds = val_source = None  # k-fold makes its own validation parts from the training split
    train = _rows(train_ds, str(path), settings)
    val = _rows(val_ds, val_source, settings) if val_ds is not None else None
    if val is not None and (val.pairs is None) != (train.pairs is None):
        raise CompareError(f"{val_source} and {path} differ: one has a pair column, the other not")
    info = {"data": str(path), "format": fmt, "columns": train.columns, "validation": val_source, "rows": len(train),
            "validation_rows": len(val) if val is not None else None}
    return train, val, info
