"""The safetensors format, read and written one tensor at a time.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (each
tensor's ``dtype``, ``shape`` and ``data_offsets`` into the data section, plus an optional
``__metadata__`` map of strings), padded with spaces, then the raw little-endian data.

:func:`read_header` parses and validates a header without touching the data.
:func:`write_safetensors` writes the format directly, streaming each tensor's bytes from
its source (a kernel-side copy out of another safetensors file, or a tensor's memory), so
nothing needs every tensor at once; ``safetensors.torch.save_file`` takes the whole dict.
Every written file is read back (header, sizes, and ``safe_open``) before it counts.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from .common import CheckpointError

if TYPE_CHECKING:
    import torch

__all__ = ["TensorInfo", "SafetensorsFile", "Item", "Progress", "read_header", "write_safetensors", "tensor_item",
           "copy_range", "torch_to_st", "BITS", "METADATA_KEY"]

METADATA_KEY = "__metadata__"
MAX_HEADER = 100_000_000  # the limit safetensors itself enforces
CHUNK = 64 * 2**20

# safetensors dtype name -> bits per element
BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
        "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
        "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


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
            raise CheckpointError(path, f"corrupt safetensors header: entry {name!r} is not {{dtype (a known "
                                        f"safetensors dtype), shape, data_offsets}}: {json.dumps(e)[:200]}")
        start, end = e["data_offsets"]
        need = _nbytes(e["dtype"], e["shape"])
        if end < start or need != end - start:
            raise CheckpointError(path, f"corrupt safetensors header: tensor {name!r} ({e['dtype']} {e['shape']}) "
                                        f"needs {need} bytes but its data_offsets {e['data_offsets']} span "
                                        f"{end - start}")
        if end > data_bytes:
            raise CheckpointError(path, f"truncated or corrupt safetensors file: tensor {name!r} ends at byte {end} of "
                                        f"the data section (offsets point past the end of the file, which holds "
                                        f"{data_bytes} data bytes)")
        tensors[name] = TensorInfo(name, e["dtype"], tuple(e["shape"]), start, end)
    pos = 0
    for t in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if t.start != pos:
            what = "overlaps the previous tensor" if t.start < pos else f"leaves a hole at byte {pos}"
            raise CheckpointError(path, f"corrupt safetensors header: tensor {t.name!r} at data offset {t.start} "
                                        f"{what}")
        pos = t.end
    if pos != data_bytes:
        raise CheckpointError(path, f"corrupt safetensors file: {data_bytes - pos} bytes after the last tensor "
                                    "that the header does not account for")
    return SafetensorsFile(path, tensors, metadata, 8 + n, size)


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


def copy_range(src_fd: int, src_path: Path, offset: int, count: int, dst_fd: int, progress: Progress | None) -> None:
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


@functools.lru_cache(maxsize=None)
def torch_to_st() -> dict:
    """torch dtype -> safetensors dtype name (torch is imported on first use only)."""
    import torch

    pairs = [("float64", "F64"), ("float32", "F32"), ("float16", "F16"), ("bfloat16", "BF16"), ("int64", "I64"),
             ("int32", "I32"), ("int16", "I16"), ("int8", "I8"), ("uint8", "U8"), ("bool", "BOOL"),
             ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
             ("float8_e5m2fnuz", "F8_E5M2FNUZ"), ("float8_e8m0fnu", "F8_E8M0"), ("complex64", "C64"),
             ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")]
    return {getattr(torch, t): s for t, s in pairs if hasattr(torch, t)}


def tensor_item(name: str, tensor: "torch.Tensor", *, path: Any = "<tensor>") -> Item:
    """An :class:`Item` that writes ``tensor``'s bytes (a contiguous CPU copy is made only
    for a non-contiguous or non-CPU tensor, one tensor at a time).

    Raises:
        CheckpointError: a dtype or layout safetensors cannot store.
    """
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise CheckpointError(path, f"{name!r} is a {type(tensor).__name__}, not a tensor")
    if tensor.layout != torch.strided or tensor.is_quantized:
        raise CheckpointError(path, f"tensor {name!r} is sparse or quantized; safetensors stores dense tensors only")
    if tensor.device.type == "meta":
        raise CheckpointError(path, f"tensor {name!r} is on the meta device (offloaded or never materialised); "
                                    "load the weights first")
    if tensor.dtype not in torch_to_st():
        raise CheckpointError(path, f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
    dtype = torch_to_st()[tensor.dtype]

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
