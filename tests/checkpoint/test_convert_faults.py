"""Durability under faults (issue 26), tested the way SQLite tests its I/O.

For each scenario (a fresh DST, ``--overwrite`` of a folder and of a single file, sharded and
single-file inputs, ``surgery.export`` in Python) a clean run first counts the filesystem
operations it makes; then, for N = 1, 2, ..., the run is repeated with the N-th operation
failed, and after each run:

* SRC (or the model) is unchanged;
* DST is exactly the old one (or absent, for a fresh DST) or exactly the correct new one;
* nothing is left beside DST, or what is left is named in the message;
* the exit status and the one line tell the truth: 0 means DST is the new checkpoint (a
  warning names anything the run could not finish after DST was in place), 2 means DST is
  as it was, with one line naming the problem in words (the injected error's words), 130
  (Ctrl-C) likewise. Never a traceback.

Faults are injected in process by wrapping the ``os`` functions convert and export call (and
``open``, whose file objects count their reads and writes), so the tests run anywhere the
suite runs. Modes: ``EIO`` on each operation; ``ENOSPC`` on each operation that allocates
space; ``EIO+`` (persistent: the N-th and every later operation fail, so the clean-up fails
too); ``EINTR``: CPython retries a system call that a signal interrupted (PEP 475) after
running the Python signal handler, so an EINTR reaches convert as its handler running at that
moment: a real SIGINT is sent to the process just before the N-th operation.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import io
import os
import shutil
import signal
import stat
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from fake_checkpoint import make_dir, st_bytes, tensors

import surgery
import surgery.checkpoint.swap as swap
from surgery.checkpoint import CheckpointError
from surgery.checkpoint.common import CheckpointWarning
from surgery.cli import main

# every os function convert and export reach for files with (directly, or through pathlib,
# os.path, shutil); os.access is not failed: it answers False for any error, which no caller
# can tell from a refusal
OPS = ("open", "read", "pread", "preadv", "readv", "write", "pwrite", "writev", "fsync", "fdatasync", "close",
       "rename", "replace", "unlink", "remove", "rmdir", "mkdir", "scandir", "listdir", "stat", "lstat", "fstat",
       "chmod", "fchmod", "utime", "copy_file_range", "sendfile", "lseek", "link", "symlink", "readlink",
       "statvfs", "pathconf", "ftruncate", "truncate")
# the operations that can run out of space (ENOSPC): creating, writing, syncing, renaming
ALLOCATING = {"write", "pwrite", "writev", "fsync", "fdatasync", "close", "rename", "replace", "mkdir",
              "copy_file_range", "sendfile", "link", "symlink", "ftruncate", "truncate", "renameat2", "file.write",
              "file.flush", "file.close"}
WORDS = {errno.EIO: "input/output error", errno.ENOSPC: "no space left"}
_REAL = {n: getattr(os, n) for n in OPS if hasattr(os, n)}
_REAL_OPEN = builtins.open


def _creates(name: str, args: tuple, kwargs: dict) -> bool:
    if name == "open":
        return bool((args[1] if len(args) > 1 else kwargs.get("flags", 0)) & os.O_CREAT)
    if name == "builtins.open":
        mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
        return any(c in mode for c in "wxa+")
    return name in ALLOCATING


class Faults:
    """While inside: count the filesystem operations this process makes (those of gettext's
    locale look-up excepted) and fail the ``fail_at``-th one (with ``persist``, every later one
    too) with ``err``; ``err=errno.EINTR`` sends SIGINT instead, just before that operation."""

    def __init__(self, fail_at: int = 0, err: int = errno.EIO, persist: bool = False):
        self.fail_at, self.err, self.persist = fail_at, err, persist
        self.n = 0
        self.log: list[tuple[str, Any]] = []  # (operation, its first argument)
        self.allocating: list[bool] = []  # whether each could fail with ENOSPC
        self.failed: list[str] = []  # the operations that were failed, as "name(arg)"

    @staticmethod
    def _gettext() -> bool:
        """Called from gettext (argparse's translations look-up: os.stat through os.path.exists)."""
        f = sys._getframe(4)
        for _ in range(8):
            if f is None:
                return False
            if f.f_code.co_filename.endswith("gettext.py"):
                return True
            f = f.f_back
        return False

    def describe(self, i: int) -> str:
        name, arg = self.log[i]
        return f"{name}({os.path.basename(os.fspath(arg)) if isinstance(arg, (str, os.PathLike)) else arg})"

    def op(self, name: str, args: tuple, kwargs: dict) -> OSError | None:
        """Count one operation; the error to raise for it, if it is to fail."""
        if name == "stat" and self._gettext():
            return None
        self.n += 1
        self.log.append((name, args[0] if args else ""))
        self.allocating.append(_creates(name, args, kwargs))
        hit = self.n == self.fail_at or (self.persist and self.fail_at and self.n > self.fail_at)
        if not hit:
            return None
        if self.err == errno.EINTR:
            self.failed.append(self.describe(-1))
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs here, as CPython runs it on EINTR
            return None
        if self.err == errno.ENOSPC and not _creates(name, args, kwargs):
            return None
        self.failed.append(self.describe(-1))
        files = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
        return OSError(self.err, os.strerror(self.err), *(files[:1] + [None] + files[1:2] if files else []))

    def _wrap(self, name: str, real: Callable) -> Callable:
        def call(*args, **kwargs):
            e = self.op(name, args, kwargs)
            if e is not None:
                if name == "close":  # Linux releases the descriptor even when close() fails
                    real(*args, **kwargs)
                raise e
            return real(*args, **kwargs)
        return call

    def _open(self, *args, **kwargs):
        e = self.op("builtins.open", args, kwargs)
        if e is not None:
            raise e
        return _File(_REAL_OPEN(*args, **kwargs), self)

    def __enter__(self) -> "Faults":
        for n, f in _REAL.items():
            setattr(os, n, self._wrap(n, f))
        builtins.open = io.open = self._open
        self._swap = swap._renameat2
        swap._renameat2 = self._wrap("renameat2", swap._renameat2)
        return self

    def __exit__(self, *exc) -> None:
        for n, f in _REAL.items():
            setattr(os, n, f)
        builtins.open = io.open = _REAL_OPEN
        swap._renameat2 = self._swap


class _File:
    """A file object whose reads, writes, flushes and close count as operations."""

    def __init__(self, f, faults: Faults):
        self._f, self._faults = f, faults

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _do(self, name, fn, *args):
        e = self._faults.op(name, (getattr(self._f, "name", ""),), {})
        if e is not None:
            if name == "file.close":
                self._f.close()
            raise e
        return fn(*args)

    def __iter__(self):
        return iter(self._do("file.read", self._f.readlines))

    def read(self, *a):
        return self._do("file.read", self._f.read, *a)

    def readline(self, *a):
        return self._do("file.read", self._f.readline, *a)

    def write(self, s):
        return self._do("file.write", self._f.write, s)

    def flush(self):
        return self._do("file.flush", self._f.flush)

    def close(self):
        if not self._f.closed:
            self._do("file.close", self._f.close)


# ---- what is on disk --------------------------------------------------------------------------------

def state(p: Path) -> Any:
    """None (absent), or every entry under ``p`` (links not followed): kind, mode, content digest."""
    if not os.path.lexists(p):
        return None
    if not os.path.isdir(p) or os.path.islink(p):
        return _entry(p)
    out = {}
    for d, dirs, files in os.walk(p):
        for n in dirs + files:
            q = os.path.join(d, n)
            out[os.path.relpath(q, p)] = _entry(q)
    return ("dir", stat.S_IMODE(os.lstat(p).st_mode), out)


def _entry(q) -> tuple:
    st = os.lstat(q)
    if stat.S_ISLNK(st.st_mode):
        return ("link", os.readlink(q))
    if stat.S_ISREG(st.st_mode):
        with _REAL_OPEN(q, "rb") as f:
            return ("file", stat.S_IMODE(st.st_mode), st.st_nlink, hashlib.sha256(f.read()).hexdigest())
    return ("dir" if stat.S_ISDIR(st.st_mode) else "other", stat.S_IMODE(st.st_mode))


def _names(folder: Path) -> set[str]:
    return set(os.listdir(folder)) if folder.is_dir() else set()


def _clear(p: Path) -> None:
    if os.path.isdir(p) and not os.path.islink(p):
        os.chmod(p, 0o700)
        shutil.rmtree(p)
    elif os.path.lexists(p):
        os.unlink(p)


def _put(template: Path, p: Path) -> None:
    """``p`` made a copy of ``template`` (or removed, when there is none)."""
    _clear(p)
    if template is None:
        return
    if template.is_dir():
        shutil.copytree(template, p, symlinks=True)
    else:
        shutil.copy2(template, p)


# ---- scenarios --------------------------------------------------------------------------------------

@dataclass
class Outcome:
    """What one run gave: ``kind`` is "ok", "error" or "interrupted"; ``lines`` what it said."""

    kind: str
    lines: list[str]
    rc: int | None = None


@dataclass
class Scenario:
    name: str
    run: Callable[[], Outcome]  # one run, faults injected around it by the caller
    dst: Path
    watch: Path  # the folder DST goes in (or the nearest that exists before the run): leftovers appear here
    old: Path | None  # a copy of DST as it was before each run (None: no DST)
    before_src: Callable[[], Any]  # SRC (or the model) as it must stay
    new: Any = None  # DST after a clean run
    watched: set[str] = field(default_factory=set)  # what ``watch`` holds before each run (DST aside)
    setup: Callable[[], None] | None = None  # before each run, after DST is restored
    api: bool = False  # Python: a KeyboardInterrupt held back until DST was placed leaves the new DST
    no_exchange: bool = False  # as on a kernel or file system without renameat2: the rename fallback


def _cli(argv: list[str]) -> Callable[[], Outcome]:
    def run() -> Outcome:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main([str(a) for a in argv])
        lines = err.getvalue().splitlines()
        kind = {0: "ok", 2: "error", 130: "interrupted"}.get(rc, f"exit {rc}")
        return Outcome(kind, lines, rc)
    return run


def _convert_scenario(tmp: Path, name: str) -> Scenario:
    """``surgery convert`` scenarios on the byte-built checkpoints of ``fake_checkpoint``."""
    out = tmp / "out"
    out.mkdir()
    if name in ("file-fresh", "file-overwrite"):
        src = tmp / "src.safetensors"
        src.write_bytes(st_bytes(tensors(), {"format": "pt"}))
        dst = out / "plain.safetensors"
    else:
        src = make_dir(tmp / "src", sharded="sharded" in name, files={"tokenizer.json": b'{"tok": 1}',
                                                                      "sub/vocab.txt": b"a\nb\n"})
        dst = out / "new" / "dst" if name == "dir-fresh-sharded" else out / "dst"
    argv = ["convert", src, dst, "--quiet"]
    old = None
    if "overwrite" in name:
        argv.append("--overwrite")
        old = tmp / "old"
        if dst.suffix == ".safetensors":
            old.write_bytes(st_bytes({"x": ("F32", [1], bytes(4))}, {"format": "pt"}))
        else:
            old.mkdir()
            (old / "model.safetensors").write_bytes(st_bytes({"x": ("F32", [1], bytes(4))}))
            (old / "only-in-old.txt").write_text("old")
            (old / "sub").mkdir()
            (old / "sub" / "vocab.txt").write_text("old")
    before = state(src)
    return Scenario(name, _cli(argv), dst, out, old, lambda: state(src) == before)


def _export_scenario(tmp: Path, name: str) -> Scenario:
    """``surgery.export`` in Python: a transformers model (sharded) to a fresh or an existing
    folder, a plain module to an existing ``.safetensors`` file."""
    import torch
    from conftest import tiny_bert

    if name == "export-module-overwrite":
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1))
        surgery.apply(model, mixout=0.1)
        dst = tmp / "out" / "net.safetensors"
        kwargs = {}
    else:
        model = tiny_bert()
        surgery.apply(model, mixout=0.1, dropout=0.0)
        dst = tmp / "out" / "model"
        kwargs = {"max_shard_size": "8KB"}  # 14 KB of weights: two shards and an index
    (tmp / "out").mkdir()
    old = None
    if "overwrite" in name:
        old = tmp / "old"
        if dst.suffix == ".safetensors":
            old.write_bytes(st_bytes({"x": ("F32", [1], bytes(4))}, {"format": "pt"}))
        else:  # an earlier export's folder: its stale shard goes, the tokenizer stays
            old.mkdir()
            (old / "tokenizer.json").write_text("{}")
            (old / "config.json").write_text("{}")
            (old / "model-00009-of-00009.safetensors").write_text("stale")
            (old / "model.safetensors.index.json").write_text("{}")
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def unchanged() -> bool:
        now = model.state_dict()
        return surgery.is_surgered(model) and now.keys() == before.keys() and all(
            torch.equal(now[k], before[k]) for k in before)

    def run() -> Outcome:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            try:
                surgery.export(model, dst, **kwargs)
            except CheckpointError as e:
                return Outcome("error", [f"error: {e}"] + [f"warning: {x.message}" for x in w])
            except KeyboardInterrupt:
                return Outcome("interrupted", [f"warning: {x.message}" for x in w])
        return Outcome("ok", [f"warning: {x.message}" for x in w if issubclass(x.category, CheckpointWarning)])

    return Scenario(name, run, dst, tmp / "out", old, unchanged, api=True)


SCENARIOS = ["dir-fresh-sharded", "dir-overwrite-sharded", "dir-overwrite-single-rename", "file-fresh",
             "file-overwrite", "export-fresh", "export-overwrite", "export-module-overwrite"]


def make_scenario(tmp: Path, name: str) -> Scenario:
    sc = (_export_scenario if name.startswith("export") else _convert_scenario)(tmp, name)
    sc.no_exchange = name.endswith("-rename")
    return sc


def _unsupported(src, dst, flags):
    raise NotImplementedError  # what swap._renameat2 raises where the kernel or file system lacks renameat2


# ---- the sweep --------------------------------------------------------------------------------------

def _reset(sc: Scenario) -> None:
    for n in _names(sc.watch) - sc.watched:
        _clear(sc.watch / n)
    _put(sc.old, sc.dst)


def _check(sc: Scenario, res: Outcome, fa: Faults) -> list[str]:
    """The promises, checked after one run; the broken ones, in words."""
    bad = []
    text = "\n".join(res.lines)
    now = state(sc.dst)
    old = state(sc.old) if sc.old is not None else None
    if not sc.before_src():
        bad.append("SRC (the model) changed")
    lost = now != sc.new and now != old
    if lost and fa.persist and "could not be put back" in text:
        lost = not _recoverable(sc, old, text)  # every later operation failed too: no undo can succeed
    if lost:
        bad.append("DST is neither the old one nor the new one")
    left = sorted(_names(sc.watch) - sc.watched - {sc.dst.relative_to(sc.watch).parts[0]})
    if sc.dst.parent != sc.watch and sc.dst.parent.is_dir():  # a parent folder the run created
        left += [os.path.join(sc.dst.parent.name, n) for n in _names(sc.dst.parent) - {sc.dst.name}]
        if now is None:
            left.append(sc.dst.parent.name)
    for n in left:
        if str(sc.watch / n) not in text:
            bad.append(f"{n} left beside DST and not named")
    if "Traceback" in text or "Errno" in text:
        bad.append("a traceback or an [Errno N]")
    if res.kind == "ok":
        if now != sc.new:
            bad.append("success, but DST is not the new one")
        if any(not (line.startswith("surgery convert: warning: ") or line.startswith("warning: "))
               for line in res.lines):
            bad.append("success with an error line")
        if fa.failed and fa.err != errno.EINTR and any(f.startswith(("fsync", "fdatasync")) for f in fa.failed) \
                and not res.lines:
            bad.append("a failed fsync went unreported")
    elif res.kind == "error":
        errors = [line for line in res.lines if "error: " in line]
        if len(errors) != 1 or len(res.lines) != len(errors) + sum("warning: " in x for x in res.lines):
            bad.append("not exactly one error line")
        if now != old and not lost and "could not be put back" not in text:
            bad.append("error, but DST is not the old one")
        if fa.err in WORDS and WORDS[fa.err] not in text.lower():
            bad.append(f"the error does not say {WORDS[fa.err]!r}")
        if not fa.failed:
            bad.append("an error, but no operation failed")
    elif res.kind == "interrupted":
        if fa.err != errno.EINTR:
            bad.append("interrupted without a signal")
        if now != old and not (sc.api and now == sc.new):
            bad.append("interrupted, but DST is not the old one")
    else:
        bad.append(f"unexpected outcome {res.kind}")
    return bad


def _recoverable(sc: Scenario, old: Any, text: str) -> bool:
    """After a swap that could not be undone: every entry of the old DST is, unchanged, in DST
    or in a place the message names."""
    named = [state(sc.watch / n) for n in _names(sc.watch) if str(sc.watch / n) in text and sc.watch / n != sc.dst]
    if old in named:  # the old DST whole, under the name the message gives
        return True
    if old is None or old[0] != "dir":
        return False
    places = [st[2] for st in named + [state(sc.dst)] if st and st[0] == "dir"]
    return all(any(place.get(k) == v for place in places) for k, v in old[2].items())


MODES = {"EIO": (errno.EIO, False), "ENOSPC": (errno.ENOSPC, False), "EINTR": (errno.EINTR, False),
         "EIO+": (errno.EIO, True)}


def sweep(sc: Scenario, mode: str) -> tuple[int, list[tuple[int, str, Outcome, list[str]]]]:
    """Count the operations of a clean run, then fail each in turn. Returns the count and,
    for every N, ``(N, failed op, outcome, broken promises)``."""
    err, persist = MODES[mode]
    sc.watched = _names(sc.watch) - {sc.dst.relative_to(sc.watch).parts[0]}
    if sc.no_exchange:
        real, swap._renameat2 = swap._renameat2, _unsupported
    try:
        return _sweep(sc, err, persist)
    finally:
        if sc.no_exchange:
            swap._renameat2 = real


def _sweep(sc: Scenario, err: int, persist: bool) -> tuple[int, list[tuple[int, str, Outcome, list[str]]]]:
    logs = []
    for _ in range(3):  # the first run also imports what convert imports on first use
        _reset(sc)
        with Faults() as fa:
            res = sc.run()
        assert res.kind == "ok" and not res.lines, (sc.name, res)
        logs.append([name for name, _ in fa.log])
    assert logs[1] == logs[2], "the operations of a run are not the same each time: N would not name one"
    sc.new = state(sc.dst)
    clean = fa
    results = []
    for n in range(1, clean.n + 1):
        if err == errno.ENOSPC and not clean.allocating[n - 1]:
            continue  # the run is the clean run up to N, and operation N cannot run out of space
        _reset(sc)
        if sc.setup:
            sc.setup()
        fa = Faults(n, err, persist)
        with fa:
            res = sc.run()
        bad = _check(sc, res, fa)
        results.append((n, fa.describe(n - 1) if n <= len(fa.log) else "?", res, bad))
    _reset(sc)
    return clean.n, results


@pytest.fixture(name="scratch")
def _scratch(tmp_path):
    """A folder on tmpfs (``/dev/shm``) where there is one, else ``tmp_path``: thousands of runs
    each fsync and unlink a few files, which costs milliseconds on a disk and microseconds in
    memory; the faults are injected, not the disk's."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK | os.X_OK):
        d = Path(tempfile.mkdtemp(prefix="surgery-faults-", dir="/dev/shm"))
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)
    else:
        yield tmp_path


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", SCENARIOS)
def test_every_operation_failed_in_turn(scratch, name, mode):
    sc = make_scenario(scratch, name)
    total, results = sweep(sc, mode)
    broken = [f"#{n} {op}: {res.kind} {res.lines}: {bad}" for n, op, res, bad in results if bad]
    assert not broken, f"{len(broken)} of {total} runs broke a promise:\n" + "\n".join(broken[:40])


def test_the_sweep_reaches_every_kind_of_operation(scratch):
    """The counted operations of an overwrite include every kind the issue names, so the sweep
    fails each of them (a wrapper that stopped counting, say after a rename, would show here)."""
    sc = make_scenario(scratch, "dir-overwrite-sharded")
    sc.watched = _names(sc.watch) - {"dst"}
    _reset(sc)
    with Faults() as fa:
        assert sc.run().kind == "ok"
    kinds = {name for name, _ in fa.log}
    assert {"open", "read", "preadv", "write", "fsync", "renameat2", "unlink", "mkdir", "scandir", "listdir", "rmdir",
            "copy_file_range", "stat", "lstat", "fstat", "close", "chmod", "fchmod", "utime", "builtins.open",
            "file.write"} <= kinds, kinds
    (scratch / "b").mkdir()
    sc = make_scenario(scratch / "b", "dir-overwrite-single-rename")
    sc.watched = _names(sc.watch) - {"dst"}
    real, swap._renameat2 = swap._renameat2, _unsupported
    try:
        _reset(sc)
        with Faults() as fa:
            assert sc.run().kind == "ok"
    finally:
        swap._renameat2 = real
    assert [name for name, _ in fa.log].count("rename") == 2  # DST aside, the new one in


def _overwrite_with_old_copy_stuck(scratch):
    """An overwrite whose removal of the old DST fails (every unlink inside it, twice)."""
    sc = make_scenario(scratch, "dir-overwrite-sharded")
    sc.watched = _names(sc.watch) - {"dst"}
    _reset(sc)
    real_unlink = os.unlink

    def unlink(path, *a, **k):
        if k.get("dir_fd") is not None or ".surgery-tmp" in os.fspath(path):
            raise OSError(errno.EIO, os.strerror(errno.EIO), path)
        return real_unlink(path, *a, **k)
    return sc, unlink


def test_an_old_copy_that_cannot_be_removed_is_named_and_the_exit_is_0(scratch, monkeypatch):
    """The decided contract: once DST is the new checkpoint, exit 0, and a warning names what is left."""
    sc, unlink = _overwrite_with_old_copy_stuck(scratch)
    monkeypatch.setattr(os, "unlink", unlink)
    res = sc.run()
    monkeypatch.undo()
    left = [n for n in _names(sc.watch) - sc.watched if n != "dst"]
    assert res.rc == 0 and len(left) == 1 and left[0].startswith(".surgery-tmp-"), (res, left)
    assert res.lines == [f"surgery convert: warning: DST was replaced, but the old copy could not be removed: "
                         f"{sc.watch / left[0]}; remove it yourself"]
    assert state(sc.dst)[2].keys() >= {"config.json", "model.safetensors.index.json", "tokenizer.json"}
    assert "only-in-old.txt" in os.listdir(sc.watch / left[0])  # the old DST, kept under the name given


def test_python_convert_warns_and_returns_the_notes(scratch, monkeypatch):
    from surgery.checkpoint import convert

    sc, unlink = _overwrite_with_old_copy_stuck(scratch)
    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.warns(CheckpointWarning, match="DST was replaced, but the old copy could not be removed"):
        plan = convert(scratch / "src", sc.dst, overwrite=True)
    assert len(plan.notes) == 1 and str(sc.watch / ".surgery-tmp-") in plan.notes[0]


def test_a_signal_that_another_thread_receives_is_held_back_too():
    """A SIGINT sent to the process goes to a thread that does not mask it (numpy's BLAS
    threads exist once safetensors has been imported); CPython then runs the handler in the
    main thread at once. signals_blocked() holds it back all the same, and delivers it once
    afterwards."""
    import threading
    import time

    from surgery.checkpoint.atomic import signal_pending, signals_blocked

    seen = []
    old = signal.signal(signal.SIGINT, lambda s, f: seen.append(s))
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, daemon=True)
    t.start()
    try:
        with signals_blocked():
            os.kill(os.getpid(), signal.SIGINT)
            deadline = time.monotonic() + 5
            while not signal_pending() and time.monotonic() < deadline:
                time.sleep(0.001)
            assert signal_pending() and seen == []
            time.sleep(0.01)
            assert seen == []
        assert seen == [signal.SIGINT]
    finally:
        stop.set()
        t.join(5)
        signal.signal(signal.SIGINT, old)


def test_a_handler_set_from_c_for_one_signal_does_not_stop_holding_the_other(monkeypatch):
    """signal.getsignal gives None for a handler installed from C (not restorable from Python): that
    signal is only masked, and SIGINT is still held back and delivered once afterwards (it was all or
    nothing: one None let SIGINT's handler run inside the block)."""
    from surgery.checkpoint.atomic import signal_pending, signals_blocked

    real = signal.getsignal
    monkeypatch.setattr(signal, "getsignal", lambda s: None if s == signal.SIGTERM else real(s))
    import threading
    import time

    seen = []
    old = signal.signal(signal.SIGINT, lambda s, f: seen.append(s))
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, daemon=True)  # a thread that does not mask SIGINT
    t.start()
    try:
        with signals_blocked():
            signal.pthread_kill(t.ident, signal.SIGINT)  # to that thread: CPython runs the handler in the main one
            deadline = time.monotonic() + 5
            while not signal_pending() and not seen and time.monotonic() < deadline:
                time.sleep(0.001)
            assert signal_pending() and seen == []
        assert seen == [signal.SIGINT]
    finally:
        stop.set()
        t.join(5)
        signal.signal(signal.SIGINT, old)


@pytest.mark.parametrize("then_eof", [False, True], ids=["short-read", "short-then-end"])
def test_a_short_read_of_the_header_length(scratch, monkeypatch, then_eof):
    """A read may return fewer bytes than asked (libfiu's "reduce" faults do it; so does a file
    that shrinks): the 8-byte header length is read in a loop, and a file that ends early is
    one line naming it, exit 2 (it was "internal error: unpack requires a buffer of 8 bytes")."""
    src = scratch / "one.safetensors"
    src.write_bytes(st_bytes(tensors(), {"format": "pt"}))
    real, calls = os.preadv, []

    def preadv(fd, buffers, offset, *a):
        if offset in (0, 3) and len(calls) < 2:  # the first read of the header length: 3 bytes, then the rest or nothing
            calls.append(offset)
            if offset == 3 and then_eof:
                return 0
            return real(fd, [memoryview(buffers[0])[:3]] if offset == 0 else buffers, offset, *a)
        return real(fd, buffers, offset, *a)

    monkeypatch.setattr(os, "preadv", preadv)
    res = _cli(["convert", src, scratch / "plain.safetensors", "--quiet"])()
    monkeypatch.undo()
    if then_eof:
        assert res.rc == 2 and res.lines == [f"surgery convert: error: {src}: the file ended early while being read "
                                             "(truncated or changed during the conversion)"], res
        assert not os.path.lexists(scratch / "plain.safetensors")
    else:
        assert res.rc == 0 and res.lines == [] and calls == [0, 3], (res, calls)
