"""A reservation pacer: start times spaced by ``amount / rate``, booked in arrival order.

Servers enforce per-minute limits over much shorter windows (OpenAI may
quantize 60,000 RPM to 1,000 per second; Azure checks over 1-10 s), so a
client that fires a minute's allowance at once earns a 429 storm. A
:class:`Pacer` hands out start times spaced by ``amount / per_second`` from
the very first request and never lets idle time build up into a burst::

    pacer = Pacer(per_second=100, clock=time.monotonic)
    start = max(time.monotonic(), pacer.next_free)
    pacer.commit(start, 1)          # this request goes at ``start``
    pacer.give_back(unused)         # the real usage came in below the booking

Why not ``aiolimiter``: its waiters are served smallest-amount-first (a big
prompt can starve behind small ones), it rejects an amount above its
capacity (a prompt larger than the per-minute budget would crash or be
clamped), it cannot give tokens back when the real usage comes in below the
estimate, and its clock cannot be injected. A reservation-based pacer does
all four in a few lines, without polling: each caller books its start time
and sleeps exactly until then.
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
        self.held_until = float("-inf")

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
        """Nothing starts before ``moment`` (the server asked for a pause), not even
        requests already booked to go earlier."""
        self._next_free = max(self._next_free, moment)
        self.held_until = max(self.held_until, moment)

    def charge(self, amount: float) -> None:
        """Book units that were used beyond what was reserved."""
        self._next_free = max(self._clock(), self._next_free) + amount / self.per_second


@dataclass(slots=True)
class Reservation:
    """One request's booking: the tokens it reserved, and when it was booked to go."""

    tokens: int
    start: float = 0.0
    """When the request was booked to go: later sends of ours are in flight past it."""
