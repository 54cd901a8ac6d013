"""Sharing a key: gateway header names, other clients, fixed windows, gateway errors.

The limiter runs on an injected clock (nothing sleeps); the gateway's answers come
from the mock server over loopback.
"""

from __future__ import annotations

import asyncio
import heapq
import random
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import job_dict, run_job, write_csv

from batcher.errors import RunAborted, Verdict
from batcher.limits.pacing import RateLimiter
from batcher.limits.quantity import Quantity
from batcher.limits.sharing import OwnSends
from batcher.mock_server.ratelimit import RateLimiter as MockLimiter
from batcher.testing import FakeClock
from batcher.transport.failures import classify_error
from batcher.transport.ratelimits import ServerLimits, parse_rate_limits, parse_retry_after

# -- header names ------------------------------------------------------------------------


def test_gateway_header_names_are_read_and_the_tightest_limit_wins() -> None:
    limits = parse_rate_limits({
        "x-ratelimit-limit-requests": "6000", "x-ratelimit-remaining-requests": "5000",
        "x-ratelimit-reset-requests": "10ms",
        "x-ratelimit-api_key-limit-requests": "30", "x-ratelimit-api_key-remaining-requests": "4",
        "x-ratelimit-team-limit-tokens": "9000", "x-ratelimit-team-remaining-tokens": "800",
        "x-ratelimit-limit-project-tokens": "100000",
        "x-ratelimit-api_key-limit-max_parallel_requests": "2",  # concurrency, not a rate
    })
    assert limits == ServerLimits(limit_requests=30, remaining_requests=4, reset_requests_s=0.01,
                                  limit_tokens=9000, remaining_tokens=800)


@pytest.mark.parametrize(("headers", "expected"), [
    ({"llm_provider-retry-after": "7"}, 7.0),
    ({"llm_provider-retry-after-ms": "250"}, 0.25),
    ({"retry-after-ms": "100", "llm_provider-retry-after": "7"}, 0.1),
])
def test_vendor_prefixed_retry_after(headers: dict[str, str], expected: float) -> None:
    assert parse_retry_after(headers) == expected


def test_a_429_without_retry_after_waits_for_the_exhausted_limits_reset() -> None:
    error = classify_error(429, b"{}", {"x-ratelimit-remaining-requests": "0",
                                        "x-ratelimit-reset-requests": "1.5s",
                                        "x-ratelimit-remaining-tokens": "500",
                                        "x-ratelimit-reset-tokens": "6m0s"})
    assert error.retry_after_s == 1.5


# -- error messages ----------------------------------------------------------------------


def test_litellm_wrapped_error_shows_the_status_once_and_the_backends_code() -> None:
    inner = {"error": {"message": "maximum context length is 8192 tokens",
                       "type": "invalid_request_error", "param": "messages",
                       "code": "context_length_exceeded"}}
    message = f"litellm.BadRequestError: OpenAIException - Error code: 400 - {inner!r}"
    body = orjson.dumps({"error": {"message": message, "type": None, "param": None,
                                   "code": "400"}})
    error = classify_error(400, body, {})
    assert error.message.startswith(
        "HTTP 400 context_length_exceeded invalid_request_error: maximum context length")
    assert "400 400" not in error.message
    assert error.code == "context_length_exceeded" and error.verdict is Verdict.ROW_ERROR


def test_gateway_answers_about_the_key_stop_the_run() -> None:
    body = orjson.dumps({"error": {"message": "No connected db.", "type": "no_db_connection",
                                   "param": "None", "code": "400"}})
    error = classify_error(400, body, {})
    assert error.verdict is Verdict.ABORT and "API key" in error.message
    plain = classify_error(500, b"Internal Server Error", {"content-type": "text/plain"})
    assert plain.gateway_fault and plain.verdict is Verdict.RETRY
    html = classify_error(502, b"<html></html>", {"content-type": "text/html"})
    assert not html.gateway_fault


@pytest.mark.parametrize("fault", ["litellm_no_db", "litellm_no_key"])
def test_a_misconfigured_gateway_stops_at_once(tmp_path: Path, make_mock: Any,
                                               fault: str) -> None:
    server = make_mock()
    source = write_csv(tmp_path / "in.csv", ["id", "text"],
                       [[f"r{i}", f"[[fault:{fault}]] prompt {i}"] for i in range(50)])
    with pytest.raises(RunAborted) as caught:
        run_job(job_dict(server.base_url, source, tmp_path / "out.csv",
                         limits={"concurrency": 4}), tmp_path)
    assert caught.value.exit_code == 3
    assert "gateway" in str(caught.value)
    assert server.stats.snapshot()["requests_total"] <= 4 + 4


# -- the limiter -------------------------------------------------------------------------


def test_another_client_on_the_key_slows_batcher_smoothly_and_it_climbs_back() -> None:
    """Simulate a 1 s sliding window of 100 requests that another client shares."""
    time = FakeClock(1000.0)
    limiter = RateLimiter(6000, None, clock=time.clock, sleep=time.sleep)
    server = MockLimiter(6000, None, 1.0, background_rpm=2400, now=time.now)
    rates = []

    async def run(seconds: float) -> tuple[int, int]:
        admitted = refused = 0
        until = time.now + seconds
        while time.now < until:
            sent = await limiter.acquire(1)
            verdict = server.admit(time.now, 1)
            limiter.observe(parse_rate_limits(verdict.headers), 1, sent=sent)
            if verdict.admitted:
                admitted += 1
            else:
                refused += 1
                limiter.on_rate_limited()
            rates.append(limiter.requests.pace_per_minute or 0)
        return admitted, refused

    admitted, refused = asyncio.run(run(20))
    assert refused <= 0.01 * (admitted + refused)
    assert admitted / 20 >= 0.9 * 60  # of the 60 a second the other client leaves
    assert min(rates) > 0.3 * 6000  # slowed, never stalled
    server._background_gap = None  # the other client goes away
    admitted, refused = asyncio.run(run(10))
    assert admitted / 10 >= 0.85 * 100  # most of the window again, climb included
    climbed = limiter.requests.pace_per_minute
    assert climbed is not None and climbed >= 0.95 * 6000 * RateLimiter.PACE_FRACTION


def test_a_fixed_window_is_spread_over_what_is_left_of_it() -> None:
    time = FakeClock(1000.0)
    limiter = RateLimiter(6000, None, clock=time.clock, sleep=time.sleep)
    refused = 0

    async def run() -> None:
        nonlocal refused
        server = MockLimiter(600, None, 6.0, window_kind="from_first",
                             remaining_off_by_one=True, now=time.now)
        for _ in range(300):
            sent = await limiter.acquire(1)
            verdict = server.admit(time.now, 1)
            limiter.observe(parse_rate_limits(verdict.headers), 1, sent=sent)
            if not verdict.admitted:
                refused += 1
                limiter.on_rate_limited(verdict.rejection.retry_after_s
                                        if verdict.rejection else None)

    asyncio.run(run())
    assert refused <= 3  # the first window only, before its kind is known


class VirtualTime(FakeClock):
    """Sleepers wake in order of their wake-up times, as on a real clock."""

    def __init__(self) -> None:
        super().__init__(1000.0)
        self._wakeups: list[tuple[float, int, asyncio.Future[None]]] = []

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._wakeups, (self.now + seconds, id(future), future))
        await future

    async def drive(self, tasks: list[asyncio.Task[None]]) -> None:
        while not all(task.done() for task in tasks):
            for _ in range(10):
                await asyncio.sleep(0)
            if self._wakeups:
                moment, _, future = heapq.heappop(self._wakeups)
                self.now = max(self.now, moment)
                future.set_result(None)


def test_a_hold_respaces_requests_already_booked() -> None:
    time = VirtualTime()
    limiter = RateLimiter(600, None, clock=time.clock, sleep=time.sleep)  # 10 a second
    starts: list[float] = []

    async def one() -> None:
        starts.append((await limiter.acquire(1)).start)

    async def scenario() -> None:
        tasks = [asyncio.create_task(one()) for _ in range(3)]
        await asyncio.sleep(0)  # all three booked within the look-ahead
        limiter.on_rate_limited(retry_after_s=2.0)
        await time.drive(tasks)

    asyncio.run(scenario())
    assert starts[0] == 1000.0  # it was due at once, before the 429 came
    later = sorted(starts[1:])
    assert later[0] >= 1002.0  # booked before the 429, they waited for its retry-after
    assert later[1] - later[0] >= 0.1 - 1e-9  # and went spaced, not in one burst


def test_alone_on_a_sliding_window_the_pace_holds_at_the_limit_without_429s() -> None:
    """16 requests in flight, each reaching the server up to 3 ms after its turn, 50 ms
    replies, a TPM limit over 1 s sliding windows and no other client: room that comes
    back before the next turn holds no turn, so the server admits what the pace sends
    (0.99 of the limit), not 0.98 of it."""
    time = VirtualTime()
    transit = random.Random(7)
    limiter = RateLimiter(6000, 400_000, clock=time.clock, sleep=time.sleep)
    server = MockLimiter(6000, 400_000, 1.0, now=time.now)
    end = time.now + 12.0
    admitted: list[float] = []
    refused = 0

    async def worker() -> None:
        nonlocal refused
        while time.now < end:
            sent = await limiter.acquire(80)
            await time.sleep(transit.uniform(0.0, 0.003))
            verdict = server.admit(time.now, 79)  # the server counts one token less
            if verdict.admitted:
                admitted.append(time.now)
                await time.sleep(0.05)
            limiter.observe(parse_rate_limits(verdict.headers), 80, sent=sent)
            if verdict.admitted:
                limiter.settle(sent, 79)
            else:
                refused += 1
                limiter.on_rate_limited(verdict.rejection.retry_after_s
                                        if verdict.rejection else None)

    async def scenario() -> None:
        await time.drive([asyncio.create_task(worker()) for _ in range(16)])

    asyncio.run(scenario())
    steady = [moment for moment in admitted if 1003.0 <= moment < 1011.0]
    assert refused == 0
    assert len(steady) * 79 / 8.0 >= 0.985 * 400_000 / 60


def test_a_429_alone_keeps_one_request_more_free_and_the_margin_fades() -> None:
    time = FakeClock(1000.0)
    tokens = Quantity(6000, time.clock)  # 100 tokens a second
    tokens.set_pace(1.0)
    tokens.respect_headroom(100.0, None, 100)
    assert tokens.pacer is not None and tokens.pacer.held_until == float("-inf")  # room enough
    tokens.overran(time.now)  # a 429 with nobody else measured on the key: our own jitter
    tokens.respect_headroom(100.0, None, 100)
    assert tokens.pacer.held_until == pytest.approx(time.now + 1.0)  # 100 more, at 100/s
    time.now += 10 * Quantity.SLACK_HALF_LIFE_S
    assert tokens.slack(time.now) < 0.1


def test_with_another_client_a_429_adds_no_margin_beyond_the_shares() -> None:
    time = FakeClock(1000.0)
    requests = Quantity(6000, time.clock)
    requests.share.observe_others(30.0, 100.0)  # another client takes 30% of the window
    requests.respect_headroom(5.0, 1.0, 1)
    requests.overran(time.now)
    assert requests.slack(time.now) == 0.0


# -- the mock's gateway conditions ---------------------------------------------------------


def test_mock_reports_litellm_per_key_names_and_its_429() -> None:
    server = MockLimiter(120, None, 6.0, window_kind="from_first", scope="api_key",
                         rejection_style="litellm_key", now=0.0)
    first = server.admit(0.0, 1)
    assert first.headers == {"x-ratelimit-api_key-limit-requests": "120",
                             "x-ratelimit-api_key-remaining-requests": "11"}
    for _ in range(11):
        server.admit(0.1, 1)
    refused = server.admit(0.2, 1)
    assert refused.rejection is not None
    headers = server.rejection_headers(refused.rejection)
    assert headers["retry-after"] == "6" and headers["rate_limit_type"] == "requests"
    assert server.error_body("m", refused.rejection)["error"]["code"] == "429"
    assert server.admit(6.0, 1).admitted  # the window started at the first request


def test_mock_calendar_window_is_off_by_one_and_the_router_429_says_wait_once() -> None:
    server = MockLimiter(60, None, 10.0, window_kind="calendar", remaining_off_by_one=True,
                         report_limit=False, rejection_style="litellm_router", now=0.0)
    seen = [server.admit(0.0, 1) for _ in range(11)]
    assert [verdict.admitted for verdict in seen] == [True] * 10 + [False]
    assert seen[9].headers["x-ratelimit-remaining-requests"] == "1"  # one too many
    assert "x-ratelimit-limit-requests" not in seen[0].headers
    rejection = seen[10].rejection
    assert rejection is not None
    assert list(server.rejection_headers(rejection)) == ["llm_provider-retry-after"]


def test_mock_background_client_takes_its_share_of_the_window() -> None:
    server = MockLimiter(6000, None, 1.0, background_rpm=1800, now=0.0)
    verdict = server.admit(10.0, 1)
    assert verdict.headers["x-ratelimit-remaining-requests"] == str(100 - 30 - 1)
    assert server.background_admitted >= 30


def test_mock_counts_what_it_admitted_per_window_without_the_other_client() -> None:
    server = MockLimiter(600, 10_000, 1.0, background_rpm=120, now=0.0)
    for moment in (0.0, 0.5, 1.2, 1.3, 2.9):
        assert server.admit(moment, 50).admitted
    assert server.background_admitted >= 2  # the other client went too, and is not counted
    assert (server.admitted.requests, server.admitted.tokens) == ([2, 2, 1], [100, 100, 50])
    server.reset()
    assert server.admitted.requests == []


def test_a_per_key_limit_under_gateway_names_earns_no_429s(tmp_path: Path,
                                                           make_mock: Any) -> None:
    server = make_mock(requests_per_minute=1200, window_s=1.0, window_kind="from_first",
                       ratelimit_scope="api_key", rejection_style="litellm_key")
    source = write_csv(tmp_path / "in.csv", ["id", "text"],
                       [[f"r{i}", f"prompt {i}"] for i in range(50)])
    report = run_job(job_dict(server.base_url, source, tmp_path / "out.csv",
                              limits={"concurrency": 8, "requests_per_minute": 6000}), tmp_path)
    assert report.exit_code == 0
    assert server.stats.snapshot()["by_status"].get("429", 0) <= 1


def test_own_sends_count_spans_and_forget_what_is_older_than_their_memory() -> None:
    own = OwnSends()
    for second in range(300):
        own.add(float(second), second)
    assert own.between(10.0, 20.0) == sum(range(11, 21))  # (after, until]
    assert own.between(20.0, 10.0) == 0
    # Asking since a send forgets the ones more than MEMORY_S (120 s) before now.
    assert own.since(250.0, 299.0) == sum(range(251, 300))
    assert own.between(-1.0, 180.0) == 179 + 180  # 179 and 180 are remembered
    own.add(300.0, 1000)  # after the forgotten sends were dropped, totals still add up
    assert own.between(298.0, 300.0) == 299 + 1000
    assert own.since(0.0, 420.0) == 1000  # only the send at 300 is within 120 s
