"""Checkpoint I/O: the safetensors format read and written one tensor at a time, the
checkpoint layouts ``surgery convert`` understands, and conversion to plain checkpoints.

A surgered checkpoint differs from a plain one in three places only (see ``record.py``):
extra ``<layer>.mixout_target`` tensors, a ``surgery`` record in ``config.json`` (models
saved with ``save_pretrained``/Trainer) and/or in the safetensors header metadata (files
written by :func:`save`), and the dropout values the record lists in ``config.json``.
Converting drops the targets, restores the config and copies every other byte as it is:
every Mixout layer keeps its weight under the original key, so the plain weights *are*
the surgered weights minus the targets, bit for bit.

Streaming: safetensors inputs are never loaded as tensors. Their header is parsed and
validated, and each kept tensor's bytes are copied from file to file by the kernel
(``os.copy_file_range``, falling back to 8 MiB reads), so memory stays flat whatever the
model size. ``.bin``/``.pt`` inputs are loaded with ``torch.load(weights_only=True,
mmap=True)`` and written tensor by tensor. The writer produces the safetensors format
directly (8-byte little-endian header length, JSON header padded to 8 bytes, raw
little-endian data), because ``safetensors.torch.save_file`` needs every tensor in memory
at once; every written file is read back (header, sizes, and ``safe_open``) before it
counts as written.

Atomicity: everything is written under a hidden temporary name beside the destination and
renamed into place at the end; on any error or Ctrl-C the temporary is removed.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import pickle
import re
import shutil
import struct
import uuid
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .errors import SurgeryError
from .record import CONFIG_KEY, TARGET_SUFFIX, Record

__all__ = [
    "CheckpointError", "TensorInfo", "SafetensorsFile", "Item", "read_header", "write_safetensors",
    "tensor_item", "load_state_dict_file", "Checkpoint", "open_checkpoint", "is_target_key", "restore_config",
    "Plan", "plan_convert", "convert", "inspect", "format_inspect", "save", "atomic_path", "commit",
]

METADATA_KEY = "__metadata__"
RECORD_METADATA_KEY = "surgery"  # safetensors header metadata entry holding Record.to_json()
MAX_HEADER = 100_000_000  # the limit safetensors itself enforces
CHUNK = 64 * 2**20

# safetensors dtype name -> bits per element
BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
        "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
        "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
TORCH_TO_ST = {getattr(torch, t): s for t, s in [
    ("float64", "F64"), ("float32", "F32"), ("float16", "F16"), ("bfloat16", "BF16"), ("int64", "I64"),
    ("int32", "I32"), ("int16", "I16"), ("int8", "I8"), ("uint8", "U8"), ("bool", "BOOL"),
    ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
    ("float8_e5m2fnuz", "F8_E5M2FNUZ"), ("float8_e8m0fnu", "F8_E8M0"), ("complex64", "C64"),
    ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")] if hasattr(torch, t)}

SAFE_NAME, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_NAME, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
CONFIG_NAME = "config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# files in a model/Trainer directory that are not copied to a plain checkpoint
TRAINER_STATE = re.compile(r"optimizer\.pt|scheduler\.pt|scaler\.pt|trainer_state\.json|training_args\.bin"
                           r"|rng_state(_\d+)?\.pth")
OTHER_WEIGHTS = re.compile(r".*(\.safetensors|\.bin|\.pt|\.pth|\.ckpt|\.h5|\.msgpack|\.pkl|\.pickle|\.onnx"
                           r"|\.gguf|\.npy|\.npz|\.joblib|\.index\.json)")


class CheckpointError(SurgeryError):
    """A checkpoint that cannot be read, converted or written. ``str(e)`` is one line:
    the file, then the problem and (where there is one) the fix."""

    def __init__(self, path: Any, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


def _mib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def is_target_key(key: str) -> bool:
    """True for the state_dict key of a Mixout target (``<layer>.mixout_target``)."""
    return key == TARGET_SUFFIX or key.endswith("." + TARGET_SUFFIX)


# ---- reading the safetensors format ------------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file; ``start``/``end`` are offsets into the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class SafetensorsFile:
    """A parsed and validated safetensors header."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None
    data_start: int  # file offset of the data section
    size: int  # file size in bytes

    @property
    def data_bytes(self) -> int:
        return self.size - self.data_start


def _nbytes(dtype: str, shape: Iterable[int]) -> int | None:
    n = BITS[dtype]
    for d in shape:
        n *= d
    return n // 8 if n % 8 == 0 else None


def read_header(path: str | os.PathLike) -> SafetensorsFile:
    """Parse and validate the header of a safetensors file (the data is not read).

    Checks what ``safetensors`` checks and says which tensor is wrong: the header fits in
    the file and is a JSON object, every entry has a known dtype, a shape of non-negative
    ints and ``data_offsets`` whose span equals ``numel * itemsize``, and the entries tile
    the data section exactly (no overlap, no hole, nothing past the end of the file).

    Raises:
        CheckpointError: the file is missing, truncated or corrupt.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise CheckpointError(path, f"truncated or not a safetensors file: {size} bytes, but the format "
                                            "starts with an 8-byte header length")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(path, f"truncated or corrupt safetensors file: the header length says {n} bytes "
                                            f"but the file has {size - 8} after the length field")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(path, f"cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"corrupt safetensors header (not UTF-8 JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "corrupt safetensors header (not a JSON object)")
    metadata = header.pop(METADATA_KEY, None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise CheckpointError(path, "corrupt safetensors header: __metadata__ must map strings to strings")
    data_bytes = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, e in header.items():
        if not (isinstance(e, dict) and e.get("dtype") in BITS and isinstance(e.get("shape"), list)
                and all(type(d) is int and d >= 0 for d in e["shape"]) and isinstance(e.get("data_offsets"), list)
                and len(e["data_offsets"]) == 2 and all(type(o) is int and o >= 0 for o in e["data_offsets"])):
            raise CheckpointError(path, f"corrupt safetensors header: entry {name!r} is not "
                                        "{dtype (a known safetensors dtype), shape, data_offsets}: " + json.dumps(e)[:200])
        start, end = e["data_offsets"]
        need = _nbytes(e["dtype"], e["shape"])
        if end < start or need != end - start:
            raise CheckpointError(path, f"corrupt safetensors header: tensor {name!r} ({e['dtype']} {e['shape']}) "
                                        f"needs {need} bytes but its data_offsets {e['data_offsets']} span {end - start}")
        if end > data_bytes:
            raise CheckpointError(path, f"truncated or corrupt safetensors file: tensor {name!r} ends at byte {end} of "
                                        f"the data section (offsets point past the end of the file, which holds "
                                        f"{data_bytes} data bytes)")
        tensors[name] = TensorInfo(name, e["dtype"], tuple(e["shape"]), start, end)
    pos = 0
    for t in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if t.start != pos:
            what = "overlaps the previous tensor" if t.start < pos else f"leaves a hole at byte {pos}"
            raise CheckpointError(path, f"corrupt safetensors header: tensor {t.name!r} at data offset {t.start} {what}")
        pos = t.end
    if pos != data_bytes:
        raise CheckpointError(path, f"corrupt safetensors file: {data_bytes - pos} bytes after the last tensor "
                                    "that the header does not account for")
    return SafetensorsFile(path, tensors, metadata, 8 + n, size)


# ---- writing the safetensors format -------------------------------------------------------

Progress = Callable[[int], None]


@dataclass
class Item:
    """One tensor to write: ``write(fd, progress)`` writes exactly ``nbytes`` bytes to ``fd``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    write: Callable[[int, Progress | None], None]


def _write_all(fd: int, buf, progress: Progress | None) -> None:
    mv = memoryview(buf).cast("B")
    pos = 0
    while pos < len(mv):
        n = os.write(fd, mv[pos:pos + CHUNK])
        pos += n
        if progress:
            progress(n)


def _copy_range(src_fd: int, src_path: Path, offset: int, count: int, dst_fd: int, progress: Progress | None) -> None:
    """Copy ``count`` bytes at ``offset`` of ``src_fd`` to the current position of ``dst_fd``
    inside the kernel (no user-space buffer); 8 MiB reads where the kernel cannot."""
    fast = hasattr(os, "copy_file_range")
    while count > 0:
        n = 0
        if fast:
            try:
                n = os.copy_file_range(src_fd, dst_fd, min(count, CHUNK), offset)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM):
                    raise
                fast = False
                continue
        else:
            buf = os.pread(src_fd, min(count, 8 * 2**20), offset)
            n = len(buf)
            if n:
                _write_all(dst_fd, buf, None)
        if n == 0:
            raise CheckpointError(src_path, "the file ended early while being copied (truncated or changed during "
                                            "the conversion)")
        offset += n
        count -= n
        if progress:
            progress(n)


def tensor_item(name: str, tensor: torch.Tensor, *, path: Any = "<tensor>") -> Item:
    """An :class:`Item` that writes ``tensor``'s bytes (a contiguous CPU copy is made only
    for a non-contiguous or non-CPU tensor, one tensor at a time).

    Raises:
        CheckpointError: a dtype or layout safetensors cannot store.
    """
    if not isinstance(tensor, torch.Tensor):
        raise CheckpointError(path, f"{name!r} is a {type(tensor).__name__}, not a tensor")
    if tensor.layout != torch.strided or tensor.is_quantized:
        raise CheckpointError(path, f"tensor {name!r} is sparse or quantized; safetensors stores dense tensors only")
    if tensor.device.type == "meta":
        raise CheckpointError(path, f"tensor {name!r} is on the meta device (offloaded or never materialised); "
                                    "load the weights first")
    if tensor.dtype not in TORCH_TO_ST:
        raise CheckpointError(path, f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
    dtype = TORCH_TO_ST[tensor.dtype]

    def write(fd: int, progress: Progress | None) -> None:
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        t = t.resolve_conj().resolve_neg().contiguous()
        if t.numel():
            _write_all(fd, t.reshape(-1).view(torch.uint8).numpy(), progress)

    return Item(name, dtype, tuple(tensor.shape), tensor.numel() * tensor.element_size(), write)


def write_safetensors(path: str | os.PathLike, items: list[Item], metadata: dict[str, str] | None = None,
                      progress: Progress | None = None) -> SafetensorsFile:
    """Write ``items`` as a safetensors file, one tensor at a time, then verify it.

    Tensors are laid out widest dtype first (as safetensors does) so every tensor is
    aligned to its element size; the header is padded with spaces to 8 bytes. The file is
    fsync'ed, its header re-read and checked against what was meant to be written, and
    opened with ``safetensors.safe_open``.

    Raises:
        CheckpointError: duplicate names, a writer that wrote the wrong number of bytes, or
            a written file that fails verification.
    """
    path = Path(path)
    names = [it.name for it in items]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise CheckpointError(path, f"duplicate tensor names {dup[:5]}")
    order = sorted(items, key=lambda it: -BITS[it.dtype])  # stable: keeps the given order within a width
    header: dict[str, Any] = {}
    if metadata:
        header[METADATA_KEY] = dict(metadata)
    pos = 0
    for it in order:
        header[it.name] = {"dtype": it.dtype, "shape": list(it.shape), "data_offsets": [pos, pos + it.nbytes]}
        pos += it.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_all(fd, struct.pack("<Q", len(raw)) + raw, None)
        for it in order:
            before = os.lseek(fd, 0, os.SEEK_CUR)
            it.write(fd, progress)
            wrote = os.lseek(fd, 0, os.SEEK_CUR) - before
            if wrote != it.nbytes:
                raise CheckpointError(path, f"wrote {wrote} bytes for tensor {it.name!r}, expected {it.nbytes}")
        os.fsync(fd)
    finally:
        os.close(fd)
    # verify: what is on disk is what we meant to write, and safetensors itself accepts it
    got = read_header(path)
    want = {n: (e["dtype"], tuple(e["shape"]), *e["data_offsets"]) for n, e in header.items() if n != METADATA_KEY}
    have = {n: (t.dtype, t.shape, t.start, t.end) for n, t in got.tensors.items()}
    if have != want or (got.metadata or None) != (metadata or None) or got.size != 8 + len(raw) + pos:
        raise CheckpointError(path, "written file failed verification (header or size differs from what was written)")
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            if set(f.keys()) != set(want):
                raise CheckpointError(path, "written file failed verification (safetensors lists other keys)")
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(path, f"written file failed verification by safetensors ({e})") from None
    return got


# ---- reading .bin / .pt state dicts ---------------------------------------------------------

def _unsafe_global(msg: str) -> str | None:
    m = re.search(r"GLOBAL ([\w.]+)", msg) or re.search(r"[Uu]nsupported (?:global|class)[^\w]*([\w.]+)", msg)
    return m.group(1) if m else None


_ALLOWED_MODULES = ("torch", "collections", "builtins", "_codecs", "numpy")


def _scan_globals(path: Path) -> str | None:
    """The first non-torch global a plain pickle file imports, found without executing it."""
    import pickletools

    try:
        strings: list[str] = []
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if isinstance(arg, str):
                    strings.append(arg)
                if op.name in ("GLOBAL", "INST"):
                    name = arg.replace(" ", ".")
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    name = f"{strings[-2]}.{strings[-1]}"
                else:
                    continue
                if not name.startswith(_ALLOWED_MODULES):
                    return name
    except Exception:
        return None
    return None


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A ``.bin``/``.pt`` state dict loaded with ``torch.load(weights_only=True)``
    (memory-mapped where the file allows it). A pickle that would import or call anything
    besides tensors and plain containers is refused; nothing in it is executed.

    Raises:
        CheckpointError: the file is unreadable, refused, or not a mapping of names to tensors.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e) and "zipfile" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except pickle.UnpicklingError as e:
        what = _unsafe_global(str(e)) or _scan_globals(path)
        raise CheckpointError(path, "refused to load: the pickle "
                              + (f"references {what}, which is not" if what else "holds something that is not")
                              + " a tensor or plain container (torch.load(weights_only=True)); nothing in it was "
                              "executed. If you trust the file, load it yourself and save model.state_dict() with "
                              "safetensors") from None
    except (OSError, EOFError, RuntimeError, ValueError, zipfile.BadZipFile, struct.error) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(path, f"cannot read as a torch.save state dict ({msg})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"holds a {type(obj).__name__}, not a state dict (a dict of names to tensors); "
                                    "save model.state_dict()")
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise CheckpointError(path, f"is not a state dict (a dict of names to tensors): entry {bad[0]!r} is a "
                                    f"{type(obj[bad[0]]).__name__} (keys: {', '.join(map(str, list(obj)[:6]))}); "
                                    "save model.state_dict() instead")
    return obj


# ---- weight files as sources ------------------------------------------------------------------

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
            _copy_range(self._fd, self.path, self.header.data_start + t.start, t.nbytes, fd, progress)

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


# ---- layouts ---------------------------------------------------------------------------------

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
            s += f" ({len(self.sources)} file{'s' if len(self.sources) > 1 else ''})"
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


# ---- config restore -------------------------------------------------------------------------

def restore_config(config: dict[str, Any], record: Record | None = None) -> tuple[dict[str, Any], list[tuple]]:
    """A copy of a saved ``config.json`` dict with the record's config changes undone and
    the ``surgery`` key removed. Returns ``(config, [(path, saved_value, restored_value)])``.

    Only entries of the root config (``"module": ""``) exist on disk; a key the save left
    out (transformers omits values equal to the class default) is written back explicitly.
    """
    out = copy.deepcopy(config)
    if record is None and out.get(CONFIG_KEY) is not None:
        record = Record.from_dict(out[CONFIG_KEY])
    out.pop(CONFIG_KEY, None)
    changes = []
    for ch in (record.config if record else []):
        if ch.get("module", "") != "":
            continue
        d = out
        for k in ch["path"][:-1]:
            if d.get(k) is None:
                d[k] = {}
            d = d[k]
            if not isinstance(d, dict):
                break
        if not isinstance(d, dict):
            continue
        changes.append((".".join(ch["path"]), d.get(ch["path"][-1], "<absent>"), ch["old"]))
        d[ch["path"][-1]] = ch["old"]
    return out, changes


# ---- atomic writes --------------------------------------------------------------------------

def atomic_path(dst: Path) -> Path:
    """A hidden temporary name beside ``dst`` (same filesystem, so renaming is atomic)."""
    return dst.parent / f".surgery-tmp-{dst.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def _fsync_dir(p: Path) -> None:
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit(tmp: Path, dst: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``dst``; an existing ``dst`` is replaced only with ``overwrite``.

    Raises:
        CheckpointError: ``dst`` exists and ``overwrite`` is False.
    """
    if os.path.lexists(dst):
        if not overwrite:
            raise CheckpointError(dst, "already exists; pass --overwrite (overwrite=True) to replace it")
        if tmp.is_dir() or (dst.is_dir() and not dst.is_symlink()):
            old = atomic_path(dst)
            os.rename(dst, old)
            try:
                os.rename(tmp, dst)
            except BaseException:
                os.rename(old, dst)
                raise
            _remove(old)
        else:
            os.replace(tmp, dst)
    else:
        os.rename(tmp, dst)
    _fsync_dir(dst.parent)


def _check_dst(src: Path, dst: Path, overwrite: bool) -> None:
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents or d in s.parents:
        raise CheckpointError(dst, f"DST must not be SRC, inside it or contain it (SRC is {src}); pick another path")
    if os.path.lexists(dst) and not overwrite:
        raise CheckpointError(dst, "already exists; pass --overwrite (overwrite=True) to replace it")


# ---- convert ------------------------------------------------------------------------------

@dataclass
class Plan:
    """What :func:`convert` does (``--dry-run`` prints :meth:`describe`)."""

    ck: Checkpoint
    dst: Path
    record: Record | None
    record_source: str | None
    files: list[tuple[_Source, str, list[str], list[str]]]  # (source, dst name, kept keys, dropped keys)
    config: dict[str, Any] | None  # restored config.json (directories)
    config_changes: list[tuple]
    index: dict[str, Any] | None  # DST index (sharded)
    warnings: list[str]

    @property
    def kept_bytes(self) -> int:
        return sum(src.entries[k][2] for src, _, kept, _ in self.files for k in kept)

    @property
    def dropped(self) -> list[str]:
        return [k for _, _, _, d in self.files for k in d]

    @property
    def dropped_bytes(self) -> int:
        return sum(src.entries[k][2] for src, _, _, d in self.files for k in d)

    @property
    def surgered(self) -> bool:
        return self.record is not None or bool(self.dropped)

    def describe(self) -> str:
        ck = self.ck
        lines = [f"convert {ck.path} ({ck.describe()})", f"     -> {self.dst}"]
        if self.record is not None:
            lines.append(f"  record: {self.record_source}")
        elif self.dropped:
            lines.append("  record: none found (Mixout targets present; dropout values on disk are kept as saved)")
        else:
            lines.append("  no surgery found: DST is a plain copy")
        n_kept = sum(len(k) for _, _, k, _ in self.files)
        lines.append(f"  weights: drop {len(self.dropped)} Mixout targets ({_mib(self.dropped_bytes)}), "
                     f"write {n_kept} tensors ({_mib(self.kept_bytes)}) to {len(self.files)} file"
                     f"{'s' if len(self.files) > 1 else ''}")
        for src, name, kept, dropped in self.files:
            lines.append(f"    {src.path.name} -> {name}: {len(kept)} tensors kept, {len(dropped)} targets dropped")
        if self.index is not None:
            lines.append(f"  index: {SAFE_INDEX} ({len(self.index['weight_map'])} keys)")
        if self.config is not None:
            lines.append(f"  {CONFIG_NAME}: " + ("; ".join(f"{p} {a} -> {b}" for p, a, b in self.config_changes)
                                                 or "no dropout fields to restore")
                         + ("; 'surgery' record removed" if self.ck.config and CONFIG_KEY in self.ck.config else ""))
        if ck.copies:
            lines.append(f"  copy: {', '.join(ck.copies)}")
        for rel, why in ck.skipped:
            lines.append(f"  skip: {rel} ({why})")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _dst_name(src: Path, ck: Checkpoint) -> str:
    name = src.name
    if ck.fmt == "safetensors":
        return name
    if name == BIN_NAME:
        return SAFE_NAME
    stem = name[:-len(".bin")] if name.endswith(".bin") else Path(name).stem
    return (stem.replace("pytorch_model", "model", 1) if stem.startswith("pytorch_model") else stem) + ".safetensors"


def plan_convert(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False,
                 require_surgery: bool = False) -> Plan:
    """Open and validate SRC and work out what :func:`convert` will write to DST.

    Raises:
        CheckpointError: see :func:`open_checkpoint`; DST exists (without ``overwrite``)
            or overlaps SRC; a state-dict input with a DST not ending in ``.safetensors``;
            no surgery in SRC with ``require_surgery``.
    """
    src, dst = Path(src), Path(dst)
    if os.path.lexists(src):
        _check_dst(src, dst, overwrite)
    ck = open_checkpoint(src)
    try:
        if not ck.is_dir and dst.suffix != ".safetensors":
            raise CheckpointError(dst, "DST must be a .safetensors file for a file SRC"
                                  + (" (.bin/.pt input is written as safetensors)" if ck.fmt == "pickle" else ""))
        record, where = ck.record()
        warnings = list(ck.warnings)
        files = []
        for s in ck.sources:
            kept = [k for k in s.entries if not is_target_key(k)]
            dropped = [k for k in s.entries if is_target_key(k)]
            if kept or not ck.sharded:
                files.append((s, _dst_name(s.path, ck) if ck.is_dir else dst.name, kept, dropped))
            else:
                files.append((s, "", [], dropped))
                warnings.append(f"{s.path.name} holds only Mixout targets; no shard is written for it")
        dropped = {k for _, _, _, d in files for k in d}
        if record is not None:
            missing = [k for k in record.target_keys if k not in dropped]
            unlisted = sorted(dropped - set(record.target_keys))
            if missing:
                warnings.append(f"the record lists {len(missing)} Mixout layers whose target is not in the weights "
                                f"(e.g. {missing[0]!r})")
            if unlisted:
                warnings.append(f"{len(unlisted)} Mixout targets are not in the record (e.g. {unlisted[0]!r}); "
                                "dropped all the same")
        if require_surgery and record is None and not dropped:
            raise CheckpointError(src, "holds no surgery (no change record in config.json or safetensors metadata, "
                                       f"no *.{TARGET_SUFFIX} tensors); nothing to convert")
        config, changes = None, []
        if ck.config is not None:
            config, changes = restore_config(ck.config, record)
            if record is None and dropped:
                warnings.append(f"{CONFIG_NAME} holds no surgery record: its dropout values are kept as saved")
        index = None
        if ck.sharded:
            wm = {k: name for s, name, kept, _ in files for k in kept}
            meta = dict(ck.index.get("metadata") or {})
            meta["total_size"] = sum(s.entries[k][2] for s, _, kept, _ in files for k in kept)
            index = {"metadata": meta, "weight_map": dict(sorted(wm.items()))}
        return Plan(ck, dst, record, where, [f for f in files if f[1]] + [f for f in files if not f[1]],
                    config, changes, index, warnings)
    except BaseException:
        ck.close()
        raise


def _metadata(src: _Source) -> dict[str, str]:
    md = {k: v for k, v in (src.metadata or {}).items() if k != RECORD_METADATA_KEY}
    md.setdefault("format", "pt")
    return md


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "x", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def execute(plan: Plan, *, overwrite: bool = False, progress: Progress | None = None) -> None:
    """Write ``plan.dst`` (through a temporary beside it, renamed at the end). SRC is only read.

    Raises:
        CheckpointError: a read or write problem; nothing is left at DST.
    """
    dst, ck = plan.dst, plan.ck
    if os.path.lexists(dst) and not overwrite:
        raise CheckpointError(dst, "already exists; pass --overwrite (overwrite=True) to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(dst)
    try:
        if ck.is_dir:
            tmp.mkdir()
            for s, name, kept, _ in plan.files:
                if name:
                    write_safetensors(tmp / name, [s.item(k) for k in kept], _metadata(s), progress)
            if plan.index is not None:
                _write_json(tmp / SAFE_INDEX, plan.index)
            if plan.config is not None:
                _write_json(tmp / CONFIG_NAME, plan.config)
            for rel in ck.copies:
                out = tmp / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(ck.path / rel, out)
                shutil.copystat(ck.path / rel, out)
            _fsync_dir(tmp)
        else:
            s, _, kept, _ = plan.files[0]
            write_safetensors(tmp, [s.item(k) for k in kept], _metadata(s), progress)
        commit(tmp, dst, overwrite)
    except OSError as e:
        _remove(tmp)
        raise CheckpointError(e.filename or dst, f"write failed ({e.strerror or e}); nothing was left at DST") from None
    except BaseException:
        _remove(tmp)
        raise


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False,
            require_surgery: bool = False, dry_run: bool = False, progress: Progress | None = None) -> Plan:
    """Convert a surgered checkpoint to a plain one (see the module docstring).

    Every tensor written equals, bit for bit and in its dtype, what ``surgery.revert``
    gives in process; Mixout targets are dropped, ``config.json`` is restored, other files
    (tokenizer, generation config ...) are copied, Trainer training state is not.

    Returns:
        the :class:`Plan` that was carried out (or only made, with ``dry_run``).

    Raises:
        CheckpointError: bad SRC or DST (see :func:`plan_convert`) or a failed write.
    """
    plan = plan_convert(src, dst, overwrite=overwrite, require_surgery=require_surgery)
    try:
        if not dry_run:
            execute(plan, overwrite=overwrite, progress=progress)
    finally:
        plan.ck.close()
    return plan


# ---- inspect --------------------------------------------------------------------------------

def inspect(src: str | os.PathLike) -> dict[str, Any]:
    """What surgery a checkpoint holds, as a JSON-ready dict (``surgery inspect --json``).

    Raises:
        CheckpointError: see :func:`open_checkpoint`.
    """
    ck = open_checkpoint(src)
    try:
        record, where = ck.record()
        dtypes: dict[str, int] = {}
        total = n = 0
        largest = ("", 0)
        targets: dict[str, int] = {}
        for _, name, (dtype, _, nb) in ck.tensors():
            n += 1
            total += nb
            dtypes[dtype] = dtypes.get(dtype, 0) + 1
            if nb > largest[1]:
                largest = (name, nb)
            if is_target_key(name):
                targets[name] = nb
        _, changes = restore_config(ck.config, record) if ck.config is not None else (None, [])
        return {
            "path": str(ck.path), "layout": ck.describe(), "trainer_checkpoint": ck.trainer,
            "files": [s.path.name for s in ck.sources], "surgered": record is not None or bool(targets),
            "tensors": n, "bytes": total, "dtypes": dtypes, "largest_tensor": {"name": largest[0], "bytes": largest[1]},
            "mixout_targets": {"count": len(targets), "bytes": sum(targets.values()), "keys": sorted(targets)},
            "plain": {"tensors": n - len(targets), "bytes": total - sum(targets.values())},
            "record_source": where, "record": record.to_dict() if record else None,
            "config_restore": [{"path": p, "saved": a, "restored": b} for p, a, b in changes],
            "warnings": ck.warnings,
        }
    finally:
        ck.close()


def format_inspect(info: dict[str, Any]) -> str:
    """The human-readable form of :func:`inspect`'s dict."""
    from .engine import describe

    t = info["mixout_targets"]
    lines = [f"{info['path']}: {info['layout']}",
             f"  tensors: {info['tensors']} ({_mib(info['bytes'])}; "
             + ", ".join(f"{k} x{v}" for k, v in sorted(info["dtypes"].items())) + ")",
             f"  largest tensor: {info['largest_tensor']['name']} ({_mib(info['largest_tensor']['bytes'])})"]
    if not info["surgered"]:
        lines.append("  no surgery: no change record and no Mixout targets (a plain checkpoint)")
        return "\n".join(lines)
    lines.append(f"  Mixout targets: {t['count']} ({_mib(t['bytes'])}); plain after convert: "
                 f"{info['plain']['tensors']} tensors ({_mib(info['plain']['bytes'])})")
    if info["record"] is None:
        lines.append("  record: none found (Mixout p, dropout and MSD settings unknown; convert still drops the targets)")
    else:
        lines.append(f"  record ({info['record_source']}):")
        lines += ["  " + ln for ln in describe(info["record"]).splitlines()[1:]]
    for c in info["config_restore"]:
        lines.append(f"  config.json {c['path']}: saved {c['saved']}, original {c['restored']}")
    lines += [f"  warning: {w}" for w in info["warnings"]]
    return "\n".join(lines)


# ---- saving a surgered model's weights with its record ----------------------------------------

def save(model: torch.nn.Module, path: str | os.PathLike, *, progress: Progress | None = None) -> Path:
    """Save a surgered model's full state_dict (Mixout targets included) as one safetensors
    file whose header metadata carries the change record (``"surgery"``), so the file can
    be inspected and converted without the model class and resumed from (load it into a
    freshly surgered pretrained model). Written tensor by tensor, atomically.

    Raises:
        NotSurgeredError: the model carries no surgery (use :func:`surgery.export`).
        CheckpointError: ``path`` does not end in ``.safetensors`` or the write fails.
    """
    from .record import get_record, unwrap

    rec = get_record(model)
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(path, "surgery.checkpoint.save writes one .safetensors file; give a path ending in "
                                    ".safetensors")
    sd = unwrap(model).state_dict()
    items = [tensor_item(k, v, path=path) for k, v in sd.items()]
    tmp = atomic_path(path)
    try:
        write_safetensors(tmp, items, {"format": "pt", RECORD_METADATA_KEY: rec.to_json()}, progress)
        commit(tmp, path, overwrite=True)
    except BaseException:
        _remove(tmp)
        raise
    return path
