"""`surgery convert` / `inspect` on folders someone else made, third round (issue 23):
containment judged by what folders are (bind mounts), files that change while they are
read, output safetensors refuses (checked on SRC, before writing), pickles counted before
any tensor is built and copied without torch, record edge cases, sparse files, and folders
named like temporaries.

Every refusal: exit 2, one line naming the SRC file (or DST), SRC unchanged, no DST, no
temporary. Bind-mount tests need root and a working ``mount --bind`` (skipped, saying so,
elsewhere)."""

import contextlib
import json
import os
import struct
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import surgery.checkpoint.conversion as conversion
import surgery.checkpoint.layout as layout
from fake_checkpoint import RECORD, debris, make_dir, snapshot, st_bytes, tensors
from surgery.checkpoint import convert, open_checkpoint
from surgery.checkpoint.torch_file import Scan
from surgery.cli import main


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_refused(rc, err, *needles):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and "internal error" not in err, err
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])


def state(p: Path):
    """Everything under a folder SRC, or a file SRC's mode and bytes."""
    return snapshot(p) if p.is_dir() else (os.stat(p).st_mode, p.read_bytes())


def refused_everywhere(capsys, tmp_path, src, dst, *needles, named=None):
    """convert, inspect and inspect --json refuse SRC with one line naming it (or the file of
    it ``named``); nothing written."""
    before = state(src)
    for argv in (["convert", src, dst], ["inspect", src], ["inspect", src, "--json"]):
        rc, out, err = run(capsys, *argv)
        assert_refused(rc, err, named or src, *needles)
    assert state(src) == before
    assert not os.path.lexists(dst) and debris(tmp_path) == []


# ---- 1. containment by identity (bind mounts) -------------------------------------------------

@contextlib.contextmanager
def bind_mount(source: Path, target: Path):
    """``mount --bind source target`` for the test, always unmounted; skipped (saying why)
    where the test cannot mount (not root, no mount namespace rights)."""
    if os.geteuid() != 0:
        pytest.skip("bind mounts need root (this run is not root)")
    target.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"mount --bind does not work here ({r.stderr.strip() or r.returncode})")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], capture_output=True, timeout=30, check=True)


def test_src_reached_through_a_bind_mount_of_a_folder_inside_dst_is_refused(tmp_path, capsys):
    """--overwrite passed the path check and deleted the old DST, SRC's real files with it."""
    dst = tmp_path / "dst"
    real = make_dir(dst / "inner")
    with bind_mount(real, tmp_path / "src") as src:
        before = snapshot(real)
        rc, out, err = run(capsys, "convert", src, dst, "--overwrite")
        assert_refused(rc, err, dst, "DST must not be SRC, inside it or contain it", str(real), "another path")
        assert snapshot(real) == before and debris(tmp_path) == []


@pytest.mark.parametrize("sub", ["", "sub"], ids=["src", "src-subfolder"])
def test_dst_under_a_bind_mount_of_src_is_refused(tmp_path, capsys, sub):
    src = make_dir(tmp_path / "src", files={"sub/x.txt": b"x"})
    before = snapshot(src)
    with bind_mount(src / sub if sub else src, tmp_path / "m") as m:
        rc, out, err = run(capsys, "convert", src, m / "out")
        assert_refused(rc, err, m / "out", "inside it", "another path")
    assert snapshot(src) == before and debris(tmp_path) == []


def test_hard_link_of_a_file_src_as_dst_is_refused(tmp_path, capsys):
    src = tmp_path / "a.safetensors"
    src.write_bytes(st_bytes(tensors()))
    os.link(src, tmp_path / "b.safetensors")
    rc, out, err = run(capsys, "convert", src, tmp_path / "b.safetensors", "--overwrite")
    assert_refused(rc, err, "the SRC file itself")


# ---- 2. a file that changes while it is read ---------------------------------------------------

def _rewrite_during_copy(monkeypatch, module, victim: Path, offset: int, data: bytes):
    """After the first copy out of SRC, ``victim`` is rewritten in place with the same size
    (a trainer still writing the folder). Its times were set to the past beforehand, so the
    rewrite is seen however coarse the file system's clock is."""
    os.utime(victim, (1_600_000_000, 1_600_000_000))
    real, fired = module.copy_range, []

    def copy(*args, **kwargs):
        real(*args, **kwargs)
        if not fired:
            fired.append(1)
            with open(victim, "r+b") as f:
                f.seek(offset)
                f.write(data)

    monkeypatch.setattr(module, "copy_range", copy)
    return fired


def test_shard_rewritten_in_place_while_copied_is_refused(tmp_path, capsys, monkeypatch):
    src = make_dir(tmp_path / "src", sharded=True)
    shard = src / "model-00001-of-00002.safetensors"
    size = shard.stat().st_size
    fired = _rewrite_during_copy(monkeypatch, layout, shard, size - 16, bytes(range(100, 116)))
    rc, out, err = run(capsys, "convert", src, tmp_path / "dst")
    assert fired and rc == 2, err
    assert_refused(rc, err, shard, "changed while convert was reading it")
    assert shard.stat().st_size == size
    assert not (tmp_path / "dst").exists() and debris(tmp_path) == []


def test_pt_rewritten_while_copied_is_refused(tmp_path, capsys, monkeypatch):
    p = tmp_path / "w.pt"
    torch.save({"a.weight": torch.ones(64), "b.weight": torch.zeros(64)}, p)
    z = zipfile.ZipFile(p)
    info = z.getinfo("w/data/1")
    with open(p, "rb") as f:
        f.seek(info.header_offset + 26)
        n, m = struct.unpack("<HH", f.read(4))
    fired = _rewrite_during_copy(monkeypatch, layout, p, info.header_offset + 30 + n + m, b"\x01" * 8)
    rc, out, err = run(capsys, "convert", p, tmp_path / "out.safetensors")
    assert fired
    assert_refused(rc, err, p, "changed while convert was reading it")
    assert not (tmp_path / "out.safetensors").exists() and debris(tmp_path) == []


def test_copied_file_rewritten_while_copied_is_refused(tmp_path, capsys, monkeypatch):
    src = make_dir(tmp_path / "src", files={"tokenizer.json": b'{"vocab": "' + b"a" * 4096 + b'"}'})
    fired = _rewrite_during_copy(monkeypatch, conversion, src / "tokenizer.json", 20, b"b" * 8)
    rc, out, err = run(capsys, "convert", src, tmp_path / "dst")
    assert fired
    assert_refused(rc, err, src / "tokenizer.json", "changed while convert was reading it")
    assert not (tmp_path / "dst").exists() and debris(tmp_path) == []


def test_file_replaced_while_dst_is_written_is_refused(tmp_path, capsys, monkeypatch):
    """A trainer saving again replaces config.json (a new file, renamed into place) after convert
    read it: DST would pair the old config with the weights; every file read is checked by path
    before DST is published."""
    src = make_dir(tmp_path / "src")
    real, fired = layout.copy_range, []

    def copy(*args, **kwargs):
        real(*args, **kwargs)
        if not fired:
            fired.append(1)
            (src / "new.json").write_text(json.dumps({"model_type": "bert", "hidden_dropout_prob": 0.3}))
            os.replace(src / "new.json", src / "config.json")

    monkeypatch.setattr(layout, "copy_range", copy)
    rc, out, err = run(capsys, "convert", src, tmp_path / "dst")
    assert fired
    assert_refused(rc, err, src / "config.json", "changed while convert was reading it")
    assert not (tmp_path / "dst").exists() and debris(tmp_path) == []


# ---- 3. what safetensors refuses is refused on SRC, before writing -------------------------

def _safetensors_reads(p: Path) -> bool:
    try:
        with safe_open(str(p), framework="numpy") as f:
            f.keys()
        return True
    except Exception:
        return False


SHAPES = [("F32", [2**64 - 1, 0], 0), ("F32", [2**64, 0], 0), ("F32", [0, 2**40, 2**40], 0),
          ("F32", [2**40, 2**40, 0], 0), ("F32", [2**62], 0), ("F4", [3], 2), ("F4", [4], 2), ("F6_E2M3", [4], 3),
          ("F6_E3M2", [3], 3), ("F8_E8M0", [2], 2), ("C64", [1], 8)]


@pytest.mark.parametrize("dtype, shape, nbytes", SHAPES, ids=[f"{d}-{s}" for d, s, _ in SHAPES])
def test_convert_and_inspect_agree_with_safetensors(tmp_path, capsys, dtype, shape, nbytes):
    """safetensors itself is the oracle: what it reads converts to a file it reads; what it
    refuses is refused on SRC by convert, inspect and inspect --json, naming SRC."""
    t = tensors()
    t["x"] = (dtype, shape, bytes(nbytes))
    src = tmp_path / "src.safetensors"
    src.write_bytes(st_bytes(t))
    dst = tmp_path / "dst.safetensors"
    if _safetensors_reads(src):
        rc, out, err = run(capsys, "convert", src, dst)
        assert rc == 0, err
        assert _safetensors_reads(dst)
    else:
        refused_everywhere(capsys, tmp_path, src, dst, "corrupt safetensors header", "'x'")


def test_unreadable_shape_past_the_read_back_bound_is_refused_before_writing(tmp_path, capsys):
    """Above 50,000 tensors safe_open does not re-read DST: [2**64, 0] was published, exit 0."""
    body = ",".join(f'"t.{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(50_001))
    raw = ('{"bad":{"dtype":"F32","shape":[18446744073709551616,0],"data_offsets":[0,0]},' + body + "}").encode()
    src = tmp_path / "many.safetensors"
    src.write_bytes(struct.pack("<Q", len(raw) + (-len(raw) % 8)) + raw + b" " * (-len(raw) % 8))
    refused_everywhere(capsys, tmp_path, src, tmp_path / "out.safetensors", "'bad'", "past 2**64 - 1")


@pytest.mark.parametrize("n", [1, 50_001], ids=["few", "past-the-read-back-bound"])
def test_pt_tensor_named_metadata_is_refused_on_src(tmp_path, capsys, n):
    """DST held __metadata__ twice (exit 0 past 50,000 tensors; refused after writing,
    blaming DST, below)."""
    shared = torch.zeros(1)
    src = tmp_path / "md.pt"
    torch.save({"__metadata__": torch.ones(2), **{f"l.{i}": shared for i in range(n)}}, src)
    refused_everywhere(capsys, tmp_path, src, tmp_path / "out.safetensors", "'__metadata__'", "reserves")


def test_pt_key_with_a_lone_surrogate_is_refused(tmp_path, capsys):
    """Was UnicodeEncodeError, exit 1 (inspect printed it, exit 0)."""
    src = tmp_path / "s.pt"
    torch.save({"a\ud800b": torch.zeros(2), "ok": torch.ones(1)}, src)
    refused_everywhere(capsys, tmp_path, src, tmp_path / "out.safetensors", "not Unicode text", "surrogate")


# ---- 4. pickles: counted before anything is built, copied without torch ----------------------

def _no_torch_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)


@pytest.mark.parametrize("form", ["zip", "views-of-one-storage", "one-tensor-many-names", "legacy", "records"])
def test_pickle_over_the_bound_is_refused_before_torch_builds_anything(tmp_path, monkeypatch, form):
    p = tmp_path / "m.pt"
    base = torch.zeros(64)
    n = 80 if form == "records" else 12
    sd = {f"l.{i}": torch.zeros(1) if form in ("zip", "records") else base if form == "one-tensor-many-names"
          else base[i:i + 1] for i in range(n)}
    torch.save(sd, p, _use_new_zipfile_serialization=form != "legacy")
    _no_torch_load(monkeypatch)
    with pytest.raises(layout.CheckpointError, match="counted in its pickle, before any was built|zip of 86 rec") as e:
        open_checkpoint(p, max_tensors=10)
    assert str(p) in str(e.value)
    if form not in ("legacy", "records"):  # at the bound: read without torch.load
        ck = open_checkpoint(p, max_tensors=12)
        assert len(ck.sources[0].entries) == 12
        ck.close()


def test_standard_pt_converts_without_torch_load(tmp_path, monkeypatch):
    p = tmp_path / "m.pt"
    sd = {"w": torch.randn(4, 4), "b": torch.arange(4), "h": torch.randn(8).bfloat16()[2:6]}
    torch.save(sd, p)
    _no_torch_load(monkeypatch)
    convert(p, tmp_path / "out.safetensors")
    with safe_open(str(tmp_path / "out.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == sorted(sd)
        for k, v in sd.items():
            assert torch.equal(f.get_tensor(k), v), k


g = torch.Generator().manual_seed(0)
_BASE = torch.randn(64, generator=g)
TABLE = {
    "f32": torch.randn(3, 4, generator=g), "f64": torch.randn(5, dtype=torch.float64, generator=g),
    "f16": torch.randn(7, generator=g).half(), "bf16": torch.randn(2, 3, generator=g).bfloat16(),
    "i64": torch.arange(5), "i32": torch.arange(6, dtype=torch.int32), "i16": torch.arange(3, dtype=torch.int16),
    "i8": torch.arange(-3, 3, dtype=torch.int8), "u8": torch.arange(9, dtype=torch.uint8),
    "bool": torch.tensor([True, False, True]), "c64": torch.randn(3, dtype=torch.complex64, generator=g),
    "f8e4m3": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
    "f8e5m2": torch.randn(4, generator=g).to(torch.float8_e5m2),
    "u16": torch.arange(4).to(torch.uint16), "u32": torch.arange(4).to(torch.uint32),
    "u64": torch.arange(4).to(torch.uint64), "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 3),
    "view-offset": _BASE[10:20], "view-2d": _BASE[5:9].view(2, 2), "whole-shared-storage": _BASE,
    "size-1-dims": _BASE[7:8].view(1, 1), "parameter": torch.nn.Parameter(torch.ones(2, 2)),
}
TORCH_ONLY = {"transposed": torch.randn(3, 4, generator=g).t(), "expanded": torch.ones(1).expand(8),
              "conj": torch.randn(2, dtype=torch.complex64, generator=g).conj(), "every-other": _BASE[::2]}


def _convert_bytes(tmp_path, p: Path, name: str, monkeypatch, torch_only: bool) -> tuple[bytes, bool]:
    out = tmp_path / f"{name}.safetensors"
    with monkeypatch.context() as m:
        if torch_only:
            m.setattr(layout, "scan", lambda fd, path, n: Scan(0, None))
        plan = convert(p, out)
    return out.read_bytes(), plan.ck.sources[0].zip is not None


def test_pickle_fast_path_writes_what_torch_load_writes(tmp_path, monkeypatch):
    """Bit for bit the file the torch.load route writes, for every dtype, views, shared
    storage, a Parameter; what the fast path does not read (non-contiguous, conj) goes to
    torch.load and is equal too."""
    p = tmp_path / "all.pt"
    torch.save(TABLE, p)
    fast, used = _convert_bytes(tmp_path, p, "fast", monkeypatch, False)
    slow, _ = _convert_bytes(tmp_path, p, "torch", monkeypatch, True)
    assert used and fast == slow
    torch.save({**TABLE, **TORCH_ONLY}, tmp_path / "mixed.pt")
    a, used = _convert_bytes(tmp_path, tmp_path / "mixed.pt", "mixed-auto", monkeypatch, False)
    b, _ = _convert_bytes(tmp_path, tmp_path / "mixed.pt", "mixed-torch", monkeypatch, True)
    assert not used and a == b


def _zip_pt(path: Path, pkl: bytes) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("m/data.pkl", pkl)
        z.writestr("m/byteorder", "little")
        z.writestr("m/version", "3\n")


def test_code_running_pickle_is_never_run_and_memo_bombs_stay_small(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    _zip_pt(evil, b"\x80\x02cposix\nsystem\nq\x00X" + struct.pack("<I", len(f"touch {marker}"))
            + f"touch {marker}".encode() + b"\x85R.")
    refused_everywhere(capsys, tmp_path, evil, tmp_path / "out.safetensors", "posix.system",
                       "nothing in it was executed")
    assert not marker.exists()
    bomb = tmp_path / "bomb.pt"  # a memo index of 2**28: the C unpickler would zero a 2 GiB array for it
    _zip_pt(bomb, b"\x80\x02}r" + struct.pack("<I", 2**28) + b".")
    refused_everywhere(capsys, tmp_path, bomb, tmp_path / "out.safetensors", "holds no tensor")


@pytest.mark.parametrize("form", ["zip", "plain-pickle"])
def test_pickle_naming_a_huge_global_is_refused_without_torch(tmp_path, capsys, form):
    """Found by the hostile run: torch's error message for an unknown global runs a regular
    expression quadratic in the name, so a 5 MB name kept torch.load (and convert) busy for
    hours. The scan refuses names past 1,024 characters itself."""
    pkl = b"\x80\x02c" + b"a" * 200_000 + b"\nb\n."
    src = tmp_path / "long.pt"
    if form == "zip":
        _zip_pt(src, pkl)
    else:
        src.write_bytes(pkl)
    refused_everywhere(capsys, tmp_path, src, tmp_path / "out.safetensors", "more than 1,024 characters",
                       "nothing in it was executed")


def test_storage_record_shorter_than_the_pickle_says_is_refused(tmp_path, capsys):
    """torch.load(mmap=True) read past the record, into the zip's own headers, and convert
    published those bytes as weights (exit 0)."""
    src = tmp_path / "short.pt"
    torch.save({"w": torch.ones(4)}, src)
    with zipfile.ZipFile(src) as z:
        files = {i.filename: z.read(i) for i in z.infolist()}
    files["short/data/0"] = files["short/data/0"][:8]
    src.unlink()
    with zipfile.ZipFile(src, "w") as z:
        for k, v in files.items():
            z.writestr(k, v)
    refused_everywhere(capsys, tmp_path, src, tmp_path / "out.safetensors", "storage '0'",
                       "8 bytes in the file but its pickle says 16")


# ---- 5. record and layout edge cases ------------------------------------------------------------

@pytest.mark.parametrize("keys", [100, 2000])
def test_config_path_of_many_keys_is_refused(tmp_path, capsys, keys):
    """2,000 keys was a RecursionError (exit 1); 100 keys wrote config.json 101 deep with keys
    SRC never had, which inspect then refused."""
    rec = json.loads(json.dumps(RECORD))
    rec["config"] = [{"module": "", "path": [f"k{i}" for i in range(keys)], "old": 0.1, "new": 0.0}]
    src = make_dir(tmp_path / "src", record=rec)
    refused_everywhere(capsys, tmp_path, src, tmp_path / "dst", "config[0].path", "at most 16",
                       named=src / "config.json")


def _mixed_index(tmp_path, first_is_bin):
    src = make_dir(tmp_path / "src", sharded=True)
    victim = "model-00001-of-00002" if first_is_bin else "model-00002-of-00002"
    keys = [k for k in tensors() if (k != "head.weight") == first_is_bin]
    torch.save({k: torch.zeros(4 if k == "head.weight" else (2, 2)) for k in keys}, src / f"{victim}.bin")
    (src / f"{victim}.safetensors").unlink()
    idx = json.loads((src / "model.safetensors.index.json").read_text())
    idx["weight_map"] = {k: (f"{victim}.bin" if k in keys else v) for k, v in idx["weight_map"].items()}
    (src / "model.safetensors.index.json").write_text(json.dumps(idx))
    return src


@pytest.mark.parametrize("first_is_bin", [False, True], ids=["second-shard-bin", "first-shard-bin"])
def test_safetensors_index_with_a_pickle_shard_is_refused(tmp_path, capsys, first_is_bin):
    """DST kept the .bin name for safetensors data, depending on the index's order."""
    src = _mixed_index(tmp_path, first_is_bin)
    before = snapshot(src)
    for argv in (["convert", src, tmp_path / "dst"], ["inspect", src]):
        rc, out, err = run(capsys, *argv)
        assert_refused(rc, err, src / "model.safetensors.index.json", ".bin", "not a .safetensors file")
    assert snapshot(src) == before and not (tmp_path / "dst").exists()


def test_pickle_shards_written_under_one_name_are_refused_up_front(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    torch.save({"a": torch.zeros(2)}, src / "a.bin")
    torch.save({"b": torch.zeros(2)}, src / "a.pt")
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "a.bin", "b": "a.pt"}}))
    before = snapshot(src)
    for argv in (["convert", src, tmp_path / "dst"], ["inspect", src]):
        rc, out, err = run(capsys, *argv)
        assert_refused(rc, err, "'a.bin' and 'a.pt'", "'a.safetensors'")
    assert snapshot(src) == before and not (tmp_path / "dst").exists() and debris(tmp_path) == []


# ---- 6. sparse files, folders named like temporaries ----------------------------------------

def _allocated(p: Path) -> int:
    return os.stat(p).st_blocks * 512


def test_sparse_files_keep_their_holes(tmp_path, capsys):
    """A 512 MiB sparse file took 512 MiB in DST; cp keeps holes, so does convert (copied
    files and tensor data alike)."""
    src = make_dir(tmp_path / "src")
    big = src / "big.dat"
    with open(big, "wb") as f:
        f.truncate(512 * 2**20)
        f.seek(100 * 2**20)
        f.write(b"island")
    if _allocated(big) > 2**20:
        pytest.skip("this file system does not keep sparse files")
    t = {"enc.0.weight": ("F32", [2**22], None), "head.weight": ("F32", [2], bytes(range(8)))}
    header = {k: {"dtype": d, "shape": s, "data_offsets": [o, o + 4 * s[0]]}
              for (k, (d, s, _)), o in zip(t.items(), (0, 2**24))}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(src / "model.safetensors", "wb") as f:  # a 16 MiB all-zero tensor left as a hole
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.seek(8 + len(raw) + 2**24)
        f.write(bytes(range(8)))
    rc, out, err = run(capsys, "convert", src, tmp_path / "dst")
    assert rc == 0, err
    dst = tmp_path / "dst"
    assert os.path.getsize(dst / "big.dat") == 512 * 2**20 and _allocated(dst / "big.dat") < 2**20
    with open(dst / "big.dat", "rb") as f:
        f.seek(100 * 2**20 - 4)
        assert f.read(12) == bytes(4) + b"island" + bytes(2)
    assert _allocated(dst / "model.safetensors") < 2**20
    with safe_open(str(dst / "model.safetensors"), framework="numpy") as f:
        assert not f.get_tensor("enc.0.weight").any() and f.get_tensor("head.weight").tobytes() == bytes(range(8))


def test_folders_named_like_temporaries_are_copied_and_named(tmp_path, capsys):
    """Folders of SRC named .surgery-tmp* (at any depth) were silently not copied."""
    files = {".surgery-tmp-1-x/keep.txt": b"a", "deep/.surgery-tmp-2-y/keep.txt": b"b", "tokenizer.json": b"{}"}
    src = make_dir(tmp_path / "src", files=files)
    rc, out, err = run(capsys, "convert", src, tmp_path / "dry", "--dry-run")
    assert rc == 0 and ".surgery-tmp-1-x/keep.txt" in out and "deep/.surgery-tmp-2-y/keep.txt" in out, out
    rc, out, err = run(capsys, "convert", src, tmp_path / "out" / "dst")
    assert rc == 0, err
    for rel, data in files.items():
        assert (tmp_path / "out" / "dst" / rel).read_bytes() == data
    assert "looks like the temporary of an interrupted surgery run" in err
