"""One limited quantity (requests, or tokens) and everything the pacer knows of it.

A :class:`Quantity` holds one limit's state, as ``aiolimiter`` holds one
bucket's: the job's limit and the server's, the :class:`Pacer` that spaces
its sends, batcher's own recent sends of it, the :class:`Share` another client
leaves, and what the server's headers tell of its window (sliding or fixed)
and of what is left in it. :class:`batcher.limits.pacing.RateLimiter` keeps
one per quantity and books every request on both.
"""

from __future__ import annotations

import math

from batcher.limits.pacer import Clock, Pacer, Reservation
from batcher.limits.sharing import OwnSends, Share


class Quantity:
    """One limit: ``job_limit`` per minute as the job set it (None: unset), and
    ``reserve`` units held back from any count the server reports (for servers whose
    count is one too generous). A 429 with no other client measured on the key adds a
    *slack* of one request's worth to what is held back (our own sends bunched by
    timing jitter); it fades with a half-life of ``SLACK_HALF_LIFE_S``, so a quiet
    machine paces at the whole limit and a busy one keeps what its jitter needs."""

    UNKNOWN_RATE_PER_S = 1e9  # a pacer that never spaces sends, only honours holds
    MIN_HORIZON_S = 0.05  # a reset just about to pass must not make the pace jump
    CLASSIFY_AFTER_S = 0.05  # reset times compared this far apart tell the window's kind
    FIXED_DRIFT = 0.25  # a deadline moving slower than this per second is a fixed window's
    SLACK_HALF_LIFE_S = 30.0  # the margin a 429 adds against timing jitter halves this fast

    def __init__(self, job_limit: float | None, clock: Clock, *, reserve: int = 0) -> None:
        self.job_limit = job_limit
        self.server_limit: float | None = None
        self.reserve = reserve
        self.pacer: Pacer | None = None
        self.share = Share()
        self.sent = OwnSends()
        self.fixed_window = False
        self._clock = clock
        self._fraction = 1.0
        self._deadline: tuple[float, float] | None = None  # a reset's deadline, seen when
        self._last_needed = 0  # what the next request needed at the last response
        self._slack = 0.0
        self._slack_at = 0.0

    # -- the pace -------------------------------------------------------------------------

    @property
    def limit(self) -> float | None:
        """Per minute: the lower of the job's and the server's (None: neither known)."""
        known = [value for value in (self.job_limit, self.server_limit) if value]
        return min(known) if known else None

    @property
    def pace_per_minute(self) -> float | None:
        """The pace applied now (None: unlimited): the limit, times the fraction the
        limiter allows (safety margin and 429 back-off), times what others leave."""
        limit = self.limit
        return None if limit is None else limit * self._fraction * self.share.value

    def set_pace(self, fraction: float) -> None:
        """Pace at ``fraction`` of the limit (before the others' share)."""
        self._fraction = fraction
        rate = self.pace_per_minute
        if rate is None:
            return
        if self.pacer is None:
            self.pacer = Pacer(rate / 60, self._clock)
        else:
            self.pacer.per_second = rate / 60

    def learn(self, server_limit: int | None) -> bool:
        """The limit the server reported; True when it is news."""
        if not server_limit or server_limit == self.server_limit:
            return False
        self.server_limit = float(server_limit)
        return True

    def hold_until(self, moment: float) -> None:
        """Nothing of this quantity starts before ``moment``; with no rate known yet, a
        pacer at "unlimited" speed that only honours holds."""
        if self.pacer is None:
            self.pacer = Pacer(self.UNKNOWN_RATE_PER_S, self._clock)
        self.pacer.hold_until(moment)

    # -- what a response says -------------------------------------------------------------

    def headroom(self, remaining: int, reset_s: float | None, sent: Reservation | None,
                 now: float, needed: int) -> float:
        """What is left, when our pace sends the next request (of ``needed``), of a
        ``remaining`` count taken when ``sent`` was admitted: less our sends since and
        less what other clients took meanwhile (a refill is not counted on: it may be
        ours), plus what a sliding window has let go of by then."""
        if sent is None:
            return float(remaining)
        drain = max(0.0, self.share.drain or 0.0)
        headroom = remaining - self.sent.since(sent.start, now) - drain * (now - sent.start)
        if reset_s and not self.fixed_window:
            # Our sends of one window earlier leave it, up to the next turn: without that
            # turn's part, a pace near the limit (one request's room left per window
            # at 99%) would hold every turn for room that comes back just before it.
            rate = self.pace_per_minute
            next_turn = now + (needed / (rate / 60) if rate else 0.0)
            headroom += self.sent.between(sent.start - reset_s, next_turn - reset_s)
        return headroom

    def steer(self, remaining: int, reset_s: float | None, headroom: float,
              sent: Reservation) -> bool:
        """Update the :class:`Share` (its horizon: the reset time, else the window the
        limit and capacity imply, else a second); True when the pace changed."""
        share = self.share
        share.capacity = max(share.capacity, float(remaining))
        limit = self.limit
        full = limit * self._fraction / 60 if limit else None
        learned = self.server_limit
        if reset_s and not self.fixed_window:
            # A sliding window (or a bucket near empty): the reset time at admission is
            # its length, so what the others hold in it is what is used less ours.
            capacity = learned * reset_s / 60 if learned else share.capacity
            ours = self.sent.between(sent.start - reset_s, sent.start)
            return share.observe_others((capacity - remaining - ours) / reset_s,
                                        capacity / reset_s)
        horizon = reset_s
        if not horizon and learned and share.capacity:
            # No reset time: the window the limit implies, or what is left of it when
            # the window is seen to be fixed (LiteLLM's per-key counters).
            horizon = window = 60 * share.capacity / learned
            if share.window_start is not None:
                horizon = window - (sent.start - share.window_start) % window
        if not horizon:
            horizon = 1.0
        return share.steer(remaining, sent.start, headroom, max(horizon, self.MIN_HORIZON_S),
                           self.sent, full, known_limit=bool(learned))

    def respect_headroom(self, headroom: float, reset_s: float | None, needed: int) -> None:
        """Hold sends until the server's bucket covers ``needed`` (and the reserve)
        again: refilled at our pace, or by its own reset time, whichever comes first."""
        now = self._clock()
        if reset_s is not None:
            self._classify_window(now + reset_s, now)
        self._last_needed = needed
        wanted = needed + self.reserve + self.slack(now)
        if headroom >= wanted:
            return
        waits = [] if reset_s is None else [reset_s]
        rate = self.pace_per_minute
        if rate is not None and not self.fixed_window:  # nothing refills a fixed window early
            waits.append((wanted - headroom) / (rate / 60))
        if waits:
            self.hold_until(now + min(waits))

    def overran(self, now: float) -> None:
        """A 429 came. Unless the :class:`Share` already keeps its margin for another
        client, our own sends reached the server bunched closer than the pace (timing
        jitter on a busy machine): keep one more request's worth free from now on, a
        margin that fades while no 429 comes. A quiet machine keeps the whole pace."""
        if self.share.margin >= Share.TARGET:
            return
        self._slack = self.slack(now) + self._last_needed
        self._slack_at = now

    def slack(self, now: float) -> float:
        """Units kept free against timing jitter, learned from 429s (see :meth:`overran`)."""
        if not self._slack:
            return 0.0
        return self._slack * math.exp2(-(now - self._slack_at) / self.SLACK_HALF_LIFE_S)

    def _classify_window(self, deadline: float, now: float) -> None:
        """A fixed window's reset time counts down to one deadline; a sliding window's
        or a bucket's moves on with the clock while the limit is in use."""
        previous = self._deadline
        if previous is None or now - previous[1] >= self.CLASSIFY_AFTER_S:
            if previous is not None:
                drift = abs(deadline - previous[0])
                self.fixed_window = drift < self.FIXED_DRIFT * (now - previous[1])
            self._deadline = (deadline, now)
