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
does all four in a few lines, without polling: each caller books its start
time once it is near (so a pace that changes meanwhile applies to it) and
sleeps exactly until then.

Longer than most modules because the pacers, the reservations they hand out
and what the server's headers say (another client on the key included:
:class:`Share`) act on one budget and are tuned together.
"""

from __future__ import annotations

import asyncio
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from batcher.transport.wire import ServerLimits

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
    start: float = 0.0
    """When the request was booked to go: later sends of ours are in flight past it."""


class OwnSends:
    """When batcher's own recent requests went, to tell them from other clients'.

    A response's ``remaining`` count was taken when the server admitted that request;
    every send of ours booked after it has been spent from the same allowance since.

    The last ``MEMORY_S`` of sends can be a million at a fast server's pace, so
    they are kept in two flat arrays (16 bytes a send, not a tuple each): start
    times, in the order booked (the clock only goes forward), and the running
    total of their tokens, so a span is two binary searches and a subtraction.
    """

    MEMORY_S = 120.0

    def __init__(self) -> None:
        self._moments = array("d")
        self._totals = array("q")  # tokens of every send so far, up to and including each
        self._first = 0  # sends before this one are forgotten
        self._forgotten_tokens = 0  # the running total just before ``_moments[0]``

    def add(self, start: float, tokens: int) -> None:
        total = self._totals[-1] if self._totals else self._forgotten_tokens
        self._moments.append(start)
        self._totals.append(total + tokens)

    def between(self, after: float, until: float) -> tuple[int, int]:
        """Requests and tokens of ours that started in ``(after, until]``."""
        low = bisect_right(self._moments, after, self._first)
        high = bisect_right(self._moments, until, self._first)
        if high <= low:
            return 0, 0
        return high - low, self._totals[high - 1] - self._total_before(low)

    def since(self, start: float, now: float) -> tuple[int, int]:
        """Requests and tokens of ours that started after ``start``, up to ``now``."""
        self._first = bisect_left(self._moments, now - self.MEMORY_S, self._first)
        if self._first > len(self._moments) // 2:  # drop the forgotten half at once
            self._forgotten_tokens = self._total_before(self._first)
            del self._moments[:self._first], self._totals[:self._first]
            self._first = 0
        return self.between(start, now)

    def _total_before(self, index: int) -> int:
        return self._totals[index - 1] if index else self._forgotten_tokens


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
        margin = self.TARGET * min(1.0, used / self.MARGIN_FULL_AT)
        value = min(1.0, max(self.MIN, 1 - used - margin))
        changed = value != self.value
        self.value = value
        return changed

    def steer(self, remaining: int, at: float, headroom: float, horizon_s: float,
              own: OwnSends, full_per_s: float | None, kind: int, *,
              known_limit: bool) -> bool:
        """Take one response's ``remaining`` count, taken when the request went at ``at``;
        True when ``value`` changed. ``kind`` picks requests (0) or tokens (1) in ``own``;
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
        ours = own.between(anchor[0], at)[kind]
        sample = (anchor[1] - remaining - ours) / span
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


class RateLimiter:
    """Requests-per-minute and tokens-per-minute pacing that listens to the server.

    The pace for each limit is the lower of the job's setting and what the
    server's ``x-ratelimit-limit-*`` headers report (learned when the job sets
    none), times a small safety fraction, times an AIMD factor: a 429 cuts the
    factor multiplicatively (at most once per ``DECREASE_SPACING_S``, so one
    burst of 429s from the same window counts once), and it grows back
    linearly while no 429 comes.

    Other clients on the same key show in the ``x-ratelimit-remaining-*`` counts:
    net of batcher's own requests, what is used is their doing. A :class:`Share`
    per limit slows the pace smoothly to what they leave and lets it climb back
    when they go. When the headroom (the reported count, less our requests sent
    since, plus what a sliding window has let go of since) is still too small for
    the next request, sends are held until the server has refilled enough, or, in
    a fixed window, until it resets. One request is kept in reserve, for limiters
    whose count is one too generous (LiteLLM's router reports one more request
    remaining than it admits). Turns are booked only shortly before they come, so
    a pace that changes, or a hold, applies to requests already waiting.
    """

    PACE_FRACTION = 0.99  # of a limit: timing jitter must not push a window over
    DECREASE = 0.8
    MIN_FACTOR = 0.05
    RECOVERY_PER_S = 0.1  # factor regained per second without a 429
    DECREASE_SPACING_S = 1.0
    UNKNOWN_RATE_PER_S = 1e9  # a pacer that never spaces sends, only honours holds
    RESERVE_REQUESTS = 1  # held back from a reported request count (off-by-one limiters)
    BOOK_AHEAD_S = 0.25  # a turn is booked this close to its time, at the pace then current
    MIN_HORIZON_S = 0.05  # a reset just about to pass must not make the pace jump
    CLASSIFY_AFTER_S = 0.05  # reset times compared this far apart tell the window's kind
    FIXED_DRIFT = 0.25  # a deadline moving slower than this per second is a fixed window's

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
        self.shares = {"requests": Share(), "tokens": Share()}
        self._own = OwnSends()
        self._deadlines: dict[str, tuple[float, float] | None] = {"requests": None,
                                                                    "tokens": None}
        self._fixed = {"requests": False, "tokens": False}
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
        self._own.add(now, tokens)
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
        if self.requests is not None:
            self.requests.commit(start, 1)
        if self.tokens is not None:
            self.tokens.commit(start, tokens)
        return start

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
        changed = False
        for name, value in (("requests", limits.limit_requests), ("tokens", limits.limit_tokens)):
            if value and value != self._learned[name]:
                self._learned[name] = float(value)
                changed = True
        now = self._clock()
        later = (0, 0) if sent is None else self._own.since(sent.start, now)
        age = 0.0 if sent is None else now - sent.start
        reports = (("requests", limits.remaining_requests, limits.reset_requests_s,
                    1 + self.RESERVE_REQUESTS),
                   ("tokens", limits.remaining_tokens, limits.reset_tokens_s, next_tokens))
        headrooms: list[tuple[str, float, float | None, int]] = []
        for kind, (name, remaining, reset, needed) in enumerate(reports):
            if remaining is None:
                continue
            # What is left now: less our requests sent since, and less what other
            # clients took meanwhile (a refill is not counted on: it may be ours).
            drain = self.shares[name].drain or 0.0
            headroom = remaining - later[kind] - max(0.0, drain) * age
            if reset and not self._fixed[name] and sent is not None:
                # A sliding window has since let go of what we sent one window earlier.
                headroom += self._own.between(sent.start - reset, now - reset)[kind]
            headrooms.append((name, headroom, reset, needed))
            if sent is not None:
                changed |= self._steer(name, kind, remaining, reset, headroom, sent)
        if changed:
            self._update_rates()
        for name, headroom, reset, needed in headrooms:
            self._respect_headroom(name, headroom, reset, needed)

    def on_rate_limited(self, retry_after_s: float | None = None) -> None:
        """A 429 for rate (not quota): slow the whole run down, not just this row, and
        send nothing until the server's ``retry_after_s`` (the other rows' requests
        would only earn 429s of their own, and some limiters count those too)."""
        now = self._clock()
        if retry_after_s is not None:
            for name in ("requests", "tokens"):
                pacer: Pacer = getattr(self, name) or self._holding_pacer(name)
                pacer.hold_until(now + retry_after_s)
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
        return min(known) * self.PACE_FRACTION * self.factor * self.shares[name].value

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

    def _respect_headroom(self, name: str, remaining: float, reset_s: float | None,
                          needed: int) -> None:
        """Hold sends until the server's bucket covers ``needed`` again: refilled at our
        pace, or by its own reset time, whichever comes first."""
        now = self._clock()
        if reset_s is not None:
            self._classify_window(name, now + reset_s, now)
        if remaining >= needed:
            return
        waits = [] if reset_s is None else [reset_s]
        rate = self.rate_per_minute(name)
        fixed_window = self._fixed[name]
        if rate is not None and not fixed_window:  # nothing refills a fixed window before its end
            waits.append((needed - remaining) / (rate / 60))
        if not waits:
            return
        # With no rate known yet, a pacer at "unlimited" speed that only honours holds.
        pacer: Pacer = getattr(self, name) or self._holding_pacer(name)
        pacer.hold_until(self._clock() + min(waits))

    def _steer(self, name: str, kind: int, remaining: int, reset_s: float | None,
               headroom: float, sent: Reservation) -> bool:
        """Update one limit's :class:`Share` (its horizon: the reset time, else the
        window its limit and capacity imply, else a second)."""
        share = self.shares[name]
        share.capacity = max(share.capacity, float(remaining))
        known = [value for value in (self._caps[name], self._learned[name]) if value]
        full = min(known) * self.PACE_FRACTION * self.factor / 60 if known else None
        learned = self._learned[name]
        if reset_s and not self._fixed[name]:
            # A sliding window (or a bucket near empty): the reset time at admission is
            # its length, so what the others hold in it is what is used less ours.
            capacity = learned * reset_s / 60 if learned else share.capacity
            ours = self._own.between(sent.start - reset_s, sent.start)[kind]
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
                           self._own, full, kind, known_limit=bool(learned))

    def _classify_window(self, name: str, deadline: float, now: float) -> None:
        """A fixed window's reset time counts down to one deadline; a sliding window's
        or a bucket's moves on with the clock while the limit is in use."""
        previous = self._deadlines[name]
        if previous is None or now - previous[1] >= self.CLASSIFY_AFTER_S:
            if previous is not None:
                drift = abs(deadline - previous[0])
                self._fixed[name] = drift < self.FIXED_DRIFT * (now - previous[1])
            self._deadlines[name] = (deadline, now)

    def _holding_pacer(self, name: str) -> Pacer:
        pacer = Pacer(self.UNKNOWN_RATE_PER_S, self._clock)
        setattr(self, name, pacer)
        return pacer

    def _pacers(self) -> list[Pacer]:
        return [pacer for pacer in (self.requests, self.tokens) if pacer is not None]
