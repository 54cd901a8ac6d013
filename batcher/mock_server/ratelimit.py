"""Server-side RPM/TPM enforcement and the headers OpenAI and LiteLLM send about it.

Each limit admits at most ``limit * window_s / 60`` requests (or tokens) per
window of ``window_s`` seconds. The window is, by ``window_kind``:

* ``sliding``: the last ``window_s`` seconds (OpenAI's short-window enforcement);
* ``calendar``: fixed windows aligned to multiples of ``window_s`` in wall-clock
  time, the whole allowance coming back at once at each boundary (LiteLLM's
  router on calendar minutes);
* ``from_first``: fixed windows that start with the first request after the
  previous one ended (LiteLLM's per-key limiter).

Optional quirks of real limiters: ``remaining_off_by_one`` reports one more
request remaining than will be admitted (LiteLLM's router); ``scope`` reports
the limits under LiteLLM's per-key or per-team names
(``x-ratelimit-api_key-remaining-requests``, no reset header); another client
on the same key (``background_rpm``) takes its requests from the same windows
at an even pace, each request it cannot fit being dropped.

The limiter is a plain object driven by an explicit ``now``, so its arithmetic
is tested without sleeping. It runs on the server's event loop only and needs
no lock.

Longer than most modules because the sliding and fixed windows, the header
dialects and another client on the key are one limiter: the one batcher's
pacing is measured against.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from .responses import error_body

RATE_LIMITS_URL = "https://platform.openai.com/account/rate-limits"
WindowKind = Literal["sliding", "calendar", "from_first"]
RejectionStyle = Literal["openai", "litellm_key", "litellm_router"]


def go_duration(seconds: float) -> str:
    """Format like Go's ``time.Duration``, as OpenAI's reset headers do (``6m0s``, ``120ms``).

    Rounded up to whole milliseconds, so any wait of a nanosecond or more never reads ``0s``.
    """
    ms = math.ceil(seconds * 1000 - 1e-6) if seconds > 0 else 0
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = str(rest // 1000) if rest % 1000 == 0 else f"{rest / 1000:.3f}".rstrip("0")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def retry_headers(seconds: float) -> dict[str, str]:
    """``retry-after-ms`` (what the OpenAI SDK reads first) and an integer ``retry-after`` >= 1."""
    return {
        "retry-after-ms": str(max(1, math.ceil(seconds * 1000))),
        "retry-after": str(max(1, math.ceil(seconds))),
    }


class _WindowLog:
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


class _FixedWindow:
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


_Log = _WindowLog | _FixedWindow


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a request was refused, in the terms OpenAI's 429 message uses."""

    kind: str
    """``requests`` or ``tokens``: the error ``type`` of the 429."""
    limit: int
    used: int
    requested: int
    retry_after_s: float | None
    """``None`` when the request is larger than a whole window and can never pass."""


@dataclass(frozen=True, slots=True)
class Verdict:
    admitted: bool
    headers: dict[str, str]
    rejection: Rejection | None = None


class RateLimiter:
    """RPM and TPM limits, either optional; a request must fit both to be admitted.

    Rejected requests still count toward RPM ("unsuccessful requests contribute
    to your per-minute limit"), so the wait a 429 reports includes the slot the
    rejected request itself took. Tokens are only charged on admission.
    Calendar windows read wall-clock time: ``now`` (monotonic) plus the offset
    between the two clocks, taken once.
    """

    def __init__(
        self,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        window_s: float,
        *,
        send_headers: bool = True,
        window_kind: WindowKind = "sliding",
        remaining_off_by_one: bool = False,
        scope: str | None = None,
        rejection_style: RejectionStyle = "openai",
        background_rpm: float | None = None,
        background_tokens: int = 0,
        report_limit: bool = True,
        now: float = 0.0,
    ) -> None:
        self.report_limit = report_limit
        self.window_s = window_s
        self.send_headers = send_headers
        self.window_kind = window_kind
        self.remaining_off_by_one = remaining_off_by_one
        self.scope = scope
        self.rejection_style = rejection_style
        self._wall_offset = time.time() - time.monotonic() if window_kind == "calendar" else 0.0
        self._requests = self._log(requests_per_minute)
        self._tokens = self._log(tokens_per_minute)
        self._background_gap = 60 / background_rpm if background_rpm else None
        self._background_tokens = background_tokens
        self._background_next = self._clock(now)
        self.background_admitted = 0
        self.background_dropped = 0

    def _log(self, limit: int | None) -> _Log | None:
        if not limit:
            return None
        if self.window_kind == "sliding":
            return _WindowLog(limit, self.window_s)
        return _FixedWindow(limit, self.window_s, start_at_first=self.window_kind == "from_first")

    @property
    def enabled(self) -> bool:
        return self._requests is not None or self._tokens is not None

    def _clock(self, now: float) -> float:
        return now + self._wall_offset

    def headers(self, now: float) -> dict[str, str]:
        """The rate-limit headers for the current state (empty when not configured)."""
        if not self.send_headers:
            return {}
        now = self._clock(now)
        self._catch_up(now)
        out: dict[str, str] = {}
        for name, log in (("requests", self._requests), ("tokens", self._tokens)):
            if log is None:
                continue
            log.prune(now)
            remaining = log.remaining()
            if name == "requests" and self.remaining_off_by_one:
                remaining += 1
            if self.scope is not None:  # LiteLLM: per-scope names, no reset time
                out[f"x-ratelimit-{self.scope}-limit-{name}"] = str(log.limit)
                out[f"x-ratelimit-{self.scope}-remaining-{name}"] = str(remaining)
                continue
            if self.report_limit:
                out[f"x-ratelimit-limit-{name}"] = str(log.limit)
            out[f"x-ratelimit-remaining-{name}"] = str(remaining)
            out[f"x-ratelimit-reset-{name}"] = go_duration(log.reset_in(now))
        return out

    def _catch_up(self, now: float) -> None:
        """Let the other client send everything it was due to send up to ``now``."""
        gap = self._background_gap
        if gap is None:
            return
        due = self._background_next
        if due < now - self.window_s:  # long idle: what it sent back then has expired
            due += math.ceil((now - self.window_s - due) / gap) * gap
        while due <= now:
            self._admit_background(due)
            due += gap
        self._background_next = due

    def _admit_background(self, moment: float) -> None:
        req, tok = self._requests, self._tokens
        for log in (req, tok):
            if log is not None:
                log.prune(moment)
        tokens = self._background_tokens
        if (req is not None and not req.fits(1)) or (tok is not None and not tok.fits(tokens)):
            self.background_dropped += 1
            return
        self.background_admitted += 1
        if req is not None:
            req.add(moment, 1)
        if tok is not None and tokens:
            tok.add(moment, tokens)

    def admit(self, now: float, tokens: int) -> Verdict:
        """Admit one request that reserves ``tokens``, or say why not and for how long."""
        headers_now = now
        now = self._clock(now)
        self._catch_up(now)
        req, tok = self._requests, self._tokens
        if req is not None:
            req.prune(now)
        if tok is not None:
            tok.prune(now)

        refused_by: _Log | None = None
        requested = 1
        if req is not None and not req.fits(1):
            refused_by = req
        elif tok is not None and not tok.fits(tokens):
            refused_by, requested = tok, tokens

        if req is not None:
            req.add(now, 1)
        if refused_by is None:
            if tok is not None:
                tok.add(now, tokens)
            return Verdict(True, self.headers(headers_now))

        wait: float | None = None
        if requested <= refused_by.capacity:
            wait = max(
                log.wait_for(amount, now)
                for log, amount in ((req, 1), (tok, tokens))
                if log is not None
            )
        kind = "requests" if refused_by is req else "tokens"
        used = refused_by.used - (1 if refused_by is req else 0)
        rejection = Rejection(kind, refused_by.limit, used, requested, wait)
        return Verdict(False, self.headers(headers_now), rejection)

    def rejection_headers(self, rejection: Rejection) -> dict[str, str]:
        """The wait a 429 advertises, in the headers its ``rejection_style`` uses.

        LiteLLM's per-key limiter always says a whole window (and names the limit type
        and a reset time); its router's 429 carries the wait only as
        ``llm_provider-retry-after``.
        """
        wait = rejection.retry_after_s
        if self.rejection_style == "litellm_key":
            reset_at = datetime.fromtimestamp(time.time() + self.window_s, UTC)
            return {"retry-after": str(max(1, math.ceil(self.window_s))),
                    "rate_limit_type": rejection.kind,
                    "reset_at": reset_at.strftime("%Y-%m-%d %H:%M:%S UTC")}
        if wait is None:
            return {}
        if self.rejection_style == "litellm_router":
            return {"llm_provider-retry-after": str(max(1, math.ceil(wait)))}
        return retry_headers(wait)

    def reset(self) -> None:
        for log in (self._requests, self._tokens):
            if log is not None:
                log.clear()

    def error_body(self, model: str, rejection: Rejection) -> dict[str, Any]:
        """The 429 body for ``rejection`` in the ``rejection_style``'s shape."""
        if self.rejection_style != "openai":
            return self._litellm_body(model, rejection)
        return self._openai_body(model, rejection)

    def _litellm_body(self, model: str, rejection: Rejection) -> dict[str, Any]:
        """LiteLLM's envelope: the status again as a string ``code``, ``"None"`` type."""
        if self.rejection_style == "litellm_key":
            message = (f"Rate limit exceeded for {self.scope or 'api_key'}: mock-key-hash. "
                       f"Limit type: {rejection.kind}. Current limit: {rejection.limit}, "
                       "Remaining: 0.")
        else:
            unit = "rpm" if rejection.kind == "requests" else "tpm"
            message = (f"litellm.RateLimitError: Deployment over defined {unit} limit="
                       f"{rejection.limit}. current usage={rejection.used}")
        return {"error": {"message": message, "type": "None", "param": "None", "code": "429"}}

    def _openai_body(self, model: str, rejection: Rejection) -> dict[str, Any]:
        """OpenAI's 429 body for ``rejection``, with its "Please try again in" wait."""
        unit = "requests per min (RPM)" if rejection.kind == "requests" else "tokens per min (TPM)"
        note = ""
        if self.window_s != 60:
            per_window = rejection.limit * self.window_s / 60
            note = f" (This mock enforces it as {per_window:g} per {self.window_s:g}s window.)"
        if rejection.retry_after_s is None:
            message = (
                f"Request too large for {model} in organization org-mock on {unit}: "
                f"Limit {rejection.limit}, Requested {rejection.requested}.{note} "
                "The input or output tokens must be reduced in order to run successfully. "
                f"Visit {RATE_LIMITS_URL} to learn more."
            )
        else:
            message = (
                f"Rate limit reached for {model} in organization org-mock on {unit}: "
                f"Limit {rejection.limit}, Used {rejection.used}, "
                f"Requested {rejection.requested}.{note} "
                f"Please try again in {go_duration(rejection.retry_after_s)}. "
                f"Visit {RATE_LIMITS_URL} to learn more."
            )
        return error_body(message, rejection.kind, None, "rate_limit_exceeded")
