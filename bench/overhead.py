"""Benchmark 2, overhead: how fast batcher itself goes when the server costs nothing.

A zero-latency mock server with no limits runs in its own process; batcher
sends 20,000+ short prompts (checkpointing is always on: every row is
journaled). Figures:

* sustained rows/s: rows journaled per second from the first to the last
  journaled row (the sending period, sampled every 2 ms from the checkpoint
  file); with no errors every row is one request, so this is requests/s;
* requests/s over the whole process (start-up, input scan and final write
  included);
* CPU-seconds per 1,000 requests, of the batcher process (whole process,
  from ``os.wait4``) and, for context, of the mock server.

Target: sustained >= 3,000 requests/s on this 2-core machine.
``--profile`` adds a second run under py-spy and prints where batcher's CPU
goes (py-spy must be installed beside this Python or on PATH).

Usage: ``python bench/overhead.py [--small] [--rows N] [--concurrency N] [--profile]``
"""

from __future__ import annotations

import sys
from pathlib import Path

from harness import BenchError
from harness.jobs import checkpoint_path, job_dict, make_parquet_input, write_job
from harness.journal import JournalWatcher
from harness.mock import MockProcess, by_status
from harness.processes import BatcherProcess, summary_line
from harness.profiling import py_spy, py_spy_wrapper, summarize_profile
from harness.report import bench_main, print_table, print_targets, small_flag

TARGET_RPS = 3000.0


def measure(folder: Path, rows: int, concurrency: int, profile: bool) -> None:
    source = make_parquet_input(folder / "input.parquet", rows)
    with MockProcess(log_folder=folder) as mock:
        output = folder / "results.parquet"
        job = write_job(folder / "job.yaml",
                        job_dict(mock.base_url, source, output, concurrency=concurrency))
        print(f"mock server: {' '.join(mock.command[1:])} ({mock.root_url})")
        watcher = JournalWatcher(checkpoint_path(output)).start()
        process = BatcherProcess(job)
        print(f"batcher: {' '.join(process.command[1:])}", flush=True)
        run = process.start().wait(timeout_s=max(120.0, rows / 200))
        watcher.stop()
        stats = mock.stats()
        mock_usage = mock.stop()
    assert mock_usage is not None and watcher.first_at is not None and watcher.last_at is not None
    statuses = by_status(stats)
    requests = int(stats["requests_total"])
    if watcher.rows != rows or statuses.get(200, 0) != rows:
        raise BenchError(f"expected {rows} rows answered, journal has {watcher.rows}, "
                         f"mock statuses {statuses}")
    usage = run.usage
    sustained = watcher.rate_per_s()
    overall = requests / usage.wall_s
    print(f"batcher summary: {summary_line(run)}")
    print_table(["figure", "value"], [
        ("rows (parquet input, parquet results)", rows),
        ("concurrency", concurrency),
        ("requests at the mock (by status)", f"{requests:,} {statuses}"),
        ("process wall time, s", usage.wall_s),
        ("  start to first journaled row, s", watcher.first_at - run.started),
        ("  sending period (first to last row), s", watcher.sending_s),
        ("  last row to exit (results write), s", run.exited_at - watcher.last_at),
        ("sustained requests/s (sending period)", sustained),
        ("requests/s over the whole process", overall),
        ("batcher CPU s (user + sys)", f"{usage.cpu_s:.2f} ({usage.user_s:.2f} + "
                                       f"{usage.sys_s:.2f})"),
        ("batcher CPU s per 1,000 requests", 1000 * usage.cpu_s / requests),
        ("batcher CPU use during its life, cores", usage.cpu_s / usage.wall_s),
        ("batcher peak RSS, MiB", usage.maxrss_mib),
        ("mock CPU s per 1,000 requests", 1000 * mock_usage.cpu_s / requests),
    ])
    print_targets([
        (f"sustained >= {TARGET_RPS:,.0f} requests/s", f"{sustained:,.0f}/s",
         sustained >= TARGET_RPS),
    ])
    if profile:
        run_profiled(folder, source, rows, concurrency)


def run_profiled(folder: Path, source: Path, rows: int, concurrency: int) -> None:
    """The same run again, sampled by py-spy (slower: the figures above are unprofiled)."""
    executable = py_spy()
    if executable is None:
        print("--profile: py-spy is not installed (pip install py-spy); skipped")
        return
    raw = folder / "profile.txt"
    with MockProcess(log_folder=folder) as mock:
        output = folder / "profiled.parquet"
        job = write_job(folder / "profiled.yaml",
                        job_dict(mock.base_url, source, output, concurrency=concurrency))
        process = BatcherProcess(job, wrapper=py_spy_wrapper(executable, raw))
        print(f"profiled run: {' '.join(process.command)}", flush=True)
        process.start().wait(timeout_s=max(180.0, rows / 100))
    summarize_profile(raw)


def main(argv: list[str] | None = None) -> int:
    parser = small_flag(__doc__.split("\n\n")[0] if __doc__ else "overhead")
    parser.add_argument("--rows", type=int, help="prompts to send (default 20,000; small 5,000)")
    parser.add_argument("--concurrency", type=int, default=32, help="limits.concurrency")
    parser.add_argument("--profile", action="store_true", help="also profile with py-spy")
    args = parser.parse_args(argv)
    rows = args.rows or (5_000 if args.small else 20_000)
    return bench_main("overhead", "overhead: zero-latency mock, no limits", args.keep,
                      lambda folder: measure(folder, rows, args.concurrency, args.profile))


if __name__ == "__main__":
    sys.exit(main())
