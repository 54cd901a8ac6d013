"""What a server says about waiting: ``Retry-After`` and the rate-limit headers.

Pure functions over header mappings, no I/O. Every provider's spelling is read
here (OpenAI's, Azure's, LiteLLM's scoped and ``llm_provider-`` forms) and
reduced to the tightest figures, which the pacer (``batcher.limits``) and the
error classifier (``batcher.transport.failures``) use.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

#: Headers that say how long to wait, most precise first: OpenAI's and Azure's, then the
#: forms LiteLLM passes on from its backend with an ``llm_provider-`` prefix (its router's
#: own 429 carries only that).
RETRY_AFTER_HEADERS = ("retry-after-ms", "retry-after", "llm_provider-retry-after-ms",
                       "llm_provider-retry-after")


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds the server asks us to wait, from the first of :data:`RETRY_AFTER_HEADERS`
    present: ``*-ms`` in milliseconds, the others as seconds or as an HTTP date."""
    for name in RETRY_AFTER_HEADERS:
        raw = headers.get(name)
        if not raw:
            continue
        value = (_millis(raw) if name.endswith("-ms")
                 else _seconds_or_date(raw, time.time() if now is None else now))
        if value is not None:
            return value
    return None


def _millis(raw: str) -> float | None:
    try:
        value = float(raw) / 1000
    except ValueError:
        return None
    return value if value >= 0 else None


def _seconds_or_date(raw: str, now: float) -> float | None:
    try:
        value = float(raw)
        return value if value >= 0 else None
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(raw).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when - now)


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What the server said about its rate limits on one response (None: not sent).

    Where several limits are reported (the account's and a gateway's per-key or
    per-team limit), each figure is the tightest: the lowest limit, the lowest
    remaining count, and the reset time of the limit with the least remaining.
    """

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None

    def exhausted_reset_s(self) -> float | None:
        """When an exhausted limit refills (a 429 that names no retry-after)."""
        waits = [reset for remaining, reset in ((self.remaining_requests, self.reset_requests_s),
                                                (self.remaining_tokens, self.reset_tokens_s))
                 if remaining == 0 and reset is not None]
        return max(waits) if waits else None


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|m|s|us|µs|ns)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6,
                   "ns": 1e-9}


def parse_duration(text: str) -> float | None:
    """Seconds in a Go-style duration (``6m0s``, ``1.5s``, ``120ms``, ``23h47m36.648s``);
    a bare number is seconds (Azure's older ``x-rate-limit-reset-tokens: 55``)."""
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
        return value if value >= 0 else None
    except ValueError:
        pass
    position = 0
    total = 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            return None
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    return total if position == len(text) and position > 0 else None


#: ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` in every placement of a scope
#: seen in the wild: OpenAI's plain names and its project limit
#: (``x-ratelimit-limit-project-tokens``), LiteLLM's per-key, per-team, per-user and
#: per-model limits (``x-ratelimit-api_key-remaining-requests``,
#: ``x-ratelimit-team-limit-tokens``), and OpenAI's ``-tokens_usage_based``.
#: LiteLLM's ``max_parallel_requests`` is a concurrency limit, not a rate, and does not match.
_RATE_HEADER = re.compile(
    r"x-ratelimit-(?:([a-z_]+)-)?(limit|remaining|reset)-(?:([a-z_]+)-)?(requests|tokens)"
    r"(?:_([a-z_]+))?")


def parse_rate_limits(headers: Mapping[str, str]) -> ServerLimits:
    """Read every rate-limit header (see :data:`_RATE_HEADER`) and keep the tightest.

    Header names must be lower-case (aiohttp's and the mock's are). Negative values
    (Azure sends ``-1`` when it does not track a limit) count as absent.
    """
    scopes: dict[tuple[str, str], dict[str, float]] = {}
    for name, raw in headers.items():
        if not name.startswith("x-ratelimit-"):
            continue
        match = _RATE_HEADER.fullmatch(name)
        if match is None:
            continue
        before, field_name, middle, kind, after = match.groups()
        value = parse_duration(raw) if field_name == "reset" else _count(raw)
        if value is None:
            continue
        scope = before or middle or after or ""
        scopes.setdefault((kind, scope), {})[field_name] = value
    found: dict[str, tuple[int | None, int | None, float | None]] = {}
    for kind in ("requests", "tokens"):
        reports = [fields for (name, _scope), fields in scopes.items() if name == kind]
        limits = [int(fields["limit"]) for fields in reports if "limit" in fields]
        tightest = min((fields for fields in reports if "remaining" in fields),
                       key=lambda fields: fields["remaining"], default=None)
        remaining = None if tightest is None else int(tightest["remaining"])
        resets = [fields["reset"] for fields in reports if "reset" in fields]
        reset = tightest.get("reset") if tightest is not None else None
        if reset is None and resets:
            reset = max(resets)
        found[kind] = (min(limits) if limits else None, remaining, reset)
    return ServerLimits(*found["requests"], *found["tokens"])


def _count(raw: str) -> int | None:
    try:
        value = int(float(raw))
    except (ValueError, OverflowError):
        return None
    return value if value >= 0 else None
