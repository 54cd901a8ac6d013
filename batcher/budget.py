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
dropped connection) may still have run, so its worst case stays spent for the
rest of the run. What earlier runs spent is read from the checkpoint (the
usage of every answered row), so a resumed run counts it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass(slots=True)
class Hold:
    """One request's reservation."""

    cost_usd: float
    tokens: int


class Budget:
    """Reserve before sending, settle on the response; ``None`` limits are unlimited."""

    def __init__(self, max_cost_usd: float | None, max_total_tokens: int | None, *,
                 spent_usd: float = 0.0, spent_tokens: int = 0) -> None:
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

    def settle(self, hold: Hold, cost_usd: float | None, tokens: int | None) -> None:
        """Replace a reservation by what the request used (``None``: not reported,
        so the reservation is kept as spent)."""
        self._release(hold)
        self.spent_usd += hold.cost_usd if cost_usd is None else cost_usd
        self.spent_tokens += hold.tokens if tokens is None else tokens
        self._notify()

    def release(self, hold: Hold) -> None:
        """The request failed: nothing was spent."""
        self._release(hold)
        self._notify()

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
