"""Another client on the same key: what it uses, told from batcher's own sends.

A server's ``x-ratelimit-remaining-*`` count covers every client of the key.
Net of batcher's own requests (:class:`OwnSends`), what is used is the others'
doing; :class:`Share` turns that into the fraction of a limit's pace left to
batcher. One :class:`OwnSends` and one :class:`Share` belong to each limited
quantity (:class:`batcher.limits.quantity.Quantity`).
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right


class OwnSends:
    """When batcher's own recent requests went, and how much of one quantity each
    took (1 for requests, the reservation for tokens), to tell them from other
    clients'. A response's ``remaining`` count was taken when the server admitted
    that request; every send of ours booked after it has been spent from the same
    allowance since.

    The last ``MEMORY_S`` of sends can be a million at a fast server's pace, so
    they are kept in two flat arrays (16 bytes a send, not a tuple of about 90):
    start times, in the order booked (the clock only goes forward), and the
    running total of what they took, so a span is two binary searches and a
    subtraction.
    """

    MEMORY_S = 120.0

    def __init__(self) -> None:
        self._moments = array("d")
        self._totals = array("q")  # what every send so far took, up to and including each
        self._first = 0  # sends before this one are forgotten
        self._forgotten = 0  # the running total just before ``_moments[0]``

    def add(self, start: float, amount: int) -> None:
        total = self._totals[-1] if self._totals else self._forgotten
        self._moments.append(start)
        self._totals.append(total + amount)

    def between(self, after: float, until: float) -> int:
        """What our sends that started in ``(after, until]`` took."""
        low = bisect_right(self._moments, after, self._first)
        high = bisect_right(self._moments, until, self._first)
        if high <= low:
            return 0
        return self._totals[high - 1] - self._total_before(low)

    def since(self, start: float, now: float) -> int:
        """What our sends that started after ``start``, up to ``now``, took."""
        self._first = bisect_left(self._moments, now - self.MEMORY_S, self._first)
        if self._first > len(self._moments) // 2:  # drop the forgotten half at once
            self._forgotten = self._total_before(self._first)
            del self._moments[:self._first], self._totals[:self._first]
            self._first = 0
        return self.between(start, now)

    def _total_before(self, index: int) -> int:
        return self._totals[index - 1] if index else self._forgotten


class Share:
    """The pace one limit leaves to batcher when other clients use the same key.

    ``value`` is that pace as a fraction of the limit's own. Two measures feed it:

    * A sliding window (a reset time that moves on with the clock) reports, on each
      response, its length as the reset time and its use as ``limit - remaining``.
      Our own sends within that window are known, so the rest is the others' use,
      measured directly (:meth:`observe_others`): we take what they leave, less a
      small margin against the jitter of two senders. It follows them down and back
      up within a window or two.
    * Otherwise (a fixed window, or no reset time), between two responses the
      ``remaining`` count fell by what everyone sent less what came back; taking
      away our own sends over the same span leaves the *outside drain*: the others'
      use less any refill (:meth:`steer`). The pace that keeps the headroom (net of
      our requests in flight) at ``TARGET`` of the capacity ``horizon`` seconds on is
      ``(headroom - TARGET * capacity) / horizon - drain``: in a fixed window that
      spreads what is left over the time to its end, less what the others take.
    """

    TARGET = 0.02  # of the capacity, kept free against timing jitter
    MARGIN_FULL_AT = 0.05  # the others' part of the limit at which all of TARGET is kept
    SMOOTHING = 0.3  # weight of a new drain sample
    OTHERS_SMOOTHING = 0.1  # weight of a new measure of the others' use
    MIN_SPAN = 0.2  # of the horizon: shorter spans between samples are too noisy
    MIN = 0.02
    QUIET = 0.02  # of the pace: an outside drain this small is noise, not another client
    JUMP = 0.5  # of the capacity coming back between two responses: a fixed window's start

    def __init__(self) -> None:
        self.value = 1.0
        self.capacity = 0.0
        self.drain: float | None = None
        self.others: float | None = None
        self.margin = 0.0  # of the limit, kept free against the jitter of two senders
        self.window_start: float | None = None
        self._anchor: tuple[float, int] | None = None

    def observe_others(self, others_per_s: float, limit_per_s: float) -> bool:
        """Sliding windows: the others' use, measured directly, leaves the rest to us."""
        if limit_per_s <= 0:
            return False
        sample = max(0.0, others_per_s)
        self.others = sample if self.others is None else (
            self.others + self.OTHERS_SMOOTHING * (sample - self.others))
        # Keep TARGET of the window free against the jitter of two senders; the margin
        # grows in with the others' use, so a key of our own keeps its whole pace.
        used = self.others / limit_per_s
        self.margin = self.TARGET * min(1.0, used / self.MARGIN_FULL_AT)
        value = min(1.0, max(self.MIN, 1 - used - self.margin))
        changed = value != self.value
        self.value = value
        return changed

    def steer(self, remaining: int, at: float, headroom: float, horizon_s: float,
              own: OwnSends, full_per_s: float | None, *, known_limit: bool) -> bool:
        """Take one response's ``remaining`` count, taken when the request went at ``at``;
        True when ``value`` changed. ``own``: our sends of this quantity;
        ``known_limit``: the server reported the limit, so the pace already matches it."""
        anchor = self._anchor
        if anchor is None or at < anchor[0]:
            if anchor is None:
                self._anchor = (at, remaining)
            return False
        if remaining - anchor[1] > self.JUMP * self.capacity and at > anchor[0]:
            # The whole allowance came back at once: a fixed window began.
            self.window_start = at
            self._anchor = (at, remaining)
            return False
        span = at - anchor[0]
        if span < self.MIN_SPAN * horizon_s or span <= 0:
            return False
        sample = (anchor[1] - remaining - own.between(anchor[0], at)) / span
        self.drain = sample if self.drain is None else (
            self.drain + self.SMOOTHING * (sample - self.drain))
        self._anchor = (at, remaining)
        if full_per_s is None or full_per_s <= 0:
            return False
        if known_limit and self.drain <= self.QUIET * full_per_s:
            value = 1.0  # nobody else drains it: the limit's own even pace fits its windows
        else:
            pace = (headroom - self.TARGET * self.capacity) / horizon_s - self.drain
            value = min(1.0, max(self.MIN, pace / full_per_s))
        changed = value != self.value
        self.value = value
        return changed
