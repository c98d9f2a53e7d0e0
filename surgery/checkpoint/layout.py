"""Checkpoint layouts: one file, or a model / Trainer checkpoint directory, and the
weight files ("sources") inside them."""

from __future__ import annotations

import functools
import os
import re
import stat
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..record import CONFIG_KEY, Record
from ..schema import parse_json, short
from .common import (BIN_INDEX, BIN_NAME, CONFIG_NAME, OTHER_WEIGHTS, PICKLE_SUFFIXES, RECORD_METADATA_KEY, SAFE_INDEX,
                     SAFE_NAME, TRAINER_STATE, CheckpointError, is_target_key, lexists)
from .pickle_file import expanded_views, load_state_dict_file
from .torch_file import ZipTensor, scan
from .safetensors_file import (MAX_TENSORS, Item, Progress, TensorInfo, check_header_size, copy_range, is_sparse,
                               read_header, tensor_item)
from .trust import SourceTree, changed, identity

__all__ = ["Checkpoint", "open_checkpoint", "dst_name", "output_metadata", "MAX_EXPANSION", "MAX_EXPANSION_BYTES"]

# a .bin/.pt whose tensors written out exceed both bounds (stride-0 views) is refused
MAX_EXPANSION, MAX_EXPANSION_BYTES = 64, 2**30


class _Source:
    """One weight file of a checkpoint: its tensors and a way to write each.

    ``entries`` maps each tensor name to an object with ``dtype``, ``shape`` and ``nbytes``.
    The file is held open from planning to the end of the conversion; :meth:`check_unchanged`
    compares its identity (device, inode, size, times) with the one it had when it was first
    read, so a file rewritten in place while it is copied is refused, not half published."""

    path: Path
    metadata: dict[str, str] | None = None
    entries: Mapping[str, Any]
    mode: int = 0o644  # permission bits of the file, kept in DST
    identity: tuple[int, ...] = ()
    _fd: int | None = None

    def item(self, name: str) -> Item:
        raise NotImplementedError

    def check_unchanged(self) -> None:
        """Raises CheckpointError (naming the file) when it changed since it was first read."""
        if self._fd is not None and identity(os.fstat(self._fd)) != self.identity:
            raise changed(self.path)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)  # read-only: an error closing it says nothing about what was read
            except OSError:
                pass


class _SafetensorsSource(_Source):
    def __init__(self, path: Path, tree: SourceTree, max_tensors: int):
        self.path, self.tree = path, tree
        fd = tree.open(path)
        try:
            st = os.fstat(fd)
            self.header = read_header(path, fd=fd, max_tensors=max_tensors)
            self.identity = identity(st)
            if identity(os.fstat(fd)) != self.identity:
                raise changed(path)
            self.sparse = is_sparse(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.mode = stat.S_IMODE(st.st_mode)
        self.metadata = self.header.metadata
        self.entries = self.header.tensors

    def _copy(self, t: TensorInfo, fd: int, progress: Progress | None) -> None:
        copy_range(self._fd, self.path, self.header.data_start + t.start, t.nbytes, fd, progress, self.sparse)

    def item(self, name: str) -> Item:
        t = self.header.tensors[name]
        return Item(name, t.dtype, t.shape, t.nbytes, functools.partial(self._copy, t))


class _PickleSource(_Source):
    """A ``.bin``/``.pt`` state dict. Its pickle is scanned first (``torch_file``: tensors
    counted before any is built, nothing run); the standard zip form of contiguous tensors is
    then copied file to file like safetensors data, anything else is read by
    ``torch.load(weights_only=True)``."""

    def __init__(self, path: Path, tree: SourceTree, max_tensors: int):
        self.path = path
        fd = tree.open(path)
        try:
            st = os.fstat(fd)
            self.identity = identity(st)
            self.mode, self.file_size = stat.S_IMODE(st.st_mode), st.st_size
            found = scan(fd, path, max_tensors)
            self.zip = found.tensors
            self.expanded: list[tuple[str, int, int]] = []
            if self.zip is not None:
                self.entries = self.zip
                self.sparse = is_sparse(fd)
            else:
                self._load(fd, path, tree, max_tensors)
            if identity(os.fstat(fd)) != self.identity:
                raise changed(path)
            _check_pickle_entries(path, self.entries)
        except BaseException:
            self.sd = self.items = None  # type: ignore[assignment]
            os.close(fd)
            raise
        self._fd = fd

    def _load(self, fd: int, path: Path, tree: SourceTree, max_tensors: int) -> None:
        fd_path = Path(f"/proc/self/fd/{fd}")  # the file that was checked, not whatever the path names now
        self.sd = load_state_dict_file(fd_path if fd_path.exists() else tree.resolve(path), name=path)
        if len(self.sd) > max_tensors:
            raise CheckpointError(path, f"holds {len(self.sd):,} tensors, more than {max_tensors:,}; refused as "
                                        "absurd")
        with warnings.catch_warnings():  # torch's deprecation warnings for what the file holds (quantized, storages)
            warnings.simplefilter("ignore")
            self.items = {n: tensor_item(n, t, path=path) for n, t in self.sd.items()}
            self.expanded = expanded_views(self.sd)
        self.entries = self.items

    def _copy(self, t: ZipTensor, fd: int, progress: Progress | None) -> None:
        copy_range(self._fd, self.path, t.file_offset, t.nbytes, fd, progress, self.sparse)

    def item(self, name: str) -> Item:
        if self.zip is not None:
            t = self.zip[name]
            return Item(name, t.dtype, t.shape, t.nbytes, functools.partial(self._copy, t))
        return self.items[name]

    def close(self) -> None:
        self.sd = self.items = None  # type: ignore[assignment]
        super().close()


def _check_pickle_entries(path: Path, entries: Mapping[str, Any]) -> None:
    """What safetensors cannot hold, refused on SRC: a tensor named ``__metadata__`` (the
    header's own entry: DST would have it twice), a name that is not Unicode text (a lone
    surrogate, which a pickle can carry and UTF-8 cannot), a shape whose size overflows
    safetensors' 64-bit arithmetic (a pickle can give an empty tensor any shape)."""
    from .safetensors_file import METADATA_KEY, shape_problem

    if METADATA_KEY in entries:
        raise CheckpointError(path, f"holds a tensor named {METADATA_KEY!r}, the name safetensors reserves for its "
                                    "header metadata; rename it (state_dict keys are module paths) and save again")
    for name, e in entries.items():
        if not name.isascii():
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                raise CheckpointError(path, f"holds a tensor name that is not Unicode text ({name!r}: an unpaired "
                                            "UTF-16 surrogate), which safetensors cannot store") from None
        problem = shape_problem(e.dtype, e.shape)
        if problem:
            raise CheckpointError(path, f"tensor {name!r} ({e.dtype} {list(e.shape)}) {problem}; safetensors cannot "
                                        "store it")


class _Items(Sequence):
    """The items of ``names`` of one source, each made when it is needed (flat memory for
    a million tensors)."""

    def __init__(self, src: _Source, names: list[str]):
        self.src, self.names = src, names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i):  # type: ignore[override]
        return self.src.item(self.names[i])


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
    tree: SourceTree | None = None  # which files may be read (directories)
    mode: int = 0o755  # permission bits of SRC (a file SRC: of the file), kept in DST
    index_mode: int = 0o644
    config_mode: int = 0o644
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
                yield src, name, (e.dtype, e.shape, e.nbytes)

    def record(self) -> tuple[Record | None, str | None]:
        """The change record and where it was found (config.json first, then file metadata).
        Every copy is checked; copies that differ are refused (no copy silently wins).

        Raises:
            CheckpointError: a record that is not valid, or two records that differ.
        """
        cands = []
        if self.config is not None and self.config.get(CONFIG_KEY) is not None:
            cands.append((self.config[CONFIG_KEY], self.path / CONFIG_NAME, CONFIG_NAME))
        for s in self.sources:
            if s.metadata and RECORD_METADATA_KEY in s.metadata:
                cands.append((s.metadata[RECORD_METADATA_KEY], s.path, f"{s.path.name} header metadata"))
        if not cands:
            return None, None
        records = []
        for raw, where, label in cands:
            try:
                records.append(Record.from_dict(raw))
            except ValueError as e:
                raise CheckpointError(where, f"invalid surgery record: {e}") from None
        for rec, (_, _, label) in zip(records[1:], cands[1:]):
            if rec.to_dict() != records[0].to_dict():
                raise CheckpointError(self.path, f"{cands[0][2]} and {label} hold different surgery records, so "
                                                 "which Mixout layers and dropout values this checkpoint has is "
                                                 "ambiguous; remove the stale one (re-save the checkpoint) and run "
                                                 "again")
        return records[0], cands[0][2]

    def close(self) -> None:
        for s in self.sources:
            s.close()


MAX_JSON = 100_000_000  # bytes of an index or config.json read (the safetensors header limit)
SHARD_NAME = re.compile(r"(.+)-(\d+)-of-(\d+)(\.safetensors|\.bin)")


def _read_json(path: Path, what: str, tree: SourceTree) -> dict[str, Any]:
    fd = tree.open(path)
    try:
        st = os.fstat(fd)
        if st.st_size > MAX_JSON:
            raise CheckpointError(path, f"{what} is {st.st_size:,} bytes, over the {MAX_JSON:,} byte limit; refused "
                                        "as absurd (memory)")
        raw = _read_fd(fd, path)
        if identity(os.fstat(fd)) != identity(st) or len(raw) != st.st_size:
            raise changed(path)
    finally:
        os.close(fd)
    try:
        obj = parse_json(raw, what)
    except ValueError as e:
        raise CheckpointError(path, str(e)) from None
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"{what} is not a JSON object but {short(obj)}")
    return obj


def _read_fd(fd: int, path: Path) -> bytes:
    parts = []
    while True:
        try:
            b = os.read(fd, 2**24)
        except OSError as e:
            raise CheckpointError(path, f"cannot read ({e.strerror or e})") from None
        if not b:
            return b"".join(parts)
        parts.append(b)


def _check_index(path: Path, index: dict[str, Any]) -> dict[str, str]:
    """The index's ``weight_map``, checked: a non-empty object of tensor names to file names."""
    wm = index.get("weight_map")
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise CheckpointError(path, "shard index has no weight_map (a JSON object of tensor names to shard files)")
    if not wm:
        raise CheckpointError(path, "shard index names no tensor (empty weight_map): a checkpoint without weights")
    meta = index.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        raise CheckpointError(path, f"shard index 'metadata' must be a JSON object, not {short(meta)}")
    return wm


def _source(path: Path, tree: SourceTree, max_tensors: int) -> _Source:
    if not lexists(path):
        raise CheckpointError(path, "no such file")
    return (_SafetensorsSource if path.suffix == ".safetensors" else _PickleSource)(path, tree, max_tensors)


def _unreferenced_shards(path: Path, index_name: str, shards: list[str]) -> str | None:
    """A file named like a shard of this index (``<stem>-NNNNN-of-MMMMM<ext>``) that the
    index does not reference: its tensors would silently go missing from DST."""
    stem, ext = os.path.splitext(index_name[:-len(".index.json")])
    referenced = set(shards)
    for fn in sorted(os.listdir(path)):
        m = SHARD_NAME.fullmatch(fn)
        if m and m.group(1) == stem and m.group(4) == ext and fn not in referenced:
            return f"{fn} looks like a shard of this checkpoint but {index_name} does not reference it"
    return None


def open_checkpoint(path: str | os.PathLike, *, follow_external_symlinks: bool = False,
                    allow_external_hard_links: bool = False, max_tensors: int = MAX_TENSORS) -> Checkpoint:
    """Find the layout of ``path`` and open (validate) its weight files.

    Layouts: a ``.safetensors`` file; a ``.bin``/``.pt``/``.pth`` state dict; a model or
    Trainer checkpoint directory holding ``model.safetensors``,
    ``model.safetensors.index.json`` + shards, ``pytorch_model.bin`` or
    ``pytorch_model.bin.index.json`` + shards (looked for in that order, as transformers does).
    Inside a directory, only files that resolve inside it (or inside the Hugging Face cache
    repository of a snapshot) are read, unless ``follow_external_symlinks``, and only files
    whose every hard link is inside it, unless ``allow_external_hard_links`` (see ``trust``).

    Raises:
        CheckpointError: a missing path, an unknown layout, a corrupt or truncated file, a
            missing or unreferenced shard, an index naming no tensor or keys its shard lacks,
            a link (symbolic or hard) leading outside SRC, more than ``max_tensors`` tensors,
            folders nested too deep, or a refused pickle.
    """
    path = Path(path)
    st = _stat_or_none(path)  # an I/O error is raised, not taken for "missing"
    if st is None:
        raise CheckpointError(path, "no such file or directory")
    tree = SourceTree(path, follow_external_symlinks, allow_external_hard_links)
    if stat.S_ISREG(st.st_mode):
        if path.suffix == ".safetensors":
            ck = Checkpoint(path, "safetensors file", [_SafetensorsSource(path, tree, max_tensors)])
        elif path.suffix in PICKLE_SUFFIXES:
            ck = Checkpoint(path, "state dict file", [_PickleSource(path, tree, max_tensors)])
        else:
            raise CheckpointError(path, "unknown checkpoint layout: expected a .safetensors file, a .bin/.pt/.pth "
                                        "state dict, or a model directory")
        ck.mode = ck.sources[0].mode
        ck.tree = tree
        _check_weights(ck)
        return ck
    if not stat.S_ISDIR(st.st_mode):
        raise CheckpointError(path, "not a regular file or directory")
    ck = Checkpoint(path, "model directory", [])
    ck.mode = stat.S_IMODE(os.stat(path).st_mode)
    try:
        _open_dir(ck, tree, max_tensors)
    except BaseException:
        ck.close()
        raise
    return ck


_DEEPSPEED_FILE = re.compile(r"(zero_pp_rank_\d+_)?mp_rank_\d+_(model|optim)_states\.pt|(bf16_)?zero_pp_rank_\d+_.*optim_states\.pt")


def _deepspeed_folder(path: Path) -> str | None:
    """The refusal of a DeepSpeed checkpoint folder (``save_checkpoint``: ``latest``, ``global_stepN/`` with ZeRO
    partition files), naming DeepSpeed's own consolidation; None for any other folder."""
    try:
        names = os.listdir(path)
    except OSError:
        return None
    steps = [n for n in names if n.startswith("global_step") and (path / n).is_dir() and not (path / n).is_symlink()]
    if not (any(_DEEPSPEED_FILE.fullmatch(n) for n in names) or ("latest" in names and steps)):
        return None
    where = path.parent if not steps else path
    return (f"a DeepSpeed checkpoint folder: its ZeRO files hold each rank's partition of the weights and optimizer "
            f"states, which surgery convert does not read. Consolidate it with DeepSpeed's own script first: python "
            f"{where / 'zero_to_fp32.py'} {where} OUT --safe_serialization, then surgery convert OUT/model.safetensors DST")


def _open_dir(ck: Checkpoint, tree: SourceTree, max_tensors: int) -> None:
    path = ck.path
    for name in (SAFE_NAME, SAFE_INDEX, BIN_NAME, BIN_INDEX):
        if lexists(path / name):
            break
    else:
        raise CheckpointError(path, _deepspeed_folder(path) or f"unknown checkpoint layout: no {SAFE_NAME}, "
                                    f"{SAFE_INDEX}, {BIN_NAME} or {BIN_INDEX} in this directory")
    used = {name}
    if name.endswith(".index.json"):
        ck.index, ck.index_name = _read_json(path / name, "the shard index", tree), name
        ck.index_mode = stat.S_IMODE(os.stat(path / name).st_mode)
        wm = _check_index(path / name, ck.index)
        shards = list(dict.fromkeys(wm.values()))
        kinds = (".safetensors",) if name == SAFE_INDEX else PICKLE_SUFFIXES
        for s in shards:
            if Path(s).name != s or s in (".", ".."):
                raise CheckpointError(path / name, f"shard index names {s!r}, which is not a file in this directory")
            if not s.endswith(kinds):
                raise CheckpointError(path / name, f"shard index maps tensors to {s!r}, which is not a "
                                                   f"{' or '.join(kinds)} file: the shards of {name} are all of one "
                                                   "format (transformers reads them so)")
            if not lexists(path / s):
                raise CheckpointError(path / s, f"missing shard: {name} maps {sum(v == s for v in wm.values())} "
                                                "tensors to it but it does not exist")
        problem = _unreferenced_shards(path, name, shards)
        if problem:
            raise CheckpointError(path / name, f"{problem}; the index and the shards do not match")
        budget = max_tensors
        for s in shards:
            ck.sources.append(_source(path / s, tree, max(budget, 0)))
            budget -= len(ck.sources[-1].entries)
        used |= set(shards)
        _check_dst_names(path / name, shards)
        found: dict[str, str] = {}
        for src in ck.sources:
            for n in src.entries:
                other = found.setdefault(n, src.path.name)
                if other != src.path.name:
                    raise CheckpointError(src.path, f"tensor {n!r} is also in {other}; a key must be in one shard")
        by_name = {s.path.name: s for s in ck.sources}
        for k, s in wm.items():
            if k not in by_name[s].entries:
                raise CheckpointError(path / s, f"{name} names tensor {k!r} in this shard, but the shard does not "
                                                "contain it")
        extra = [n for n in found if n not in wm]
        if extra:
            ck.warnings.append(f"{len(extra)} tensors in the shards are not in {name} (e.g. {extra[0]!r}); "
                               "they are copied and indexed")
    else:
        ck.sources = [_source(path / name, tree, max_tensors)]
    _check_weights(ck)
    if lexists(path / CONFIG_NAME):
        ck.config = _read_json(path / CONFIG_NAME, CONFIG_NAME, tree)
        ck.config_mode = stat.S_IMODE(os.stat(path / CONFIG_NAME).st_mode)
        used.add(CONFIG_NAME)
    ck.trainer = os.path.isfile(path / "trainer_state.json")
    files, warnings = tree.walk()
    ck.warnings += warnings
    for rel in files:
        fn = os.path.basename(rel)
        if rel in used:
            continue
        if TRAINER_STATE.fullmatch(rel):
            ck.skipped.append((rel, "Trainer training state (resume from SRC, not from the plain checkpoint)"))
        elif OTHER_WEIGHTS.fullmatch(fn):
            ck.skipped.append((rel, "weights or pickle other than the model weights: not converted"))
        else:
            tree.check_readable(path / rel)  # a link outside SRC, a FIFO or an unreadable file: refused now
            ck.copies.append(rel)
    ck.tree = tree


def _stat_or_none(path: Path) -> os.stat_result | None:
    """``os.stat``, or None when nothing (or a broken link) is there; an I/O error is raised."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def dst_name(name: str) -> str:
    """The name a weight file of a directory SRC gets in DST: a safetensors shard keeps its
    name, a pickle becomes ``.safetensors`` (``pytorch_model*`` -> ``model*``)."""
    if name.endswith(".safetensors"):
        return name
    if name == BIN_NAME:
        return SAFE_NAME
    stem = name[:-len(".bin")] if name.endswith(".bin") else Path(name).stem
    return (stem.replace("pytorch_model", "model", 1) if stem.startswith("pytorch_model") else stem) + ".safetensors"


def _check_dst_names(index: Path, shards: list[str]) -> None:
    """Two shards that would be written under one name in DST are refused up front."""
    seen: dict[str, str] = {}
    for s in shards:
        other = seen.setdefault(dst_name(s), s)
        if other != s:
            raise CheckpointError(index, f"shards {other!r} and {s!r} would both be written as {dst_name(s)!r} in DST "
                                         "(pickle shards become .safetensors); rename one of them and its entries in "
                                         "the index")


def _check_weights(ck: Checkpoint) -> None:
    if not any(s.entries for s in ck.sources):
        raise CheckpointError(ck.sources[0].path if ck.sources else ck.path,
                              "holds no tensor: a checkpoint without weights")
    for s in ck.sources:
        for name, storage, nbytes in getattr(s, "expanded", ()):
            ck.warnings.append(f"{s.path.name}: tensor {name!r} is an expanded view (stride 0) of "
                               f"{storage:,} bytes of storage; written out it takes {nbytes:,} bytes "
                               f"(x{nbytes // max(storage, 1):,})")
        total = sum(e.nbytes for e in s.entries.values()) if isinstance(s, _PickleSource) else 0
        if total > MAX_EXPANSION_BYTES and total > MAX_EXPANSION * s.file_size:
            raise CheckpointError(s.path, f"its tensors would take {total:,} bytes written out, {total // s.file_size:,}"
                                          f" times the {s.file_size:,} bytes of the file (expanded stride-0 views, or "
                                          "many views of one storage); "
                                          f"refused past {MAX_EXPANSION}x and {MAX_EXPANSION_BYTES // 2**30} GiB. "
                                          "Save tensor.contiguous() yourself if you mean it")
        kept = {k: e for k, e in s.entries.items() if not is_target_key(k)}
        check_header_size(s.path, kept, output_metadata(s))  # what convert writes: safetensors must read it


def output_metadata(src: _Source) -> dict[str, str]:
    """The header metadata of the file convert writes for ``src``: SRC's, without the record."""
    md = {k: v for k, v in (src.metadata or {}).items() if k != RECORD_METADATA_KEY}
    md.setdefault("format", "pt")
    return md
