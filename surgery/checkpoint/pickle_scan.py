"""A ``torch.save`` file read without torch and without running it.

``torch.load(weights_only=True)`` builds every tensor before anyone can count them: a 17 MB
``.pt`` of 80,000 empty tensors took 15 s and 382 MB, and a file over the tensor bound was
refused only after it had been built. :func:`scan` reads the file's pickle first, with
Python's C unpickler and a ``find_class`` that hands out only the inert stand-ins of this
module (nothing of the file runs, no torch import; a global outside the list torch's
weights-only unpickler allows stops the scan, and torch then refuses it by name). Every
tensor the pickle builds is counted as it is built, so a file over the bound is refused
before torch touches it, at the cost of the pickle's own size.

For the form ``torch.save`` writes since PyTorch 1.6 (a zip of ``data.pkl`` and one stored
record per storage, little-endian) holding a state dict of contiguous tensors, the scan
also says where each tensor's bytes are in the file: ``convert`` then copies them file to
file like safetensors data (no tensor is ever built). Anything else (the legacy format,
big-endian data, a compressed record, a non-contiguous or quantized tensor, a tensor
subclass) is left to ``torch.load(weights_only=True)`` after the count.
"""

from __future__ import annotations

import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import CheckpointError

__all__ = ["scan", "Scan", "ZipTensor", "MAX_PICKLE_BYTES", "MAX_GLOBAL_NAME"]

MAX_PICKLE_BYTES = 1 << 30  # the pickle of a torch.save file (500,000 tensors take ~100 MB of it)
MAX_GLOBAL_NAME = 1024  # characters of a global's module or name (torch's own are under 60)
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch's legacy (pre-zip) format starts with this pickled int

# storage class name -> safetensors dtype of its elements (torch.storage._dtype_to_storage_type_map)
_STORAGE_DTYPES = {"DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16", "LongStorage": "I64",
                   "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8", "ByteStorage": "U8",
                   "BoolStorage": "BOOL", "BFloat16Storage": "BF16", "ComplexFloatStorage": "C64"}
# torch dtype global (a _rebuild_tensor_v3 argument) -> safetensors dtype (surgery.checkpoint.safetensors_file.torch_to_st)
_TORCH_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                 "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
                 "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "float8_e4m3fnuz": "F8_E4M3FNUZ",
                 "float8_e5m2fnuz": "F8_E5M2FNUZ", "float8_e8m0fnu": "F8_E8M0", "complex64": "C64",
                 "uint16": "U16", "uint32": "U32", "uint64": "U64"}
_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
          "F8_E4M3": 1, "F8_E5M2": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1, "F8_E8M0": 1, "C64": 8, "U16": 2,
          "U32": 4, "U64": 8}

# what torch's weights-only unpickler allows (torch/_weights_only_unpickler.py, _get_allowed_globals)
_TORCH_DTYPE_NAMES = frozenset(
    ["bfloat16", "bool", "complex128", "complex64", "float16", "float32", "float64", "int16", "int32", "int64",
     "int8", "qint32", "qint8", "quint2x4", "quint4x2", "quint8", "uint8", "bits16", "bits1x8", "bits2x4",
     "bits4x2", "bits8", "complex32", "float4_e2m1fn_x2", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2",
     "float8_e5m2fnuz", "float8_e8m0fnu", "uint16", "uint32", "uint64"]
    + [f"uint{i}" for i in range(1, 8)] + [f"int{i}" for i in range(1, 8)])
_STORAGE_NAMES = frozenset(["BFloat16", "Bool", "Byte", "Char", "ComplexDouble", "ComplexFloat", "Double", "Float",
                            "Half", "Int", "Long", "Short"])
_TENSOR_NAMES = frozenset(f"{n}Tensor" for n in ["BFloat16", "Bool", "Byte", "Char", "Double", "Float", "Half", "Int",
                                                  "Long", "Short"])
_QSCHEMES = frozenset(["per_tensor_affine", "per_tensor_symmetric", "per_channel_affine", "per_channel_symmetric",
                       "per_channel_affine_float_qparams"])
# the leaf tensor builders (wrappers such as _rebuild_parameter are not counted: their tensor is)
_COUNTED = frozenset(["_rebuild_tensor", "_rebuild_qtensor", "_rebuild_sparse_tensor", "_rebuild_meta_tensor_no_storage",
                      "_rebuild_nested_tensor", "_rebuild_wrapper_subclass", "_rebuild_device_tensor_from_numpy"])
_WRAPPERS = frozenset(["_rebuild_parameter_with_state", "_rebuild_device_tensor_from_cpu_tensor"])
_OTHER_GLOBALS = frozenset(["torch.serialization._get_layout", "torch.Size", "torch.device", "_codecs.encode",
                            "builtins.bytearray", "builtins.set", "builtins.complex"])


class _TooMany(Exception):
    pass


class _NameTooLong(Exception):
    """A global's module or name past :data:`MAX_GLOBAL_NAME` characters: refused here, not
    handed to torch (whose error-message regular expression takes time quadratic in it: a
    5 MB name kept ``torch.load`` busy for hours)."""


class _Refused(Exception):
    """What torch's weights-only unpickler refuses (a global it does not allow, an opcode it
    does not know, a corrupt pickle): the scan stops there and ``torch.load`` says why."""


class _Opaque:
    """An allowed object the fast path does not read (a Size, a device, a quantized tensor ...)."""

    __slots__ = ()


_OPAQUE = _Opaque()


class _ODict(dict):
    """``collections.OrderedDict`` / ``Counter`` (a state dict's own type)."""

    __slots__ = ()


@dataclass(frozen=True)
class _StorageType:
    name: str  # "FloatStorage", "UntypedStorage" ...


@dataclass(frozen=True)
class _DType:
    name: str  # "float8_e4m3fn" ...


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: str | None  # safetensors name; None: a dtype the fast path does not read
    nbytes: int


class _TensorRef:
    """A ``_rebuild_tensor_v2``/``v3`` call: a strided view of one storage."""

    __slots__ = ("storage", "dtype", "offset", "shape", "stride")

    def __init__(self, storage: _Storage, dtype: str | None, offset: Any, shape: Any, stride: Any):
        self.storage, self.dtype, self.offset, self.shape, self.stride = storage, dtype, offset, shape, stride


class _Global:
    """A global the pickle named, standing in for the torch object: what calling it does."""

    __slots__ = ("kind", "name")

    def __init__(self, kind: str, name: str):
        self.kind, self.name = kind, name


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


_MARK = object()


class _Scanner:
    """torch's weights-only unpickler (the same opcodes, globals and checks), with inert
    stand-ins for what it would build: it counts and describes tensors and builds none.
    Written over a bytes buffer, with a dict memo (the C unpickler grows its memo array to
    the largest index a pickle names: ten bytes of pickle can make it take gigabytes)."""

    def __init__(self, reader: "_Reader", max_tensors: int, legacy: bool = False):
        self.r, self.max_tensors, self.legacy = reader, max_tensors, legacy
        self.count = 0
        self.standard = not legacy
        self.storages: dict[str, _Storage] = {}

    def _counted(self) -> None:
        self.count += 1
        if self.count > self.max_tensors:
            raise _TooMany

    # -- globals ---------------------------------------------------------------------------
    def _global(self, module: str, name: str) -> Any:
        if module == "__builtin__":  # torch's Python 2 mapping, as far as it reaches allowed names
            module = "builtins"
        full = f"{module}.{name}"
        if full in ("collections.OrderedDict", "collections.Counter"):
            return _Global("dict", full)
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter"):
            return _Global(name, full)
        if (module == "torch._utils" and name in _COUNTED) or full == "torch._tensor._rebuild_from_type_v2":
            return _Global("tensor", full)
        if module == "torch._utils" and name in _WRAPPERS:
            return _Global("opaque", full)
        if full in ("torch.storage.UntypedStorage", "torch.storage.TypedStorage") or (
                module in ("torch", "torch.cuda") and name.endswith("Storage") and name[:-7] in _STORAGE_NAMES) or (
                module == "torch" and name.startswith("Q") and name in (
                "QInt32Storage", "QInt8Storage", "QUInt2x4Storage", "QUInt4x2Storage", "QUInt8Storage")):
            return _StorageType(name)
        if module == "torch" and name in _TORCH_DTYPE_NAMES:
            return _DType(name)
        if full in ("torch.Tensor", "torch.nn.parameter.Parameter") or (
                module in ("torch", "torch.cuda", "torch.sparse", "torch.cuda.sparse") and name in _TENSOR_NAMES):
            return _Global("tensor", full)
        if full in _OTHER_GLOBALS or (module == "torch" and name in _QSCHEMES):
            return _Global("opaque", full)
        raise _Refused(f"global {full}")

    def _call(self, f: Any, args: Any) -> Any:
        if type(f) is not _Global or type(args) is not tuple:
            raise _Refused("a call of something not allowed")
        kind = f.kind
        if kind == "_rebuild_tensor_v2" or kind == "_rebuild_tensor_v3":
            return self._rebuild(args, kind == "_rebuild_tensor_v3")
        if kind == "_rebuild_parameter":
            self.standard = self.standard and len(args) == 3
            return args[0] if args else _OPAQUE
        if kind == "dict":
            self.standard = self.standard and not args and f.name == "collections.OrderedDict"
            return _ODict()
        if kind == "tensor":
            self._counted()
        self.standard = False
        return _OPAQUE

    def _rebuild(self, args: tuple, v3: bool) -> Any:
        self._counted()
        n_fixed = 7 if v3 else 6
        if len(args) < n_fixed or len(args) > n_fixed + 1 or type(args[0]) is not _Storage:
            self.standard = False
            return _OPAQUE
        storage, offset, shape, stride = args[:4]
        dtype = storage.dtype
        if v3:  # an untyped (byte) storage and the tensor's dtype
            dtype = _TORCH_DTYPES.get(args[6].name) if type(args[6]) is _DType and storage.dtype == "U8" else None
        if len(args) > n_fixed and args[n_fixed]:  # tensor metadata (the conj or neg bit): torch applies it
            dtype = None
        if dtype is None:
            self.standard = False
        return _TensorRef(storage, dtype, offset, shape, stride)

    def _persistent(self, pid: Any) -> Any:
        if type(pid) is not tuple and type(pid) is not int:
            raise _Refused("a persistent id that is not a tuple")
        if type(pid) is tuple and pid and pid[0] not in ("storage", b"storage"):
            raise _Refused("a persistent id that is not a storage")
        if self.legacy:  # ('storage', type, root key, location, numel, view metadata)
            return _OPAQUE
        if type(pid) is not tuple or len(pid) != 5:
            raise _Refused("a storage id of the wrong length")
        st, key, numel = pid[1], pid[2], pid[4]
        if type(st) is not _StorageType or type(key) is not str or type(numel) is not int or numel < 0:
            self.standard = False
            return _OPAQUE
        dtype = "U8" if st.name == "UntypedStorage" else _STORAGE_DTYPES.get(st.name)
        storage = _Storage(key, dtype, numel * _BYTES[dtype] if dtype else 0)
        known = self.storages.setdefault(key, storage)
        if known != storage or dtype is None:  # torch keeps the first; another view of it is not read here
            self.standard = False
        return known

    # -- the opcodes torch's weights-only unpickler knows ------------------------------------
    def load(self) -> Any:
        r = self.r
        stack: list[Any] = []
        metastack: list[list[Any]] = []
        memo = _Memo()
        put, get = memo.put, memo.get
        seq = memo.items  # the in-order part of the memo, inlined for the one-byte opcodes
        seq_append = seq.append
        push = stack.append
        unpack_from = struct.unpack_from
        buf, i = r.buf, r.pos
        end = len(buf) - 9
        while True:
            if i > end:
                buf, i = r.fill(i, 9)
                end = len(buf) - 9
            op = buf[i]
            i += 1
            if op == 0x71:  # BINPUT
                k = buf[i]
                i += 1
                if k == len(seq):
                    seq_append(stack[-1])
                else:
                    put(k, stack[-1])
            elif op == 0x68:  # BINGET
                k = buf[i]
                i += 1
                push(seq[k] if k < len(seq) else get(k))
            elif op == 0x72:  # LONG_BINPUT
                (k,) = unpack_from("<I", buf, i)
                i += 4
                if k == len(seq):
                    seq_append(stack[-1])
                else:
                    put(k, stack[-1])
            elif op == 0x6A:  # LONG_BINGET
                (k,) = unpack_from("<I", buf, i)
                i += 4
                push(seq[k] if k < len(seq) else get(k))
            elif op == 0x4B:  # BININT1
                push(buf[i])
                i += 1
            elif op == 0x28:  # MARK
                metastack.append(stack)
                stack = []
                push = stack.append
            elif op == 0x85:  # TUPLE1
                stack[-1] = (stack[-1],)
            elif op == 0x74:  # TUPLE
                items = stack
                stack = metastack.pop()
                push = stack.append
                push(tuple(items))
            elif op == 0x58:  # BINUNICODE
                (n,) = unpack_from("<I", buf, i)
                i += 4
                if i + n > len(buf):
                    buf, i = r.fill(i, n)
                    end = len(buf) - 9
                push(str(buf[i:i + n], "utf-8", "surrogatepass"))
                i += n
            elif op == 0x52:  # REDUCE
                args = stack.pop()
                stack[-1] = self._call(stack[-1], args)
            elif op == 0x51:  # BINPERSID
                push(self._persistent(stack.pop()))
            elif op == 0x29:  # EMPTY_TUPLE
                push(())
            elif op == 0x89:  # NEWFALSE
                push(False)
            elif op == 0x88:  # NEWTRUE
                push(True)
            elif op == 0x86:  # TUPLE2
                stack[-2:] = [(stack[-2], stack[-1])]
            elif op == 0x87:  # TUPLE3
                stack[-3:] = [(stack[-3], stack[-2], stack[-1])]
            elif op == 0x4D:  # BININT2
                push(unpack_from("<H", buf, i)[0])
                i += 2
            elif op == 0x4A:  # BININT
                push(unpack_from("<i", buf, i)[0])
                i += 4
            elif op == 0x75:  # SETITEMS
                items = stack
                stack = metastack.pop()
                push = stack.append
                target = stack[-1]
                if type(target) is not dict and type(target) is not _ODict:
                    raise _Refused("SETITEMS on something that is not a dict")
                for j in range(0, len(items) - 1, 2):
                    target[items[j]] = items[j + 1]
                if len(items) % 2:
                    raise _Refused("SETITEMS with an odd number of items")
            elif op == 0x73:  # SETITEM
                v, k = stack.pop(), stack.pop()
                if type(stack[-1]) is not dict and type(stack[-1]) is not _ODict:
                    raise _Refused("SETITEM on something that is not a dict")
                stack[-1][k] = v
            elif op == 0x7D:  # EMPTY_DICT
                push({})
            elif op == 0x5D:  # EMPTY_LIST
                push([])
            elif op == 0x8F:  # EMPTY_SET
                push(set())
            elif op == 0x4E:  # NONE
                push(None)
            elif op == 0x61:  # APPEND
                item = stack.pop()
                if type(stack[-1]) is not list:
                    raise _Refused("APPEND to something that is not a list")
                stack[-1].append(item)
            elif op == 0x65:  # APPENDS
                items = stack
                stack = metastack.pop()
                push = stack.append
                if type(stack[-1]) is not list:
                    raise _Refused("APPENDS to something that is not a list")
                stack[-1].extend(items)
            elif op == 0x47:  # BINFLOAT
                push(unpack_from(">d", buf, i)[0])
                i += 8
            elif op == 0x55:  # SHORT_BINSTRING
                n = buf[i]
                i += 1
                if i + n > len(buf):
                    buf, i = r.fill(i, n)
                    end = len(buf) - 9
                push(bytes(buf[i:i + n]))
                i += n
            elif op == 0x8A:  # LONG1
                n = buf[i]
                i += 1
                if i + n > len(buf):
                    buf, i = r.fill(i, n)
                    end = len(buf) - 9
                push(int.from_bytes(buf[i:i + n], "little", signed=True))
                i += n
            elif op == 0x63:  # GLOBAL
                r.pos = i
                module, name = r.line(), r.line()
                buf, i = r.buf, r.pos
                end = len(buf) - 9
                push(self._global(module, name))
            elif op == 0x81:  # NEWOBJ
                args = stack.pop()
                cls = stack.pop()
                if type(cls) is not _Global or cls.kind not in ("tensor", "dict", "opaque"):
                    raise _Refused("NEWOBJ of something not allowed")
                push(self._call(cls, args if type(args) is tuple else (args,)))
            elif op == 0x62:  # BUILD
                stack.pop()
                inst = stack[-1]
                if type(inst) is _ODict:
                    pass  # torch sets the state as attributes (a state dict's _metadata)
                elif type(inst) in (_TensorRef, _Opaque):
                    self.standard = False
                else:
                    raise _Refused("BUILD of something not allowed")
            elif op == 0x80:  # PROTO
                i += 1
            elif op == 0x2E:  # STOP
                r.pos = i
                return stack.pop()
            else:
                raise _Refused(f"opcode {op:#x}")


class _Memo:
    """The pickle's memo: a list while indices come in order (as every pickler writes them;
    8 bytes an entry), a dict for the rest (never sized by an index the pickle names)."""

    __slots__ = ("items", "extra")

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.extra: dict[int, Any] = {}

    def put(self, k: int, v: Any) -> None:
        items = self.items
        if k == len(items):
            items.append(v)
        elif k < len(items):
            items[k] = v
        else:
            self.extra[k] = v

    def get(self, k: int) -> Any:
        items = self.items
        if k < len(items):
            return items[k]
        return self.extra[k]


class _Reader:
    """Bytes of a pickle, read ahead from a file as the scan needs them."""

    def __init__(self, f: Any, limit: int):
        self.f, self.limit = f, limit
        self.buf = b""
        self.pos = 0
        self.consumed = 0  # bytes of the file before buf

    def fill(self, i: int, n: int) -> tuple[bytes, int]:
        """Make ``n`` bytes from position ``i`` available (fewer at the end of the input:
        an opcode cut short then fails to read, which stops the scan)."""
        buf = self.buf
        self.consumed += i
        rest = buf[i:]
        want = max(n - len(rest), 1 << 20)
        if self.consumed + len(rest) + want > self.limit:
            want = max(self.limit - self.consumed - len(rest), 0)
        more = self.f.read(want) if want else b""
        if len(rest) + len(more) < n and n > 9:
            raise _Refused("a pickle cut short")
        self.buf = rest + more + (b"\0" * 9 if len(rest) + len(more) < 9 else b"")  # an opcode at the end reads zeros
        self.pos = 0
        return self.buf, 0

    def line(self) -> str:
        j = self.buf.find(b"\n", self.pos, self.pos + MAX_GLOBAL_NAME + 1)
        while j < 0:
            if len(self.buf) - self.pos > MAX_GLOBAL_NAME:
                raise _NameTooLong
            self.fill(self.pos, len(self.buf) - self.pos + 1)
            j = self.buf.find(b"\n", self.pos, self.pos + MAX_GLOBAL_NAME + 1)
        text = self.buf[self.pos:j].decode("utf-8")
        self.pos = j + 1
        return text


def _too_many(path: Path, max_tensors: int) -> CheckpointError:
    from .safetensors_file import MAX_TENSORS

    if max_tensors < MAX_TENSORS:
        return CheckpointError(path, f"with the other shards, the checkpoint holds more than {MAX_TENSORS:,} tensors "
                                     "(the largest open models have under 200,000); refused as absurd (counted in "
                                     "its pickle, before any was built)")
    return CheckpointError(path, f"holds more than {max_tensors:,} tensors (the largest open models have under "
                                 "200,000); refused as absurd (counted in its pickle, before any was built)")


def _load(scanner: _Scanner, path: Path) -> Any:
    """Run the scanner; None where it stopped (torch then decides: a refused global, a corrupt pickle)."""
    try:
        return scanner.load()
    except _TooMany:
        raise _too_many(path, scanner.max_tensors) from None
    except _NameTooLong:
        raise CheckpointError(path, f"refused to load: its pickle names a global of more than {MAX_GLOBAL_NAME:,} "
                                    "characters, which is not a tensor or plain container (torch.load(weights_only="
                                    "True) allows none such); nothing in it was executed") from None
    except (_Refused, ValueError, TypeError, IndexError, KeyError, LookupError, struct.error, RecursionError):
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
    reader = _Reader(f, MAX_PICKLE_BYTES)
    count = 0
    for k in range(4):
        scanner = _Scanner(reader, max_tensors - count, legacy=True)
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
            scanner = _Scanner(_Reader(stream, pkl.file_size), max_tensors)
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


def _check_records(path: Path, names: dict[str, zipfile.ZipInfo], prefix: str, storages: dict[str, _Storage]) -> None:
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
            storages: dict[str, _Storage]) -> dict[str, ZipTensor] | None:
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
        if type(name) is not str or type(t) is not _TensorRef or t.dtype is None:
            return None
        shape, stride, offset = t.shape, t.stride, t.offset
        if not (_ints(shape) and _ints(stride) and len(stride) == len(shape) and type(offset) is int
                and 0 <= offset < 2**63):
            return None
        numel = 1
        for d in shape:
            numel *= d
        item = _BYTES[t.dtype]
        nbytes = numel * item
        if numel and not _contiguous(shape, stride):
            return None
        if numel and (offset + numel) * item > t.storage.nbytes:
            return None  # torch refuses it (out of bounds for the storage)
        out[name] = ZipTensor(t.dtype, shape, nbytes, starts[t.storage.key] + offset * item if numel else 0)
    return out
