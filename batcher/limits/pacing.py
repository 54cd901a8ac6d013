"""Request and token rate limits, paced evenly and listening to the server.

Each limited quantity (requests, tokens) is a :class:`batcher.limits.quantity.Quantity`
with its own :class:`batcher.limits.pacer.Pacer`; the :class:`RateLimiter` books
every request on both, and holds what is run-wide: the back-off after 429s and
the first request that goes alone to read the server's limits. Usage::

    limiter = RateLimiter(requests_per_minute=6000, tokens_per_minute=None,
                          clock=time.monotonic, sleep=asyncio.sleep)
    reservation = await limiter.acquire(tokens=120)   # waits for this request's turn
    ...                                               # send it
    limiter.observe(parse_rate_limits(headers), next_tokens=120, sent=reservation)
    limiter.settle(reservation, used_tokens)          # or limiter.on_rate_limited(...)
"""

from __future__ import annotations

import asyncio

from batcher.limits.pacer import Clock, Pacer, Reservation, Sleep
from batcher.limits.quantity import Quantity
from batcher.transport.ratelimits import ServerLimits

__all__ = ["Clock", "OutputEstimate", "RateLimiter", "Reservation", "Sleep"]


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


class RateLimiter:
    """Requests-per-minute and tokens-per-minute pacing that listens to the server.

    The pace for each limit is the lower of the job's setting and what the
    server's ``x-ratelimit-limit-*`` headers report (learned when the job sets
    none), times a small safety fraction, times an AIMD factor: a 429 cuts the
    factor multiplicatively (at most once per ``DECREASE_SPACING_S``, so one
    burst of 429s from the same window counts once), and it grows back
    linearly while no 429 comes.

    Other clients on the same key show in the ``x-ratelimit-remaining-*`` counts:
    net of batcher's own requests, what is used is their doing. Each quantity's
    :class:`batcher.limits.sharing.Share` slows its pace smoothly to what they leave
    and lets it climb back when they go. When the headroom (the reported count, less
    our requests sent since, plus what a sliding window lets go of by our next turn) is
    still too small for the next request, sends are held until the server has refilled
    enough, or, in a fixed window, until it resets. One request is kept in reserve,
    for limiters whose count is one too generous (LiteLLM's router reports one more
    request remaining than it admits), and after a 429 with nobody else on the key a
    fading slack against timing jitter (:meth:`batcher.limits.quantity.Quantity.overran`).
    Turns are booked only shortly before they come, so a pace that changes, or a hold,
    applies to requests already waiting.
    """

    PACE_FRACTION = 0.99  # of a limit: timing jitter must not push a window over
    DECREASE = 0.8
    MIN_FACTOR = 0.05
    RECOVERY_PER_S = 0.1  # factor regained per second without a 429
    DECREASE_SPACING_S = 1.0
    RESERVE_REQUESTS = 1  # held back from a reported request count (off-by-one limiters)
    BOOK_AHEAD_S = 0.25  # a turn is booked this close to its time, at the pace then current

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None,
                 clock: Clock, sleep: Sleep) -> None:
        self._clock = clock
        self._sleep = sleep
        self.requests = Quantity(requests_per_minute, clock,
                                 reserve=self.RESERVE_REQUESTS)
        self.tokens = Quantity(tokens_per_minute, clock)
        self._quantities = (self.requests, self.tokens)
        self.factor = 1.0
        self._factor_at = clock()
        self._last_decrease = float("-inf")
        # With no limit set, the first request goes alone: its response's headers
        # tell the pace before a concurrency-wide burst can overrun a short window.
        self._probing = not (requests_per_minute or tokens_per_minute)
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
        while True:
            start = await self._book(tokens)
            now = self._clock()
            if start > now:
                await self._sleep(start - now)
            # A hold that came in while this request waited its turn applies to it too:
            # it books a new turn after the hold, so the held requests go spaced.
            now = self._clock()
            if max([pacer.held_until for pacer in self._pacers()], default=now) <= now:
                break
        self.requests.sent.add(now, 1)
        self.tokens.sent.add(now, tokens)
        return Reservation(tokens, now)

    async def _book(self, tokens: int) -> float:
        """Book the next turn under every limit, no further ahead than ``BOOK_AHEAD_S``
        (the pace may change meanwhile); returns its start time."""
        while True:
            now = self._clock()
            if self.factor < 1.0:
                self._recover(now)
            start = max([now, *(pacer.next_free for pacer in self._pacers())])
            if start - now <= self.BOOK_AHEAD_S:
                break
            await self._sleep(start - now - self.BOOK_AHEAD_S)
        if self.requests.pacer is not None:
            self.requests.pacer.commit(start, 1)
        if self.tokens.pacer is not None:
            self.tokens.pacer.commit(start, tokens)
        return start

    def settle(self, reservation: Reservation, used_tokens: int | None) -> None:
        """Reconcile a reservation with the usage the server reported."""
        pacer = self.tokens.pacer
        if pacer is None or used_tokens is None:
            return
        difference = reservation.tokens - used_tokens
        if difference > 0:
            pacer.give_back(difference)
        elif difference < 0:
            pacer.charge(-difference)

    # -- listening ------------------------------------------------------------------------

    def observe(self, limits: ServerLimits, next_tokens: int,
                sent: Reservation | None = None) -> None:
        """Take in one response's rate-limit headers (call it for every response).

        ``sent`` is the reservation of the request this response answers: the
        server's counts are corrected for our requests that went after it.
        """
        if self._probing:
            self._probing = False
            if self._probe_answered is not None:
                self._probe_answered.set()
        changed = self.requests.learn(limits.limit_requests)
        changed |= self.tokens.learn(limits.limit_tokens)
        now = self._clock()
        reports = ((self.requests, limits.remaining_requests, limits.reset_requests_s, 1),
                   (self.tokens, limits.remaining_tokens, limits.reset_tokens_s, next_tokens))
        headrooms: list[tuple[Quantity, float, float | None, int]] = []
        for quantity, remaining, reset_s, needed in reports:
            if remaining is None:
                continue
            headroom = quantity.headroom(remaining, reset_s, sent, now, needed)
            headrooms.append((quantity, headroom, reset_s, needed))
            if sent is not None:
                changed |= quantity.steer(remaining, reset_s, headroom, sent)
        if changed:
            self._update_rates()
        for quantity, headroom, reset_s, needed in headrooms:
            quantity.respect_headroom(headroom, reset_s, needed)

    def on_rate_limited(self, retry_after_s: float | None = None) -> None:
        """A 429 for rate (not quota): slow the whole run down, not just this row, and
        send nothing until the server's ``retry_after_s`` (the other rows' requests
        would only earn 429s of their own, and some limiters count those too)."""
        now = self._clock()
        for quantity in self._quantities:
            quantity.overran(now)
            if retry_after_s is not None:
                quantity.hold_until(now + retry_after_s)
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

    def _update_rates(self) -> None:
        for quantity in self._quantities:
            quantity.set_pace(self.PACE_FRACTION * self.factor)

    def _recover(self, now: float) -> None:
        elapsed = now - self._factor_at
        self._factor_at = now
        if self.factor < 1.0 and elapsed > 0:
            self.factor = min(1.0, self.factor + self.RECOVERY_PER_S * elapsed)
            self._update_rates()

    def _pacers(self) -> list[Pacer]:
        return [quantity.pacer for quantity in self._quantities if quantity.pacer is not None]
