"""The windows a mock limit counts in: sliding, or fixed (calendar, or from the first request).

Each admits at most ``limit * window_s / 60`` units (requests or tokens) per
window of ``window_s`` seconds, driven by an explicit ``now`` so its
arithmetic is tested without sleeping.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Literal

WindowKind = Literal["sliding", "calendar", "from_first"]
"""``sliding``: the last ``window_s`` seconds; ``calendar``: fixed windows on multiples of
``window_s`` of wall-clock time; ``from_first``: fixed windows from the first request."""


class WindowLog:
    """Amounts admitted within the last ``window_s`` seconds."""

    __slots__ = ("_entries", "capacity", "limit", "used", "window_s")

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.capacity = limit * window_s / 60
        self.window_s = window_s
        self.used = 0
        self._entries: deque[tuple[float, int]] = deque()

    def prune(self, now: float) -> None:
        horizon = now - self.window_s
        entries = self._entries
        while entries and entries[0][0] <= horizon:
            self.used -= entries.popleft()[1]

    def fits(self, amount: int) -> bool:
        return self.used + amount <= self.capacity

    def add(self, now: float, amount: int) -> None:
        self._entries.append((now, amount))
        self.used += amount

    def wait_for(self, amount: int, now: float) -> float:
        """Seconds until ``amount`` more fits; ``amount`` must not exceed the capacity."""
        excess = self.used + amount - self.capacity
        if excess <= 0:
            return 0.0
        freed = 0
        for stamp, amount_then in self._entries:
            freed += amount_then
            if freed >= excess:
                return max(0.0, stamp + self.window_s - now)
        raise ValueError(f"{amount} can never fit a capacity of {self.capacity:g}")

    def reset_in(self, now: float) -> float:
        """Seconds until the log is empty again ("resets to its initial state")."""
        return max(0.0, self._entries[-1][0] + self.window_s - now) if self._entries else 0.0

    def remaining(self) -> int:
        return max(0, math.floor(self.capacity - self.used))

    def clear(self) -> None:
        self._entries.clear()
        self.used = 0


class FixedWindow:
    """Amounts admitted in the current fixed window; the whole allowance returns at its end.

    ``start_at_first`` starts a window with the first request after the last one ended
    (LiteLLM's per-key counters); otherwise windows sit on multiples of ``window_s``
    of the clock given as ``now`` (calendar minutes, when ``now`` is wall-clock time).
    """

    __slots__ = ("_start", "capacity", "limit", "start_at_first", "used", "window_s")

    def __init__(self, limit: int, window_s: float, *, start_at_first: bool) -> None:
        self.limit = limit
        self.capacity = limit * window_s / 60
        self.window_s = window_s
        self.start_at_first = start_at_first
        self.used = 0
        self._start: float | None = None

    def prune(self, now: float) -> None:
        if self._start is not None and now >= self._start + self.window_s:
            self.used = 0
            self._start = None
        if self._start is None and not self.start_at_first:
            self._start = math.floor(now / self.window_s) * self.window_s

    def fits(self, amount: int) -> bool:
        return self.used + amount <= self.capacity

    def add(self, now: float, amount: int) -> None:
        if self._start is None:
            self._start = now
        self.used += amount

    def wait_for(self, amount: int, now: float) -> float:
        if self.used + amount <= self.capacity:
            return 0.0
        if amount > self.capacity:
            raise ValueError(f"{amount} can never fit a capacity of {self.capacity:g}")
        return self.reset_in(now)

    def reset_in(self, now: float) -> float:
        return 0.0 if self._start is None else max(0.0, self._start + self.window_s - now)

    def remaining(self) -> int:
        return max(0, math.floor(self.capacity - self.used))

    def clear(self) -> None:
        self.used = 0
        self._start = None


Log = WindowLog | FixedWindow


class Admitted:
    """What the clients (not the simulated other client) were admitted, requests and
    tokens, in consecutive windows of ``window_s`` from the first admission: a
    benchmark's utilization by the server's own count, free of the client's start-up
    and of when its rows were written."""

    __slots__ = ("_first", "requests", "tokens", "window_s")

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._first: float | None = None
        self.requests: list[int] = []
        self.tokens: list[int] = []

    def add(self, now: float, tokens: int) -> None:
        if self._first is None:
            self._first = now
        index = int((now - self._first) // self.window_s)
        while len(self.requests) <= index:
            self.requests.append(0)
            self.tokens.append(0)
        self.requests[index] += 1
        self.tokens[index] += tokens

    def clear(self) -> None:
        self._first = None
        self.requests.clear()
        self.tokens.clear()
