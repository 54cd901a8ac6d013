"""Benchmark 4, resume: how soon a restarted million-row job sends again.

Set-up: a 1,000,000-row Parquet input and the checkpoint a run killed near
the end would have left: every row but the last 1,000 journaled as ``ok``.
Sending a million requests first would take minutes, so the checkpoint is
written directly in batcher's journal format, under the request keys
batcher computes for this job's rows (see ``harness.jobs.synthesize_checkpoint``);
batcher reuses it exactly as its own.

Measured: seconds from starting ``batcher run JOB -q`` (the process spawn)
to the first request arriving at the mock server (``requests_total`` in
``/_mock/stats``, polled every 10 ms from here), to the first new row in the
checkpoint, and to the process exit (which includes writing all million
result rows). Target: first new request under 3 s.

Usage: ``python bench/resume.py [--small] [--rows N] [--tail N] [--profile]``
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from harness import BenchError
from harness.jobs import (
    checkpoint_path,
    job_dict,
    make_parquet_input,
    synthesize_checkpoint,
    write_job,
)
from harness.journal import JournalWatcher
from harness.mock import MockProcess
from harness.processes import BatcherProcess, summary_line
from harness.profiling import py_spy, py_spy_wrapper, summarize_profile
from harness.report import bench_main, print_table, print_targets, small_flag

TARGET_FIRST_REQUEST_S = 3.0
POLL_S = 0.01


def measure(folder: Path, rows: int, tail: int, profile: bool) -> None:
    started = time.monotonic()
    source = make_parquet_input(folder / "input.parquet", rows)
    print(f"input: {rows:,} rows written in {time.monotonic() - started:.1f} s")
    with MockProcess(log_folder=folder) as mock:
        output = folder / "results.parquet"
        job = write_job(folder / "job.yaml", job_dict(mock.base_url, source, output))
        started = time.monotonic()
        ckpt = synthesize_checkpoint(job, rows - tail)
        print(f"checkpoint: {rows - tail:,} rows synthesized in "
              f"{time.monotonic() - started:.1f} s ({ckpt.stat().st_size / 1e6:.0f} MB)")
        print(f"mock server: {' '.join(mock.command[1:])}")
        watcher = JournalWatcher(checkpoint_path(output)).start()
        process = BatcherProcess(job)
        print(f"batcher: {' '.join(process.command[1:])}", flush=True)
        process.start()
        first_request_at = None
        while first_request_at is None and not process.poll():
            if mock.requests_total() > 0:
                first_request_at = time.monotonic()
                break
            time.sleep(POLL_S)
        run = process.wait(timeout_s=120 + rows / 2000)
        watcher.stop()
        sent = mock.requests_total()
    if first_request_at is None:
        raise BenchError("batcher exited before sending any request")
    if sent != tail or watcher.rows != tail:
        raise BenchError(f"expected {tail} rows sent and journaled; the mock saw {sent}, "
                         f"the checkpoint gained {watcher.rows}")
    assert watcher.first_at is not None and watcher.last_at is not None
    to_first = first_request_at - run.started
    usage = run.usage
    print(f"batcher summary: {summary_line(run)}")
    print_table(["figure", "value"], [
        ("input rows / already in the checkpoint / to send", f"{rows:,} / {rows - tail:,} / "
                                                             f"{tail:,}"),
        ("start to first request at the mock, s", to_first),
        ("start to first new row journaled, s", watcher.first_at - run.started),
        ("start to last new row journaled, s", watcher.last_at - run.started),
        ("start to exit (results written), s", usage.wall_s),
        ("batcher CPU s (user + sys)", f"{usage.cpu_s:.2f} ({usage.user_s:.2f} + "
                                       f"{usage.sys_s:.2f})"),
        ("batcher peak RSS, MiB", usage.maxrss_mib),
    ])
    print_targets([(f"first new request < {TARGET_FIRST_REQUEST_S:g} s after restart",
                    f"{to_first:.2f} s", to_first < TARGET_FIRST_REQUEST_S)])
    if profile:
        run_profiled(folder, job, rows, tail)


def run_profiled(folder: Path, job: Path, rows: int, tail: int) -> None:
    """The same resume again under py-spy: where the time before the first request goes."""
    executable = py_spy()
    if executable is None:
        print("--profile: py-spy is not installed (pip install py-spy); skipped")
        return
    with MockProcess(log_folder=folder) as mock:
        output = folder / "profiled.parquet"
        profiled = write_job(folder / "profiled.yaml",
                             job_dict(mock.base_url, folder / "input.parquet", output))
        synthesize_checkpoint(profiled, rows - tail)
        raw = folder / "profile.txt"
        process = BatcherProcess(profiled, wrapper=py_spy_wrapper(executable, raw))
        print(f"profiled run: {' '.join(process.command)}", flush=True)
        process.start().wait(timeout_s=180 + rows / 1000)
    summarize_profile(raw)


def main(argv: list[str] | None = None) -> int:
    parser = small_flag(__doc__.split("\n\n")[0] if __doc__ else "resume")
    parser.add_argument("--rows", type=int, help="input rows (default 1,000,000; small 100,000)")
    parser.add_argument("--tail", type=int, default=1000, help="rows left to send")
    parser.add_argument("--profile", action="store_true", help="also profile with py-spy")
    args = parser.parse_args(argv)
    rows = args.rows or (100_000 if args.small else 1_000_000)
    return bench_main("resume", "resume: restart of a job killed near the end", args.keep,
                      lambda folder: measure(folder, rows, min(args.tail, rows), args.profile))


if __name__ == "__main__":
    sys.exit(main())
