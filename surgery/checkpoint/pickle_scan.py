"""torch's weights-only unpickler, run over inert stand-ins: a pickle read without running it.

``Scanner`` takes the opcodes and globals ``torch.load(weights_only=True)`` takes (torch/
_weights_only_unpickler.py) and hands out nothing but the stand-ins of this module: nothing of
the pickle runs and torch is not imported. It counts every tensor the pickle would build as it
is described (``TooMany`` past the bound, before anything is built) and describes the plain ones
(``TensorRef``: a strided view of a storage) for ``torch_file``, which locates their bytes.
Written over a bytes buffer with a dict memo: Python's C unpickler sizes its memo array by the
largest index a pickle names, so ten bytes of pickle could make it take gigabytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

__all__ = ["Scanner", "Reader", "TooMany", "NameTooLong", "Refused", "Storage", "TensorRef", "BYTES",
           "MAX_GLOBAL_NAME"]

MAX_GLOBAL_NAME = 1024  # characters of a global's module or name (torch's own are under 60)

# storage class name -> safetensors dtype of its elements (torch.storage._dtype_to_storage_type_map)
_STORAGE_DTYPES = {"DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16", "LongStorage": "I64",
                   "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8", "ByteStorage": "U8",
                   "BoolStorage": "BOOL", "BFloat16Storage": "BF16", "ComplexFloatStorage": "C64"}
# torch dtype global (a _rebuild_tensor_v3 argument) -> safetensors dtype (as safetensors_file.torch_to_st)
_TORCH_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                 "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
                 "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "float8_e4m3fnuz": "F8_E4M3FNUZ",
                 "float8_e5m2fnuz": "F8_E5M2FNUZ", "float8_e8m0fnu": "F8_E8M0", "complex64": "C64",
                 "uint16": "U16", "uint32": "U32", "uint64": "U64"}
BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
         "F8_E4M3": 1, "F8_E5M2": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1, "F8_E8M0": 1, "C64": 8, "U16": 2,
         "U32": 4, "U64": 8}  # bytes per element of each dtype the fast path reads

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
_COUNTED = frozenset(["_rebuild_tensor", "_rebuild_qtensor", "_rebuild_sparse_tensor",
                      "_rebuild_meta_tensor_no_storage", "_rebuild_nested_tensor", "_rebuild_wrapper_subclass", "_rebuild_device_tensor_from_numpy"])
_WRAPPERS = frozenset(["_rebuild_parameter_with_state", "_rebuild_device_tensor_from_cpu_tensor"])
_OTHER_GLOBALS = frozenset(["torch.serialization._get_layout", "torch.Size", "torch.device", "_codecs.encode",
                            "builtins.bytearray", "builtins.set", "builtins.complex"])


class TooMany(Exception):
    pass


class NameTooLong(Exception):
    """A global's module or name past :data:`MAX_GLOBAL_NAME` characters: refused here, not
    handed to torch (whose error-message regular expression takes time quadratic in it: a
    5 MB name kept ``torch.load`` busy for hours)."""


class Refused(Exception):
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
class StorageType:
    name: str  # "FloatStorage", "UntypedStorage" ...


@dataclass(frozen=True)
class DType:
    name: str  # "float8_e4m3fn" ...


@dataclass(frozen=True)
class Storage:
    key: str
    dtype: str | None  # safetensors name; None: a dtype the fast path does not read
    nbytes: int


class TensorRef:
    """A ``_rebuild_tensor_v2``/``v3`` call: a strided view of one storage."""

    __slots__ = ("storage", "dtype", "offset", "shape", "stride")

    def __init__(self, storage: Storage, dtype: str | None, offset: Any, shape: Any, stride: Any):
        self.storage, self.dtype, self.offset, self.shape, self.stride = storage, dtype, offset, shape, stride


class _Global:
    """A global the pickle named, standing in for the torch object: what calling it does."""

    __slots__ = ("kind", "name")

    def __init__(self, kind: str, name: str):
        self.kind, self.name = kind, name


class Scanner:
    """torch's weights-only unpickler (the same opcodes, globals and checks), with inert
    stand-ins for what it would build: it counts and describes tensors and builds none.
    Written over a bytes buffer, with a dict memo (the C unpickler grows its memo array to
    the largest index a pickle names: ten bytes of pickle can make it take gigabytes)."""

    def __init__(self, reader: "Reader", max_tensors: int, legacy: bool = False):
        self.r, self.max_tensors, self.legacy = reader, max_tensors, legacy
        self.count = 0
        self.standard = not legacy
        self.storages: dict[str, Storage] = {}

    def _counted(self) -> None:
        self.count += 1
        if self.count > self.max_tensors:
            raise TooMany

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
            return StorageType(name)
        if module == "torch" and name in _TORCH_DTYPE_NAMES:
            return DType(name)
        if full in ("torch.Tensor", "torch.nn.parameter.Parameter") or (
                module in ("torch", "torch.cuda", "torch.sparse", "torch.cuda.sparse") and name in _TENSOR_NAMES):
            return _Global("tensor", full)
        if full in _OTHER_GLOBALS or (module == "torch" and name in _QSCHEMES):
            return _Global("opaque", full)
        raise Refused(f"global {full}")

    def _call(self, f: Any, args: Any) -> Any:
        if type(f) is not _Global or type(args) is not tuple:
            raise Refused("a call of something not allowed")
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
        if len(args) < n_fixed or len(args) > n_fixed + 1 or type(args[0]) is not Storage:
            self.standard = False
            return _OPAQUE
        storage, offset, shape, stride = args[:4]
        dtype = storage.dtype
        if v3:  # an untyped (byte) storage and the tensor's dtype
            dtype = _TORCH_DTYPES.get(args[6].name) if type(args[6]) is DType and storage.dtype == "U8" else None
        if len(args) > n_fixed and args[n_fixed]:  # tensor metadata (the conj or neg bit): torch applies it
            dtype = None
        if dtype is None:
            self.standard = False
        return TensorRef(storage, dtype, offset, shape, stride)

    def _persistent(self, pid: Any) -> Any:
        if type(pid) is not tuple and type(pid) is not int:
            raise Refused("a persistent id that is not a tuple")
        if type(pid) is tuple and pid and pid[0] not in ("storage", b"storage"):
            raise Refused("a persistent id that is not a storage")
        if self.legacy:  # ('storage', type, root key, location, numel, view metadata)
            return _OPAQUE
        if type(pid) is not tuple or len(pid) != 5:
            raise Refused("a storage id of the wrong length")
        st, key, numel = pid[1], pid[2], pid[4]
        if type(st) is not StorageType or type(key) is not str or type(numel) is not int or numel < 0:
            self.standard = False
            return _OPAQUE
        dtype = "U8" if st.name == "UntypedStorage" else _STORAGE_DTYPES.get(st.name)
        storage = Storage(key, dtype, numel * BYTES[dtype] if dtype else 0)
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
            # the memo opcodes are most of a torch pickle: written out here, not as calls
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
                    raise Refused("SETITEMS on something that is not a dict")
                for j in range(0, len(items) - 1, 2):
                    target[items[j]] = items[j + 1]
                if len(items) % 2:
                    raise Refused("SETITEMS with an odd number of items")
            elif op == 0x73:  # SETITEM
                v, k = stack.pop(), stack.pop()
                if type(stack[-1]) is not dict and type(stack[-1]) is not _ODict:
                    raise Refused("SETITEM on something that is not a dict")
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
                    raise Refused("APPEND to something that is not a list")
                stack[-1].append(item)
            elif op == 0x65:  # APPENDS
                items = stack
                stack = metastack.pop()
                push = stack.append
                if type(stack[-1]) is not list:
                    raise Refused("APPENDS to something that is not a list")
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
                    raise Refused("NEWOBJ of something not allowed")
                push(self._call(cls, args if type(args) is tuple else (args,)))
            elif op == 0x62:  # BUILD
                stack.pop()
                inst = stack[-1]
                if type(inst) is _ODict:
                    pass  # torch sets the state as attributes (a state dict's _metadata)
                elif type(inst) in (TensorRef, _Opaque):
                    self.standard = False
                else:
                    raise Refused("BUILD of something not allowed")
            elif op == 0x80:  # PROTO
                i += 1
            elif op == 0x2E:  # STOP
                r.pos = i
                return stack.pop()
            else:
                raise Refused(f"opcode {op:#x}")


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


class Reader:
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
            raise Refused("a pickle cut short")
        self.buf = rest + more + (b"\0" * 9 if len(rest) + len(more) < 9 else b"")  # an opcode at the end reads zeros
        self.pos = 0
        return self.buf, 0

    def line(self) -> str:
        j = self.buf.find(b"\n", self.pos, self.pos + MAX_GLOBAL_NAME + 1)
        while j < 0:
            if len(self.buf) - self.pos > MAX_GLOBAL_NAME:
                raise NameTooLong
            self.fill(self.pos, len(self.buf) - self.pos + 1)
            j = self.buf.find(b"\n", self.pos, self.pos + MAX_GLOBAL_NAME + 1)
        text = self.buf[self.pos:j].decode("utf-8")
        self.pos = j + 1
        return text
