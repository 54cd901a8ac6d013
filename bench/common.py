"""Shared helpers for batcher's benchmarks.

Everything is measured from outside, the way a user runs batcher: the mock
server and ``batcher run`` are separate processes (``python -m batcher ...``),
so the figures include interpreter start-up, imports and the final write, and
the two processes compete for the machine's cores as they would in real use.

* :class:`MockProcess` starts ``batcher mock-server`` on a port the kernel
  picks (``--port 0``), waits for its "listening" line, reads
  ``/_mock/stats`` and, when stopped, reports the mock's own CPU time.
* :class:`BatcherProcess` starts ``batcher run JOB -q`` through a tiny
  launcher that reaps it with ``os.wait4``, whose ``rusage`` gives batcher's
  CPU time and peak RSS (``ru_maxrss``, KiB on Linux; see :data:`LAUNCHER`).
* :class:`JournalWatcher` follows the checkpoint (``<output>.ckpt``) as it
  grows: one line per finished row, so it times the sending period (first
  to last journaled row) without adding any load to the mock server.
* :func:`synthesize_checkpoint` writes the checkpoint of a run stopped near
  the end (with batcher's own ``Checkpoint``), so "resume near the end of a
  million rows" takes seconds to set up instead of a million requests.
* :class:`LoadMeter` says how busy other processes kept the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import selectors
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Self

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
MAX_TOKENS = 64
"""``max_tokens`` every benchmark job sets: the mock reserves it against TPM."""


class BenchError(RuntimeError):
    """The benchmark itself could not run (as opposed to a target being missed)."""


# -- reporting ------------------------------------------------------------------------------


def machine_facts() -> list[tuple[str, str]]:
    """What the figures depend on: cores, CPU, Python, batcher and key libraries."""
    import aiohttp

    from batcher import __version__

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return [
        ("batcher tree", git_state()),
        ("nproc", str(os.cpu_count())),
        ("cpu", cpu),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("platform", platform.platform()),
        ("batcher", __version__),
        ("libraries", f"aiohttp {aiohttp.__version__}, pyarrow {pa.__version__}, "
                      f"orjson {orjson.__version__}"),
    ]


def git_state() -> str:
    """The commit measured and whether batcher's sources differ from it."""
    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                                check=False)
        return result.stdout.rstrip("\n")

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--", "batcher").splitlines()
    if not changed:
        return f"{commit} (batcher/ clean)"
    names = ", ".join(line[3:].removeprefix("batcher/") for line in changed)
    return f"{commit} + uncommitted changes in batcher/: {names}"


def print_header(title: str) -> LoadMeter:
    """Print the benchmark's name, the exact command line and the machine facts;
    returns a meter of the machine's load from now on."""
    command = shlex.join([sys.executable, *sys.argv])
    print(f"== {title} ==")
    print(f"command: (cd {shlex.quote(str(Path.cwd()))} && {command})")
    for key, value in machine_facts():
        print(f"{key}: {value}")
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    print(flush=True)
    return LoadMeter()


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
    import resource

    mine = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return mine.ru_utime + mine.ru_stime + children.ru_utime + children.ru_stime


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain, left-aligned text table (copies cleanly into Markdown code blocks)."""
    cells = [[str(h) for h in headers]] + [[_cell(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for index, row in enumerate(cells):
        print("  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True))
              .rstrip())
        if index == 0:
            print("  ".join("-" * width for width in widths))
    print(flush=True)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def verdict(met: bool) -> str:
    """How a target line reads: a measurement, so a miss is reported, not raised."""
    return "met" if met else "MISSED"


def print_targets(targets: Sequence[tuple[str, str, bool]]) -> None:
    """Print ``(target, measured, met)`` lines."""
    print("targets:")
    print_table(["target", "measured", "result"],
                [(name, measured, verdict(met)) for name, measured, met in targets])


def small_flag(description: str) -> argparse.ArgumentParser:
    """An argument parser with the ``--small`` switch every benchmark takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--small", action="store_true",
                        help="CI mode: smaller sizes, all four benchmarks in well under 2 min")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work folder (inputs, jobs, checkpoints, results)")
    return parser


@contextlib.contextmanager
def work_folder(keep: bool, prefix: str) -> Iterator[Path]:
    """A scratch folder under the system temp dir, removed afterwards unless ``keep``."""
    folder = Path(tempfile.mkdtemp(prefix=f"batcher-bench-{prefix}-"))
    try:
        yield folder
    finally:
        if keep:
            print(f"work folder kept: {folder}")
        else:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)


# -- inputs and jobs ------------------------------------------------------------------------


def row_id(position: int) -> str:
    return f"row{position:07d}"


def prompt_text(position: int) -> str:
    """A short prompt (about 15 tokens by both batcher's and the mock's estimate)."""
    return f"Prompt number {position}: say something."


def make_parquet_input(path: Path, rows: int, row_group_rows: int | None = None) -> Path:
    """``rows`` rows of ``id``, ``text``; pyarrow's default row groups (as pandas
    writes: up to 1,048,576 rows each) unless ``row_group_rows`` is given."""
    schema = pa.schema([("id", pa.string()), ("text", pa.string())])
    table = pa.table({
        "id": pa.array([row_id(i) for i in range(rows)], pa.string()),
        "text": pa.array([prompt_text(i) for i in range(rows)], pa.string()),
    }, schema=schema)
    pq.write_table(table, path, row_group_size=row_group_rows)
    return path


def job_dict(base_url: str, input_path: Path, output_path: Path, *, concurrency: int = 32,
             requests_per_minute: float | None = None, tokens_per_minute: float | None = None,
             retry: dict[str, Any] | None = None, name: str = "bench") -> dict[str, Any]:
    """A job like the tests' ``job_dict``: prompt column ``text``, ids in ``id``."""
    limits: dict[str, Any] = {"concurrency": concurrency}
    if requests_per_minute is not None:
        limits["requests_per_minute"] = requests_per_minute
    if tokens_per_minute is not None:
        limits["tokens_per_minute"] = tokens_per_minute
    job: dict[str, Any] = {
        "name": name,
        "input": {"path": str(input_path), "id_column": "id"},
        "prompt": {"column": "text"},
        "model": "gpt-4o-mini",
        "params": {"temperature": 0, "max_tokens": MAX_TOKENS},
        "endpoint": {"base_url": base_url, "timeout_s": 30},
        "limits": limits,
        "output": {"path": str(output_path)},
    }
    if retry is not None:
        job["retry"] = retry
    return job


def write_job(path: Path, job: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(job, sort_keys=False), encoding="utf-8")
    return path


def checkpoint_path(output_path: Path) -> Path:
    """Where batcher journals a job's rows by default: beside the results."""
    return output_path.with_suffix(".ckpt")


def synthesize_checkpoint(job_path: Path, done_rows: int) -> Path:
    """Write the checkpoint a run that finished rows ``0 .. done_rows-1`` would have left.

    Each row is stored under the request key batcher computes for it
    (``batcher.preflight.prepare(job).plans(None)``), so ``batcher run``
    reuses those answers and sends only the remaining rows. The lines are
    written by batcher's own ``Checkpoint.append``, so they stay in whatever
    journal format batcher uses; each holds a ``RowResult`` like the mock's.
    """
    from batcher.checkpoint import Checkpoint
    from batcher.config import load_job
    from batcher.mock_server import reply_for
    from batcher.preflight import prepare
    from batcher.records import RESULT_FIELDS, RowResult

    job = load_job(job_path)
    assert job.output is not None
    prepared = prepare(job)
    if done_rows > prepared.rows:
        raise BenchError(f"cannot mark {done_rows} rows done in a {prepared.rows}-row input")
    path: Path = job.output.checkpoint_path
    with Checkpoint(path, fresh=True) as checkpoint:
        for plan in prepared.plans(None):
            for row in plan.pending:
                if row.position >= done_rows:
                    break
                checkpoint.append([(row.key, row.position)], RowResult(
                    **_done_fields(row.position, reply_for, RESULT_FIELDS)))
            if plan.start + len(plan.keys) >= done_rows:
                break
        checkpoint.sync()
    return path


def _done_fields(position: int, reply_for: Callable[[str], str],
                 columns: Sequence[str]) -> dict[str, Any]:
    """The ``RowResult`` fields of one ``ok`` row, as the mock's reply would give them.

    Only fields ``RowResult`` has are passed, so a field added to batcher
    later takes its default instead of breaking the benchmark.
    """
    prompt = prompt_text(position)
    prompt_tokens = -(-len(prompt) // 4) + 6
    reply = reply_for(prompt)
    completion_tokens = -(-len(reply) // 4)
    known: dict[str, Any] = {
        "reply": reply,
        "finish_reason": "stop",
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "cached_tokens": 0,
        "reasoning_tokens": 0,
        "status": "ok",
        "error": None,
        "attempts": 1,
        "latency_s": 0.0012,
    }
    return {name: value for name, value in known.items() if name in columns}


# -- processes --------------------------------------------------------------------------------


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


class _Reaper:
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


class MockProcess:
    """``python -m batcher mock-server`` as a separate process on a free port."""

    def __init__(self, *, latency_s: float = 0.0, rpm: int | None = None,
                 tpm: int | None = None, window_s: float | None = None,
                 log_folder: Path | None = None) -> None:
        self.args = ["--port", "0", "--latency", f"{latency_s:g}"]
        if rpm is not None:
            self.args += ["--rpm", str(rpm)]
        if tpm is not None:
            self.args += ["--tpm", str(tpm)]
        if window_s is not None:
            self.args += ["--window", f"{window_s:g}"]
        self._log_folder = log_folder
        self._proc: subprocess.Popen[bytes] | None = None
        self._reaper: _Reaper | None = None
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
        self._reaper = _Reaper(self._proc, time.monotonic())
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
        self._reaper: _Reaper | None = None
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
        self._reaper = _Reaper(self._proc, self.started)
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


# -- watching a run ---------------------------------------------------------------------------


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


def by_status(stats: dict[str, Any]) -> dict[int, int]:
    return {int(status): count for status, count in stats.get("by_status", {}).items()}


# -- profiling ----------------------------------------------------------------------------------


def py_spy() -> str | None:
    """The ``py-spy`` executable beside this interpreter or on PATH, if installed."""
    import shutil

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
    for marker in ("site-packages/", "/lib/python3.11/", str(REPO) + "/"):
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
    from collections import Counter

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


def bench_main(name: str, title: str, keep: bool,
               body: Callable[[Path], Callable[[], None] | None]) -> int:
    """Run one benchmark's ``body`` in a work folder: header, figures, machine load.

    ``body`` may return a function that prints the final tables once the
    work folder is gone; a ``BenchError`` (the run itself failed) exits 1.
    """
    meter = print_header(title)
    try:
        with work_folder(keep, name) as folder:
            finish = body(folder)
    except BenchError as error:
        print(f"{name}: benchmark failed: {error}", file=sys.stderr)
        print(meter.report())
        return 1
    if finish is not None:
        print()
        finish()
    print(meter.report())
    return 0
