"""Temporaries an earlier ``convert`` left beside DST (a ``kill -9`` cannot be caught).

A hidden ``.surgery-tmp-<pid>-<host>-<random>-<name>`` beside DST (see ``atomic.py``) is
removed by the next convert to the same DST only when it is provably an abandoned one:

* its name has that exact form, for this DST's name;
* it is a regular file or a folder (never a link), owned by the user running convert;
* ``<host>`` is this machine's tag (same host name and boot), so ``<pid>`` means a process
  here, and no process ``<pid>`` is running.

Anything else that looks like a temporary of convert (another machine or boot, a process
that is still running, a file of another user, the name format of older versions) is left
alone and named in a warning.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from .atomic import TMP_PREFIX, host_tag, name_max, remove

__all__ = ["Leftover", "find_leftovers", "remove_leftovers"]

_NAME = re.compile(re.escape(TMP_PREFIX) + r"(\d{1,10})-([0-9a-f]{8})-[0-9a-f]{8}-(.+)", re.S)


@dataclass
class Leftover:
    path: Path
    pid: int
    removable: bool
    why: str  # words for the warning

    def warning(self) -> str:
        if self.removable:
            return (f"{self.path.name} is a temporary left by an earlier convert to this DST ({self.why}); "
                    "convert removes it")
        return (f"{self.path.name} beside DST looks like a temporary of another convert run ({self.why}); left "
                "alone: remove it yourself once no convert is writing it")


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # a process of another user, or no way to tell
    return True


def _for_dst(name: str, dst: Path, full: str) -> bool:
    if name == dst.name:
        return True
    limit = name_max(dst.parent)
    return len(os.fsencode(full)) >= limit - 3 and dst.name.startswith(name)  # a name cut to the limit


def find_leftovers(dst: Path) -> list[Leftover]:
    """The temporaries of earlier convert runs beside ``dst`` (none when its folder does not exist)."""
    try:
        with os.scandir(dst.parent) as it:
            names = sorted(e.name for e in it if e.name.startswith(TMP_PREFIX))
    except OSError:
        return []
    out = []
    old = re.compile(re.escape(TMP_PREFIX + dst.name) + r"-(\d{1,10})-[0-9a-f]{8}")
    for n in names:
        m = _NAME.fullmatch(n)
        p = dst.parent / n
        if m is None or not _for_dst(m.group(3), dst, n):
            o = old.fullmatch(n)
            if o:
                out.append(Leftover(p, int(o.group(1)), False, f"pid {o.group(1)}, named by an older surgery"))
            continue
        pid, tag = int(m.group(1)), m.group(2)
        try:
            st = os.lstat(p)
        except OSError:
            continue
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)) or st.st_uid != os.getuid():
            out.append(Leftover(p, pid, False, "not a file or folder of yours"))
        elif tag != host_tag():
            out.append(Leftover(p, pid, False, f"pid {pid} on another machine or before a reboot"))
        elif _running(pid):
            out.append(Leftover(p, pid, False, f"pid {pid} is running"))
        else:
            out.append(Leftover(p, pid, True, f"pid {pid}, no longer running"))
    return out


def remove_leftovers(found: list[Leftover]) -> list[Leftover]:
    """Remove the removable ones, checking again that their process is still gone; those that
    could not be removed."""
    return [f for f in found if f.removable and not _running(f.pid) and not remove(f.path)]
