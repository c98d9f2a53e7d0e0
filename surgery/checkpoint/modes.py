"""Permission bits of what ``convert`` writes: what ``cp`` without ``-p`` gives, at most.

SRC may come from someone else, and ``convert`` may run as root: copying SRC's bits
verbatim would publish a setuid-root program whose content SRC's author chose, or leave
DST world-writable. So:

* never setuid, setgid or sticky;
* never more than the umask allows (a 0666 file in SRC is 0644 in DST under umask 022);
* files ``convert`` writes itself (weights, ``config.json``, the shard index) are data:
  never executable;
* copied files keep SRC's execute bits (like ``cp``: a script shipped beside the model
  stays runnable), masked as above;
* folders keep SRC's bits, masked as above, plus the owner's ``rwx`` (so the owner can
  always replace or delete DST).

Bits SRC does not grant are never added (a 0600 weight file stays 0600).
"""

from __future__ import annotations

import os
import stat

__all__ = ["umask", "data_mode", "copy_mode", "dir_mode"]


def umask() -> int:
    """The process umask (read from ``/proc`` where it can be, without changing it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)  # not thread-safe; only where /proc cannot tell
    os.umask(old)
    return old


def data_mode(src_mode: int, mask: int | None = None) -> int:
    """A file convert writes (weights, config, index): SRC's read/write bits, no execute."""
    return stat.S_IMODE(src_mode) & 0o666 & ~(umask() if mask is None else mask)


def copy_mode(src_mode: int, mask: int | None = None) -> int:
    """A file copied from SRC: SRC's rwx bits under the umask; never setuid/setgid/sticky."""
    return stat.S_IMODE(src_mode) & 0o777 & ~(umask() if mask is None else mask)


def dir_mode(src_mode: int, mask: int | None = None) -> int:
    """A folder of DST: SRC's rwx bits under the umask, plus the owner's rwx."""
    return (stat.S_IMODE(src_mode) & 0o777 & ~(umask() if mask is None else mask)) | 0o700
