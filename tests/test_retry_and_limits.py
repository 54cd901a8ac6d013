"""The retry policy and the pacers, on an injected clock: nothing sleeps for real."""

from __future__ import annotations

import asyncio
import random

import pytest

from batcher.errors import ApiError, Verdict
from batcher.limits.pacing import OutputEstimate, RateLimiter
from batcher.limits.retry import FailureStreak, GaveUp, Retrying, RetryPolicy, classify
from batcher.testing import FakeClock
from batcher.transport.ratelimits import ServerLimits, parse_rate_limits


class ExactLimiter(RateLimiter):
    """Paces at exactly the limit, so the arithmetic below stays readable."""

    PACE_FRACTION = 1.0



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


def engine(time: FakeClock, max_attempts: int = 4, seed: int = 3) -> Retrying:
    return Retrying(RetryPolicy(max_attempts=max_attempts, base_delay_s=1.0, max_delay_s=8.0),
                    sleep=time.sleep, rng=random.Random(seed), clock=time.clock)


class Calls:
    """A server call that fails with ``errors`` in turn, then answers ``"done"``."""

    def __init__(self, *errors: ApiError) -> None:
        self.errors = list(errors)
        self.made = 0

    async def __call__(self) -> str:
        self.made += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


def test_the_engine_waits_the_policy_s_delays_between_attempts() -> None:
    time = FakeClock(1000.0)
    call = Calls(transient(), transient(), transient(retry_after=5.0))
    assert asyncio.run(engine(time).call(call)) == "done"
    assert call.made == 4
    rng, policy = random.Random(3), engine(FakeClock(1000.0)).policy
    expected = [policy.delay_before_retry(n, error, rng)
                for n, error in [(1, transient()), (2, transient()),
                                 (3, transient(retry_after=5.0))]]
    assert time.sleeps == expected  # the policy's draws, in order, from the engine's rng
    assert 5.0 <= time.sleeps[2] <= 6.0


def test_the_engine_gives_up_after_the_last_attempt_saying_how_long_it_tried() -> None:
    time = FakeClock(1000.0)
    call = Calls(*(transient() for _ in range(10)))
    with pytest.raises(GaveUp) as gave_up:
        asyncio.run(engine(time, max_attempts=3).call(call))
    assert call.made == 3 and len(time.sleeps) == 2
    assert gave_up.value.verdict is Verdict.RETRY and not gave_up.value.aborts
    assert gave_up.value.attempts == 3
    assert gave_up.value.elapsed_s == pytest.approx(sum(time.sleeps))
    assert gave_up.value.tries().startswith(" (3 attempts over ")


@pytest.mark.parametrize(("error", "verdict"), [
    (ApiError(Verdict.ROW_ERROR, "HTTP 400", status=400), Verdict.ROW_ERROR),
    (ApiError(Verdict.ABORT, "HTTP 401", status=401), Verdict.ABORT),
])
def test_the_engine_never_retries_a_terminal_error(error: ApiError, verdict: Verdict) -> None:
    time = FakeClock(1000.0)
    call = Calls(error)
    with pytest.raises(GaveUp) as gave_up:
        asyncio.run(engine(time).call(call))
    assert call.made == 1 and time.sleeps == []
    assert gave_up.value.verdict is verdict and gave_up.value.error is error
    assert gave_up.value.aborts is (verdict is Verdict.ABORT) and gave_up.value.tries() == ""


def test_a_recheck_after_the_wait_can_end_the_retries() -> None:
    """A create whose answer was lost: look it up before creating again."""
    time = FakeClock(1000.0)
    call = Calls(transient(), transient())
    looked: list[float] = []

    async def created_meanwhile() -> str | None:
        looked.append(time.now)
        return "found" if len(looked) == 2 else None

    assert asyncio.run(engine(time).call(call, recheck=created_meanwhile)) == "found"
    assert call.made == 2 and len(time.sleeps) == 2 and looked == [1000.0 + time.sleeps[0],
                                                                   time.now]


def test_a_gateway_failing_in_itself_aborts_until_a_request_got_through() -> None:
    fault = ApiError(Verdict.RETRY, "HTTP 500 with a non-JSON body", status=500,
                     gateway_fault=True)
    assert classify(fault, answered=False) is Verdict.ABORT
    assert classify(fault, answered=True) is Verdict.RETRY
    decided = engine(FakeClock(1000.0)).decide(1, fault, answered=False)
    assert decided.aborts and decided.delay_s is None
    assert engine(FakeClock(1000.0)).decide(1, fault).delay_s is not None


def test_requests_are_paced_evenly_from_the_first_one() -> None:
    time = FakeClock(1000.0)
    limiter = ExactLimiter(requests_per_minute=600, tokens_per_minute=None,
                          clock=time.clock, sleep=time.sleep)

    async def send(count: int) -> list[float]:
        starts = []
        for _ in range(count):
            await limiter.acquire(10)
            starts.append(time.now)
        return starts

    starts = asyncio.run(send(5))
    # 600 RPM is one request every 0.1 s, with no initial burst.
    assert starts == pytest.approx([1000.0, 1000.1, 1000.2, 1000.3, 1000.4])


def test_token_limit_spaces_by_size_and_a_huge_request_waits_instead_of_failing() -> None:
    time = FakeClock(1000.0)
    limiter = ExactLimiter(requests_per_minute=None, tokens_per_minute=6000,
                          clock=time.clock, sleep=time.sleep)  # 100 tokens per second

    async def scenario() -> list[float]:
        starts = []
        for tokens in (100, 50_000, 100):  # the middle one is > a whole minute's budget
            await limiter.acquire(tokens)
            starts.append(time.now)
        return starts

    starts = asyncio.run(scenario())
    assert starts == pytest.approx([1000.0, 1001.0, 1501.0])


def test_settle_returns_unused_tokens_and_charges_overruns() -> None:
    time = FakeClock(1000.0)
    limiter = ExactLimiter(requests_per_minute=None, tokens_per_minute=6000,
                          clock=time.clock, sleep=time.sleep)

    async def scenario() -> float:
        reservation = await limiter.acquire(500)  # books 5 s
        limiter.settle(reservation, 100)  # only 1 s worth was used
        assert limiter.tokens.pacer is not None
        return limiter.tokens.pacer.next_free

    assert asyncio.run(scenario()) == pytest.approx(1001.0)

    async def overrun() -> float:
        reservation = await limiter.acquire(100)
        limiter.settle(reservation, 300)
        assert limiter.tokens.pacer is not None
        return limiter.tokens.pacer.next_free

    time.now = 2000.0
    assert asyncio.run(overrun()) == pytest.approx(2003.0)


def test_idle_time_does_not_build_a_burst() -> None:
    time = FakeClock(1000.0)
    limiter = ExactLimiter(requests_per_minute=60, tokens_per_minute=None,
                          clock=time.clock, sleep=time.sleep)

    async def scenario() -> list[float]:
        await limiter.acquire(1)
        time.now += 100  # a long idle spell
        starts = []
        for _ in range(3):
            await limiter.acquire(1)
            starts.append(time.now)
        return starts

    assert asyncio.run(scenario()) == pytest.approx([1100.0, 1101.0, 1102.0])


def test_output_estimate_follows_observed_completions() -> None:
    estimate = OutputEstimate(initial=256)
    assert estimate.value == 256
    for _ in range(200):
        estimate.observe(40)
    assert estimate.value == 40


def test_pace_keeps_a_safety_margin_below_the_limit() -> None:
    time = FakeClock(1000.0)
    limiter = RateLimiter(requests_per_minute=6000, tokens_per_minute=None,
                          clock=time.clock, sleep=time.sleep)
    assert limiter.requests.pace_per_minute == pytest.approx(6000 * RateLimiter.PACE_FRACTION)
    assert 0.97 <= RateLimiter.PACE_FRACTION < 1


def test_limits_are_learned_from_headers_but_never_above_the_job() -> None:
    time = FakeClock(1000.0)
    unlimited = ExactLimiter(None, None, clock=time.clock, sleep=time.sleep)
    assert unlimited.requests.pacer is None
    unlimited.observe(ServerLimits(limit_requests=3000, limit_tokens=90_000), 10)
    assert unlimited.requests.pace_per_minute == 3000
    assert unlimited.tokens.pace_per_minute == 90_000
    capped = ExactLimiter(600, None, clock=time.clock, sleep=time.sleep)
    capped.observe(ServerLimits(limit_requests=10_000), 10)
    assert capped.requests.pace_per_minute == 600  # the job's limit wins when lower
    capped.observe(ServerLimits(limit_requests=300), 10)
    assert capped.requests.pace_per_minute == 300  # the server's, when lower


def test_low_remaining_headroom_holds_sends_until_refilled() -> None:
    time = FakeClock(1000.0)
    limiter = ExactLimiter(None, 6000, clock=time.clock, sleep=time.sleep)  # 100 tok/s

    async def scenario() -> float:
        await limiter.acquire(100)
        time.now += 30  # idle: our own accounting says the next request may go at once
        # ... but the server has only 20 tokens left (another client shares the key).
        limiter.observe(ServerLimits(remaining_tokens=20, reset_tokens_s=5.0), next_tokens=100)
        await limiter.acquire(100)
        return time.now

    # It needs 80 more tokens at 100/s: 0.8 s, sooner than the full reset in 5 s.
    assert asyncio.run(scenario()) == pytest.approx(1030.8)


def test_headroom_without_a_known_rate_waits_for_the_reset() -> None:
    time = FakeClock(1000.0)
    limiter = ExactLimiter(None, None, clock=time.clock, sleep=time.sleep)

    async def scenario() -> float:
        limiter.observe(ServerLimits(remaining_requests=0, reset_requests_s=0.25), 10)
        await limiter.acquire(10)
        return time.now

    assert asyncio.run(scenario()) == pytest.approx(1000.25)


def test_a_429_cuts_the_pace_once_per_burst_and_it_recovers() -> None:
    time = FakeClock(1000.0)
    limiter = ExactLimiter(6000, None, clock=time.clock, sleep=time.sleep)
    for _ in range(10):  # ten 429s from one window count as one
        limiter.on_rate_limited()
    assert limiter.factor == pytest.approx(RateLimiter.DECREASE)
    assert limiter.requests.pace_per_minute == pytest.approx(6000 * RateLimiter.DECREASE)
    time.now += 2.0
    limiter.on_rate_limited()
    assert limiter.factor == pytest.approx(
        (RateLimiter.DECREASE + 2 * RateLimiter.RECOVERY_PER_S) * RateLimiter.DECREASE)
    time.now += 60

    async def one() -> None:
        await limiter.acquire(1)

    asyncio.run(one())
    assert limiter.factor == 1.0 and limiter.requests.pace_per_minute == 6000


def test_header_parsing() -> None:
    limits = parse_rate_limits({
        "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s", "x-ratelimit-limit-tokens": "150000",
        "x-ratelimit-remaining-tokens": "149984", "x-ratelimit-reset-tokens": "6m0s"})
    assert limits == ServerLimits(60, 59, 1.0, 150000, 149984, 360.0)
    azure = parse_rate_limits({"x-ratelimit-remaining-requests": "79",
                               "x-ratelimit-limit-tokens": "-1"})
    assert azure == ServerLimits(remaining_requests=79)
    assert parse_rate_limits({}) == ServerLimits()


def test_failure_streak_trips_on_identical_failures_only() -> None:
    streak = FailureStreak(3)
    assert not streak.record("HTTP 400") and not streak.record("HTTP 400")
    assert not streak.record(None)  # a success resets
    assert not streak.record("HTTP 400") and not streak.record("HTTP 404")
    assert not streak.record("HTTP 404")
    assert streak.record("HTTP 404")
