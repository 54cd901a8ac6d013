"""Benchmark 3, memory: peak RSS of the batcher process as the input grows.

Parquet inputs of 250,000 and 1,000,000 short prompts (one column of ids,
one of text; one row group, as pyarrow and pandas write by default),
Parquet results. Two modes per size, each a separate ``batcher run``:

* ``send``: a fresh run that sends every row to a zero-latency mock server
  (its own process) and writes the results: the whole data path, including
  the checkpoint growing to one line per row. A million requests take
  several minutes.
* ``resume``: the checkpoint of a run stopped near the end is synthesized
  (every row but the last 1,000 journaled ``ok``); batcher loads it, sends
  the 1,000 and writes all the results: the memory of the checkpoint index
  and of the final write, in seconds instead of minutes.
* ``batch`` (only when asked for: ``--modes batch``): the same job with
  ``mode: batch`` and ``--wait``: shard files written, uploaded, the mock's
  batches polled, downloaded and reconciled, the results written. The input
  is keyed once per run, so time and memory stay close to ``send``'s.

Peak RSS is ``ru_maxrss`` of the batcher process itself (through a small
launcher: a plain fork of the benchmark would carry the benchmark's own RSS
into the figure). ``baseline`` is ``python -m batcher --version``: the
interpreter and batcher's imports, for scale.

Targets: peak RSS under 400 MiB at a million rows (MB read as MiB; 400 MB =
381 MiB if read as 10^6), and under 100 bytes of peak RSS per row beyond the
smallest size (``per extra row``: the growth from the smallest size to the
largest over the rows between them), so the peak stays nearly flat as inputs
grow: what is kept per row (the checkpoint's key index, each row's key for
the final write, a latency per ``ok`` row) must stay a few dozen bytes.

Usage: ``python bench/memory.py [--small] [--sizes N,N] [--modes send,resume,batch]``
(``python bench/memory.py --modes batch --sizes 200000`` for the batch figure)
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
from harness import PYTHON, BenchError
from harness.jobs import job_dict, make_parquet_input, synthesize_checkpoint, write_job
from harness.mock import MockProcess
from harness.processes import BatcherProcess, ChildProcess, Usage, summary_line
from harness.report import bench_main, print_table, print_targets, small_flag

TARGET_PEAK_MIB = 400.0
TARGET_BYTES_PER_ROW = 100.0
MODES = ("send", "resume", "batch")
DEFAULT_MODES = ("send", "resume")


@dataclass
class Measurement:
    mode: str
    rows: int
    sent: int
    usage: Usage
    summary: str


def run_one(folder: Path, source: Path, rows: int, mode: str, tail: int) -> Measurement:
    work = folder / f"{mode}-{rows}"
    work.mkdir()
    with MockProcess(log_folder=work) as mock:
        settings = job_dict(mock.base_url, source, work / "results.parquet")
        env = None
        if mode == "batch":  # the mock's Files API serves a file to the key that made it
            settings |= {"mode": "batch", "batch": {"poll_interval_s": 0.2}}
            settings["endpoint"]["api_key_env"] = "BATCHER_BENCH_KEY"
            env = {"BATCHER_BENCH_KEY": "sk-bench-any"}
        job = write_job(work / "job.yaml", settings)
        sent = rows
        if mode == "resume":
            sent = min(tail, rows)
            synthesize_checkpoint(job, rows - sent)
        process = BatcherProcess(job, *(["--wait"] if mode == "batch" else []), env=env)
        print(f"[{mode} {rows:,}] batcher: {' '.join(process.command[1:])} "
              f"({sent:,} rows to send)", flush=True)
        run = process.start().wait(timeout_s=180 + sent / 200 + rows / 5000)
    print(f"[{mode} {rows:,}] {summary_line(run)}", flush=True)
    if f"this run: {sent:,} request" not in run.stderr:  # the summary line's count
        raise BenchError(f"{mode} {rows}: expected {sent} requests; batcher said "
                         f"{summary_line(run)}")
    return Measurement(mode, rows, sent, run.usage, summary_line(run))


def baseline() -> Usage:
    """Peak RSS of starting batcher and importing everything ``batcher run`` imports."""
    process = ChildProcess([PYTHON, "-m", "batcher", "--version"])
    return process.start().wait(timeout_s=60).usage


def bytes_per_row(large: Measurement, small: Measurement) -> float:
    """Peak RSS growth per row beyond the smaller input, in bytes."""
    return (large.usage.maxrss_mib - small.usage.maxrss_mib) * 2**20 / (large.rows - small.rows)


def report(base: Usage, results: list[Measurement]) -> None:
    smallest = {m.mode: m for m in sorted(results, key=lambda m: -m.rows)}
    print_table(
        ["mode", "input rows", "rows sent", "wall s", "CPU s", "peak RSS MiB",
         "vs smallest size, MiB", "per extra row, bytes"],
        [("baseline (--version)", "-", "-", base.wall_s, base.cpu_s, base.maxrss_mib, "-", "-")]
        + [(m.mode, m.rows, m.sent, m.usage.wall_s, m.usage.cpu_s, m.usage.maxrss_mib,
            f"{m.usage.maxrss_mib - smallest[m.mode].usage.maxrss_mib:+.0f}",
            "-" if m is smallest[m.mode] else f"{bytes_per_row(m, smallest[m.mode]):.0f}")
           for m in results])
    targets = []
    for mode in MODES:
        runs = sorted((m for m in results if m.mode == mode), key=lambda m: m.rows)
        if not runs:
            continue
        large, small = runs[-1], runs[0]
        targets.append((f"{mode}: peak RSS < {TARGET_PEAK_MIB:.0f} MiB at {large.rows:,} rows",
                        f"{large.usage.maxrss_mib:.0f} MiB",
                        large.usage.maxrss_mib < TARGET_PEAK_MIB))
        if large is not small:
            per_row = bytes_per_row(large, small)
            targets.append((f"{mode}: < {TARGET_BYTES_PER_ROW:.0f} bytes per row beyond "
                            f"{small.rows:,} (to {large.rows:,})", f"{per_row:.0f} bytes",
                            per_row < TARGET_BYTES_PER_ROW))
    print_targets(targets)


def main(argv: list[str] | None = None) -> int:
    parser = small_flag(__doc__.split("\n\n")[0] if __doc__ else "memory")
    parser.add_argument("--sizes", help="input sizes, comma-separated "
                                        "(default 250000,1000000; small 20000,100000)")
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES),
                        help="send,resume,batch (default send,resume)")
    parser.add_argument("--send-max", type=int,
                        help="skip send mode above this many rows (small: 20000)")
    parser.add_argument("--tail", type=int, default=1000, help="rows left to send in resume")
    parser.add_argument("--row-group-rows", type=int,
                        help="Parquet row group size of the inputs (default: pyarrow's, "
                             "so a million rows are one row group)")
    args = parser.parse_args(argv)
    default_sizes = "20000,100000" if args.small else "250000,1000000"
    sizes = sorted(int(size) for size in (args.sizes or default_sizes).split(","))
    modes = [mode for mode in args.modes.split(",") if mode]
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown mode {sorted(unknown)[0]!r}")
    send_max = args.send_max if args.send_max is not None else (20_000 if args.small else None)

    def body(folder: Path) -> Callable[[], None]:
        base = baseline()
        results = []
        for rows in sizes:
            source = make_parquet_input(folder / f"input-{rows}.parquet", rows,
                                        args.row_group_rows)
            groups = pq.ParquetFile(source).metadata.num_row_groups
            print(f"input: {rows:,} rows, {source.stat().st_size / 1e6:.1f} MB parquet, "
                  f"{groups} row group{'s' if groups != 1 else ''}", flush=True)
            for mode in modes:
                if mode == "send" and send_max is not None and rows > send_max:
                    print(f"[send {rows:,}] skipped (--send-max {send_max:,})")
                    continue
                results.append(run_one(folder, source, rows, mode, args.tail))
        return lambda: report(base, results)

    return bench_main("memory", "memory: peak RSS by input size", args.keep, body)


if __name__ == "__main__":
    sys.exit(main())
