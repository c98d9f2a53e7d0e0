"""Ctrl-C (SIGINT) and ``kill`` (SIGTERM) for the ``surgery`` command line.

Contract: a signal at any moment before convert's final rename exits 130 with one line and
leaves no DST and no temporary; once DST is in place, a late signal is ignored and the
command exits 0 (DST is complete).

* :func:`install` is called by ``surgery/__init__.py`` as the first thing the ``surgery``
  console script runs, and again by ``main``. Until ``main`` is ready (``arm``), a signal
  only sets a flag, which ``main`` turns into exit 130: no traceback while Python imports.
* Armed, the first signal raises ``KeyboardInterrupt``; later ones only set the flag, so a
  second Ctrl-C cannot cut the cleanup of the temporary in half.
* A ``KeyboardInterrupt`` that library code swallowed still counts: :data:`STATE` keeps
  the flag and ``convert`` checks it before its final rename.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

__all__ = ["STATE", "install", "arm", "disarm", "restore", "ignore", "test_hook"]

SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None)


class _State:
    def __init__(self):
        self.interrupted = False  # a signal arrived
        self.armed = False  # raise KeyboardInterrupt on the first signal
        self.committed = False  # DST is in place: later signals are ignored
        self.previous: dict[int, object] = {}

    def reset(self) -> None:
        self.interrupted = self.armed = self.committed = False


STATE = _State()


def _handler(signum, frame):
    if STATE.committed or STATE.interrupted:
        STATE.interrupted = True
        return
    STATE.interrupted = True
    if STATE.armed:
        raise KeyboardInterrupt


def _unraisable(hook):
    """``sys.unraisablehook`` that stays quiet about our own ``KeyboardInterrupt``: a signal that lands
    in a weakref callback or a ``__del__`` (importlib's module-lock callback, say) raises there, Python
    can only print it ("Exception ignored in ..."), and the flag already carries it to exit 130."""
    def quiet(unraisable):
        if issubclass(unraisable.exc_type, KeyboardInterrupt) and STATE.interrupted:
            return
        hook(unraisable)
    quiet.surgery = True
    return quiet


def install() -> bool:
    """Install the handler for SIGINT and SIGTERM (main thread only); False where impossible."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if not getattr(sys.unraisablehook, "surgery", False):
        sys.unraisablehook = _unraisable(sys.unraisablehook)
    for s in SIGNALS:
        old = signal.signal(s, _handler)
        if old is not _handler:
            STATE.previous[s] = old
    return True


def arm() -> None:
    """From now on the first signal raises KeyboardInterrupt (raised at once if one already came)."""
    STATE.armed = True
    if STATE.interrupted:
        raise KeyboardInterrupt


def disarm() -> None:
    STATE.armed = False


def restore() -> None:
    """Put back the handlers :func:`install` replaced (``main`` called in process)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for s, old in STATE.previous.items():
        signal.signal(s, old if old is not None else signal.SIG_DFL)
    STATE.previous.clear()


def ignore() -> None:
    """Ignore SIGINT/SIGTERM from now on: the command has decided its exit status and only
    the interpreter's shutdown is left (which would otherwise restore the default action,
    so a late Ctrl-C would kill a finished, successful run)."""
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)


def test_hook(name: str) -> None:
    """For the signal tests only: with ``name`` in ``SURGERY_TEST_HOOK`` (comma-separated),
    create the file ``$SURGERY_TEST_HOOK_FILE.<name>`` and wait (up to 20 s) until the test
    deletes it, so a signal can be sent at a known moment (with ``SURGERY_TEST_HOOK_NOWAIT``
    set, only create it). Does nothing otherwise."""
    if name not in os.environ.get("SURGERY_TEST_HOOK", "").split(","):
        return
    marker = f"{os.environ['SURGERY_TEST_HOOK_FILE']}.{name}"
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    if os.environ.get("SURGERY_TEST_HOOK_NOWAIT"):
        return
    deadline = time.monotonic() + 20
    while os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.005)


def started_as_console_script() -> bool:
    """True in the ``surgery`` console script (``sys.argv[0]`` is .../surgery)."""
    return bool(sys.argv) and os.path.basename(sys.argv[0]) in ("surgery", "surgery.exe", "surgery-script.py")
