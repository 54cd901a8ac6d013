"""Sleeps that shutdown can interrupt.

Handlers wait here for ``latency_s`` and for ``stall`` faults. Stopping the
server wakes every sleeper at once, so a stalled request never holds up
``MockServer.stop()`` and no handler is cancelled half-way through.
"""

from __future__ import annotations

import asyncio


def _wake(waiter: asyncio.Future[bool], closing: bool) -> None:
    if not waiter.done():
        waiter.set_result(closing)


class Sleeper:
    """``await sleeper.sleep(s)`` returns True when woken by shutdown, False when ``s`` passed."""

    def __init__(self) -> None:
        self.closing = False
        self._waiters: set[asyncio.Future[bool]] = set()

    async def sleep(self, seconds: float) -> bool:
        if self.closing:
            return True
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        timer = loop.call_later(seconds, _wake, waiter, False)
        self._waiters.add(waiter)
        try:
            return await waiter
        finally:
            timer.cancel()
            self._waiters.discard(waiter)

    def wake_all(self) -> None:
        """Mark the server as closing and release every sleeping handler."""
        self.closing = True
        for waiter in self._waiters:
            _wake(waiter, True)
