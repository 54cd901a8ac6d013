"""One rate limit shared by many workers, who lease it in slices.

When a job runs on many machines (``batcher.raydata``), its requests- and
tokens-per-minute must hold for the sum over every worker, and what one
worker hears from the server (a 429, the limits in the ``x-ratelimit-*``
headers, a bucket run dry) must slow them all. Asking a central party before
every request would make the coordination cost grow with the request rate;
instead:

- A :class:`ClusterLimit` (one per run; on Ray it lives in a named actor) keeps the
  run's global pace on a timeline -- one :class:`batcher.limits.pacer.Pacer` per
  limit at the global rate, the same reservation pacer a single machine uses
  -- and hands out *leases*: a slice of about ``LEASE_S`` seconds' worth of
  requests and tokens, sized to the worker's share of the rate (the rate
  divided by the workers that leased recently), booked on the timeline so
  that no two leases spend the same part of the limit.
- A worker's :class:`LeasedLimiter` is what ``batcher.plan.pipeline.attempt_row``
  sees as its limiter: it spends its lease locally, paced evenly at its share
  of the rate (never in a burst), many requests in flight at once. When half
  the lease is spent it asks for the next one in the background, so a busy
  worker never waits for a lease.
- With each lease request the worker reports what it heard since the last:
  429s for rate, the limits the server announced, a bucket the server said
  is short of the next request (and when it resets), tokens reserved but not used, and its
  progress counters. The limit cuts its pace on a 429 (multiplicatively, as
  :class:`batcher.limits.pacing.RateLimiter` does, recovering linearly), learns a
  limit the job did not set, holds every lease on an empty bucket, and gives
  unused tokens back. A worker that hears a 429 drops the rest of its lease
  and asks again at once, so one worker's 429 reaches every worker within
  one lease.
- A verdict that stops the run (a bad key, no quota) is recorded by the
  limit; every worker's next lease carries it and the worker stops too.

So the shared limit is asked about twice per worker per ``LEASE_S`` seconds,
whatever the request rate; the price is that a change of pace (a 429, a
worker joining) takes effect within one lease rather than at once. Leases
of a worker that stopped asking stay counted in the shares for one lease
more, so a share can only grow once the old lease is spent: the sum of the
workers' paces never exceeds the global one.

Longer than most modules because the cluster's limit and a worker's limiter
are the two ends of one lease protocol, read together.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from batcher.errors import RunAborted
from batcher.limits.pacer import Clock, Pacer, Reservation, Sleep
from batcher.limits.pacing import RateLimiter
from batcher.transport.ratelimits import ServerLimits

LIMITS = ("requests", "tokens")


@dataclass
class Feedback:
    """What a worker heard and did since its last lease."""

    rate_limited: int = 0
    """429s for rate (not quota)."""
    pause_s: float = 0.0
    """The longest wait a 429 asked for (``retry-after``): nobody sends before it."""
    learned: dict[str, int] = field(default_factory=dict)
    """Limits per minute the server announced, by ``requests``/``tokens``."""
    short: dict[str, tuple[float, float]] = field(default_factory=dict)
    """A bucket the server said is short of the next request, by ``requests``/``tokens``:
    how much it lacks and the seconds until it is full again."""
    unused_tokens: int = 0
    """Tokens booked (leased or reserved) but not spent; negative: spent beyond."""
    abort: str | None = None
    """This worker met a verdict that stops the run."""
    counts: Counter[str] = field(default_factory=Counter)
    """Progress counters since the last report (rows ok/error, requests, tokens)."""


@dataclass(frozen=True)
class Lease:
    """A slice of the limit: ``requests`` and ``tokens`` (None: no such limit
    is known), to be spent from ``delay_s`` after the grant at no more than the
    given paces, within ``duration_s``; or the verdict that stops the run."""

    requests: int | None
    tokens: int | None
    delay_s: float
    requests_per_s: float | None
    tokens_per_s: float | None
    duration_s: float
    abort: str | None = None


class ClusterLimit:
    """The run's global pace; hands out leases (see the module docstring)."""

    LEASE_S = 0.5
    PACE_FRACTION = 0.97  # of a limit: sends from many processes jitter more than one loop's

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None,
                 clock: Clock) -> None:
        self._clock = clock
        self._caps = {"requests": requests_per_minute, "tokens": tokens_per_minute}
        self._learned: dict[str, float] = {}
        self._pacers: dict[str, Pacer] = {}
        self._held_until = clock()
        self.factor = 1.0
        self._factor_at = clock()
        self._last_decrease = -math.inf
        self._leases_end: dict[str, float] = {}
        self.abort: str | None = None
        self.counts: Counter[str] = Counter()

    def rate_per_s(self, name: str) -> float | None:
        """The global pace of ``requests`` or ``tokens`` now (None: unlimited)."""
        known = [value for value in (self._caps[name], self._learned.get(name)) if value]
        if not known:
            return None
        return min(known) * self.PACE_FRACTION * self.factor / 60

    def lease(self, worker: str, feedback: Feedback, min_tokens: int = 0) -> Lease:
        """Take in ``worker``'s feedback and grant its next slice."""
        now = self._clock()
        self._hear(feedback, now)
        if self.abort is not None:
            return Lease(0, 0, 0.0, None, None, 0.0, abort=self.abort)
        self._recover(now)
        # A worker counts in the shares while its last lease may still be spent.
        self._leases_end = {name: end for name, end in self._leases_end.items()
                            if end + self.LEASE_S > now}
        self._leases_end.setdefault(worker, now)
        share = 1 / len(self._leases_end)
        start = max([now, self._held_until, *(pacer.next_free for pacer in
                                               self._pacers.values())])
        amounts: dict[str, int | None] = {}
        paces: dict[str, float | None] = {}
        duration = self.LEASE_S
        for name in LIMITS:
            rate = self.rate_per_s(name)
            if rate is None:
                amounts[name] = paces[name] = None
                continue
            amount = max(1, round(rate * share * self.LEASE_S))
            if name == "tokens":
                amount = max(amount, min_tokens)
            pacer = self._pacer(name, rate)
            pacer.commit(start, amount)
            amounts[name], paces[name] = amount, rate * share
            duration = max(duration, amount / (rate * share))
        self._leases_end[worker] = start + duration
        return Lease(amounts["requests"], amounts["tokens"], start - now, paces["requests"],
                     paces["tokens"], duration)

    def report(self, feedback: Feedback) -> str | None:
        """Take in feedback without leasing (a worker that finished its rows); the
        verdict that stops the run, if any."""
        self._hear(feedback, self._clock())
        return self.abort

    # -- internals ------------------------------------------------------------------------

    def _hear(self, feedback: Feedback, now: float) -> None:
        self.counts.update(feedback.counts)
        if feedback.abort is not None and self.abort is None:
            self.abort = feedback.abort
        for name, value in feedback.learned.items():
            if value > 0:
                self._learned[name] = float(value)
        if feedback.rate_limited and now - self._last_decrease >= RateLimiter.DECREASE_SPACING_S:
            self._recover(now)
            self._last_decrease = now
            self.factor = max(RateLimiter.MIN_FACTOR, self.factor * RateLimiter.DECREASE)
        if feedback.pause_s > 0:
            self._held_until = max(self._held_until, now + feedback.pause_s)
        for name, (lacking, reset_s) in feedback.short.items():
            # Until the bucket has refilled enough at our pace, or its reset, whichever is first.
            rate = self.rate_per_s(name)
            wait = reset_s if rate is None else min(reset_s, lacking / rate)
            self._held_until = max(self._held_until, now + wait)
        tokens = self._pacers.get("tokens")
        if tokens is not None and feedback.unused_tokens > 0:
            tokens.give_back(feedback.unused_tokens)
        elif tokens is not None and feedback.unused_tokens < 0:
            tokens.charge(-feedback.unused_tokens)

    def _recover(self, now: float) -> None:
        elapsed = now - self._factor_at
        self._factor_at = now
        if elapsed > 0:
            self.factor = min(1.0, self.factor + RateLimiter.RECOVERY_PER_S * elapsed)

    def _pacer(self, name: str, rate: float) -> Pacer:
        pacer = self._pacers.get(name)
        if pacer is None:
            pacer = self._pacers[name] = Pacer(rate, self._clock)
        pacer.per_second = rate
        return pacer


class LeaseSource(Protocol):
    """Where a worker's leases come from: the limit, in this process or behind an actor."""

    async def lease(self, worker: str, feedback: Feedback, min_tokens: int) -> Lease: ...


class LocalLimit:
    """A :class:`LeaseSource` over a :class:`ClusterLimit` in this process."""

    def __init__(self, limit: ClusterLimit) -> None:
        self.limit = limit

    async def lease(self, worker: str, feedback: Feedback, min_tokens: int) -> Lease:
        return self.limit.lease(worker, feedback, min_tokens)


@dataclass
class _Slice:
    """What is left of one lease on the worker's side."""

    start: float
    expires: float
    requests: float  # math.inf: no request limit known
    tokens: float  # math.inf: no token limit known
    granted_requests: float
    paces: dict[str, float]  # per second, by requests/tokens: this slice is spent at these


class LeasedLimiter:
    """One worker's limiter over leases from a :class:`LeaseSource`: what
    ``attempt_row`` calls ``acquire``, ``settle``, ``observe`` and
    ``on_rate_limited`` on, as it would a :class:`batcher.limits.pacing.RateLimiter`.

    Leases queue up as slices; a request is booked on the worker's own pacers
    (its share of the rate) and never before the start of the slice it spends.
    """

    def __init__(self, source: LeaseSource, worker: str, clock: Clock, sleep: Sleep) -> None:
        self._source = source
        self._worker = worker
        self._clock = clock
        self._sleep = sleep
        self._pacers: dict[str, Pacer] = {}
        self._slices: deque[_Slice] = deque()
        self._renewal: asyncio.Task[None] | None = None
        self._feedback = Feedback()
        self.abort: str | None = None

    # -- what attempt_row calls -----------------------------------------------------------

    async def acquire(self, tokens: int) -> Reservation:
        """Wait for this request's turn within the worker's lease, then book it."""
        while (current := self._spendable(tokens)) is None:
            if self.abort is not None:
                raise RunAborted(self.abort)
            await self._renew(tokens)
        if self.abort is not None:
            raise RunAborted(self.abort)
        now = self._clock()
        start = max([now, current.start, *(pacer.next_free for pacer in self._pacers.values())])
        current.requests -= 1
        current.tokens -= tokens
        for name, amount in (("requests", 1), ("tokens", tokens)):
            pace = current.paces.get(name)
            if pace is None:
                continue
            # Each slice at its own pace: what is left of an older lease never goes at a
            # newer lease's (maybe larger) share while the others spend theirs.
            pacer = self._pacers.get(name)
            if pacer is None:
                pacer = self._pacers[name] = Pacer(pace, self._clock)
            pacer.per_second = pace
            pacer.commit(start, amount)
        left = sum(piece.requests for piece in self._slices)
        if self._renewal is None and left < current.granted_requests / 2:
            self._renewal = asyncio.ensure_future(self._fetch(0))  # the next slice, early
        if start > now:
            await self._sleep(start - now)
        return Reservation(tokens)

    def settle(self, reservation: Reservation, used_tokens: int | None) -> None:
        if used_tokens is not None and "tokens" in self._pacers:
            self._feedback.unused_tokens += reservation.tokens - used_tokens

    def observe(self, limits: ServerLimits, next_tokens: int,
                sent: Reservation | None = None) -> None:
        """Note the limits the server announced and a bucket short of the next
        request, for the next lease (``sent`` is not needed: every worker's sends
        are the cluster's own, counted by the shared limit)."""
        for name, value in (("requests", limits.limit_requests), ("tokens", limits.limit_tokens)):
            if value:
                self._feedback.learned[name] = value
        for name, remaining, reset_s, needed in (
                ("requests", limits.remaining_requests, limits.reset_requests_s, 1),
                ("tokens", limits.remaining_tokens, limits.reset_tokens_s, next_tokens)):
            if remaining is not None and remaining < needed and reset_s:
                lacking, known_reset = self._feedback.short.get(name, (0.0, 0.0))
                self._feedback.short[name] = (max(lacking, needed - remaining),
                                              max(known_reset, reset_s))

    def on_rate_limited(self, retry_after_s: float | None = None) -> None:
        """A 429 for rate: give up the rest of the lease and tell the limit at once
        (with the server's ``retry_after_s``, which then holds every worker)."""
        self._feedback.rate_limited += 1
        if retry_after_s is not None:
            self._feedback.pause_s = max(self._feedback.pause_s, retry_after_s)
        self._drop_slices()

    # -- progress -------------------------------------------------------------------------

    def count(self, counts: Mapping[str, int]) -> None:
        """Progress to report with the next lease (or :meth:`take_feedback`)."""
        self._feedback.counts.update(counts)

    def take_feedback(self) -> Feedback:
        """What the limit has not heard yet (for a report without a lease)."""
        feedback, self._feedback = self._feedback, Feedback()
        return feedback

    def stop(self, reason: str) -> None:
        """This worker met a verdict that stops the run: the limit tells the others."""
        self.abort = reason
        self._feedback.abort = reason

    # -- internals ------------------------------------------------------------------------

    def _spendable(self, tokens: int) -> _Slice | None:
        """The first slice that can pay for a request of ``tokens``; spent and
        expired slices are dropped, and a slice short of tokens is merged into
        the next (later) one."""
        now = self._clock()
        while self._slices:
            first = self._slices[0]
            if first.expires <= now:
                self._drop(self._slices.popleft())
            elif first.requests >= 1 and first.tokens >= tokens:
                return first
            elif len(self._slices) > 1:
                second = self._slices[1]
                second.requests += max(0.0, first.requests)
                second.tokens += max(0.0, first.tokens)
                self._slices.popleft()
            else:
                return None
        return None

    async def _renew(self, tokens: int) -> None:
        if self._renewal is None:
            self._renewal = asyncio.ensure_future(self._fetch(tokens))
        await asyncio.shield(self._renewal)

    async def _fetch(self, tokens: int) -> None:
        try:
            lease = await self._source.lease(self._worker, self.take_feedback(), tokens)
            self._take(lease)
        finally:
            self._renewal = None

    def _take(self, lease: Lease) -> None:
        if lease.abort is not None:
            self.abort = lease.abort
            return
        start = self._clock() + lease.delay_s
        paces = {name: pace for name, pace in (("requests", lease.requests_per_s),
                                               ("tokens", lease.tokens_per_s))
                 if pace is not None}
        requests = math.inf if lease.requests is None else float(lease.requests)
        self._slices.append(_Slice(
            start, start + lease.duration_s + ClusterLimit.LEASE_S, requests,
            math.inf if lease.tokens is None else float(lease.tokens),
            requests if lease.requests is not None else 0.0, paces))

    def _drop(self, piece: _Slice) -> None:
        if "tokens" in self._pacers and 0 < piece.tokens < math.inf:
            self._feedback.unused_tokens += int(piece.tokens)

    def _drop_slices(self) -> None:
        while self._slices:
            self._drop(self._slices.popleft())
