"""Small checkpoint folders written byte by byte (no torch), for the untrusted-input tests."""

import hashlib
import json
import os
import struct
from pathlib import Path

RECORD = {"format": "surgery", "version": 1, "args": {"mixout": 0.1, "dropout": 0.0},
          "mixout": [{"name": "enc.0", "p": 0.1, "orig": "torch.nn.modules.linear.Linear", "transposed": False}],
          "dropout": [{"module": "drop", "attr": "p", "old": 0.1, "new": 0.0}],
          "config": [{"module": "", "path": ["hidden_dropout_prob"], "old": 0.1, "new": 0.0}],
          "msd": [], "skipped": []}


def st_bytes(tensors: dict, metadata: dict | None = None, raw_header: bytes | None = None) -> bytes:
    """A safetensors file: ``tensors`` maps name -> (dtype, shape, data bytes)."""
    header, data, pos = {}, b"", 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, (dtype, shape, blob) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + len(blob)]}
        data += blob
        pos += len(blob)
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def tensors():
    return {"enc.0.weight": ("F32", [2, 2], bytes(range(16))), "enc.0.mixout_target": ("F32", [2, 2], bytes(16)),
            "head.weight": ("F32", [2], bytes(range(8)))}


def make_dir(path: Path, *, sharded: bool = False, record: dict | None = RECORD, files: dict | None = None) -> Path:
    """A surgered model folder: weights (one file or two shards + index), config.json with the
    record, and ``files`` (name -> bytes) as extra files (a tokenizer)."""
    path.mkdir(parents=True)
    t = tensors()
    if sharded:
        a = {k: t[k] for k in list(t)[:2]}
        b = {k: t[k] for k in list(t)[2:]}
        (path / "model-00001-of-00002.safetensors").write_bytes(st_bytes(a, {"format": "pt"}))
        (path / "model-00002-of-00002.safetensors").write_bytes(st_bytes(b, {"format": "pt"}))
        wm = {**{k: "model-00001-of-00002.safetensors" for k in a}, **{k: "model-00002-of-00002.safetensors" for k in b}}
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 40},
                                                                        "weight_map": wm}))
    else:
        (path / "model.safetensors").write_bytes(st_bytes(t, {"format": "pt"}))
    cfg = {"model_type": "bert", "hidden_dropout_prob": 0.0}
    if record is not None:
        cfg["surgery"] = record
    (path / "config.json").write_text(json.dumps(cfg))
    for name, blob in (files or {"tokenizer.json": b'{"tok": 1}'}).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(blob)
    return path


def _walk(path: Path):
    """``(dirpath, dirnames, filenames)`` like ``os.walk`` (links not followed), without
    recursion: a folder nested 1200 deep is walked, not a RecursionError."""
    stack = [str(path)]
    while stack:
        top = stack.pop()
        try:
            entries = list(os.scandir(top))
        except OSError:
            continue
        dirs = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
        files = sorted(e.name for e in entries if not e.is_dir(follow_symlinks=False))
        yield top, dirs, files
        stack.extend(os.path.join(top, d) for d in reversed(dirs))


def snapshot(path: Path) -> dict:
    """Every entry under ``path`` (links not followed): kind, mode, and content digest."""
    out = {}
    for dirpath, dirnames, filenames in _walk(path):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            if os.path.islink(p):
                out[p] = ("link", os.readlink(p))
            elif os.path.isfile(p):
                out[p] = ("file", st.st_mode, st.st_nlink, hashlib.sha256(open(p, "rb").read()).hexdigest())
            else:
                out[p] = ("other", st.st_mode)
    return out


def debris(parent: Path) -> list[str]:
    """Hidden temporaries left anywhere under ``parent``."""
    return [os.path.join(d, n) for d, ds, fs in _walk(parent) for n in ds + fs if n.startswith(".surgery-tmp")]


def make_deep(top: Path, depth: int, name: str = "d") -> None:
    """``top/d/d/.../d``, ``depth`` folders, made through folder descriptors (no long paths)."""
    fd = os.open(top, os.O_RDONLY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            nfd = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)


def remove_deep(top: Path, name: str = "d") -> None:
    """Remove what :func:`make_deep` made, deepest first, without recursion (pytest's own
    clean-up of ``tmp_path`` recurses)."""
    fds = [os.open(top, os.O_RDONLY)]
    try:
        while True:
            try:
                fds.append(os.open(name, os.O_RDONLY, dir_fd=fds[-1]))
            except FileNotFoundError:
                break
        while len(fds) > 1:
            os.close(fds.pop())
            os.rmdir(name, dir_fd=fds[-1])
    finally:
        for fd in fds:
            os.close(fd)
