"""Timing a run's sending period by following its checkpoint as it grows."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class JournalWatcher:
    """Follows a checkpoint file as rows are journaled, on a background thread.

    Rows already in the file when watching starts (a synthesized checkpoint)
    are the baseline; ``first_at``/``last_at`` are when the first and the last
    new row were seen, to within ``interval_s``.
    """

    path: Path
    interval_s: float = 0.002
    baseline_rows: int = 0
    rows: int = 0
    first_at: float | None = None
    first_rows: int = 0
    last_at: float | None = None
    _offset: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> JournalWatcher:
        if self.path.exists():
            self._offset = self.path.stat().st_size
            with self.path.open("rb") as handle:
                self.baseline_rows = max(0, sum(chunk.count(b"\n") for chunk in
                                                iter(lambda: handle.read(1 << 20), b"")) - 1)
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._poll()

    def _follow(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._poll()

    def _poll(self) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size <= self._offset:
            return
        now = time.monotonic()
        with self.path.open("rb") as handle:
            handle.seek(self._offset)
            data = handle.read(size - self._offset)
        complete = data.rfind(b"\n") + 1  # a line being written is counted once it ends
        self._offset += complete
        lines = data[:complete].count(b"\n")
        if self._offset == complete and self.baseline_rows == 0 and lines:
            lines -= 1  # the header written by a fresh run
        if lines <= 0:
            return
        self.rows += lines
        if self.first_at is None:
            self.first_at, self.first_rows = now, self.rows
        self.last_at = now

    @property
    def sending_s(self) -> float:
        """Seconds between the first and the last observed journal growth."""
        if self.first_at is None or self.last_at is None:
            return 0.0
        return self.last_at - self.first_at

    def rate_per_s(self) -> float:
        """Rows journaled per second between the first and last observation."""
        span = self.sending_s
        return (self.rows - self.first_rows) / span if span > 0 else 0.0

