"""How busy the machine was while a benchmark ran, from ``/proc/stat`` and rusage."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path


class LoadMeter:
    """How busy the whole machine was while a benchmark ran, and how much of that
    was the benchmark itself (this process and the children it reaped).

    On a shared 2-core machine another busy process skews every figure here,
    so each benchmark ends by saying how many cores others were using.
    """

    def __init__(self) -> None:
        self._busy, self._total = _machine_jiffies()
        self._own = _own_cpu_s()
        self._started = time.monotonic()

    def report(self) -> str:
        busy, total = _machine_jiffies()
        elapsed = time.monotonic() - self._started
        cores = os.cpu_count() or 1
        if total <= self._total or elapsed <= 0:
            return "machine load: unknown"
        machine = cores * (busy - self._busy) / (total - self._total)
        own = (_own_cpu_s() - self._own) / elapsed
        others = max(0.0, machine - own)
        note = " (others were busy: figures are skewed)" if others > 0.25 else ""
        return (f"machine load over {elapsed:.0f} s: {machine:.2f} of {cores} cores busy on "
                f"average; this benchmark's processes {own:.2f}, other processes "
                f"{others:.2f}{note}; load average now {os.getloadavg()[0]:.2f}")


def _machine_jiffies() -> tuple[int, int]:
    """Busy and total CPU time of the whole machine, from ``/proc/stat`` (0, 0 elsewhere)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return 0, 0
    values = [int(value) for value in fields[:8]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def _own_cpu_s() -> float:
    mine = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return mine.ru_utime + mine.ru_stime + children.ru_utime + children.ru_stime

