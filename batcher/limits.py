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

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

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
    """Requests-per-minute and tokens-per-minute limits, either or both optional."""

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None,
                 clock: Clock, sleep: Sleep) -> None:
        self._clock = clock
        self._sleep = sleep
        self.requests = Pacer(requests_per_minute / 60, clock) if requests_per_minute else None
        self.tokens = Pacer(tokens_per_minute / 60, clock) if tokens_per_minute else None

    async def acquire(self, tokens: int) -> Reservation:
        """Wait for this request's turn under every limit, then book it.

        A request larger than a whole minute's token budget is not an error:
        it simply waits as long as the budget needs to cover it.
        """
        now = self._clock()
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

    def _pacers(self) -> list[Pacer]:
        return [pacer for pacer in (self.requests, self.tokens) if pacer is not None]
