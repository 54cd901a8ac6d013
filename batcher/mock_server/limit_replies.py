"""What a mock limit says about itself: reset times, retry waits and its 429s, in
OpenAI's and LiteLLM's dialects.

OpenAI formats its reset times like Go's ``time.Duration`` and names the limit
in its 429 message; LiteLLM's per-key limiter always asks for a whole window
and names the limit type; its router carries the wait only as
``llm_provider-retry-after``. The error bodies follow each dialect's envelope.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from .responses import error_body

RATE_LIMITS_URL = "https://platform.openai.com/account/rate-limits"
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


def rejection_headers(rejection: Rejection, style: RejectionStyle,
                      window_s: float) -> dict[str, str]:
    """The wait a 429 advertises, in the headers ``style`` uses.

    LiteLLM's per-key limiter always says a whole window (and names the limit type
    and a reset time); its router's 429 carries the wait only as
    ``llm_provider-retry-after``.
    """
    wait = rejection.retry_after_s
    if style == "litellm_key":
        reset_at = datetime.fromtimestamp(time.time() + window_s, UTC)
        return {"retry-after": str(max(1, math.ceil(window_s))),
                "rate_limit_type": rejection.kind,
                "reset_at": reset_at.strftime("%Y-%m-%d %H:%M:%S UTC")}
    if wait is None:
        return {}
    if style == "litellm_router":
        return {"llm_provider-retry-after": str(max(1, math.ceil(wait)))}
    return retry_headers(wait)


def rejection_body(model: str, rejection: Rejection, style: RejectionStyle, window_s: float,
                   scope: str | None) -> dict[str, Any]:
    """The 429 body for ``rejection`` in ``style``'s shape."""
    if style == "openai":
        return _openai_body(model, rejection, window_s)
    # LiteLLM's envelope: the status again as a string ``code``, ``"None"`` type.
    if style == "litellm_key":
        message = (f"Rate limit exceeded for {scope or 'api_key'}: mock-key-hash. "
                   f"Limit type: {rejection.kind}. Current limit: {rejection.limit}, "
                   "Remaining: 0.")
    else:
        unit = "rpm" if rejection.kind == "requests" else "tpm"
        message = (f"litellm.RateLimitError: Deployment over defined {unit} limit="
                   f"{rejection.limit}. current usage={rejection.used}")
    return {"error": {"message": message, "type": "None", "param": "None", "code": "429"}}


def _openai_body(model: str, rejection: Rejection, window_s: float) -> dict[str, Any]:
    """OpenAI's 429 body for ``rejection``, with its "Please try again in" wait."""
    unit = "requests per min (RPM)" if rejection.kind == "requests" else "tokens per min (TPM)"
    note = ""
    if window_s != 60:
        per_window = rejection.limit * window_s / 60
        note = f" (This mock enforces it as {per_window:g} per {window_s:g}s window.)"
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
