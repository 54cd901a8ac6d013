"""The rate limit a cluster shares and the journal by request key (issue 16), without
Ray: the shared limit in this process, time on a fake clock."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from batcher.errors import RunAborted
from batcher.limits.leases import ClusterLimit, Feedback, Lease, LeasedLimiter, LocalLimit
from batcher.records import RowResult
from batcher.store.answers import Answers, AnswerWriter
from batcher.testing import FakeClock
from batcher.transport.ratelimits import ServerLimits


def test_a_lone_worker_leases_half_a_second_at_the_whole_rate() -> None:
    time = FakeClock(100.0)
    limit = ClusterLimit(6000, None, time.clock)
    lease = limit.lease("a", Feedback())
    assert lease.requests == round(6000 * ClusterLimit.PACE_FRACTION / 60 * ClusterLimit.LEASE_S)
    assert lease.requests_per_s == pytest.approx(6000 * ClusterLimit.PACE_FRACTION / 60)
    assert lease.delay_s == 0
    assert lease.tokens is None and lease.tokens_per_s is None


def test_workers_share_the_rate_and_their_leases_never_overlap() -> None:
    time = FakeClock(100.0)
    limit = ClusterLimit(6000, 600_000, time.clock)
    rate = 6000 * ClusterLimit.PACE_FRACTION / 60
    granted = (limit.lease("a", Feedback()).requests or 0) + (
        limit.lease("b", Feedback()).requests or 0)
    for _ in range(20):
        for worker in ("a", "b"):
            lease = limit.lease(worker, Feedback())
            assert lease.requests_per_s == pytest.approx(rate / 2)
            tokens_rate = 600_000 * ClusterLimit.PACE_FRACTION / 60
            assert lease.tokens_per_s == pytest.approx(tokens_rate / 2)
            granted += lease.requests or 0
            last_start = time.now + lease.delay_s
        time.now += 0.5
    # Everything granted fits the global pace from the first lease to the last one's start.
    assert granted <= rate * (last_start - 100.0) + rate * ClusterLimit.LEASE_S


def test_a_429_heard_by_one_worker_slows_every_worker() -> None:
    time = FakeClock(100.0)
    limit = ClusterLimit(6000, None, time.clock)
    before = limit.lease("b", Feedback()).requests_per_s
    limit.lease("a", Feedback(rate_limited=3))
    after = limit.lease("b", Feedback()).requests_per_s
    assert before is not None and after is not None
    assert after == pytest.approx(before / 2 * 0.8)  # two workers now, and the cut
    time.now += 10  # no 429 since: the pace recovers (and "a", silent, has left the shares)
    assert limit.lease("b", Feedback()).requests_per_s == pytest.approx(before)


def test_limits_the_server_announces_pace_a_job_that_set_none() -> None:
    time = FakeClock(100.0)
    limit = ClusterLimit(None, None, time.clock)
    assert limit.lease("a", Feedback()).requests is None
    lease = limit.lease("a", Feedback(learned={"requests": 600}))
    assert lease.requests_per_s == pytest.approx(600 * ClusterLimit.PACE_FRACTION / 60)


def test_a_bucket_the_server_says_is_empty_holds_every_lease() -> None:
    time = FakeClock(100.0)
    limit = ClusterLimit(600, None, time.clock)
    limit.lease("a", Feedback())
    time.now += 5
    lease = limit.lease("b", Feedback(short={"requests": (3.0, 20.0)}))
    assert lease.delay_s == pytest.approx(3 / (600 * ClusterLimit.PACE_FRACTION / 60))


def test_a_retry_after_heard_by_one_worker_holds_every_lease() -> None:
    time = FakeClock(100.0)
    limit = ClusterLimit(600, None, time.clock)
    limit.lease("a", Feedback())
    time.now += 5
    assert limit.lease("b", Feedback(rate_limited=1, pause_s=2.0)).delay_s == pytest.approx(2.0)


def test_a_verdict_met_by_one_worker_stops_the_others() -> None:
    time = FakeClock(100.0)
    limit = ClusterLimit(600, None, time.clock)
    limiter = LeasedLimiter(LocalLimit(limit), "b", time.clock, time.sleep)
    limit.lease("a", Feedback(abort="HTTP 401: bad key"))
    with pytest.raises(RunAborted, match="bad key"):
        asyncio.run(limiter.acquire(10))


def test_a_worker_spends_its_leases_at_its_share_of_the_pace() -> None:
    time = FakeClock(100.0)
    limit = ClusterLimit(1200, None, time.clock)

    class BusyPeer(LocalLimit):
        """Another worker leases as often as this one: half the pace is ours."""

        async def lease(self, worker: str, feedback: Feedback, min_tokens: int) -> Lease:
            self.limit.lease("other", Feedback())
            return await super().lease(worker, feedback, min_tokens)

    limiter = LeasedLimiter(BusyPeer(limit), "me", time.clock, time.sleep)

    async def send(count: int) -> list[float]:
        moments = []
        for _ in range(count):
            await limiter.acquire(10)
            moments.append(time.now)
        return moments

    moments = asyncio.run(send(200))
    share = 1200 * ClusterLimit.PACE_FRACTION / 60 / 2
    for start in moments:
        in_a_second = sum(1 for moment in moments if start <= moment < start + 1)
        assert in_a_second <= share + 1


def test_a_429_gives_up_the_rest_of_the_lease_and_reports_it() -> None:
    time = FakeClock(100.0)
    limit = ClusterLimit(6000, None, time.clock)
    limiter = LeasedLimiter(LocalLimit(limit), "me", time.clock, time.sleep)
    asyncio.run(limiter.acquire(10))
    limiter.on_rate_limited()
    limiter.observe(ServerLimits(limit_requests=5000), 10)
    asyncio.run(limiter.acquire(10))  # a new lease, carrying the 429 and the limit
    assert limit.factor == pytest.approx(0.8)
    assert limit.rate_per_s("requests") == pytest.approx(5000 * ClusterLimit.PACE_FRACTION * 0.8
                                                          / 60)


# -- the journal by request key ---------------------------------------------------------------


def ok(reply: str) -> RowResult:
    return RowResult(reply, "stop", 5, 2, 7, "ok", None, 1, 0.1)


def test_answers_find_ok_rows_of_every_worker_and_skip_errors_and_torn_lines(
        tmp_path: Path) -> None:
    first, second = AnswerWriter(tmp_path, "w1"), AnswerWriter(tmp_path, "w2")
    keys = np.frombuffer(bytes(range(64)), dtype=np.uint8).reshape(4, 16).copy()
    keys[3, 15] = 0  # a key that ends in a zero byte is a key like any other
    first.append(keys[0].tobytes(), ok("zero"))
    second.append(keys[1].tobytes(), RowResult.failed("HTTP 500", 3))
    second.append(keys[2].tobytes(), RowResult.failed("HTTP 500", 3))
    first.append(keys[2].tobytes(), ok("two"))
    first.close()
    second.close()
    with (tmp_path / "journal-w2.jsonl").open("ab") as torn:  # a kill mid-write
        torn.write(b'{"k":"' + keys[3].tobytes().hex().encode() + b'","status":"ok","rep')
    answers = Answers(tmp_path)
    assert len(answers) == 2
    found = answers.find(keys)
    assert [record and record["reply"] for record in found] == ["zero", None, "two", None]
    assert found[0] == ok("zero").to_dict()
    answers.close()


def test_answers_of_an_empty_or_missing_folder(tmp_path: Path) -> None:
    assert Answers(tmp_path / "none").find(np.zeros((1, 16), np.uint8)) == [None]
