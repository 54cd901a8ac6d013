"""The retry policy and the pacers, on an injected clock: nothing sleeps for real."""

from __future__ import annotations

import asyncio
import random

import pytest

from batcher.errors import ApiError, Verdict
from batcher.limits import OutputEstimate, RateLimiter
from batcher.retry import RetryPolicy


class FakeTime:
    """A clock that only moves when something sleeps on it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def transient(retry_after: float | None = None) -> ApiError:
    return ApiError(Verdict.RETRY, "HTTP 503", status=503, retry_after_s=retry_after)


def test_backoff_is_full_jitter_under_an_exponential_cap() -> None:
    policy = RetryPolicy(max_attempts=10, base_delay_s=0.5, max_delay_s=4)
    rng = random.Random(7)
    for attempts_made, cap in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (8, 4.0)]:
        delays = [policy.delay_before_retry(attempts_made, transient(), rng) for _ in range(200)]
        assert all(d is not None and 0 <= d <= cap for d in delays)
        assert max(d for d in delays if d is not None) > cap * 0.8  # really spread to the cap


def test_retry_after_is_a_floor() -> None:
    policy = RetryPolicy(max_attempts=5)
    rng = random.Random(1)
    delays = [policy.delay_before_retry(1, transient(retry_after=3.0), rng) for _ in range(100)]
    assert all(d is not None and 3.0 <= d <= 3.6 for d in delays)


def test_gives_up_after_max_attempts_and_never_retries_terminal_errors() -> None:
    policy = RetryPolicy(max_attempts=3)
    rng = random.Random(0)
    assert policy.delay_before_retry(2, transient(), rng) is not None
    assert policy.delay_before_retry(3, transient(), rng) is None
    row_error = ApiError(Verdict.ROW_ERROR, "HTTP 400", status=400)
    abort = ApiError(Verdict.ABORT, "HTTP 401", status=401)
    assert policy.delay_before_retry(1, row_error, rng) is None
    assert policy.delay_before_retry(1, abort, rng) is None


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_requests_are_paced_evenly_from_the_first_one() -> None:
    time = FakeTime()
    limiter = RateLimiter(requests_per_minute=600, tokens_per_minute=None,
                          clock=time.clock, sleep=time.sleep)

    async def send(count: int) -> list[float]:
        starts = []
        for _ in range(count):
            await limiter.acquire(10)
            starts.append(time.now)
        return starts

    starts = run(send(5))
    # 600 RPM is one request every 0.1 s, with no initial burst.
    assert starts == pytest.approx([1000.0, 1000.1, 1000.2, 1000.3, 1000.4])


def test_token_limit_spaces_by_size_and_a_huge_request_waits_instead_of_failing() -> None:
    time = FakeTime()
    limiter = RateLimiter(requests_per_minute=None, tokens_per_minute=6000,
                          clock=time.clock, sleep=time.sleep)  # 100 tokens per second

    async def scenario() -> list[float]:
        starts = []
        for tokens in (100, 50_000, 100):  # the middle one is > a whole minute's budget
            await limiter.acquire(tokens)
            starts.append(time.now)
        return starts

    starts = run(scenario())
    assert starts == pytest.approx([1000.0, 1001.0, 1501.0])


def test_settle_returns_unused_tokens_and_charges_overruns() -> None:
    time = FakeTime()
    limiter = RateLimiter(requests_per_minute=None, tokens_per_minute=6000,
                          clock=time.clock, sleep=time.sleep)

    async def scenario() -> float:
        reservation = await limiter.acquire(500)  # books 5 s
        limiter.settle(reservation, 100)  # only 1 s worth was used
        assert limiter.tokens is not None
        return limiter.tokens.next_free

    assert run(scenario()) == pytest.approx(1001.0)

    async def overrun() -> float:
        reservation = await limiter.acquire(100)
        limiter.settle(reservation, 300)
        assert limiter.tokens is not None
        return limiter.tokens.next_free

    time.now = 2000.0
    assert run(overrun()) == pytest.approx(2003.0)


def test_idle_time_does_not_build_a_burst() -> None:
    time = FakeTime()
    limiter = RateLimiter(requests_per_minute=60, tokens_per_minute=None,
                          clock=time.clock, sleep=time.sleep)

    async def scenario() -> list[float]:
        await limiter.acquire(1)
        time.now += 100  # a long idle spell
        starts = []
        for _ in range(3):
            await limiter.acquire(1)
            starts.append(time.now)
        return starts

    assert run(scenario()) == pytest.approx([1100.0, 1101.0, 1102.0])


def test_output_estimate_follows_observed_completions() -> None:
    estimate = OutputEstimate(initial=256)
    assert estimate.value == 256
    for _ in range(200):
        estimate.observe(40)
    assert estimate.value == 40
