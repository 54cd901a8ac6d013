"""py-spy: wrapping a command in it, and where the profiled process spent its time."""

from __future__ import annotations

import re
import shutil
import sys
import sysconfig
from collections import Counter
from pathlib import Path

from harness import REPO
from harness.report import print_table

# Prefixes cut from a frame's file path, so ``.../lib/python3.X/asyncio/events.py``
# reads ``asyncio/events.py`` whatever the Python version and install location.
_STDLIB = Path(sysconfig.get_path("stdlib"))
_PATH_PREFIXES = ("site-packages/", f"{_STDLIB}/", f"{_STDLIB.resolve()}/", f"{REPO}/")


def py_spy() -> str | None:
    """The ``py-spy`` executable beside this interpreter or on PATH, if installed."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def py_spy_wrapper(executable: str, raw_path: Path, rate: int = 250) -> list[str]:
    """Prefix for a command so py-spy samples it (collapsed stacks, idle time excluded)."""
    return [executable, "record", "--format", "raw", "--rate", str(rate), "--nonblocking",
            "--output", str(raw_path), "--"]


def _frame_name(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``pkg/file.py:func``."""
    match = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    if match is None:
        return frame
    function, path = match.groups()
    for marker in _PATH_PREFIXES:
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{function}"


def summarize_profile(raw_path: Path, rate: int = 250, top: int = 15) -> None:
    """Print where a py-spy'd process spent its time: self time by function and by
    package, by thread kind, and inclusive time of batcher's own functions.

    py-spy drops samples of threads it sees idle, but counts a thread waiting
    for the GIL as busy, so with aiohttp's executor threads in play the sample
    total exceeds the CPU time: shares are of samples, seconds are samples/rate.
    """
    self_time: Counter[str] = Counter()
    by_package: Counter[str] = Counter()
    by_thread: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw_path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(frame) for frame in stack.split(";")
                  if not frame.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        leaf = frames[-1]
        self_time[leaf] += count
        by_package[leaf.split("/", 1)[0].split(".py", 1)[0]] += count
        pool = any(frame.startswith("concurrent/futures/thread.py:") for frame in frames)
        by_thread["executor threads (concurrent.futures)" if pool else "other threads"
                  if frames[0].startswith("threading.py:") else "main thread"] += count
        for name in set(frames):
            if name.startswith("batcher/"):
                inclusive[name] += count
    if not total:
        print("profile: no samples")
        return

    def share(counter: Counter[str], limit: int) -> list[tuple[str, str, str]]:
        return [(name, f"{100 * count / total:.1f}%", f"{count / rate:.2f}")
                for name, count in counter.most_common(limit)]

    print(f"profile: {total} samples at {rate}/s = {total / rate:.1f} s of non-idle thread "
          "time (py-spy; a thread waiting for the GIL counts as non-idle)")
    print("by thread:")
    print_table(["thread", "share", "~s"], share(by_thread, 5))
    print("self time by function:")
    print_table(["function", "share", "~s"], share(self_time, top))
    print("self time by package/module of the leaf frame:")
    print_table(["package", "share", "~s"], share(by_package, 10))
    print("inclusive time of batcher functions:")
    print_table(["function", "share", "~s"], share(inclusive, top))

