"""A run's budget: ``limits.max_cost_usd`` and ``limits.max_total_tokens``.

Every request reserves its worst case before it is sent (its prompt's
upper bound plus ``max_tokens`` for every choice, at the full input price),
and the reservation is replaced by what the response says it used. A request
is sent only when what was spent, plus every reservation still in flight,
plus its own worst case fits the budget, so the budget holds however many
requests are in flight. When one does not fit, it waits for requests in
flight to settle (they usually use less than reserved); when nothing is in
flight and it still does not fit, the budget is reached and the run stops.

A request the server answered with an error releases its reservation
(providers bill answers only); one that got no answer at all (a timeout, a
dropped connection), or an answer whose usage cannot be trusted, may still
have been billed in full, so its worst case stays spent. What earlier runs
spent is read from the checkpoint (the usage of every answered row), and what
they sent and never settled from a :class:`Ledger` (``batcher.store.unsettled``):
every request is recorded there as it goes out, and an answer with usable
usage settles it, in this run or a later one, so a resumed run counts both.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol


class Ledger(Protocol):
    """Where requests sent under a budget are kept until an answer settles them."""

    def sent(self, key: bytes, usd: float, tokens: int) -> None: ...

    def answered(self, key: bytes) -> tuple[float, int]:
        """Settle ``key``'s requests; returns what earlier runs had counted for them."""
        ...


@dataclass(slots=True)
class Hold:
    """One request's reservation."""

    cost_usd: float
    tokens: int


class Budget:
    """Reserve before sending, settle on the response; ``None`` limits are unlimited."""

    def __init__(self, max_cost_usd: float | None, max_total_tokens: int | None, *,
                 spent_usd: float = 0.0, spent_tokens: int = 0,
                 ledger: Ledger | None = None) -> None:
        """``spent_*``: what earlier runs spent, their unsettled requests included."""
        self.ledger = ledger
        self.max_cost_usd = max_cost_usd
        self.max_total_tokens = max_total_tokens
        self.spent_usd = spent_usd
        self.spent_tokens = spent_tokens
        self.reached = False
        self._held_usd = 0.0
        self._held_tokens = 0
        self._in_flight = 0
        self._changed = asyncio.Event()

    @property
    def limited(self) -> bool:
        return self.max_cost_usd is not None or self.max_total_tokens is not None

    async def reserve(self, cost_usd: float, tokens: int) -> Hold | None:
        """Hold room for one request, waiting for requests in flight to settle if
        need be; ``None`` once the budget is reached (nothing is to be sent)."""
        while not self.reached:
            if self._fits(cost_usd, tokens):
                self._held_usd += cost_usd
                self._held_tokens += tokens
                self._in_flight += 1
                return Hold(cost_usd, tokens)
            if self._in_flight == 0:
                self.reached = True
                self._notify()
                break
            await self._changed.wait()
        return None

    def sending(self, hold: Hold, key: bytes) -> None:
        """The request for ``key`` goes out now: it stays counted until answered."""
        if self.ledger is not None:
            self.ledger.sent(key, hold.cost_usd, hold.tokens)

    def settle(self, hold: Hold, cost_usd: float | None, tokens: int | None,
               key: bytes | None = None) -> None:
        """Replace a reservation by what the request used (``None``: not reported,
        so the reservation is kept as spent). ``key``: an answer to that request,
        which settles its requests of earlier runs when it reports its usage."""
        self._release(hold)
        self.spent_usd += hold.cost_usd if cost_usd is None else cost_usd
        self.spent_tokens += hold.tokens if tokens is None else tokens
        if key is not None and tokens is not None:
            self._answered(key)
        self._notify()

    def release(self, hold: Hold, key: bytes | None = None) -> None:
        """The request failed with an answer (for ``key``): nothing was spent."""
        self._release(hold)
        if key is not None:
            self._answered(key)
        self._notify()

    def _answered(self, key: bytes) -> None:
        if self.ledger is not None:
            carried_usd, carried_tokens = self.ledger.answered(key)
            self.spent_usd = max(0.0, self.spent_usd - carried_usd)
            self.spent_tokens = max(0, self.spent_tokens - carried_tokens)

    def _fits(self, cost_usd: float, tokens: int) -> bool:
        if self.max_cost_usd is not None and (
                self.spent_usd + self._held_usd + cost_usd > self.max_cost_usd):
            return False
        return self.max_total_tokens is None or (
            self.spent_tokens + self._held_tokens + tokens <= self.max_total_tokens)

    def _release(self, hold: Hold) -> None:
        self._held_usd -= hold.cost_usd
        self._held_tokens -= hold.tokens
        self._in_flight -= 1
        if self._in_flight == 0:  # no float drift carried into the next reservations
            self._held_usd, self._held_tokens = 0.0, 0

    def _notify(self) -> None:
        # Wake every waiter; each rechecks against the new totals.
        self._changed.set()
        self._changed = asyncio.Event()
