"""Request and token rate limits, paced evenly.

Servers enforce per-minute limits over much shorter windows (OpenAI may
quantize 60,000 RPM to 1,000 per second; Azure checks over 1-10 s), so a
client that fires a minute's allowance at once earns a 429 storm. Each
limit here is a *pacer*: it hands out start times spaced by
``amount / rate``, from the very first request, and never lets idle time
build up into a burst.

Why not ``aiolimiter``: its waiters are served smallest-amount-first (a big
prompt can starve behind small ones), it rejects an amount above its
capacity (a prompt larger than the per-minute budget would crash or be
clamped), it cannot give tokens back when the real usage comes in below the
estimate, and its clock cannot be injected. A reservation-based pacer
does all four in a few lines, FIFO and without polling: each caller
computes its start time once and sleeps exactly until then.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from batcher.wire import ServerLimits

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class Pacer:
    """Hands out start times so that at most ``per_second`` units go per second."""

    def __init__(self, per_second: float, clock: Clock) -> None:
        if per_second <= 0:
            raise ValueError("per_second must be positive")
        self.per_second = per_second
        self._clock = clock
        self._next_free = clock()

    @property
    def next_free(self) -> float:
        return self._next_free

    def commit(self, start: float, amount: float) -> None:
        """Book ``amount`` units starting at ``start`` (never before ``next_free``)."""
        self._next_free = max(start, self._next_free) + amount / self.per_second

    def give_back(self, amount: float) -> None:
        """Return units booked but not used; idle time in the past is not credit."""
        self._next_free = max(self._clock(), self._next_free - amount / self.per_second)

    def hold_until(self, moment: float) -> None:
        """Nothing starts before ``moment`` (the server asked for a pause)."""
        self._next_free = max(self._next_free, moment)

    def charge(self, amount: float) -> None:
        """Book units that were used beyond what was reserved."""
        self._next_free = max(self._clock(), self._next_free) + amount / self.per_second


class OutputEstimate:
    """Expected completion tokens when the job sets no ``max_tokens``.

    Servers reserve ``max_tokens`` against TPM; with none set, a running
    average of observed completions is the best guess we have.
    """

    def __init__(self, initial: float = 256.0, weight: float = 0.05) -> None:
        self._value = initial
        self._weight = weight
        self._seen = 0

    @property
    def value(self) -> int:
        return max(1, round(self._value))

    def observe(self, completion_tokens: int) -> None:
        self._seen += 1
        # Plain mean for the first few, then an exponential average that follows drift.
        weight = max(self._weight, 1 / self._seen)
        self._value += weight * (completion_tokens - self._value)


@dataclass(slots=True)
class Reservation:
    tokens: int


class RateLimiter:
    """Requests-per-minute and tokens-per-minute pacing that listens to the server.

    The pace for each limit is the lower of the job's setting and what the
    server's ``x-ratelimit-limit-*`` headers report (learned when the job sets
    none), times a small safety fraction, times an AIMD factor: a 429 cuts the
    factor multiplicatively (at most once per ``DECREASE_SPACING_S``, so one
    burst of 429s from the same window counts once), and it grows back
    linearly while no 429 comes. When a response's ``x-ratelimit-remaining-*``
    shows less headroom than the pace assumes (another client shares the
    key, say), sends are held until the server has refilled enough.
    """

    PACE_FRACTION = 0.99  # of a limit: timing jitter must not push a window over
    DECREASE = 0.8
    MIN_FACTOR = 0.05
    RECOVERY_PER_S = 0.1  # factor regained per second without a 429
    DECREASE_SPACING_S = 1.0
    UNKNOWN_RATE_PER_S = 1e9  # a pacer that never spaces sends, only honours holds

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None,
                 clock: Clock, sleep: Sleep) -> None:
        self._clock = clock
        self._sleep = sleep
        self._caps = {"requests": requests_per_minute, "tokens": tokens_per_minute}
        self._learned: dict[str, float | None] = {"requests": None, "tokens": None}
        self.requests: Pacer | None = None
        self.tokens: Pacer | None = None
        self.factor = 1.0
        self._factor_at = clock()
        self._last_decrease = float("-inf")
        # With no limit set, the first request goes alone: its response's headers
        # tell the pace before a concurrency-wide burst can overrun a short window.
        self._probing = not any(self._caps.values())
        self._probe_answered: asyncio.Event | None = None
        self._update_rates()

    # -- sending --------------------------------------------------------------------------

    async def acquire(self, tokens: int) -> Reservation:
        """Wait for this request's turn under every limit, then book it.

        A request larger than a whole minute's token budget is not an error:
        it simply waits as long as the budget needs to cover it.
        """
        if self._probing:
            await self._wait_for_probe()
        now = self._clock()
        if self.factor < 1.0:
            self._recover(now)
        start = max([now, *(pacer.next_free for pacer in self._pacers())])
        if self.requests is not None:
            self.requests.commit(start, 1)
        if self.tokens is not None:
            self.tokens.commit(start, tokens)
        if start > now:
            await self._sleep(start - now)
        return Reservation(tokens)

    def settle(self, reservation: Reservation, used_tokens: int | None) -> None:
        """Reconcile a reservation with the usage the server reported."""
        if self.tokens is None or used_tokens is None:
            return
        difference = reservation.tokens - used_tokens
        if difference > 0:
            self.tokens.give_back(difference)
        elif difference < 0:
            self.tokens.charge(-difference)

    # -- listening ------------------------------------------------------------------------

    def observe(self, limits: ServerLimits, next_tokens: int) -> None:
        """Take in one response's rate-limit headers (call it for every response)."""
        if self._probing:
            self._probing = False
            if self._probe_answered is not None:
                self._probe_answered.set()
        learned = False
        for name, value in (("requests", limits.limit_requests), ("tokens", limits.limit_tokens)):
            if value and value != self._learned[name]:
                self._learned[name] = float(value)
                learned = True
        if learned:
            self._update_rates()
        self._respect_headroom("requests", limits.remaining_requests, limits.reset_requests_s, 1)
        self._respect_headroom("tokens", limits.remaining_tokens, limits.reset_tokens_s,
                               next_tokens)

    def on_rate_limited(self) -> None:
        """A 429 for rate (not quota): slow the whole run down, not just this row."""
        now = self._clock()
        if now - self._last_decrease < self.DECREASE_SPACING_S:
            return
        self._recover(now)
        self._last_decrease = now
        self.factor = max(self.MIN_FACTOR, self.factor * self.DECREASE)
        self._update_rates()

    # -- internals ------------------------------------------------------------------------

    async def _wait_for_probe(self) -> None:
        if self._probe_answered is None:
            self._probe_answered = asyncio.Event()  # this caller is the probe
            return
        await self._probe_answered.wait()

    def rate_per_minute(self, name: str) -> float | None:
        """The pace currently applied to ``requests`` or ``tokens`` (None: unlimited)."""
        known = [value for value in (self._caps[name], self._learned[name]) if value]
        if not known:
            return None
        return min(known) * self.PACE_FRACTION * self.factor

    def _update_rates(self) -> None:
        for name in ("requests", "tokens"):
            rate = self.rate_per_minute(name)
            pacer: Pacer | None = getattr(self, name)
            if rate is None:
                continue
            if pacer is None:
                setattr(self, name, Pacer(rate / 60, self._clock))
            else:
                pacer.per_second = rate / 60

    def _recover(self, now: float) -> None:
        elapsed = now - self._factor_at
        self._factor_at = now
        if self.factor < 1.0 and elapsed > 0:
            self.factor = min(1.0, self.factor + self.RECOVERY_PER_S * elapsed)
            self._update_rates()

    def _respect_headroom(self, name: str, remaining: int | None, reset_s: float | None,
                          needed: int) -> None:
        """Hold sends until the server's bucket covers ``needed`` again: refilled at our
        pace, or by its own reset time, whichever comes first."""
        if remaining is None or remaining >= needed:
            return
        waits = [] if reset_s is None else [reset_s]
        rate = self.rate_per_minute(name)
        if rate is not None:
            waits.append((needed - remaining) / (rate / 60))
        if not waits:
            return
        # With no rate known yet, a pacer at "unlimited" speed that only honours holds.
        pacer: Pacer = getattr(self, name) or self._holding_pacer(name)
        pacer.hold_until(self._clock() + min(waits))

    def _holding_pacer(self, name: str) -> Pacer:
        pacer = Pacer(self.UNKNOWN_RATE_PER_S, self._clock)
        setattr(self, name, pacer)
        return pacer

    def _pacers(self) -> list[Pacer]:
        return [pacer for pacer in (self.requests, self.tokens) if pacer is not None]
