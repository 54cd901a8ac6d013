"""Pacing on virtual time: batcher's limiter against the mock's, in one process.

The machine-independent companion of ``utilization.py`` and ``sharing.py``: no
sockets and no real sleeping, so the figures do not move with the machine's
load. Workers acquire a turn from :class:`batcher.limits.pacing.RateLimiter`,
reach the mock's limiter (:class:`batcher.mock_server.ratelimit.RateLimiter`,
1 s sliding windows) after a random transit of up to ``--transit-ms`` (the
jitter of a busy machine), wait the 50 ms reply, and report the headers back.
Utilization is what the mock admitted from 5 s after the start to 5 s before
the end, over the binding limit (for ``other-client``: over what the other
client leaves). Deterministic for a given ``--seed``.

Usage: ``python bench/pacing_virtual.py [--seconds 40] [--transit-ms 3 15]``
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import random
import sys
from dataclasses import dataclass

from batcher.limits.pacing import RateLimiter
from batcher.mock_server.ratelimit import RateLimiter as MockLimiter
from batcher.transport.ratelimits import parse_rate_limits

LATENCY_S = 0.05
CONCURRENCY = 32
ESTIMATE, CHARGE = 80, 79  # tokens batcher reserves for a request, and what the mock counts


class VirtualTime:
    """Sleepers wake in order of their wake-up times; the clock jumps between them."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._wakeups: list[tuple[float, int, asyncio.Future[None]]] = []
        self._count = 0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._count += 1
        heapq.heappush(self._wakeups, (self.now + max(0.0, seconds), self._count, future))
        await future

    async def drive(self, tasks: list[asyncio.Task[None]]) -> None:
        while not all(task.done() for task in tasks):
            for _ in range(20):
                await asyncio.sleep(0)
            if self._wakeups:
                moment, _, future = heapq.heappop(self._wakeups)
                self.now = max(self.now, moment)
                future.set_result(None)


@dataclass(frozen=True)
class Scenario:
    name: str
    rpm: int
    tpm: int | None
    job_limits: bool
    other_rpm: int = 0

    def utilization(self, admitted_per_s: float) -> float:
        if self.other_rpm:
            return admitted_per_s * 60 / (self.rpm - self.other_rpm)
        if self.tpm is not None and self.tpm < self.rpm * CHARGE:
            return admitted_per_s * 60 * CHARGE / self.tpm
        return admitted_per_s * 60 / self.rpm


SCENARIOS = (
    Scenario("rpm-bound", 6000, 2_000_000, job_limits=True),
    Scenario("tpm-bound", 6000, 400_000, job_limits=True),
    Scenario("no-limits", 6000, 2_000_000, job_limits=False),
    Scenario("other-client", 6000, None, job_limits=True, other_rpm=2000),
)


def run(scenario: Scenario, seconds: float, transit_s: float, seed: int) -> tuple[float, int]:
    """Utilization (by the mock's count) and 429s of one scenario."""
    time = VirtualTime()
    transit = random.Random(seed)
    rpm, tpm = (scenario.rpm, scenario.tpm) if scenario.job_limits else (None, None)
    limiter = RateLimiter(rpm, tpm, clock=time.clock, sleep=time.sleep)
    mock = MockLimiter(scenario.rpm, scenario.tpm, 1.0, background_rpm=scenario.other_rpm or None,
                       now=time.now)
    start, end = time.now, time.now + seconds
    admitted: list[float] = []
    refused = 0

    async def worker() -> None:
        nonlocal refused
        while time.now < end:
            sent = await limiter.acquire(ESTIMATE)
            await time.sleep(transit.uniform(0.0, transit_s))
            verdict = mock.admit(time.now, CHARGE)
            if verdict.admitted:
                admitted.append(time.now)
                await time.sleep(LATENCY_S)
            limiter.observe(parse_rate_limits(verdict.headers), ESTIMATE, sent=sent)
            if verdict.admitted:
                limiter.settle(sent, CHARGE)
            else:
                refused += 1
                rejection = verdict.rejection
                limiter.on_rate_limited(rejection.retry_after_s if rejection else None)

    async def scenario_run() -> None:
        await time.drive([asyncio.create_task(worker()) for _ in range(CONCURRENCY)])

    asyncio.run(scenario_run())
    steady = [moment for moment in admitted if start + 5 <= moment < end - 5]
    return scenario.utilization(len(steady) / (seconds - 10)), refused


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--seconds", type=float, default=40.0, help="virtual seconds per run")
    parser.add_argument("--transit-ms", type=float, nargs="+", default=[3.0, 15.0],
                        help="the longest transit to the server, one run each")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--small", action="store_true",
                        help="CI's quick mode: 15 virtual seconds, 3 ms transit only")
    args = parser.parse_args(argv)
    if args.small:
        args.seconds, args.transit_ms = 15.0, [3.0]
    print(f"virtual time, {args.seconds:g} s per run; concurrency {CONCURRENCY}, replies "
          f"after {LATENCY_S:g} s, 1 s sliding windows; seed {args.seed}\n")
    print(f"{'scenario':<14}{'transit ms':>11}{'utilization':>13}{'429s':>6}")
    for scenario in SCENARIOS:
        for transit_ms in args.transit_ms:
            utilization, refused = run(scenario, args.seconds, transit_ms / 1000, args.seed)
            print(f"{scenario.name:<14}{transit_ms:>11g}{utilization:>13.3f}{refused:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
