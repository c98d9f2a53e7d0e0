"""Checkpoint layouts: one file, or a model / Trainer checkpoint directory, and the
weight files ("sources") inside them."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..record import CONFIG_KEY, Record
from .common import (BIN_INDEX, BIN_NAME, CONFIG_NAME, OTHER_WEIGHTS, PICKLE_SUFFIXES, RECORD_METADATA_KEY, SAFE_INDEX,
                     SAFE_NAME, TRAINER_STATE, CheckpointError)
from .pickle_file import load_state_dict_file
from .safetensors_file import Item, Progress, copy_range, read_header, tensor_item

__all__ = ["Checkpoint", "open_checkpoint"]


class _Source:
    """One weight file of a checkpoint: its tensors and a way to write each."""

    path: Path
    metadata: dict[str, str] | None = None
    entries: dict[str, tuple[str, tuple[int, ...], int]]  # name -> (dtype, shape, nbytes)

    def item(self, name: str) -> Item:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _SafetensorsSource(_Source):
    def __init__(self, path: Path):
        self.path = path
        self.header = read_header(path)
        self.metadata = self.header.metadata
        self.entries = {n: (t.dtype, t.shape, t.nbytes) for n, t in self.header.tensors.items()}
        self._fd: int | None = None

    def item(self, name: str) -> Item:
        t = self.header.tensors[name]

        def write(fd: int, progress: Progress | None) -> None:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            if os.fstat(self._fd).st_size != self.header.size:
                raise CheckpointError(self.path, "the file changed size during the conversion")
            copy_range(self._fd, self.path, self.header.data_start + t.start, t.nbytes, fd, progress)

        return Item(name, t.dtype, t.shape, t.nbytes, write)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _PickleSource(_Source):
    def __init__(self, path: Path):
        self.path = path
        self.sd = load_state_dict_file(path)
        self.items = {n: tensor_item(n, t, path=path) for n, t in self.sd.items()}
        self.entries = {n: (it.dtype, it.shape, it.nbytes) for n, it in self.items.items()}

    def item(self, name: str) -> Item:
        return self.items[name]

    def close(self) -> None:
        self.sd = self.items = None  # type: ignore[assignment]


@dataclass
class Checkpoint:
    """A checkpoint on disk: one file, or a model / Trainer checkpoint directory."""

    path: Path
    layout: str  # "safetensors file" | "state dict file" | "model directory"
    sources: list[_Source]
    index: dict[str, Any] | None = None  # parsed *.index.json
    index_name: str | None = None
    config: dict[str, Any] | None = None  # parsed config.json
    trainer: bool = False
    copies: list[str] = field(default_factory=list)  # other files, relative to path
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why it is not copied)
    warnings: list[str] = field(default_factory=list)

    @property
    def is_dir(self) -> bool:
        return self.layout == "model directory"

    @property
    def fmt(self) -> str:
        return "safetensors" if isinstance(self.sources[0], _SafetensorsSource) else "pickle"

    @property
    def sharded(self) -> bool:
        return self.index is not None

    def describe(self) -> str:
        s = self.layout
        if self.is_dir:
            s = ("Trainer checkpoint" if self.trainer else "model") + " directory"
            s += f", {'sharded ' if self.sharded else ''}{'safetensors' if self.fmt == 'safetensors' else 'torch.save'}"
            s += f", {len(self.sources)} file{'s' if len(self.sources) > 1 else ''}"
        return s

    def tensors(self) -> Iterable[tuple[_Source, str, tuple[str, tuple[int, ...], int]]]:
        for src in self.sources:
            for name, e in src.entries.items():
                yield src, name, e

    def record(self) -> tuple[Record | None, str | None]:
        """The change record and where it was found (config.json first, then file metadata).

        Raises:
            CheckpointError: a record that is not valid.
        """
        cands = []
        if self.config is not None and self.config.get(CONFIG_KEY) is not None:
            cands.append((self.config[CONFIG_KEY], self.path / CONFIG_NAME, CONFIG_NAME))
        for s in self.sources:
            if s.metadata and RECORD_METADATA_KEY in s.metadata:
                cands.append((s.metadata[RECORD_METADATA_KEY], s.path, f"{s.path.name} header metadata"))
        if not cands:
            return None, None
        raw, where, label = cands[0]
        try:
            return Record.from_dict(raw), label
        except ValueError as e:
            raise CheckpointError(where, f"invalid surgery record: {e}") from None

    def close(self) -> None:
        for s in self.sources:
            s.close()


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"cannot read {what} ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"{what} is not a JSON object")
    return obj


def _open_source(path: Path) -> _Source:
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    return _SafetensorsSource(path) if path.suffix == ".safetensors" else _PickleSource(path)


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Find the layout of ``path`` and open (validate) its weight files.

    Layouts: a ``.safetensors`` file; a ``.bin``/``.pt``/``.pth`` state dict; a model or
    Trainer checkpoint directory holding ``model.safetensors``,
    ``model.safetensors.index.json`` + shards, ``pytorch_model.bin`` or
    ``pytorch_model.bin.index.json`` + shards (looked for in that order, as transformers does).

    Raises:
        CheckpointError: a missing path, an unknown layout, a corrupt or truncated file, a
            missing shard, an index naming keys its shard lacks, or a refused pickle.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "no such file or directory")
    if path.is_file():
        if path.suffix == ".safetensors":
            return Checkpoint(path, "safetensors file", [_SafetensorsSource(path)])
        if path.suffix in PICKLE_SUFFIXES:
            return Checkpoint(path, "state dict file", [_PickleSource(path)])
        raise CheckpointError(path, "unknown checkpoint layout: expected a .safetensors file, a .bin/.pt/.pth state "
                                    "dict, or a model directory")
    if not path.is_dir():
        raise CheckpointError(path, "not a regular file or directory")
    ck = Checkpoint(path, "model directory", [])
    for name in (SAFE_NAME, SAFE_INDEX, BIN_NAME, BIN_INDEX):
        if (path / name).is_file():
            break
    else:
        raise CheckpointError(path, f"unknown checkpoint layout: no {SAFE_NAME}, {SAFE_INDEX}, {BIN_NAME} or "
                                    f"{BIN_INDEX} in this directory")
    used = {name}
    if name.endswith(".index.json"):
        ck.index, ck.index_name = _read_json(path / name, "the shard index"), name
        wm = ck.index.get("weight_map")
        if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
            raise CheckpointError(path / name, "shard index has no weight_map (a JSON object of tensor names to "
                                               "shard files)")
        shards = list(dict.fromkeys(wm.values()))
        for s in shards:
            if Path(s).name != s or s in (".", ".."):
                raise CheckpointError(path / name, f"shard index names {s!r}, which is not a file in this directory")
            if not (path / s).is_file():
                raise CheckpointError(path / s, f"missing shard: {name} maps {sum(v == s for v in wm.values())} "
                                                "tensors to it but it does not exist")
        ck.sources = [_open_source(path / s) for s in shards]
        used |= set(shards)
        found = {n: s.path.name for s in ck.sources for n in s.entries}
        for src in ck.sources:
            for n in src.entries:
                if found[n] != src.path.name:
                    raise CheckpointError(src.path, f"tensor {n!r} is also in {found[n]}; a key must be in one shard")
        for k, s in wm.items():
            if k not in ck.sources[shards.index(s)].entries:
                raise CheckpointError(path / s, f"{name} names tensor {k!r} in this shard, but the shard does not "
                                                "contain it")
        extra = [n for n in found if n not in wm]
        if extra:
            ck.warnings.append(f"{len(extra)} tensors in the shards are not in {name} (e.g. {extra[0]!r}); "
                               "they are copied and indexed")
    else:
        ck.sources = [_open_source(path / name)]
    if (path / CONFIG_NAME).is_file():
        ck.config = _read_json(path / CONFIG_NAME, CONFIG_NAME)
        used.add(CONFIG_NAME)
    ck.trainer = (path / "trainer_state.json").is_file()
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".surgery-tmp"))
        for fn in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, fn), path)
            if rel in used:
                continue
            if TRAINER_STATE.fullmatch(rel):
                ck.skipped.append((rel, "Trainer training state (resume from SRC, not from the plain checkpoint)"))
            elif OTHER_WEIGHTS.fullmatch(fn):
                ck.skipped.append((rel, "weights or pickle other than the model weights: not converted"))
            elif os.path.isfile(os.path.join(dirpath, fn)):
                ck.copies.append(rel)
    return ck
