"""One timed ``batcher run`` against a mock server, followed through its checkpoint.

The shape the rate benchmarks share: start batcher on a job, time its
sending period from the journal, read the mock's counters, and count the
rows the journal ends with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from harness import BenchError
from harness.jobs import checkpoint_path
from harness.journal import JournalWatcher
from harness.mock import MockProcess
from harness.processes import BatcherProcess, BatcherRun


@dataclass
class WatchedRun:
    run: BatcherRun
    stats: dict[str, Any]  # the mock's /_mock/stats after the run
    rows_ok: int
    rows_failed: int
    prompt_tokens: int  # of the ok rows
    sending_s: float  # first to last journal growth
    ok_per_min: float  # rows journaled per minute over the sending period


def run_watched(name: str, mock: MockProcess, job: Path, output: Path, rows: int, *,
                timeout_s: float, settings: str) -> WatchedRun:
    """Run ``job`` (inside ``with mock:``); ``settings`` describes its limits for the log."""
    process = BatcherProcess(job)
    print(f"[{name}] mock: {' '.join(mock.command[1:])}")
    print(f"[{name}] batcher: {' '.join(process.command[1:])} ({settings})", flush=True)
    watcher = JournalWatcher(checkpoint_path(output)).start()
    # Exit 1 (some rows failed for good) is a result here, not a broken run.
    run = process.start().wait(timeout_s=timeout_s, ok_codes=(0, 1))
    watcher.stop()
    stats = mock.stats()
    rows_ok, rows_failed, prompt_tokens = read_journal(checkpoint_path(output))
    if rows_ok + rows_failed != rows:
        raise BenchError(f"{name}: {rows_ok + rows_failed} of {rows} rows journaled")
    span = watcher.sending_s
    ok_per_min = (watcher.rows - watcher.first_rows) * 60 / span if span > 0 else 0.0
    return WatchedRun(run, stats, rows_ok, rows_failed, prompt_tokens, span, ok_per_min)


def read_journal(path: Path) -> tuple[int, int, int]:
    """Rows ok, rows failed (latest outcome per row) and the prompt tokens of the ok rows."""
    latest: dict[int, dict[str, object]] = {}
    with path.open("rb") as handle:
        next(handle)  # header
        for line in handle:
            record = orjson.loads(line)
            latest[record["i"]] = record
    ok = [record for record in latest.values() if record["status"] == "ok"]
    tokens = sum(int(record["prompt_tokens"] or 0) for record in ok)  # type: ignore[call-overload]
    return len(ok), len(latest) - len(ok), tokens
