"""Benchmark 5, sharing: a key batcher does not have to itself, and gateways' own limits.

The mock server (its own process) answers after 50 ms; the job names the
account's limit, RPM 6,000. Scenarios:

* ``other-client``: RPM 6,000 over 1 s sliding windows, and another client
  on the same key sending 2,000 requests a minute into the same windows
  (the mock's ``--background-rpm``). What is left to batcher: 4,000 a minute.
* ``per-key``: a gateway's per-key limit of 1,200 a minute, reported only under
  LiteLLM's names (``x-ratelimit-api_key-{limit,remaining}-requests``, no reset
  time), enforced in fixed windows of 6 s that start with the first request,
  429s as LiteLLM's limiter sends them (``retry-after`` of a whole window).
* ``fixed-window``: 1,200 a minute in fixed calendar windows of 6 s that report
  one request more remaining than they admit and no limit, only remaining and
  reset (LiteLLM's router on a deployment limit); its 429 carries the wait only
  as ``llm_provider-retry-after``.

Achieved rate: rows answered per minute from the first to the last row
journaled (as in the utilization benchmark); ``by windows``: the mock's own count
of batcher's admitted requests per window (first and last left out), over what
is left. 429s from the mock's
``/_mock/stats``, as a share of batcher's requests.

Targets: ``other-client`` reaches >= 0.95 of what is left with <= 1% 429s;
``per-key`` and ``fixed-window``: <= 1% 429s and every row ok.

Usage: ``python bench/sharing.py [--small] [--scenario NAME ...]``
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness.jobs import job_dict, make_parquet_input, write_job
from harness.mock import MockProcess, by_status, use_per_window
from harness.processes import summary_line
from harness.report import bench_main, print_table, print_targets, small_flag
from harness.watched import run_watched

ACCOUNT_RPM = 6000
LATENCY_S = 0.05
CONCURRENCY = 32
TARGET_SHARE_OF_LEFT = 0.95
TARGET_429_SHARE = 0.01


@dataclass(frozen=True)
class Scenario:
    name: str
    mock_args: tuple[str, ...]
    window_s: float
    limit_rpm: int
    other_rpm: int = 0
    rows_small: int = 300
    rows_full: int = 3000

    @property
    def left_rpm(self) -> int:
        return self.limit_rpm - self.other_rpm


SCENARIOS = (
    Scenario("other-client", ("--background-rpm", "2000"), 1.0, ACCOUNT_RPM, other_rpm=2000,
             rows_small=400, rows_full=6000),
    Scenario("per-key", ("--window-kind", "from_first", "--ratelimit-scope", "api_key",
                         "--rejection-style", "litellm_key"), 6.0, 1200,
             rows_small=200, rows_full=2000),
    Scenario("fixed-window", ("--window-kind", "calendar", "--off-by-one", "--no-limit-header",
                              "--rejection-style", "litellm_router"), 6.0, 1200,
             rows_small=200, rows_full=2000),
)


@dataclass
class Outcome:
    scenario: Scenario
    rows: int
    rows_ok: int
    requests: int
    rate_limited: int
    other_dropped: int
    ok_per_min: float
    wall_s: float
    summary: str
    by_windows: float
    """batcher's admitted requests by the mock's count, window by window, over what is left."""

    @property
    def share_of_left(self) -> float:
        return self.ok_per_min / self.scenario.left_rpm

    @property
    def share_429(self) -> float:
        return self.rate_limited / self.requests if self.requests else 0.0


def run_scenario(folder: Path, source: Path, rows: int, scenario: Scenario) -> Outcome:
    work = folder / scenario.name
    work.mkdir()
    mock = MockProcess(latency_s=LATENCY_S, rpm=scenario.limit_rpm, window_s=scenario.window_s,
                       log_folder=work, extra=scenario.mock_args)
    with mock:
        output = work / "results.parquet"
        job = write_job(work / "job.yaml", job_dict(
            mock.base_url, source, output, concurrency=CONCURRENCY,
            requests_per_minute=ACCOUNT_RPM, retry={"max_attempts": 10}))
        watched = run_watched(scenario.name, mock, job, output, rows,
                              timeout_s=180 + rows / 5,
                              settings=f"requests_per_minute {ACCOUNT_RPM}, concurrency "
                                       f"{CONCURRENCY}")
    stats = watched.stats
    return Outcome(scenario, rows, watched.rows_ok, int(stats["requests_total"]),
                   by_status(stats).get(429, 0), int(stats["background"]["dropped"]),
                   watched.ok_per_min, watched.run.usage.wall_s, summary_line(watched.run),
                   use_per_window(stats, "requests", scenario.left_rpm))


def report(outcomes: list[Outcome]) -> None:
    print_table(
        ["scenario", "limit/min", "other/min", "left/min", "rows ok", "requests", "429s",
         "429 share", "other dropped", "ok req/min", "of left", "by windows", "wall s"],
        [(o.scenario.name, o.scenario.limit_rpm, o.scenario.other_rpm, o.scenario.left_rpm,
          f"{o.rows_ok}/{o.rows}", o.requests, o.rate_limited, f"{100 * o.share_429:.2f}%",
          o.other_dropped, round(o.ok_per_min), f"{o.share_of_left:.3f}",
          f"{o.by_windows:.3f}", o.wall_s)
         for o in outcomes])
    for outcome in outcomes:
        print(f"[{outcome.scenario.name}] batcher summary: {outcome.summary}")
    print()
    targets = []
    for o in outcomes:
        name = o.scenario.name
        if o.scenario.other_rpm:
            targets.append((f"{name}: >= {TARGET_SHARE_OF_LEFT} of what is left",
                            f"{o.share_of_left:.3f}", o.share_of_left >= TARGET_SHARE_OF_LEFT))
        else:
            targets.append((f"{name}: every row ok", f"{o.rows_ok}/{o.rows}", o.rows_ok == o.rows))
        targets.append((f"{name}: 429s <= {100 * TARGET_429_SHARE:.0f}% of requests",
                        f"{100 * o.share_429:.2f}%", o.share_429 <= TARGET_429_SHARE))
    if targets:
        print_targets(targets)


def main(argv: list[str] | None = None) -> int:
    parser = small_flag(__doc__.split("\n\n")[0] if __doc__ else "sharing")
    parser.add_argument("--scenario", action="append", choices=[s.name for s in SCENARIOS],
                        help="run only this scenario (repeatable)")
    args = parser.parse_args(argv)
    chosen = [s for s in SCENARIOS if not args.scenario or s.name in args.scenario]

    def body(folder: Path) -> Callable[[], None]:
        print(f"mock latency {LATENCY_S:g} s; job requests_per_minute {ACCOUNT_RPM}, "
              f"concurrency {CONCURRENCY}\n", flush=True)
        outcomes = []
        for scenario in chosen:
            rows = scenario.rows_small if args.small else scenario.rows_full
            source = make_parquet_input(folder / f"{scenario.name}.parquet", rows)
            outcomes.append(run_scenario(folder, source, rows, scenario))
        return lambda: report(outcomes)

    return bench_main("sharing", "sharing: another client on the key, per-key and fixed-window "
                      "limits, 50 ms latency", args.keep, body)


if __name__ == "__main__":
    sys.exit(main())
