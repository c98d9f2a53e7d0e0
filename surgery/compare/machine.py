"""Where ``surgery compare`` runs, said in words, and the peak memory of one run.

On a GPU the peak is what torch allocated on it during the run (``torch.cuda.max_memory_allocated``,
reset before the run). On a CPU it is the process's peak resident memory during the run (Linux: the
``VmHWM`` of ``/proc/self/status``, reset with ``/proc/self/clear_refs``); it includes the data and
Python, so read the differences between methods. Where neither can be measured it is None.
"""

from __future__ import annotations

import os
import platform

__all__ = ["choose_device", "describe_device", "PeakMemory"]


def choose_device(wanted: str) -> str:
    """``"cuda"``, ``"mps"`` or ``"cpu"`` for ``--device`` ``auto``/``cpu``/``cuda``.

    Raises:
        CompareError: ``cuda`` asked for where torch sees no CUDA device.
    """
    import torch

    from .settings import CompareError

    if wanted == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if wanted == "cuda":
        raise CompareError("--device cuda: torch sees no CUDA device here (torch "
                           f"{torch.__version__}); use --device cpu or auto")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def _cpu_name() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return name


def describe_device(device: str) -> str:
    """The device in words, e.g. ``GPU: NVIDIA H100 80GB HBM3 (cuda:0), torch 2.13.0``."""
    import torch

    if device == "cuda":
        what = f"GPU: {torch.cuda.get_device_name(0)} (cuda:0)"
    elif device == "mps":
        what = "GPU: Apple MPS"
    else:
        n = torch.get_num_threads()
        what = f"CPU: {_cpu_name()}, {os.cpu_count()} cores, {n} torch thread{'s' * (n != 1)}"
    return f"{what}, torch {torch.__version__}"


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.bytes`` (None where not measurable) and ``peak.kind``."""

    def __init__(self, device: str):
        self.device = device
        self.bytes: int | None = None
        self.kind = "GPU memory allocated by torch" if device == "cuda" else "process peak resident memory"
        self._ok = False

    def __enter__(self):
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._ok = True
        elif self.device == "cpu":
            try:
                with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                    f.write("5")  # resets VmHWM to the current resident size
                self._ok = _status_kib("VmHWM") is not None
            except OSError:
                self._ok = False
        return self

    def __exit__(self, *exc):
        if not self._ok:
            return False
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            self.bytes = int(torch.cuda.max_memory_allocated())
        else:
            kib = _status_kib("VmHWM")
            self.bytes = kib * 1024 if kib is not None else None
        return False
