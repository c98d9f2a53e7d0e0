"""Ctrl-C and SIGTERM (issue 9, item 6): at start-up, mid-write, twice, and at random
moments, `surgery convert` exits 130 with one line and leaves no DST and no temporary (or,
signalled after its final rename, exits 0 with DST complete).

The console script is run as pip writes it. ``SURGERY_TEST_HOOK`` makes the command wait at
a named point (see ``surgery.interrupts.test_hook``) so the signal lands there for sure."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fake_checkpoint import debris, make_dir, snapshot

ROOT = Path(__file__).resolve().parents[2]  # the project
CONSOLE_SCRIPT = "import re\nimport sys\nfrom surgery.cli import main\nif __name__ == '__main__':\n" \
                 "    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n    sys.exit(main())\n"


def _start(tmp_path, src, dst, hooks="", **extra_env):
    script = tmp_path / "bin" / "surgery"
    script.parent.mkdir(exist_ok=True)
    script.write_text(CONSOLE_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SURGERY_TEST_HOOK": hooks,
           "SURGERY_TEST_HOOK_FILE": str(tmp_path / "hook"), **extra_env}
    return subprocess.Popen([sys.executable, str(script), "convert", str(src), str(dst), "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(tmp_path, name, proc, timeout=60):
    marker = tmp_path / f"hook.{name}"
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"the command never reached {name}"
        time.sleep(0.005)
    return marker


def _assert_interrupted(proc, tmp_path, src, before, dst):
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (proc.returncode, err)
    lines = err.strip().splitlines()
    assert lines == ["surgery convert: interrupted; nothing was written to DST"], err
    assert not os.path.lexists(dst) and debris(tmp_path) == []
    assert snapshot(src) == before


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_at_start_up(tmp_path, sig):
    """While Python imports the package: no traceback, exit 130 (the flag is turned into the exit)."""
    src = make_dir(tmp_path / "src", sharded=True)
    before = snapshot(src)
    proc = _start(tmp_path, src, tmp_path / "dst", "startup")
    marker = _wait_for(tmp_path, "startup", proc)
    proc.send_signal(sig)
    time.sleep(0.05)
    marker.unlink()
    _assert_interrupted(proc, tmp_path, src, before, tmp_path / "dst")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_write(tmp_path, sig):
    src = make_dir(tmp_path / "src", sharded=True)
    before = snapshot(src)
    proc = _start(tmp_path, src, tmp_path / "dst", "write")
    marker = _wait_for(tmp_path, "write", proc)
    assert debris(tmp_path), "the temporary exists while writing"
    proc.send_signal(sig)
    _assert_interrupted(proc, tmp_path, src, before, tmp_path / "dst")
    marker.unlink(missing_ok=True)


def test_double_ctrl_c_during_cleanup_leaves_no_temporary(tmp_path):
    src = make_dir(tmp_path / "src", sharded=True)
    before = snapshot(src)
    proc = _start(tmp_path, src, tmp_path / "dst", "write,cleanup")
    _wait_for(tmp_path, "write", proc)
    proc.send_signal(signal.SIGINT)
    marker = _wait_for(tmp_path, "cleanup", proc)  # cleanup has started, temporary still there
    assert debris(tmp_path)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    marker.unlink()
    _assert_interrupted(proc, tmp_path, src, before, tmp_path / "dst")


@pytest.mark.slow
def test_ctrl_c_at_random_moments(tmp_path):
    """From the package's first line to the end, whatever the moment: exit 130 with one line
    and nothing left, or (signalled after the final rename) exit 0 with DST whole.
    Before that line Python itself is starting (site, the console script's own imports): a
    SIGINT there is Python's, as for any program; nothing can have been written then."""
    src = make_dir(tmp_path / "src", sharded=True)
    before = snapshot(src)
    t0 = time.monotonic()
    proc = _start(tmp_path, src, tmp_path / "ref", "startup", SURGERY_TEST_HOOK_NOWAIT="1")
    _wait_for(tmp_path, "startup", proc)
    t1 = time.monotonic()
    assert proc.wait(timeout=120) == 0
    full = time.monotonic() - t1
    outcomes = []
    for i in range(12):
        (tmp_path / "hook.startup").unlink()
        dst = tmp_path / f"dst{i}"
        proc = _start(tmp_path, src, dst, "startup", SURGERY_TEST_HOOK_NOWAIT="1")
        _wait_for(tmp_path, "startup", proc)
        time.sleep(full * i / 10)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        outcomes.append(proc.returncode)
        assert debris(tmp_path) == [], (i, err)
        assert proc.returncode in (0, 130), (i, proc.returncode, err)
        if proc.returncode == 0:
            assert sorted(os.listdir(dst)) == sorted(os.listdir(tmp_path / "ref"))
        else:
            assert not os.path.lexists(dst), (i, err)
            assert err.strip().splitlines() == ["surgery convert: interrupted; nothing was written to DST"], err
    assert snapshot(src) == before
    assert 130 in outcomes, outcomes


def test_a_signal_landing_in_a_weakref_callback_prints_nothing():
    """A signal that arrives while Python runs a weakref callback or a __del__ (seen in importlib's
    module-lock callback at a random moment) raises KeyboardInterrupt where Python can only print it;
    the flag already carries it to exit 130, so the installed unraisable hook keeps it quiet, and
    prints everything else as before."""
    import types

    from surgery import interrupts

    seen = []
    hook = interrupts._unraisable(seen.append)
    kb = types.SimpleNamespace(exc_type=KeyboardInterrupt, exc_value=KeyboardInterrupt(), object=None)
    other = types.SimpleNamespace(exc_type=ValueError, exc_value=ValueError("x"), object=None)
    old = interrupts.STATE.interrupted
    try:
        interrupts.STATE.interrupted = True
        hook(kb)
        hook(other)
        interrupts.STATE.interrupted = False
        hook(kb)  # a KeyboardInterrupt that no signal of ours explains is printed as usual
    finally:
        interrupts.STATE.interrupted = old
    assert seen == [other, kb]
