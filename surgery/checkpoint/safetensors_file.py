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
import io
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Callable, Iterable

from ..schema import no_duplicates, parse_json, short
from .common import CheckpointError

if TYPE_CHECKING:
    import torch

__all__ = ["TensorInfo", "SafetensorsFile", "Item", "Progress", "read_header", "write_safetensors", "tensor_item",
           "copy_range", "end_file", "is_sparse", "check_header_size", "written_header_size", "shape_problem",
           "torch_to_st", "BITS", "METADATA_KEY"]

METADATA_KEY = "__metadata__"
MAX_HEADER = 100_000_000  # the limit safetensors itself enforces
MAX_TENSORS = 500_000  # per checkpoint: more is refused as absurd (the largest open models have under 200,000)
SAFE_OPEN_MAX = 50_000  # written files of up to this many tensors are also opened with safetensors.safe_open
CHUNK = 64 * 2**20

# safetensors dtype name -> bits per element
BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
        "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
        "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


@dataclass(slots=True)
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


USIZE_MAX = 2**64 - 1  # safetensors reads shapes and offsets as 64-bit unsigned integers


def _nbits(dtype: str, shape: Iterable[int]) -> int | None:
    """Bits of a tensor, or None where safetensors' own check overflows: it multiplies the
    dimensions in order as 64-bit unsigned integers, then by the bits per element, and
    refuses a product past 2**64 at any step (``[2**40, 2**40, 0]`` is refused although it
    has no element; ``[0, 2**40, 2**40]`` is not)."""
    n = 1
    for d in shape:
        n *= d
        if n > USIZE_MAX:
            return None
    n *= BITS[dtype]
    return None if n > USIZE_MAX else n


_ENTRY_KEYS = frozenset(("dtype", "shape", "data_offsets"))
_DTYPES = {d: d for d in BITS}  # one string object per dtype name


def _entry_hook(pairs: list[tuple[str, Any]]) -> Any:
    """``object_pairs_hook``: a well-formed tensor entry becomes a compact :class:`TensorInfo`
    as soon as it is parsed (a million tensors cost ~200 bytes each, not a dict and two lists).
    A key given twice in any object of the header is refused (:func:`no_duplicates`)."""
    d = no_duplicates(pairs)
    if len(d) == 3 and d.keys() == _ENTRY_KEYS:
        dtype, shape, offs = d["dtype"], d["shape"], d["data_offsets"]
        if (isinstance(dtype, str) and dtype in _DTYPES and type(shape) is list
                and all(type(x) is int and x >= 0 for x in shape) and type(offs) is list and len(offs) == 2
                and type(offs[0]) is int and type(offs[1]) is int and offs[0] >= 0 and offs[1] >= 0):
            return TensorInfo("", _DTYPES[dtype], tuple(shape), offs[0], offs[1])
    return d


def count_tensors_upper_bound(raw: bytes) -> int:
    """At least the number of tensor entries a header can hold (each has a ``"data_offsets"``
    key; a key spelled with escapes is counted after parsing instead)."""
    return raw.count(b'"data_offsets"')


def read_header(path: str | os.PathLike, *, fd: int | None = None, max_tensors: int = MAX_TENSORS) -> SafetensorsFile:
    """Parse and validate the header of a safetensors file (the data is not read).

    Checks what ``safetensors`` checks and says which tensor is wrong: the header fits in
    the file and is a JSON object, every entry has a known dtype, a shape of non-negative
    ints and ``data_offsets`` whose span equals ``numel * itemsize``, and the entries tile
    the data section exactly (no overlap, no hole, nothing past the end of the file).
    A header of more than ``max_tensors`` tensors is refused before it is parsed.
    ``fd``: read from this open descriptor (``path`` then only names the file in errors).

    Raises:
        CheckpointError: the file is missing, truncated or corrupt.
    """
    path = Path(path)
    own = fd is None
    try:
        if own:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            size = os.fstat(fd).st_size
            if size < 8:
                raise CheckpointError(path, f"truncated or not a safetensors file: {size} bytes, but the format "
                                            "starts with an 8-byte header length")
            head = _pread_all(fd, 8, 0)  # a read may return less than asked (a file changing, a failing disk)
            if len(head) < 8:
                raise CheckpointError(path, "the file ended early while being read (truncated or changed during "
                                            "the conversion)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                raise CheckpointError(path, f"corrupt or not a safetensors file: the header length field says {n} "
                                            f"bytes, over the {MAX_HEADER} byte limit safetensors sets")
            if 8 + n > size:
                raise CheckpointError(path, f"truncated or corrupt safetensors file: the header length says {n} bytes "
                                            f"but the file has {size - 8} after the length field")
            raw = _pread_all(fd, n, 8)
        finally:
            if own:
                os.close(fd)
    except OSError as e:
        raise CheckpointError(path, f"cannot read ({e.strerror or e})") from None
    if count_tensors_upper_bound(raw) > max_tensors:
        raise CheckpointError(path, _too_many(max_tensors))
    try:
        header = parse_json(raw, "the header", max_depth=None, constants=False, object_pairs_hook=_entry_hook)
    except ValueError as e:
        raise CheckpointError(path, f"corrupt safetensors file: {e}") from None
    raw = None
    if not isinstance(header, dict):
        raise CheckpointError(path, f"corrupt safetensors header: not a JSON object but {short(header)}")
    metadata = header.pop(METADATA_KEY, None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise CheckpointError(path, "corrupt safetensors header: __metadata__ must map strings to strings")
    if len(header) > max_tensors:
        raise CheckpointError(path, _too_many(max_tensors))
    data_bytes = size - 8 - n
    tensors: dict[str, TensorInfo] = header  # type: ignore[assignment]
    for name, t in header.items():
        if type(t) is not TensorInfo:
            raise CheckpointError(path, f"corrupt safetensors header: entry {name!r} is not {{dtype (a known "
                                        f"safetensors dtype), shape (non-negative ints), data_offsets (two "
                                        f"non-negative ints)}}: {short(t)}")
        t.name = name
        problem = _entry_problem(t)
        if problem:
            raise CheckpointError(path, f"corrupt safetensors header: tensor {name!r} "
                                        f"({t.dtype} {_shape_text(t.shape)}) {problem}")
        if t.end > data_bytes:
            raise CheckpointError(path, f"truncated or corrupt safetensors file: tensor {name!r} ends at byte "
                                        f"{t.end if t.end.bit_length() <= 64 else 'past 2**64'} of the data section (offsets point past the end of the file, which "
                                        f"holds {data_bytes} data bytes)")
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


def _shape_text(shape: tuple[int, ...]) -> str:
    return short(list(shape)) if any(d.bit_length() > 64 for d in shape) or len(shape) > 8 else str(list(shape))


def shape_problem(dtype: str, shape: tuple[int, ...]) -> str | None:
    """What safetensors refuses in a shape of ``dtype``, in words (None: nothing)."""
    if any(d > USIZE_MAX for d in shape):
        return "has a dimension past 2**64 - 1, which safetensors cannot read"
    bits = _nbits(dtype, shape)
    if bits is None:
        return ("has a shape whose element count or size overflows 64 bits (safetensors multiplies the dimensions "
                "in order)")
    if bits % 8:
        return (f"holds {bits} bits, not a whole number of bytes ({BITS[dtype]}-bit elements need a count that "
                "fills whole bytes)")
    return None


def _entry_problem(t: TensorInfo) -> str | None:
    """What safetensors refuses in one well-typed entry, in words (None: nothing)."""
    problem = shape_problem(t.dtype, t.shape)
    if problem:
        return problem
    bits = _nbits(t.dtype, t.shape) or 0
    if t.end < t.start:
        return "has data_offsets that end before they start"
    if bits // 8 != t.end - t.start:
        span = t.end - t.start if (t.end - t.start).bit_length() <= 64 else "more than 2**64"
        return f"needs {bits // 8} bytes but its data_offsets span {span}"
    return None


def _too_many(max_tensors: int) -> str:
    if max_tensors < MAX_TENSORS:
        return (f"with the other shards, the checkpoint lists more than {MAX_TENSORS:,} tensors (the largest open "
                "models have under 200,000); refused as absurd (memory grows with the tensor count)")
    return (f"the header lists more than {max_tensors:,} tensors (the largest open models have under 200,000); "
            "refused as absurd (memory grows with the tensor count)")


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    """``n`` bytes at ``offset`` (fewer at the end of the file), read into one buffer (no second copy)."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = os.preadv(fd, [view[got:got + CHUNK]], offset + got)
        if k == 0:
            break
        got += k
    view.release()
    if got < n:
        del buf[got:]
    return buf


Progress = Callable[[int], None]


@dataclass(slots=True)
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


def copy_range(src_fd: int, src_path: Path, offset: int, count: int, dst_fd: int, progress: Progress | None,
               sparse: bool | None = None) -> None:
    """Copy ``count`` bytes at ``offset`` of ``src_fd`` to the current position of ``dst_fd``
    inside the kernel (no user-space buffer); 8 MiB reads where the kernel cannot.

    Holes of a sparse ``src_fd`` (``SEEK_DATA``/``SEEK_HOLE``) are not read: ``dst_fd``'s
    position skips over them, so DST keeps them as holes as ``cp`` does (a caller that may
    end a file on a hole sets its size with :func:`end_file`). ``sparse``: whether
    ``src_fd`` has holes (:func:`is_sparse`; found out here when None)."""
    fast = hasattr(os, "copy_file_range")
    end = offset + count
    if sparse is None:
        sparse = is_sparse(src_fd)
    while offset < end:
        data, hole = _data_extent(src_fd, src_path, offset, end) if sparse else (offset, end)
        if data > offset:  # a hole: nothing to read, DST's position moves on
            os.lseek(dst_fd, data - offset, os.SEEK_CUR)
            if progress:
                progress(data - offset)
            offset = data
            continue
        while offset < hole:
            n = 0
            if fast:
                try:
                    n = os.copy_file_range(src_fd, dst_fd, min(hole - offset, CHUNK), offset)
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM):
                        raise
                    fast = False
                    continue
            else:
                buf = os.pread(src_fd, min(hole - offset, 8 * 2**20), offset)
                n = len(buf)
                if n:
                    _write_all(dst_fd, buf, None)
            if n == 0:
                raise _ended_early(src_path)
            offset += n
            if progress:
                progress(n)


def _ended_early(src_path: Path) -> CheckpointError:
    return CheckpointError(src_path, "the file ended early while being copied (truncated or changed during the "
                                     "conversion)")


def is_sparse(fd: int) -> bool:
    """The file has holes (fewer blocks on disk than its size needs), so copies look for them."""
    st = os.fstat(fd)
    return hasattr(st, "st_blocks") and st.st_blocks * 512 < st.st_size and hasattr(os, "SEEK_DATA")


def _data_extent(fd: int, path: Path, offset: int, end: int) -> tuple[int, int]:
    """``(data, hole)``: where the next bytes stored on disk start at or after ``offset``
    and where the run of them ends, both capped at ``end`` (all data where the file system
    cannot tell).

    Raises:
        CheckpointError: the file ends before ``end``."""
    try:
        data = os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as e:
        if e.errno != errno.ENXIO:
            return offset, end
        if os.fstat(fd).st_size < end:  # ENXIO: past the end of the file, or a hole up to it
            raise _ended_early(path) from None
        return end, end
    if data >= end:
        return end, end
    try:
        hole = os.lseek(fd, data, os.SEEK_HOLE)
    except OSError:
        return data, end
    return data, min(max(hole, data + 1), end)


def end_file(fd: int) -> None:
    """Give ``fd``'s file the size of its current position (a copy that ended on a hole)."""
    pos = os.lseek(fd, 0, os.SEEK_CUR)
    if os.fstat(fd).st_size < pos:
        os.ftruncate(fd, pos)


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


def _write_tensor(fd: int, t: "torch.Tensor", progress: Progress | None) -> None:
    """Write ``t``'s bytes in C order. A non-contiguous tensor (a transposed or expanded
    view) is made contiguous one slice of at most CHUNK bytes at a time, so a stride-0 view
    of a few bytes never becomes one huge allocation."""
    import torch

    if t.numel() == 0:
        return
    if t.device.type != "cpu" or t.is_conj() or t.is_neg() or not t.is_contiguous():
        nbytes = t.numel() * t.element_size()
        if t.dim() > 0 and nbytes > CHUNK:
            if t.shape[0] == 1:
                _write_tensor(fd, t[0], progress)
                return
            step = max(1, CHUNK // (nbytes // t.shape[0]))
            for i in range(0, t.shape[0], step):
                _write_tensor(fd, t[i:i + step], progress)
            return
        t = t.to("cpu").resolve_conj().resolve_neg().contiguous()
    _write_all(fd, t.reshape(-1).view(torch.uint8).numpy(), progress)


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
        _write_tensor(fd, tensor.detach(), progress)

    return Item(name, dtype, tuple(tensor.shape), tensor.numel() * tensor.element_size(), write)


def _header_bytes(order: Sequence[Item], metadata: dict[str, str] | None) -> tuple[bytes, int]:
    """The JSON header (padded with spaces to 8 bytes) and the data size, built piece by piece
    (no dict per tensor: a million tensors cost their text and nothing more)."""
    buf = io.StringIO()
    buf.write("{")
    sep = ""
    if metadata:
        buf.write(json.dumps(METADATA_KEY) + ":" + json.dumps(dict(metadata), separators=(",", ":"),
                                                              ensure_ascii=False))
        sep = ","
    pos = 0
    for it in order:
        buf.write(f'{sep}{json.dumps(it.name, ensure_ascii=False)}:{{"dtype":"{it.dtype}","shape":'
                  f'[{",".join(map(str, it.shape))}],"data_offsets":[{pos},{pos + it.nbytes}]}}')
        sep = ","
        pos += it.nbytes
    buf.write("}")
    raw = buf.getvalue().encode("utf-8")
    return raw + b" " * (-len(raw) % 8), pos


def written_header_size(items: Sequence[Item] | Mapping[str, Any], metadata: dict[str, str] | None) -> int:
    """The exact size of the header :func:`write_safetensors` writes for ``items`` (a sequence
    of :class:`Item`, or a mapping of names to entries with ``dtype``, ``shape``, ``nbytes``),
    found without building it where a cheap bound shows it is far under :data:`MAX_HEADER`."""
    if isinstance(items, Mapping):
        items = [Item(k, e.dtype, tuple(e.shape), e.nbytes, None) for k, e in items.items()]  # type: ignore[arg-type]
    ndim = max((len(it.shape) for it in items), default=0)
    bound = (6 * sum(len(it.name) for it in items) + len(items) * (100 + 21 * ndim)
             + 6 * sum(len(k) + len(v) + 6 for k, v in (metadata or {}).items()) + 64)
    if bound <= MAX_HEADER:
        return min(bound, MAX_HEADER)
    widths = [BITS[it.dtype] for it in items]
    order = _Reordered(items, sorted(range(len(items)), key=lambda i: -widths[i]))
    return len(_header_bytes(order, metadata)[0])


def check_header_size(path: Any, items: Sequence[Item] | Mapping[str, Any], metadata: dict[str, str] | None) -> None:
    """Refuse (naming ``path``) tensors whose safetensors header would pass the 100 MB that
    safetensors reads: written, the file would be one no reader opens."""
    n = written_header_size(items, metadata)
    if n > MAX_HEADER:
        raise CheckpointError(path, f"written as safetensors, its {len(items):,} tensors need a header of {n:,} bytes, "
                                    f"over the {MAX_HEADER:,} bytes safetensors reads (long names?); refused")


def write_safetensors(path: str | os.PathLike, items: Sequence[Item], metadata: dict[str, str] | None = None,
                      progress: Progress | None = None, *, mode: int | None = None) -> SafetensorsFile:
    """Write ``items`` as a safetensors file, one tensor at a time, then verify it.

    Tensors are laid out widest dtype first (as safetensors does) so every tensor is
    aligned to its element size; the header is padded with spaces to 8 bytes. The file is
    fsync'ed, its header read back and compared byte for byte with what was meant to be
    written, its size checked, and (up to SAFE_OPEN_MAX tensors) it is opened with ``safetensors.safe_open``. ``items``
    may be any sequence (``convert`` passes one that makes each item on demand); ``mode``:
    the new file's permission bits (default: 0644 less the umask).

    Raises:
        CheckpointError: duplicate names, a writer that wrote the wrong number of bytes, or
            a written file that fails verification.
    """
    path = Path(path)
    n_items = len(items)
    names = {it.name for it in items}
    if len(names) != n_items:
        seen: set[str] = set()
        dup = sorted({it.name for it in items if it.name in seen or seen.add(it.name)})
        raise CheckpointError(path, f"duplicate tensor names {dup[:5]}")
    del names
    widths = [BITS[it.dtype] for it in items]
    order_idx = sorted(range(n_items), key=lambda i: -widths[i])  # stable: keeps the given order within a width
    del widths
    order = _Reordered(items, order_idx)
    raw, data_size = _header_bytes(order, metadata)
    if len(raw) > MAX_HEADER:  # convert refuses this on SRC already; a save or export gets it here, before writing
        raise CheckpointError(path, f"the header of {n_items:,} tensors would be {len(raw):,} bytes, over the "
                                    f"{MAX_HEADER:,} bytes safetensors reads; save fewer or shorter-named tensors "
                                    "per file")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        if mode is not None:
            os.fchmod(fd, mode & 0o7777)  # exactly ``mode`` (convert keeps SRC's bits), whatever the umask
        _write_all(fd, struct.pack("<Q", len(raw)) + raw, None)
        for it in order:
            before = os.lseek(fd, 0, os.SEEK_CUR)
            it.write(fd, progress)
            wrote = os.lseek(fd, 0, os.SEEK_CUR) - before
            if wrote != it.nbytes:
                raise CheckpointError(path, f"wrote {wrote} bytes for tensor {it.name!r}, expected {it.nbytes}")
        end_file(fd)  # the last tensor may end on a hole of a sparse SRC
        os.fsync(fd)
        # verify: what is on disk is what we meant to write, and safetensors itself accepts it
        size = os.fstat(fd).st_size
        back = _pread_all(fd, 8 + len(raw), 0)
    finally:
        os.close(fd)
    if size != 8 + len(raw) + data_size or back != struct.pack("<Q", len(raw)) + raw:
        raise CheckpointError(path, "written file failed verification (header or size differs from what was written)")
    del back
    if n_items > SAFE_OPEN_MAX:  # safe_open's own parse costs ~10x the header in memory: skipped past the bound
        return SafetensorsFile(path, _LazyTensors(order), dict(metadata) if metadata else None, 8 + len(raw), size)
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="numpy") as f:  # numpy, not torch: no torch import for safetensors
            if len(f.keys()) != n_items:
                raise CheckpointError(path, "written file failed verification (safetensors lists other keys)")
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(path, f"written file failed verification by safetensors ({e})") from None
    return SafetensorsFile(path, _LazyTensors(order), dict(metadata) if metadata else None, 8 + len(raw),
                           size)


class _Reordered(Sequence):
    """``items`` in the order ``idx`` gives, without copying them."""

    def __init__(self, items: Sequence[Item], idx: list[int]):
        self.items, self.idx = items, idx

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i):  # type: ignore[override]
        return self.items[self.idx[i]]

    def __iter__(self):
        items = self.items
        for i in self.idx:
            yield items[i]


class _LazyTensors(Mapping):
    """The :class:`TensorInfo` of a written file, made on first use (most callers never look)."""

    def __init__(self, order: Sequence[Item]):
        self._order: Sequence[Item] | None = order
        self._d: dict[str, TensorInfo] = {}

    def _all(self) -> dict[str, TensorInfo]:
        if self._order is not None:
            pos = 0
            for it in self._order:
                self._d[it.name] = TensorInfo(it.name, it.dtype, tuple(it.shape), pos, pos + it.nbytes)
                pos += it.nbytes
            self._order = None
        return self._d

    def __getitem__(self, k: str) -> TensorInfo:
        return self._all()[k]

    def __iter__(self):
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())
