"""batcher's mock server as a separate process, and what its stats say."""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from harness import PYTHON, REPO, BenchError
from harness.processes import Reaper, Usage


class MockProcess:
    """``python -m batcher mock-server`` as a separate process on a free port."""

    def __init__(self, *, latency_s: float = 0.0, rpm: int | None = None,
                 tpm: int | None = None, window_s: float | None = None,
                 log_folder: Path | None = None, extra: Sequence[str] = ()) -> None:
        self.args = ["--port", "0", "--latency", f"{latency_s:g}", *extra]
        if rpm is not None:
            self.args += ["--rpm", str(rpm)]
        if tpm is not None:
            self.args += ["--tpm", str(tpm)]
        if window_s is not None:
            self.args += ["--window", f"{window_s:g}"]
        self._log_folder = log_folder
        self._proc: subprocess.Popen[bytes] | None = None
        self._reaper: Reaper | None = None
        self._stderr: IO[bytes] | None = None
        self.root_url = ""
        self.usage: Usage | None = None

    @property
    def command(self) -> list[str]:
        return [PYTHON, "-m", "batcher", "mock-server", *self.args]

    @property
    def base_url(self) -> str:
        return self.root_url + "/v1"

    def start(self, timeout_s: float = 20.0) -> MockProcess:
        folder = self._log_folder or Path(tempfile.gettempdir())
        self._stderr = tempfile.TemporaryFile(dir=folder)  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=self._stderr,
                                      cwd=REPO, start_new_session=True)
        self._reaper = Reaper(self._proc, time.monotonic())
        assert self._proc.stdout is not None
        line = _read_line(self._proc.stdout, timeout_s)
        match = re.search(r"listening on (http://\S+)/v1", line)
        if match is None:
            self.stop()
            raise BenchError(f"mock server did not start (said {line!r}; "
                             f"stderr: {self._stderr_text()!r})")
        self.root_url = match.group(1)
        return self

    def stats(self) -> dict[str, Any]:
        """``GET /_mock/stats`` (``by_status`` keys come back as strings)."""
        with urllib.request.urlopen(self.root_url + "/_mock/stats", timeout=30) as response:
            data: dict[str, Any] = json.load(response)
        return data

    def requests_total(self) -> int:
        return int(self.stats()["requests_total"])

    def stop(self) -> Usage | None:
        """SIGTERM, then reap; the mock's CPU time and peak RSS land in ``usage``."""
        if self._proc is None or self._reaper is None:
            return self.usage
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, signal.SIGTERM)
        self.usage = self._reaper.join(15)
        if self.usage is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self.usage = self._reaper.join(5)
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
        self._proc = None
        return self.usage

    def _stderr_text(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-2000:]

    def __enter__(self) -> MockProcess:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def _read_line(stream: IO[bytes], timeout_s: float) -> str:
    """One line from a child's stdout, or whatever arrived before the deadline."""
    selector = selectors.DefaultSelector()
    selector.register(stream, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    data = b""
    fd = stream.fileno()
    try:
        while b"\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    finally:
        selector.close()
    return data.decode(errors="replace").splitlines()[0] if data else ""



def by_status(stats: dict[str, Any]) -> dict[int, int]:
    return {int(status): count for status, count in stats.get("by_status", {}).items()}



def use_per_window(stats: dict[str, Any], quantity: str, limit_per_min: float) -> float:
    """The mock's own count of what it admitted (``requests`` or ``tokens``, the other
    client's left out), over its windows, as a share of ``limit_per_min``. The first and
    the last window are partial (start-up, the last rows) and left out."""
    admitted = stats.get("admitted_per_window", {})
    inner = admitted.get(quantity, [])[1:-1]
    if not inner:
        return 0.0
    capacity = limit_per_min * float(admitted["window_s"]) / 60
    return sum(inner) / (len(inner) * capacity)
