"""Server-side RPM/TPM enforcement and the headers OpenAI sends about it.

A sliding log per limit: each window of ``window_s`` seconds admits at most
``limit * window_s / 60`` requests (or tokens). The limiter is a plain object
driven by an explicit ``now``, so its arithmetic is tested without sleeping.
It runs on the server's event loop only and needs no lock.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from .responses import error_body

RATE_LIMITS_URL = "https://platform.openai.com/account/rate-limits"


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
    """

    def __init__(
        self,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        window_s: float,
        *,
        send_headers: bool = True,
    ) -> None:
        self.window_s = window_s
        self.send_headers = send_headers
        self._requests = _WindowLog(requests_per_minute, window_s) if requests_per_minute else None
        self._tokens = _WindowLog(tokens_per_minute, window_s) if tokens_per_minute else None

    @property
    def enabled(self) -> bool:
        return self._requests is not None or self._tokens is not None

    def headers(self, now: float) -> dict[str, str]:
        """The ``x-ratelimit-*`` headers for the current state (empty when not configured)."""
        if not self.send_headers:
            return {}
        out: dict[str, str] = {}
        for name, log in (("requests", self._requests), ("tokens", self._tokens)):
            if log is None:
                continue
            log.prune(now)
            out[f"x-ratelimit-limit-{name}"] = str(log.limit)
            out[f"x-ratelimit-remaining-{name}"] = str(log.remaining())
            out[f"x-ratelimit-reset-{name}"] = go_duration(log.reset_in(now))
        return out

    def admit(self, now: float, tokens: int) -> Verdict:
        """Admit one request that reserves ``tokens``, or say why not and for how long."""
        req, tok = self._requests, self._tokens
        if req is not None:
            req.prune(now)
        if tok is not None:
            tok.prune(now)

        refused_by: _WindowLog | None = None
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
            return Verdict(True, self.headers(now))

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
        return Verdict(False, self.headers(now), rejection)

    def reset(self) -> None:
        for log in (self._requests, self._tokens):
            if log is not None:
                log.clear()

    def error_body(self, model: str, rejection: Rejection) -> dict[str, Any]:
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
