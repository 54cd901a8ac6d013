"""Child processes measured with ``os.wait4``: CPU time, peak RSS, fork and exit times."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Self

from harness import PYTHON, REPO, BenchError


@dataclass
class Usage:
    """What ``os.wait4`` reports about a finished child process."""

    exit_code: int
    wall_s: float
    user_s: float
    sys_s: float
    maxrss_mib: float

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s


class Reaper:
    """Reaps one child with a blocking ``os.wait4`` on a helper thread, timing its exit."""

    def __init__(self, proc: subprocess.Popen[bytes], started: float) -> None:
        self._proc = proc
        self._started = started
        self.usage: Usage | None = None
        self.exited_at: float | None = None
        self._thread = threading.Thread(target=self._wait, daemon=True)
        self._thread.start()

    def _wait(self) -> None:
        _pid, status, rusage = os.wait4(self._proc.pid, 0)
        self.exited_at = time.monotonic()
        code = os.waitstatus_to_exitcode(status)
        self._proc.returncode = code  # so Popen does not try to reap it again
        self.usage = Usage(code, self.exited_at - self._started, rusage.ru_utime,
                           rusage.ru_stime, rusage.ru_maxrss / 1024)

    def join(self, timeout: float | None) -> Usage | None:
        self._thread.join(timeout)
        return self.usage


# Why a launcher: Linux folds the RSS a process had *before* exec into its
# ru_maxrss, and a child forked (or vforked) from this benchmark starts as a
# copy of it, so a plain ``os.wait4`` on ``batcher run`` would report the
# benchmark's own peak whenever that is the larger. This tiny interpreter
# (no site, a few MB) forks and execs batcher itself and hands back what
# ``wait4`` says, plus the CLOCK_MONOTONIC times (system-wide) of the fork
# and the exit.
LAUNCHER = """
import os, sys, time
out, argv = sys.argv[1], sys.argv[2:]
started = time.monotonic()
pid = os.fork()
if pid == 0:
    try:
        os.execv(argv[0], argv)
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
exited = time.monotonic()
code = os.waitstatus_to_exitcode(status)
with open(out, "w") as handle:
    handle.write(f"{code} {started!r} {exited!r} {ru.ru_utime!r} {ru.ru_stime!r} {ru.ru_maxrss}")
sys.exit(code if code >= 0 else 128 - code)
"""




@dataclass
class BatcherRun:
    """One finished ``batcher run``: its exit, resources and what it printed."""

    command: list[str]
    usage: Usage
    stdout: str
    stderr: str
    started: float
    exited_at: float


class ChildProcess:
    """A command run through :data:`LAUNCHER`, so ``usage`` (CPU, peak RSS) is the
    command's own and ``started``/``exited_at`` are its fork and its exit."""

    def __init__(self, command: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.command = list(command)
        self._env = {**os.environ, **(env or {})}
        self._proc: subprocess.Popen[bytes] | None = None
        self._reaper: Reaper | None = None
        self._out = tempfile.TemporaryFile()  # noqa: SIM115 - closed in wait()
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 - closed in wait()
        handle, name = tempfile.mkstemp(prefix="batcher-bench-usage-")
        os.close(handle)
        self._usage_path = Path(name)
        self.started = 0.0

    def start(self) -> Self:
        self.started = time.monotonic()  # until the launcher reports the fork time
        argv = [PYTHON, "-S", "-c", LAUNCHER, str(self._usage_path), *self.command]
        self._proc = subprocess.Popen(argv, stdout=self._out, stderr=self._err,
                                      cwd=REPO, env=self._env, start_new_session=True)
        self._reaper = Reaper(self._proc, self.started)
        return self

    def poll(self) -> bool:
        """True once the process has exited."""
        return self._reaper is not None and self._reaper.usage is not None

    def wait(self, timeout_s: float, *, ok_codes: Sequence[int] = (0,)) -> BatcherRun:
        """Wait for the exit; a timeout or an unexpected exit code is a ``BenchError``."""
        assert self._proc is not None and self._reaper is not None
        launcher = self._reaper.join(timeout_s)
        if launcher is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._reaper.join(10)
            self._usage_path.unlink(missing_ok=True)
            raise BenchError(f"did not finish within {timeout_s:g} s: "
                             f"{shlex.join(self.command)}")
        out, err = _drain(self._out), _drain(self._err)
        report = self._usage_path.read_text().split()
        self._usage_path.unlink(missing_ok=True)
        if len(report) != 6:
            raise BenchError(f"the launcher failed (exit {launcher.exit_code}): {err[-1500:]}")
        code, started, exited, user, system, maxrss_kib = report
        self.started = float(started)
        usage = Usage(int(code), float(exited) - float(started), float(user), float(system),
                      int(maxrss_kib) / 1024)
        run = BatcherRun(self.command, usage, out, err, self.started, float(exited))
        if usage.exit_code not in ok_codes:
            raise BenchError(f"exit {usage.exit_code} from {shlex.join(self.command)}"
                             f"\nstdout: {out[-1500:]}\nstderr: {err[-1500:]}")
        return run


class BatcherProcess(ChildProcess):
    """``python -m batcher run JOB -q``, optionally wrapped (in a profiler)."""

    def __init__(self, job_path: Path, *extra: str, wrapper: Sequence[str] = (),
                 env: dict[str, str] | None = None) -> None:
        super().__init__([*wrapper, PYTHON, "-m", "batcher", "run", str(job_path), "-q", *extra],
                         env)


def _drain(handle: IO[bytes]) -> str:
    handle.seek(0)
    text = handle.read().decode(errors="replace")
    handle.close()
    return text


def summary_line(run: BatcherRun) -> str:
    """batcher's own end-of-run summary (the ``batcher: N rows: ... ok ...`` line)."""
    for line in run.stderr.splitlines():
        if line.startswith("batcher: ") and "from the checkpoint" in line:
            return line.removeprefix("batcher: ")
    return "(no summary line)"

