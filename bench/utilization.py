"""Benchmark 1, utilization: how much of a rate limit batcher uses without earning 429s.

The mock server (its own process) enforces RPM 6,000 over a 1 s sliding
window (100 requests in any second, as OpenAI enforces per-minute limits
over short windows) and a TPM limit, and answers after 50 ms. Scenarios:

* ``rpm-bound``: TPM 2,000,000 (not binding), job limits equal to the mock's:
  the request pacer is what holds batcher at the limit;
* ``tpm-bound``: TPM 400,000, so tokens bind (about 79 tokens per request:
  the prompt plus ``max_tokens`` 64, which the server reserves);
* ``no-limits``: the job sets no limits at all; batcher has only what the
  server says to go by (its ``x-ratelimit-*`` headers, 429s and their
  retry-after).

Achieved rate: rows answered (HTTP 200) per minute from the first to the
last row journaled to the checkpoint (sampled every 2 ms), i.e. over the
sending period, start-up and the final write excluded. Utilization is that
rate over the binding limit (requests, or tokens as the mock charges them).
429s come from the mock's ``/_mock/stats`` ``by_status``, as a fraction of
all requests it received.

The mock's own count gives a second figure, ``by windows``: what it admitted in
each 1 s window of the binding limit, the first and the last (partial) windows
left out, over the limit. It does not depend on when batcher journals its rows,
so it is the steadier figure on a busy machine.

Targets: utilization >= 0.97, 429s <= 0.5% of requests (checked for every
scenario; the issue states them for a job that sets its limits).

Usage: ``python bench/utilization.py [--small] [--rows N] [--scenario NAME ...]``
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness.jobs import MAX_TOKENS, job_dict, make_parquet_input, write_job
from harness.mock import MockProcess, by_status, use_per_window
from harness.processes import summary_line
from harness.report import bench_main, print_table, print_targets, small_flag
from harness.watched import run_watched

RPM = 6000
LATENCY_S = 0.05
WINDOW_S = 1.0
CONCURRENCY = 32  # 100 req/s x 50 ms needs 5 in flight; 32 leaves room for slow replies
TARGET_UTILIZATION = 0.97
TARGET_429_SHARE = 0.005


@dataclass(frozen=True)
class Scenario:
    name: str
    tpm: int
    job_limits: bool

    @property
    def binding(self) -> str:
        return "tokens" if self.tpm < RPM * 79 else "requests"


SCENARIOS = (
    Scenario("rpm-bound", 2_000_000, job_limits=True),
    Scenario("tpm-bound", 400_000, job_limits=True),
    Scenario("no-limits", 2_000_000, job_limits=False),
)


@dataclass
class Outcome:
    scenario: Scenario
    rows_ok: int
    rows_failed: int
    requests: int
    rate_limited: int
    sending_s: float
    ok_per_min: float
    tokens_per_min: float
    wall_s: float
    summary: str
    by_windows: float
    """The binding limit's use by the mock's count, window by window."""

    @property
    def utilization(self) -> float:
        if self.scenario.binding == "tokens":
            return self.tokens_per_min / self.scenario.tpm
        return self.ok_per_min / RPM

    @property
    def share_429(self) -> float:
        return self.rate_limited / self.requests if self.requests else 0.0


def run_scenario(folder: Path, source: Path, rows: int, scenario: Scenario) -> Outcome:
    work = folder / scenario.name
    work.mkdir()
    mock = MockProcess(latency_s=LATENCY_S, rpm=RPM, tpm=scenario.tpm, window_s=WINDOW_S,
                       log_folder=work)
    with mock:
        output = work / "results.parquet"
        rpm, tpm = (RPM, scenario.tpm) if scenario.job_limits else (None, None)
        limits = {"requests_per_minute": rpm, "tokens_per_minute": tpm} if rpm else {}
        job = write_job(work / "job.yaml", job_dict(
            mock.base_url, source, output, concurrency=CONCURRENCY,
            requests_per_minute=rpm, tokens_per_minute=tpm))
        watched = run_watched(scenario.name, mock, job, output, rows,
                              timeout_s=120 + rows / 20,
                              settings=f"limits: {limits or 'none'}, concurrency {CONCURRENCY}")
    ok = watched.rows_ok
    tokens_per_row = watched.prompt_tokens / ok + MAX_TOKENS if ok else 0.0
    stats = watched.stats
    return Outcome(scenario, ok, watched.rows_failed, int(stats["requests_total"]),
                   by_status(stats).get(429, 0), watched.sending_s, watched.ok_per_min,
                   watched.ok_per_min * tokens_per_row, watched.run.usage.wall_s,
                   summary_line(watched.run),
                   use_per_window(stats, scenario.binding, scenario.tpm
                                  if scenario.binding == "tokens" else RPM))


def report(outcomes: list[Outcome]) -> None:
    print_table(
        ["scenario", "mock TPM", "binding", "rows ok", "rows failed", "requests", "429s",
         "429 share", "sending s", "ok req/min", "tokens/min", "utilization", "by windows",
         "wall s"],
        [(o.scenario.name, o.scenario.tpm, o.scenario.binding if o.scenario.job_limits else "-",
          o.rows_ok, o.rows_failed, o.requests, o.rate_limited, f"{100 * o.share_429:.2f}%",
          o.sending_s, round(o.ok_per_min), round(o.tokens_per_min),
          f"{o.utilization:.3f}", f"{o.by_windows:.3f}", o.wall_s) for o in outcomes])
    for outcome in outcomes:
        print(f"[{outcome.scenario.name}] batcher summary: {outcome.summary}")
    print()
    targets = []
    for o in outcomes:
        targets.append((f"{o.scenario.name}: utilization >= {TARGET_UTILIZATION}",
                        f"{o.utilization:.3f}", o.utilization >= TARGET_UTILIZATION))
        targets.append((f"{o.scenario.name}: 429s <= {100 * TARGET_429_SHARE:.1f}% of requests",
                        f"{100 * o.share_429:.2f}%", o.share_429 <= TARGET_429_SHARE))
    if targets:
        print_targets(targets)


def main(argv: list[str] | None = None) -> int:
    parser = small_flag(__doc__.split("\n\n")[0] if __doc__ else "utilization")
    parser.add_argument("--rows", type=int, help="prompts per scenario (default 5,000; small 600)")
    parser.add_argument("--scenario", action="append", choices=[s.name for s in SCENARIOS],
                        help="run only this scenario (repeatable)")
    args = parser.parse_args(argv)
    rows = args.rows or (600 if args.small else 5_000)
    chosen = [s for s in SCENARIOS if not args.scenario or s.name in args.scenario]

    def body(folder: Path) -> Callable[[], None]:
        print(f"rows per scenario: {rows:,}; mock RPM {RPM:,}, window {WINDOW_S:g} s, "
              f"latency {LATENCY_S:g} s; job concurrency {CONCURRENCY}\n", flush=True)
        source = make_parquet_input(folder / "input.parquet", rows)
        outcomes = [run_scenario(folder, source, rows, scenario) for scenario in chosen]
        return lambda: report(outcomes)

    return bench_main("utilization",
                      "utilization: RPM 6,000 + TPM limit over 1 s windows, 50 ms latency",
                      args.keep, body)


if __name__ == "__main__":
    sys.exit(main())
