"""Benchmark 5, Ray: the rate limit's utilization on a local Ray with 2 workers,
beside one machine, and what starting Ray costs.

The mock server (its own process) enforces RPM 6,000 over a 1 s sliding window
and answers after 50 ms, as in ``utilization.py``. The same job runs twice:
``batcher run job.yaml`` (one process) and ``batcher run job.yaml --ray
--workers 2`` (a local Ray started by the command: a budget actor, two
workers leasing slices of the one limit).

Utilization: rows answered per minute between the 10th and the 90th
percentile of the rows (journal lines, followed every 10 ms), over the limit;
start-up and the tail excluded. Ray's fixed cost: seconds from the command's
start to the first answer journaled (Ray's start, reading the input, the
workers' start), beside one machine's.

Targets: on Ray, utilization >= 0.9 and 429s <= 0.5% of requests.

Usage: ``python bench/ray_utilization.py [--small] [--rows N]``
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness import BenchError
from harness.jobs import job_dict, make_parquet_input, write_job
from harness.mock import MockProcess, by_status
from harness.processes import BatcherProcess, summary_line
from harness.report import bench_main, print_table, print_targets, small_flag

RPM = 6000
LATENCY_S = 0.05
WINDOW_S = 1.0
CONCURRENCY = 16  # per worker on Ray; 100 req/s x 50 ms needs 5 in flight in all
WORKERS = 2
TARGET_UTILIZATION = 0.9
TARGET_429_SHARE = 0.005


@dataclass
class Outcome:
    mode: str
    requests: int
    rate_limited: int
    to_first_request_s: float
    sending_s: float
    per_minute: float
    wall_s: float
    summary: str

    @property
    def utilization(self) -> float:
        return self.per_minute / RPM

    @property
    def share_429(self) -> float:
        return self.rate_limited / self.requests if self.requests else 0.0


class Sampler:
    """Counts journaled rows on a thread (the checkpoint on one machine, every worker's
    journal on Ray), reading only what was appended since: (moment, rows) pairs. This
    adds no load to the mock (polling ``/_mock/stats`` would)."""

    def __init__(self, paths: Callable[[], list[Path]]) -> None:
        self._paths = paths
        self._offsets: dict[Path, int] = {}
        self._rows = 0
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            for path in self._paths():
                with path.open("rb") as handle:
                    handle.seek(self._offsets.get(path, 0))
                    data = handle.read()
                whole = data.rfind(b"\n") + 1
                self._offsets[path] = self._offsets.get(path, 0) + whole
                self._rows += data.count(b"\n", 0, whole)
            self.samples.append((time.monotonic(), self._rows))
            time.sleep(0.01)

    def moment_of(self, rows: int) -> float:
        for moment, seen in self.samples:
            if seen >= rows:
                return moment
        raise BenchError(f"never saw {rows} rows journaled")


def run_mode(folder: Path, source: Path, rows: int, on_ray: bool) -> Outcome:
    mode = f"Ray, {WORKERS} workers" if on_ray else "one machine"
    work = folder / ("ray" if on_ray else "single")
    work.mkdir()
    with MockProcess(latency_s=LATENCY_S, rpm=RPM, window_s=WINDOW_S, log_folder=work) as mock:
        job = write_job(work / "job.yaml", job_dict(
            mock.base_url, source, work / "results.parquet", concurrency=CONCURRENCY,
            requests_per_minute=RPM))
        extra = ["--ray", "--workers", str(WORKERS)] if on_ray else []
        # Ray's socket paths must be short: its temporary folder goes directly under /tmp.
        with tempfile.TemporaryDirectory(prefix="bray", dir="/tmp") as ray_tmp:
            process = BatcherProcess(job, *extra, env={"RAY_TMPDIR": ray_tmp})
            print(f"[{mode}] batcher: {' '.join(process.command[1:])}", flush=True)
            output = work / "results.parquet"
            journals = output.with_suffix(".ckpt.ray") if on_ray else output.with_suffix(".ckpt")
            pattern = "journal-*.jsonl" if on_ray else journals.name
            folder_of = journals if on_ray else journals.parent
            sampler = Sampler(lambda: sorted(folder_of.glob(pattern))).start()
            run = process.start().wait(timeout_s=300 + rows / 20)
            sampler.stop()
        stats = mock.stats()
    # One machine's checkpoint starts with a header line.
    low, high = max(1, rows // 10) + (not on_ray), rows * 9 // 10 + (not on_ray)
    span = sampler.moment_of(high) - sampler.moment_of(low)
    return Outcome(mode, int(stats["requests_total"]), by_status(stats).get(429, 0),
                   sampler.moment_of(1 + (not on_ray)) - run.started, span,
                   (high - low) * 60 / span if span > 0 else 0.0, run.usage.wall_s,
                   summary_line(run))


def report(outcomes: list[Outcome]) -> None:
    print_table(["mode", "requests", "429s", "429 share", "to first answer s",
                 "sending s (10-90%)", "req/min", "utilization", "wall s"],
                [(o.mode, o.requests, o.rate_limited, f"{100 * o.share_429:.2f}%",
                  round(o.to_first_request_s, 1), round(o.sending_s, 2), round(o.per_minute),
                  f"{o.utilization:.3f}", o.wall_s) for o in outcomes])
    for outcome in outcomes:
        print(f"[{outcome.mode}] batcher summary: {outcome.summary}")
    single, on_ray = outcomes
    print(f"\nRay's fixed cost: {on_ray.to_first_request_s - single.to_first_request_s:.1f} s "
          "more than one machine before the first answer\n")
    print_targets([
        (f"Ray: utilization >= {TARGET_UTILIZATION}", f"{on_ray.utilization:.3f}",
         on_ray.utilization >= TARGET_UTILIZATION),
        (f"Ray: 429s <= {100 * TARGET_429_SHARE:.1f}% of requests",
         f"{100 * on_ray.share_429:.2f}%", on_ray.share_429 <= TARGET_429_SHARE),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = small_flag(__doc__.split("\n\n")[0] if __doc__ else "ray utilization")
    parser.add_argument("--rows", type=int, help="prompts (default 6,000; small 1,500)")
    args = parser.parse_args(argv)
    rows = args.rows or (1_500 if args.small else 6_000)
    try:
        import ray  # noqa: F401 - only to tell whether the extra is installed
    except ImportError:
        print("ray_utilization: Ray is not installed (pip install -e '.[ray]'); skipped")
        return 0

    def body(folder: Path) -> Callable[[], None]:
        print(f"rows: {rows:,}; mock RPM {RPM:,}, window {WINDOW_S:g} s, latency "
              f"{LATENCY_S:g} s; concurrency {CONCURRENCY} per process/worker\n", flush=True)
        source = make_parquet_input(folder / "input.parquet", rows)
        outcomes = [run_mode(folder, source, rows, on_ray) for on_ray in (False, True)]
        return lambda: report(outcomes)

    return bench_main("ray_utilization",
                      "Ray: RPM 6,000 over 1 s windows, 50 ms latency, 2 workers vs one machine",
                      args.keep, body)


if __name__ == "__main__":
    sys.exit(main())
