"""``torch.save`` files read without torch: tensors counted before any is built, and the
standard form copied without building them.

``torch.load(weights_only=True)`` builds every tensor before anyone can count them: a 17 MB
``.pt`` of 80,000 empty tensors took 15 s and 382 MB, and a file over the tensor bound was
refused only after it had been built. :func:`scan` reads the pickle first with
``pickle_scan.Scanner`` (nothing runs), counting every tensor, so a file over the bound is
refused before torch touches it. For the form ``torch.save`` writes since PyTorch 1.6 (a zip
of ``data.pkl`` and one stored record per storage, little-endian) holding a state dict of
contiguous tensors, it also says where each tensor's bytes are in the file: ``convert`` then
copies them file to file like safetensors data. Anything else (the legacy format, big-endian
data, a compressed record, a non-contiguous or quantized tensor, a tensor subclass) is left to
``torch.load(weights_only=True)`` after the count.
"""

from __future__ import annotations

import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import CheckpointError
from .pickle_scan import BYTES, MAX_GLOBAL_NAME, NameTooLong, Reader, Refused, Scanner, Storage, TensorRef, TooMany

__all__ = ["scan", "Scan", "ZipTensor", "MAX_PICKLE_BYTES"]

MAX_PICKLE_BYTES = 1 << 30  # the pickle of a torch.save file (500,000 tensors take ~100 MB of it)
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch's legacy (pre-zip) format starts with this pickled int


@dataclass(slots=True)
class ZipTensor:
    """One tensor of a standard ``torch.save`` zip: its bytes are ``nbytes`` at ``file_offset``."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file_offset: int


@dataclass
class Scan:
    """What :func:`scan` found: ``tensors`` (name -> :class:`ZipTensor`, in the file's order)
    when the whole file takes the fast path, else None (``torch.load`` reads it)."""

    count: int
    tensors: dict[str, ZipTensor] | None


def _too_many(path: Path, max_tensors: int) -> CheckpointError:
    from .safetensors_file import MAX_TENSORS

    if max_tensors < MAX_TENSORS:
        return CheckpointError(path, f"with the other shards, the checkpoint holds more than {MAX_TENSORS:,} tensors "
                                     "(the largest open models have under 200,000); refused as absurd (counted in "
                                     "its pickle, before any was built)")
    return CheckpointError(path, f"holds more than {max_tensors:,} tensors (the largest open models have under "
                                 "200,000); refused as absurd (counted in its pickle, before any was built)")


def _load(scanner: Scanner, path: Path) -> Any:
    """Run the scanner; None where it stopped (torch then decides: a refused global, a corrupt pickle)."""
    try:
        return scanner.load()
    except TooMany:
        raise _too_many(path, scanner.max_tensors) from None
    except NameTooLong:
        raise CheckpointError(path, f"refused to load: its pickle names a global of more than {MAX_GLOBAL_NAME:,} "
                                    "characters, which is not a tensor or plain container (torch.load(weights_only="
                                    "True) allows none such); nothing in it was executed") from None
    except (Refused, ValueError, TypeError, IndexError, KeyError, LookupError, struct.error, RecursionError):
        return None


def scan(fd: int, path: Path, max_tensors: int) -> Scan:
    """Count the tensors of the ``torch.save`` file open at ``fd`` and, for the standard zip
    form of a state dict of contiguous tensors, locate each one's bytes.

    Raises:
        CheckpointError: more than ``max_tensors`` tensors (counted as the pickle is read,
            before any is built), a pickle past :data:`MAX_PICKLE_BYTES`, or a storage
            record of another size than the pickle says.
    """
    head = os.pread(fd, 4, 0)
    f = open(fd, "rb", closefd=False)  # data is read by offset elsewhere; this object owns the position for the scan
    try:
        if head == b"PK\x03\x04":
            return _scan_zip(f, fd, path, max_tensors)
        return Scan(_scan_legacy(f, path, max_tensors), None)  # torch reads anything else as the legacy form
    finally:
        f.close()


def _scan_legacy(f: Any, path: Path, max_tensors: int) -> int:
    """The legacy format: three small pickles (magic number, protocol, system info), then the
    one that holds the tensors, then the storages: counted, then left to torch."""
    reader = Reader(f, MAX_PICKLE_BYTES)
    count = 0
    for k in range(4):
        scanner = Scanner(reader, max_tensors - count, legacy=True)
        result = _load(scanner, path)
        count += scanner.count
        if result is None or (k == 0 and result != _LEGACY_MAGIC):
            break
        if k == 3 and isinstance(result, dict) and len(result) > max_tensors:
            raise _too_many(path, max_tensors)
    return count


def _records(f: Any) -> int | None:
    """The number of records the zip's end of central directory declares (read before the
    directory itself is parsed), or None where it cannot be found."""
    size = f.seek(0, os.SEEK_END)
    tail_len = min(size, 65535 + 22 + 20)
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    i = tail.rfind(b"PK\x05\x06")
    if i < 0 or i + 22 > len(tail):
        return None
    n = struct.unpack_from("<H", tail, i + 10)[0]
    if n == 0xFFFF and i >= 20 and tail[i - 20:i - 16] == b"PK\x06\x07":  # zip64: the count is in the zip64 record
        (off,) = struct.unpack_from("<Q", tail, i - 20 + 8)
        f.seek(off)
        rec = f.read(56)
        if len(rec) == 56 and rec[:4] == b"PK\x06\x06":
            n = struct.unpack_from("<Q", rec, 32)[0]
    return n


def _scan_zip(f: Any, fd: int, path: Path, max_tensors: int) -> Scan:
    n_records = _records(f)
    if n_records is not None and n_records > max_tensors + 64:  # one record per storage, a few of torch's own
        raise CheckpointError(path, f"is a zip of {n_records:,} records; a torch.save file of at most "
                                    f"{max_tensors:,} tensors has at most {max_tensors + 64:,}; refused as absurd")
    try:
        z = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error):
        return Scan(0, None)
    with z:
        infos = z.infolist()
        if not infos:
            return Scan(0, None)
        prefix = infos[0].filename.split("/", 1)[0] + "/"
        names = {i.filename: i for i in infos}
        pkl = names.get(prefix + "data.pkl")
        if pkl is None:
            return Scan(0, None)
        if pkl.file_size > MAX_PICKLE_BYTES:
            raise CheckpointError(path, f"its pickle (data.pkl) is {pkl.file_size:,} bytes, over the "
                                        f"{MAX_PICKLE_BYTES:,} byte limit; refused as absurd (memory)")
        try:
            stream = z.open(pkl)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError):
            return Scan(0, None)
        with stream:
            scanner = Scanner(Reader(stream, pkl.file_size), max_tensors)
            try:
                result = _load(scanner, path)
            except (zipfile.BadZipFile, OSError, EOFError):
                return Scan(scanner.count, None)
        if not isinstance(result, dict):
            return Scan(scanner.count, None)
        if len(result) > max_tensors:
            raise _too_many(path, max_tensors)
        fast = (scanner.standard and len(names) == len(infos) and all(i.filename.startswith(prefix) for i in infos)
                and prefix + "constants.pkl" not in names and _little_endian(z, names.get(prefix + "byteorder")))
        _check_records(path, names, prefix, scanner.storages)
        if not fast:
            return Scan(scanner.count, None)
        return Scan(scanner.count, _locate(fd, path, result, names, prefix, scanner.storages))


def _little_endian(z: zipfile.ZipFile, info: zipfile.ZipInfo | None) -> bool:
    if info is None:  # torch reads a file without the record as little-endian
        return True
    if info.file_size > 16:
        return False
    try:
        return z.read(info) == b"little"
    except Exception:
        return False


def _check_records(path: Path, names: dict[str, zipfile.ZipInfo], prefix: str, storages: dict[str, Storage]) -> None:
    """A storage whose record is not the size the pickle says is refused, as ``torch.load``
    refuses it (with ``mmap=True`` it read past a short record, into the zip's own headers,
    and published those bytes as weights)."""
    for s in storages.values():
        info = names.get(f"{prefix}data/{s.key}")
        if info is None:
            raise CheckpointError(path, f"its pickle refers to storage {s.key!r}, which the file does not hold "
                                        "(truncated or corrupt)")
        if s.dtype is not None and info.file_size != s.nbytes:
            raise CheckpointError(path, f"storage {s.key!r} is {info.file_size:,} bytes in the file but its pickle "
                                        f"says {s.nbytes:,} (corrupt or tampered: torch.load refuses it, and with "
                                        "mmap=True reads past the record into the zip's own bytes)")


def _contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """torch's ``is_contiguous``: C order, a dimension of size 1 taking any stride."""
    expected = 1
    for size, st in zip(reversed(shape), reversed(stride)):
        if size != 1 and st != expected:
            return False
        expected *= size
    return True


def _ints(v: Any) -> bool:
    return type(v) is tuple and all(type(x) is int and 0 <= x < 2**63 for x in v)


def _locate(fd: int, path: Path, result: dict, names: dict[str, zipfile.ZipInfo], prefix: str,
            storages: dict[str, Storage]) -> dict[str, ZipTensor] | None:
    """Where each tensor's bytes are; None where one is not a plain contiguous view of a
    stored record inside the file (torch then reads the file)."""
    size = os.fstat(fd).st_size
    starts: dict[str, int] = {}
    for s in storages.values():
        info = names[f"{prefix}data/{s.key}"]
        if s.nbytes == 0:  # nothing to read (where it is does not matter)
            starts[s.key] = 0
            continue
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            return None
        local = os.pread(fd, 30, info.header_offset)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            return None
        n, m = struct.unpack_from("<HH", local, 26)
        start = info.header_offset + 30 + n + m
        if start + info.file_size > size:
            return None
        starts[s.key] = start
    out: dict[str, ZipTensor] = {}
    for name, t in result.items():
        if type(name) is not str or type(t) is not TensorRef or t.dtype is None:
            return None
        shape, stride, offset = t.shape, t.stride, t.offset
        if not (_ints(shape) and _ints(stride) and len(stride) == len(shape) and type(offset) is int
                and 0 <= offset < 2**63):
            return None
        numel = 1
        for d in shape:
            numel *= d
        item = BYTES[t.dtype]
        nbytes = numel * item
        if numel and not _contiguous(shape, stride):
            return None
        if numel and (offset + numel) * item > t.storage.nbytes:
            return None  # torch refuses it (out of bounds for the storage)
        out[name] = ZipTensor(t.dtype, shape, nbytes, starts[t.storage.key] + offset * item if numel else 0)
    return out
