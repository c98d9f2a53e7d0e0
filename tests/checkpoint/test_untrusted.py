"""`surgery convert` / `inspect` on folders someone else made (issue 9): links leading outside
SRC, Hugging Face cache snapshots, special files, checkpoints without weights, tampered
records, file modes, parent folders, error wording, expanded .pt views, start-up imports."""

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fake_checkpoint import RECORD, debris, make_dir, snapshot, st_bytes, tensors
from surgery.cli import main

ROOT = Path(__file__).resolve().parents[2]  # the project


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_refused(rc, err, *needles):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])


def assert_clean(tmp_path, src, before, dst):
    assert snapshot(src) == before  # SRC unchanged
    assert not os.path.lexists(dst)
    assert debris(tmp_path) == []


# ---- item 1: links ------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["secret", "/proc/self/environ", "/etc/passwd"])
@pytest.mark.parametrize("name", ["tokenizer.json", "config.json", "sub/vocab.txt"])
def test_link_outside_src_is_refused(tmp_path, capsys, name, target):
    (tmp_path / "secret").write_text("API_KEY=hunter2\n")
    src = make_dir(tmp_path / "src")
    link = src / name
    link.parent.mkdir(exist_ok=True)
    if link.exists():
        link.unlink()
    link.symlink_to(tmp_path / target if target == "secret" else target)
    before = snapshot(src)
    for cmd in (["convert", src, tmp_path / "dst"], ["inspect", src]):
        rc, out, err = run(capsys, *cmd)
        assert_refused(rc, err, link, "outside the checkpoint", "--follow-external-symlinks")
        assert "hunter2" not in out + err
    assert_clean(tmp_path, src, before, tmp_path / "dst")


def test_link_to_weights_outside_src_is_refused(tmp_path, capsys):
    (tmp_path / "elsewhere.safetensors").write_bytes(st_bytes(tensors()))
    src = make_dir(tmp_path / "src")
    (src / "model.safetensors").unlink()
    (src / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    before = snapshot(src)
    rc, out, err = run(capsys, "convert", src, tmp_path / "dst")
    assert_refused(rc, err, src / "model.safetensors", "outside the checkpoint")
    assert_clean(tmp_path, src, before, tmp_path / "dst")


def test_opt_in_follows_external_links(tmp_path, capsys):
    (tmp_path / "shared_tok.json").write_text('{"shared": true}')
    src = make_dir(tmp_path / "src")
    (src / "tokenizer.json").unlink()
    (src / "tokenizer.json").symlink_to(tmp_path / "shared_tok.json")
    rc, out, err = run(capsys, "convert", src, tmp_path / "dst", "--follow-external-symlinks")
    assert rc == 0, err
    assert not (tmp_path / "dst" / "tokenizer.json").is_symlink()
    assert (tmp_path / "dst" / "tokenizer.json").read_text() == '{"shared": true}'


def test_links_inside_src_are_followed(tmp_path, capsys):
    src = make_dir(tmp_path / "src", files={"real/tok.json": b"abc"})
    (src / "tokenizer.json").symlink_to("real/tok.json")
    rc, out, err = run(capsys, "convert", src, tmp_path / "dst")
    assert rc == 0, err
    assert (tmp_path / "dst" / "tokenizer.json").read_bytes() == b"abc"


def _hf_cache(tmp_path, sharded):
    """models--org--name/{blobs/<sha>, refs/main, snapshots/<rev>/* -> ../../blobs/<sha>}"""
    repo = tmp_path / "hub" / "models--org--tiny"
    staging = make_dir(tmp_path / "staging", sharded=sharded, files={"tokenizer.json": b"{}", "1_Pooling/config.json":
                                                                     b'{"pooling": "mean"}'})
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    snap = repo / "snapshots" / "abc123"
    for dirpath, _, files in os.walk(staging):
        for fn in files:
            rel = os.path.relpath(os.path.join(dirpath, fn), staging)
            blob = repo / "blobs" / f"sha{abs(hash(rel))}"
            os.replace(os.path.join(dirpath, fn), blob)
            link = snap / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    return snap


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_hugging_face_cache_snapshot_converts(tmp_path, capsys, sharded):
    snap = _hf_cache(tmp_path, sharded)
    before = snapshot(snap.parents[1])
    rc, out, err = run(capsys, "convert", snap, tmp_path / "dst")
    assert rc == 0, err
    dst = tmp_path / "dst"
    assert json.loads((dst / "config.json").read_text())["hidden_dropout_prob"] == 0.1
    assert (dst / "1_Pooling" / "config.json").read_text() == '{"pooling": "mean"}'
    assert not any(p.is_symlink() for p in dst.rglob("*"))
    assert snapshot(snap.parents[1]) == before
    rc, out, err = run(capsys, "inspect", snap)
    assert rc == 0, err


def test_hf_snapshot_link_leaving_the_repository_is_refused(tmp_path, capsys):
    snap = _hf_cache(tmp_path, False)
    (tmp_path / "hub" / "other.txt").write_text("private")
    (snap / "vocab.txt").symlink_to("../../../other.txt")  # hub/other.txt: outside models--org--tiny
    rc, out, err = run(capsys, "convert", snap, tmp_path / "dst")
    assert_refused(rc, err, snap / "vocab.txt", "outside the checkpoint")


def test_symlinked_folder_fifo_and_broken_link_are_named_in_warnings(tmp_path, capsys):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "x.txt").write_text("x")
    src = make_dir(tmp_path / "src")
    (src / "linked_dir").symlink_to(tmp_path / "outside")
    os.mkfifo(src / "pipe.txt")
    (src / "broken.json").symlink_to(src / "nowhere")
    before = snapshot(src)
    rc, out, err = run(capsys, "convert", src, tmp_path / "dst")  # a FIFO would block if it were opened
    assert rc == 0, err
    for needle in ("linked_dir is a symbolic link to a folder", "pipe.txt is a FIFO", "broken.json is a broken"):
        assert needle in err, err
    assert sorted(os.listdir(tmp_path / "dst")) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert snapshot(src) == before
    rc, out, err = run(capsys, "inspect", src)
    assert rc == 0 and "pipe.txt is a FIFO" in out


def test_plain_checkpoint_warnings_and_link_loops(tmp_path, capsys):
    src = make_dir(tmp_path / "src", record=None)
    plain = {k: v for k, v in tensors().items() if not k.endswith("mixout_target")}
    (src / "model.safetensors").write_bytes(st_bytes(plain))
    (src / "loop_a").symlink_to("loop_b")
    (src / "loop_b").symlink_to("loop_a")
    os.mkfifo(src / "pipe\x1b[2J.txt")
    rc, out, err = run(capsys, "inspect", src)
    assert rc == 0 and "no surgery" in out, err
    assert "loop_a is a broken symbolic link" in out and "pipe\\x1b[2J.txt is a FIFO" in out and "\x1b" not in out
    rc, out, err = run(capsys, "convert", src, tmp_path / "dst")
    assert rc == 0 and "loop_b is a broken symbolic link" in err and "\x1b" not in err, err
    (src / "config.json").unlink()
    (src / "config.json").symlink_to("config.json")
    rc, out, err = run(capsys, "convert", src, tmp_path / "dst2")
    assert_refused(rc, err, src / "config.json", "cannot read")


def test_fifo_as_config_is_refused_without_blocking(tmp_path, capsys):
    src = make_dir(tmp_path / "src")
    (src / "config.json").unlink()
    os.mkfifo(src / "config.json")
    rc, out, err = run(capsys, "convert", src, tmp_path / "dst")
    assert_refused(rc, err, src / "config.json", "FIFO", "not a regular file")


# ---- item 2: checkpoints without weights ----------------------------------------------------

def test_empty_weight_map_is_refused(tmp_path, capsys):
    src = make_dir(tmp_path / "src", sharded=True)
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    before = snapshot(src)
    for cmd in (["convert", src, tmp_path / "dst"], ["inspect", src]):
        rc, out, err = run(capsys, *cmd)
        assert_refused(rc, err, "model.safetensors.index.json", "names no tensor")
    assert_clean(tmp_path, src, before, tmp_path / "dst")


def test_unreferenced_shard_is_refused(tmp_path, capsys):
    src = make_dir(tmp_path / "src", sharded=True)
    idx = json.loads((src / "model.safetensors.index.json").read_text())
    idx["weight_map"] = {k: v for k, v in idx["weight_map"].items() if v.startswith("model-00001")}
    (src / "model.safetensors.index.json").write_text(json.dumps(idx))
    rc, out, err = run(capsys, "convert", src, tmp_path / "dst")
    assert_refused(rc, err, "model-00002-of-00002.safetensors looks like a shard", "does not reference it")


def test_file_without_tensors_is_refused(tmp_path, capsys):
    (tmp_path / "empty.safetensors").write_bytes(st_bytes({}))
    for cmd in (["convert", tmp_path / "empty.safetensors", tmp_path / "o.safetensors"],
                ["inspect", tmp_path / "empty.safetensors"]):
        rc, out, err = run(capsys, *cmd)
        assert_refused(rc, err, "holds no tensor")


# ---- item 5: a tampered record ---------------------------------------------------------------

@pytest.mark.parametrize("field, value, needle", [
    ("config", [{"module": "", "path": "hidden_dropout_prob", "old": 0.1}], "config[0].path must be a non-empty list"),
    ("config", [{"path": ["a", 3], "old": 0.1}], "config[0].path"),
    ("mixout", 5, "'mixout' must be a list"),
    ("mixout", [{"p": 0.1}], "mixout[0] has no 'name'"),
    ("dropout", [{"module": "d", "attr": "p", "old": [0.1]}], "dropout[0].old must be a finite number"),
])
def test_tampered_record_is_refused_before_writing(tmp_path, capsys, field, value, needle):
    src = make_dir(tmp_path / "src", record={**RECORD, field: value})
    before = snapshot(src)
    for cmd in (["convert", src, tmp_path / "dst"], ["inspect", src]):
        rc, out, err = run(capsys, *cmd)
        assert_refused(rc, err, src / "config.json", "invalid surgery record", needle)
    assert_clean(tmp_path, src, before, tmp_path / "dst")


# ---- item 7: modes, parents, wording ------------------------------------------------------

def test_file_modes_are_kept(tmp_path, capsys):
    src = make_dir(tmp_path / "src")
    os.chmod(src / "model.safetensors", 0o600)
    os.chmod(src / "tokenizer.json", 0o640)
    os.chmod(src / "config.json", 0o600)
    rc, out, err = run(capsys, "convert", src, tmp_path / "dst")
    assert rc == 0, err
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "dst" / "model.safetensors") == 0o600
    assert mode(tmp_path / "dst" / "tokenizer.json") == 0o640
    assert mode(tmp_path / "dst" / "config.json") == 0o600
    (tmp_path / "one.safetensors").write_bytes(st_bytes(tensors()))
    os.chmod(tmp_path / "one.safetensors", 0o600)
    rc, out, err = run(capsys, "convert", tmp_path / "one.safetensors", tmp_path / "plain.safetensors")
    assert rc == 0 and mode(tmp_path / "plain.safetensors") == 0o600


def test_failed_convert_removes_the_parent_folders_it_created(tmp_path, capsys):
    src = make_dir(tmp_path / "src")
    os.chmod(src / "tokenizer.json", 0)  # unreadable: found before anything is written
    dst = tmp_path / "a" / "b" / "dst"
    if os.access(src / "tokenizer.json", os.R_OK):  # root reads anything: break the write instead
        (src / "tokenizer.json").chmod(0o644)
        (src / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes()[:-4])
    rc, out, err = run(capsys, "convert", src, dst)
    assert rc == 2, err
    assert not (tmp_path / "a").exists() and debris(tmp_path) == []


def test_unreadable_source_file_is_a_read_error(tmp_path, capsys):
    src = make_dir(tmp_path / "src", files={"vocab.txt": b"[PAD]\n"})
    os.chmod(src / "vocab.txt", 0)
    if os.access(src / "vocab.txt", os.R_OK):
        os.chmod(src / "vocab.txt", 0o644)
        (src / "vocab.txt").unlink()
        os.mkfifo(src / "vocab.txt")  # root: stand in with another unreadable kind
        rc, out, err = run(capsys, "convert", src, tmp_path / "dst")
        assert rc == 0 and "vocab.txt is a FIFO" in err
        return
    rc, out, err = run(capsys, "convert", src, tmp_path / "dst")
    assert_refused(rc, err, src / "vocab.txt", "cannot read", "ermission denied")
    assert "write failed" not in err


def test_errors_name_dst_not_the_temporary_nor_errno(tmp_path, capsys, monkeypatch):
    import surgery.checkpoint.conversion as conversion
    src = make_dir(tmp_path / "src")

    def enospc(*a, **k):
        raise OSError(28, "No space left on device", str(a[2]))

    monkeypatch.setattr(conversion, "copy_file", enospc)
    rc, out, err = run(capsys, "convert", src, tmp_path / "dst")
    assert_refused(rc, err, tmp_path / "dst" / "tokenizer.json", "no space left")
    assert ".surgery-tmp" not in err and "Errno" not in err
    assert debris(tmp_path) == [] and not (tmp_path / "dst").exists()


def test_existing_dst_file_message_has_no_errno(tmp_path, capsys):
    (tmp_path / "one.safetensors").write_bytes(st_bytes(tensors()))
    (tmp_path / "taken").mkdir()
    rc, out, err = run(capsys, "convert", tmp_path / "one.safetensors", tmp_path / "taken" / "x" / "o.safetensors")
    assert rc == 0, err  # parents are created
    (tmp_path / "file").write_text("")
    rc, out, err = run(capsys, "convert", tmp_path / "one.safetensors", tmp_path / "file" / "o.safetensors")
    assert_refused(rc, err, tmp_path / "file" / "o.safetensors", "is a file, not a folder")
    assert "Errno" not in err


def test_header_length_over_the_limit_says_so(tmp_path, capsys):
    p = tmp_path / "x.safetensors"
    p.write_bytes((200_000_000).to_bytes(8, "little") + b"{}" + b" " * 6)
    rc, out, err = run(capsys, "inspect", p)
    assert_refused(rc, err, "over the 100000000 byte limit")
    assert "file has" not in err


def test_expanded_pt_view_warns_and_past_the_bound_is_refused(tmp_path, capsys):
    import torch
    torch.save({"w": torch.zeros(1).expand(1 << 16), "b": torch.ones(3)}, tmp_path / "small.pt")
    rc, out, err = run(capsys, "convert", tmp_path / "small.pt", tmp_path / "small.safetensors")
    assert rc == 0 and "expanded view (stride 0)" in err and "x65,536" in err, err
    torch.save({"w": torch.zeros(1).expand(1 << 29)}, tmp_path / "big.pt")  # 2 GiB written out from 4 bytes
    rc, out, err = run(capsys, "convert", tmp_path / "big.pt", tmp_path / "big.safetensors")
    assert_refused(rc, err, "expanded stride-0 views", "refused past 64x")
    assert not (tmp_path / "big.safetensors").exists() and debris(tmp_path) == []


def test_control_characters_in_names_stay_on_one_line(tmp_path, capsys):
    p = tmp_path / "x.safetensors"
    p.write_bytes(st_bytes({}, raw_header=json.dumps({"a\n\x1b[31mred": {"dtype": ["F32"], "shape": [1],
                                                                          "data_offsets": [0, 4]}}).encode()))
    rc, out, err = run(capsys, "inspect", p)
    assert_refused(rc, err, "is not {dtype")
    assert "\x1b" not in err


# ---- item 8: start-up imports ---------------------------------------------------------------

def test_safetensors_convert_and_inspect_never_import_torch(tmp_path):
    src = make_dir(tmp_path / "src", sharded=True)
    code = ("import sys; from surgery.cli import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for argv in (["convert", str(src), str(tmp_path / "dst")], ["inspect", str(src), "--json"], ["inspect", str(src)]):
        r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr


def test_lazy_package_keeps_every_public_name():
    code = ("import sys, surgery; assert 'torch' not in sys.modules; "
            "names = [getattr(surgery, n) for n in surgery.__all__]; "
            "assert callable(surgery.export) and surgery.export.__module__ == 'surgery.exporting'; "
            "assert surgery.checkpoint.save.__name__ == 'save'; "
            "from surgery import *; print(len(names))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 0, r.stderr
    import surgery
    assert int(r.stdout) == len(surgery.__all__)


def test_verification_error_names_dst_and_a_disguised_ctrl_c_is_130(tmp_path, capsys, monkeypatch):
    import surgery.checkpoint.conversion as conversion
    from surgery.checkpoint import CheckpointError
    from surgery.interrupts import STATE
    src = make_dir(tmp_path / "src")

    def fails(path, *a, **k):
        raise CheckpointError(path, "written file failed verification")

    monkeypatch.setattr(conversion, "write_safetensors", fails)
    rc, out, err = run(capsys, "convert", src, tmp_path / "dst")
    assert_refused(rc, err, tmp_path / "dst" / "model.safetensors", "failed verification")
    assert ".surgery-tmp" not in err

    def interrupted_import(path, *a, **k):  # numpy turned a Ctrl-C during its import into an ImportError
        STATE.interrupted = True
        raise ImportError("PyCapsule_Import could not import module 'datetime'")

    monkeypatch.setattr(conversion, "write_safetensors", interrupted_import)
    rc, out, err = run(capsys, "convert", src, tmp_path / "dst")
    assert rc == 130 and err.strip().splitlines() == ["surgery convert: interrupted; nothing was written to DST"]
    assert not (tmp_path / "dst").exists() and debris(tmp_path) == []


# ---- issue 16: output modes -------------------------------------------------------------------

NOBODY = 65534


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(p):
    return stat.S_IMODE(os.lstat(p).st_mode)


# (file in SRC, its mode, its mode in DST under umask 022): never setuid/setgid/sticky, never group- or
# world-writable beyond the umask, no execute bit on the files convert writes (weights, config, index)
MODES = [
    ("run.sh", 0o4755, 0o755),  # a setuid program SRC's author wrote: copied as an ordinary executable
    ("run.sh", 0o6777, 0o755),
    ("tool", 0o2711, 0o711),
    ("tokenizer.json", 0o666, 0o644),
    ("tokenizer.json", 0o640, 0o640),
    ("tokenizer.json", 0o400, 0o400),
    ("model.safetensors", 0o4755, 0o644),
    ("model.safetensors", 0o600, 0o600),
    ("config.json", 0o777, 0o644),
    ("sub", 0o1777, 0o755),
    ("sub", 0o2770, 0o750),
    (".", 0o777, 0o755),
    (".", 0o700, 0o700),
]


@pytest.mark.parametrize("name, src_mode, dst_mode", MODES, ids=[f"{n}-{m:o}" for n, m, _ in MODES])
def test_output_modes_are_ordinary(tmp_path, capsys, umask022, name, src_mode, dst_mode):
    src = make_dir(tmp_path / "src", files={"tokenizer.json": b"{}", "run.sh": b"#!/bin/sh\nid\n",
                                             "tool": b"\x7fELF", "sub/x.txt": b"x"})
    if os.geteuid() == 0:  # the case: root converting a folder another user made
        for dirpath, dirnames, filenames in os.walk(src):
            for n in dirnames + filenames + ["."]:
                os.chown(os.path.join(dirpath, n), NOBODY, NOBODY)
    os.chmod(src / name, src_mode)
    assert _mode(src / name) == src_mode  # the SRC really has the bits (setuid on a file one owns is allowed)
    rc, out, err = run(capsys, "convert", src, tmp_path / "dst")
    assert rc == 0, err
    assert _mode(tmp_path / "dst" / name) == dst_mode
    for dirpath, dirnames, filenames in os.walk(tmp_path / "dst"):
        for n in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, n))
            assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | 0o022), (n, oct(st.st_mode))
            assert st.st_uid == os.geteuid()  # DST belongs to whoever ran convert


def test_output_modes_follow_the_umask_and_a_file_src(tmp_path, capsys):
    (tmp_path / "one.safetensors").write_bytes(st_bytes(tensors()))
    os.chmod(tmp_path / "one.safetensors", 0o6755)
    src = make_dir(tmp_path / "src", files={"run.sh": b"#!/bin/sh\n"})
    os.chmod(src / "run.sh", 0o775)
    os.chmod(src / "model.safetensors", 0o664)
    old = os.umask(0o077)
    try:
        rc, out, err = run(capsys, "convert", tmp_path / "one.safetensors", tmp_path / "plain.safetensors")
        assert rc == 0, err
        rc, out, err = run(capsys, "convert", src, tmp_path / "dst")
        assert rc == 0, err
    finally:
        os.umask(old)
    assert _mode(tmp_path / "plain.safetensors") == 0o600  # 6755 -> no setuid/setgid, no x, under umask 077
    assert _mode(tmp_path / "dst") == 0o700 and _mode(tmp_path / "dst" / "run.sh") == 0o700
    assert _mode(tmp_path / "dst" / "model.safetensors") == 0o600


# ---- issue 16: hard links -----------------------------------------------------------------------

def test_hard_link_outside_src_opt_in(tmp_path, capsys):
    (tmp_path / "shared_tok.json").write_text('{"shared": true}')
    src = make_dir(tmp_path / "src")
    (src / "tokenizer.json").unlink()
    os.link(tmp_path / "shared_tok.json", src / "tokenizer.json")
    before = snapshot(src)
    for cmd in (["convert", src, tmp_path / "dst"], ["inspect", src]):
        rc, out, err = run(capsys, *cmd)
        assert_refused(rc, err, src / "tokenizer.json", "is a hard link", "2 names, 1 of them inside",
                       "--allow-external-hard-links")
        assert "shared" not in out
    assert_clean(tmp_path, src, before, tmp_path / "dst")
    rc, out, err = run(capsys, "inspect", src, "--allow-external-hard-links")
    assert rc == 0, err
    rc, out, err = run(capsys, "convert", src, tmp_path / "dst", "--allow-external-hard-links")
    assert rc == 0, err
    assert (tmp_path / "dst" / "tokenizer.json").read_text() == '{"shared": true}'
    assert os.stat(tmp_path / "dst" / "tokenizer.json").st_nlink == 1  # a copy, not a link


def test_hard_link_swapped_in_after_planning_is_refused(tmp_path):
    from surgery.checkpoint import CheckpointError, execute, plan_convert
    (tmp_path / "private").write_text("API_KEY=hunter2")
    src = make_dir(tmp_path / "src")
    plan = plan_convert(src, tmp_path / "dst")
    try:
        (src / "tokenizer.json").unlink()
        os.link(tmp_path / "private", src / "tokenizer.json")  # swapped in between planning and writing
        with pytest.raises(CheckpointError, match="is a hard link"):
            execute(plan)
    finally:
        plan.ck.close()
    assert not (tmp_path / "dst").exists() and debris(tmp_path) == []


def test_hard_links_in_a_hugging_face_snapshot_repo_count_as_inside(tmp_path, capsys):
    snap = _hf_cache(tmp_path, False)
    blobs = snap.parents[1] / "blobs"
    blob = next(b for b in sorted(blobs.iterdir()) if b.read_bytes() == b"{}")
    os.link(blob, blobs / "dedup")  # two names, both inside the repository folder
    rc, out, err = run(capsys, "convert", snap, tmp_path / "dst")
    assert rc == 0, err


# ---- issue 16: DST errors name DST, first error first ----------------------------------------------

def _read_only(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        os.chmod(ro, 0o555)
        return ro / "dst", "permission denied"
    # root writes anywhere but on a read-only file system, which a test cannot mount: the kernel's answers
    # for one are stood in for (access() false, ST_RDONLY set)
    import surgery.checkpoint.atomic as atomic
    real_access, real_statvfs = os.access, os.statvfs
    monkeypatch.setattr(atomic.os, "access", lambda p, m, **k: False if str(p) == str(ro) else real_access(p, m))

    class RO:
        f_flag = os.ST_RDONLY

    monkeypatch.setattr(atomic.os, "statvfs", lambda p: RO() if str(p) == str(ro) else real_statvfs(p))
    return ro / "dst", "read-only file system"


def _dst_cases(tmp_path, monkeypatch, case):
    (tmp_path / "afile").write_text("x")
    if case == "parent-is-a-file":
        return tmp_path / "afile" / "dst", "afile is a file, not a folder"
    if case == "grandparent-is-a-file":
        return tmp_path / "afile" / "a" / "dst", "afile is a file, not a folder"
    if case == "name-too-long":
        return tmp_path / ("n" * 256), "file name too long: 256 bytes"
    if case == "folder-name-too-long":
        return tmp_path / ("n" * 300) / "dst", "file name too long: 300 bytes"
    return _read_only(tmp_path, monkeypatch)


@pytest.mark.parametrize("case", ["parent-is-a-file", "grandparent-is-a-file", "name-too-long",
                                  "folder-name-too-long", "read-only"])
@pytest.mark.parametrize("layout", ["dir", "file"])
def test_dst_errors_name_dst_not_the_temporary(tmp_path, capsys, monkeypatch, case, layout):
    dst, needle = _dst_cases(tmp_path, monkeypatch, case)
    if layout == "file":
        src = tmp_path / "one.safetensors"
        src.write_bytes(st_bytes(tensors()))
        dst = dst.with_name(dst.name + ".safetensors") if len(dst.name) < 200 else dst
    else:
        src = make_dir(tmp_path / "src")
    before = snapshot(tmp_path)
    rc, out, err = run(capsys, "convert", src, dst)
    assert_refused(rc, err, f"error: {dst}: ", needle)
    assert ".surgery-tmp" not in err and "Errno" not in err
    assert snapshot(tmp_path) == before  # nothing created, not even a parent folder


def test_a_dst_name_at_the_limit_still_converts(tmp_path, capsys):
    """DST names up to the file system's limit work: the temporary's name is cut to fit."""
    src = make_dir(tmp_path / "src")
    dst = tmp_path / ("n" * 255)
    rc, out, err = run(capsys, "convert", src, dst)
    assert rc == 0 and (dst / "model.safetensors").exists(), err
    (tmp_path / "one.safetensors").write_bytes(st_bytes(tensors()))
    rc, out, err = run(capsys, "convert", tmp_path / "one.safetensors", tmp_path / ("m" * 243 + ".safetensors"))
    assert rc == 0, err


def test_parent_turned_into_a_file_after_planning_reports_the_first_error(tmp_path):
    """The clean-up of the temporary fails too (its folder is a file): the error is the write's, naming DST."""
    from surgery.checkpoint import CheckpointError, execute, plan_convert
    src = make_dir(tmp_path / "src")
    (tmp_path / "out").mkdir()
    plan = plan_convert(src, tmp_path / "out" / "dst")
    try:
        (tmp_path / "out").rmdir()
        (tmp_path / "out").write_text("now a file")
        with pytest.raises(CheckpointError) as e:
            execute(plan)
    finally:
        plan.ck.close()
    assert str(e.value).startswith(f"{tmp_path / 'out' / 'dst'}: write failed (a part of the path is not a "
                                   "directory)"), str(e.value)
    assert ".surgery-tmp" not in str(e.value)


# ---- issue 16: temporaries of a killed run --------------------------------------------------------

def _killed_mid_write(tmp_path, src, dst):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SURGERY_TEST_HOOK": "write",
           "SURGERY_TEST_HOOK_FILE": str(tmp_path / "hook")}
    proc = subprocess.Popen([sys.executable, "-m", "surgery", "convert", str(src), str(dst)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "hook.write").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        proc.kill()  # SIGKILL: nothing can clean up
        proc.wait(timeout=60)
    (tmp_path / "hook.write").unlink()
    return proc.pid


def test_temporary_of_a_killed_run_is_removed_by_the_next(tmp_path, capsys):
    from surgery.checkpoint.atomic import host_tag
    src = make_dir(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "dst"
    pid = _killed_mid_write(tmp_path, src, dst)
    stale = debris(out)
    assert len(stale) == 1 and f".surgery-tmp-{pid}-" in stale[0]
    live = out / f".surgery-tmp-{os.getppid()}-{host_tag()}-0123abcd-dst"  # a process that is running
    elsewhere = out / ".surgery-tmp-4242-0badc0de-0123abcd-dst"  # another machine: its pid means nothing here
    old_format = out / ".surgery-tmp-dst-4242-0123abcd"  # an older surgery's name: no machine recorded
    other_dst = out / f".surgery-tmp-4242-{host_tag()}-0123abcd-other"  # another DST's: not this run's business
    planted = out / f".surgery-tmp-4243-{host_tag()}-0123abcd-dst"  # a link: never ours
    for p in (live, elsewhere, old_format, other_dst):
        p.mkdir()
    planted.symlink_to(src)
    rc, o, err = run(capsys, "convert", src, dst, "--dry-run")  # names it, removes nothing
    assert rc == 0 and os.path.basename(stale[0]) in o and os.path.exists(stale[0])
    rc, o, err = run(capsys, "convert", src, dst)
    assert rc == 0, err
    assert f"{os.path.basename(stale[0])} is a temporary left by an earlier convert to this DST (pid {pid}, no " \
           "longer running); convert removes it" in err
    assert not os.path.exists(stale[0])
    for p in (live, elsewhere, old_format, planted):
        assert os.path.lexists(p) and p.name in err and "left alone" in err, (p.name, err)
    assert other_dst.exists() and other_dst.name not in err
    assert snapshot(src)  # the planted link's target is untouched
    assert (dst / "model.safetensors").exists()


# ---- issue 16: a quantized tensor in a .pt ----------------------------------------------------------

@pytest.mark.parametrize("argv", [["convert", "{pt}", "{out}"], ["inspect", "{pt}"], ["inspect", "{pt}", "--json"]],
                         ids=["convert", "inspect", "inspect-json"])
def test_quantized_pt_is_one_line_without_torch_warnings(tmp_path, argv):
    import torch
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)
    torch.save({"w": q, "b": torch.ones(2)}, tmp_path / "q.pt")
    args = [a.format(pt=tmp_path / "q.pt", out=tmp_path / "q.safetensors") for a in argv]
    r = subprocess.run([sys.executable, "-m", "surgery", *args], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "default"})
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [f"surgery {argv[0]}: error: {tmp_path / 'q.pt'}: tensor 'w' is sparse or "
                                     "quantized; safetensors stores dense tensors only"], r.stderr
    assert not (tmp_path / "q.safetensors").exists()
