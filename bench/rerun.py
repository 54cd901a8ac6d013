"""Benchmark 5, rerun: a nightly job whose input changed a little (issue 11).

Set-up: a 1,000,000-row Parquet input (ids in ``id``, short prompts in
``text``) run once in full against a zero-latency mock server in its own
process: the first run. Then 1% of the rows are edited (every 100th row's
prompt) and the same job is run again, as a cron job would the next night.

Measured:

* first run: wall time to exit (results written) and peak RSS;
* deciding what to send, in this process: opening the checkpoint (a
  million answers) and keying and looking up every input row, as a run
  does before and while it sends; and ``batcher run --dry-run`` over the
  changed input, start to exit, which does the same plus the interpreter's
  start and the input's id check, and must report exactly 1% to send;
* the rerun: requests at the mock (exactly the edited rows), wall time to
  exit including writing all million result rows, and peak RSS.

Targets: deciding < 3 s; peak RSS < 400 MB for both runs; the rerun sends
exactly 1% and finishes in < 30 s.

Usage: ``python bench/rerun.py [--small] [--rows N] [--every N]``
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from harness import PYTHON, BenchError
from harness.jobs import job_dict, make_parquet_input, write_job
from harness.mock import MockProcess
from harness.processes import BatcherProcess, ChildProcess, summary_line
from harness.report import bench_main, print_table, print_targets, small_flag

TARGET_DECIDE_S = 3.0
TARGET_PEAK_MIB = 400.0
TARGET_RERUN_S = 30.0


def edit_every(path: Path, every: int) -> int:
    """Reword the prompt of every ``every``-th row in place; returns how many."""
    table = pq.read_table(path)
    texts = table.column("text").to_pylist()
    edited = 0
    for position in range(0, len(texts), every):
        texts[position] = f"{texts[position]} (edited)"
        edited += 1
    table = table.set_column(table.schema.get_field_index("text"), "text",
                             pa.array(texts, pa.string()))
    pq.write_table(table, path)
    return edited


def decide_in_process(job_path: Path) -> tuple[float, float, int]:
    """Seconds to open the checkpoint, seconds to key and look up every row, rows to send."""
    from batcher.jobload import load_job
    from batcher.plan.preflight import prepare
    from batcher.store.checkpoint import Checkpoint

    job = load_job(job_path)
    assert job.output is not None
    prepared = prepare(job)
    started = time.monotonic()
    with Checkpoint(job.output.checkpoint_path) as checkpoint:
        opened = time.monotonic()
        pending = sum(len(plan.pending) for plan in prepared.plans(checkpoint))
        decided = time.monotonic()
    return opened - started, decided - opened, pending


def measure(folder: Path, rows: int, every: int) -> None:
    source = make_parquet_input(folder / "input.parquet", rows)
    with MockProcess(log_folder=folder) as mock:
        output = folder / "results.parquet"
        job = write_job(folder / "job.yaml", job_dict(mock.base_url, source, output))
        print(f"mock server: {' '.join(mock.command[1:])}", flush=True)
        first = BatcherProcess(job).start().wait(timeout_s=600 + rows / 200)
        print(f"first run: {summary_line(first)}", flush=True)
        sent_first = mock.requests_total()
        edited = edit_every(source, every)
        open_s, plan_s, pending = decide_in_process(job)
        dry = ChildProcess([PYTHON, "-m", "batcher", "run", str(job), "--dry-run"]).start()
        dry_run = dry.wait(timeout_s=120)
        found = re.search(r"\(([\d,]+) to send, ([\d,]+) reused", dry_run.stdout)
        if found is None:
            raise BenchError(f"no counts in the dry run's output: {dry_run.stdout!r}")
        dry_send = int(found.group(1).replace(",", ""))
        rerun = BatcherProcess(job).start().wait(timeout_s=600)
        print(f"rerun: {summary_line(rerun)}", flush=True)
        sent_rerun = mock.requests_total() - sent_first
    if sent_first != rows or pending != edited or dry_send != edited or sent_rerun != edited:
        raise BenchError(f"expected {rows:,} requests, then {edited:,}: the first run sent "
                         f"{sent_first:,}, the plan found {pending:,} and the dry run "
                         f"{dry_send:,} to send, the rerun sent {sent_rerun:,}")
    results = pq.ParquetFile(output).metadata.num_rows
    if results != rows:
        raise BenchError(f"the rerun's results have {results:,} rows, not {rows:,}")
    decide_s = open_s + plan_s
    print_table(["figure", "value"], [
        ("input rows / edited before the rerun", f"{rows:,} / {edited:,}"),
        ("first run: start to exit, s", first.usage.wall_s),
        ("first run: peak RSS, MiB", first.usage.maxrss_mib),
        ("open the checkpoint, s (in process)", open_s),
        ("key and look up every row, s (in process)", plan_s),
        ("--dry-run start to exit, s", dry_run.usage.wall_s),
        ("rerun: requests sent", f"{sent_rerun:,}"),
        ("rerun: start to exit (results written), s", rerun.usage.wall_s),
        ("rerun: peak RSS, MiB", rerun.usage.maxrss_mib),
    ])
    print_targets([
        (f"open + decide < {TARGET_DECIDE_S:g} s", f"{decide_s:.2f} s",
         decide_s < TARGET_DECIDE_S),
        (f"peak RSS < {TARGET_PEAK_MIB:g} MB, first run", f"{first.usage.maxrss_mib:.0f} MiB",
         first.usage.maxrss_mib * 1.048576 < TARGET_PEAK_MIB),
        (f"peak RSS < {TARGET_PEAK_MIB:g} MB, rerun", f"{rerun.usage.maxrss_mib:.0f} MiB",
         rerun.usage.maxrss_mib * 1.048576 < TARGET_PEAK_MIB),
        ("rerun sends exactly the edited rows", f"{sent_rerun:,} of {edited:,}",
         sent_rerun == edited),
        (f"rerun < {TARGET_RERUN_S:g} s", f"{rerun.usage.wall_s:.1f} s",
         rerun.usage.wall_s < TARGET_RERUN_S),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = small_flag(__doc__.split("\n\n")[0] if __doc__ else "rerun")
    parser.add_argument("--rows", type=int, help="input rows (default 1,000,000; small 20,000)")
    parser.add_argument("--every", type=int, default=100,
                        help="edit every Nth row before the rerun (default 100: 1%%)")
    args = parser.parse_args(argv)
    rows = args.rows or (20_000 if args.small else 1_000_000)
    return bench_main("rerun", "rerun: a job whose input changed by 1%", args.keep,
                      lambda folder: measure(folder, rows, args.every))


if __name__ == "__main__":
    sys.exit(main())
