"""The OpenAI chat-completions wire format: request bodies, replies, errors.

Pure functions over bytes and headers, no I/O, so every provider quirk is
tested without a network. Errors are classified by HTTP status and the
body's ``code``/``type`` only, never by message text, and the parser accepts
the shapes real servers send: OpenAI's four-key error, Azure's string code
and null type, vLLM's ``{"error": "Unauthorized"}`` and numeric codes,
llama.cpp's ``{"detail": ...}``, and HTML pages from proxies.

Longer than most modules, kept whole: requests, replies, errors and rate-limit
headers are one format, read together when a provider changes it.
"""

from __future__ import annotations

import ast
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import orjson

from batcher.errors import ApiError, Verdict
from batcher.redact import mask_key_shapes, redact_url

# 429 codes/types that mean the account has no money or quota left: retrying
# cannot help ("Retrying these errors won't restore access").
QUOTA_CODES = frozenset({
    "insufficient_quota",
    "credit_balance_exhausted",
    "organization_spend_limit_exceeded",
    "project_spend_limit_exceeded",
    "organization_usage_limit_exceeded",
    "billing_hard_limit_reached",
    "billing_not_active",
    "access_terminated",
})
# Codes/types a gateway uses for an answer about the key or its own configuration, not
# about the request: every row would get the same answer, so the run stops (exit 3).
GATEWAY_SETUP_CODES: Mapping[str, str] = {
    "no_db_connection": ("the gateway could not check the API key (LiteLLM without its "
                         "database answers this to any key but its master key)"),
    "budget_exceeded": "the key's budget on the gateway is spent",
    "auth_error": "the gateway refused the API key",
}
RETRYABLE_STATUSES = frozenset({408, 409, 429})
# 407: a proxy refuses our proxy credentials, and will refuse every request alike.
ABORT_STATUSES = frozenset({401, 403, 407})
MAX_MESSAGE_CHARS = 300
MAX_LABEL_CHARS = 64
"""An error's ``code`` and ``type`` are short names (``context_length_exceeded``);
longer is not a name, and it becomes the row's ``error_class``."""


@dataclass(frozen=True, slots=True)
class Choice:
    """One of a completion's choices (``n`` > 1 asks for several)."""

    reply: str | None
    finish_reason: str | None
    refusal: str | None


@dataclass(slots=True)
class Completion:
    """A parsed chat completion: the first choice's fields, and every choice."""

    reply: str | None
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    cached_tokens: int | None
    reasoning_tokens: int | None
    refusal: str | None
    choices: tuple[Choice, ...] = ()


def request_body(model: str, messages: list[dict[str, str]], params: Mapping[str, Any]) -> bytes:
    return orjson.dumps({"model": model, "messages": messages, **params})


def parse_completion(body: bytes, *, clean: Callable[[str], str] = mask_key_shapes) -> Completion:
    """Read a 200 response. A body that is not a usable chat completion is a
    transient server fault (``ApiError`` with ``Verdict.RETRY``); ``clean`` is
    applied to any text the server put in it (the client passes its redactor's)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ApiError(Verdict.RETRY, "HTTP 200 with a malformed JSON body", status=200) from None
    if not isinstance(data, dict):
        raise ApiError(Verdict.RETRY, "HTTP 200 with a body that is not a JSON object", status=200)
    if "error" in data:
        detail = describe_error(200, data, clean=clean)
        raise ApiError(Verdict.RETRY, f"HTTP 200 carrying an error: {detail.message}",
                       status=200, code=detail.code, type=detail.type)
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ApiError(Verdict.RETRY, "HTTP 200 with no choices in the body", status=200)
    parsed: list[Choice] = []
    for choice in choices:
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            raise ApiError(Verdict.RETRY, "HTTP 200 with a choice that has no message",
                           status=200)
        parsed.append(Choice(_reply_text(message), _text_or_none(choice.get("finish_reason")),
                             _text_or_none(message.get("refusal"))))
    raw_usage = data.get("usage")
    usage: dict[str, Any] = raw_usage if isinstance(raw_usage, dict) else {}
    first = parsed[0]
    return Completion(
        reply=first.reply,
        finish_reason=first.finish_reason,
        prompt_tokens=_token_count(usage.get("prompt_tokens")),
        completion_tokens=_token_count(usage.get("completion_tokens")),
        total_tokens=_token_count(usage.get("total_tokens")),
        cached_tokens=_token_count(_nested(usage, "prompt_tokens_details", "cached_tokens")),
        reasoning_tokens=_token_count(
            _nested(usage, "completion_tokens_details", "reasoning_tokens")),
        refusal=first.refusal,
        choices=tuple(parsed),
    )


def classify_error(status: int, body: bytes, headers: Mapping[str, str], *,
                   now: float | None = None, url: str | None = None,
                   clean: Callable[[str], str] = mask_key_shapes) -> ApiError:
    """Decide what a non-200 response means for its row and for the run.

    ``url``, the URL requested, when given: a 404 without an error code
    (OpenAI's "Invalid URL", a framework's "Not Found") means no such route,
    so the URL is wrong for every row alike and the run stops with a hint; a
    404 with a code (``model_not_found``, ``DeploymentNotFound``) stays the
    row's error. ``clean`` (the client passes its redactor's) scrubs secrets from
    the server's text before it is cut to length (a key cut in half would no
    longer be recognised), so a key the server echoes never reaches the results."""
    try:
        data: Any = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        data = None
    detail = describe_error(status, data, clean=clean)
    message = detail.message
    gateway_fault = False
    if 300 <= status < 400:
        target = server_text(headers.get("location", "elsewhere"), clean)
        message = (f"HTTP {status}: the server redirects to {target}; batcher does not "
                   "follow redirects (set endpoint.base_url to the final URL)")
    elif data is None and body:
        content_type = server_text(headers.get("content-type", "unknown type").split(";")[0],
                                   clean, MAX_LABEL_CHARS)
        message = f"HTTP {status} with a non-JSON body ({content_type})"
        # Starlette/uvicorn answer an unhandled exception in the gateway itself with a
        # plain-text 500; the backend's own failures come wrapped in JSON.
        gateway_fault = status == 500 and content_type == "text/plain"
        if gateway_fault:
            message += (": the gateway itself failed, not the model; check the API key "
                        "and the gateway's configuration (LiteLLM without its database "
                        "answers a request with no key this way)")
    if status == 407:  # only a proxy answers this, and it answers every request alike
        message += ("; a proxy refused batcher's proxy credentials: fix the user and "
                    "password in HTTP_PROXY (or ALL_PROXY), %-encoding special characters")
    wrong_url = False
    if url is not None and status == 404 and detail.code is None:
        wrong_url = True
        message = not_found_message(url, message)
    retry_after_s = parse_retry_after(headers, now=now)
    if retry_after_s is None and status == 429:
        retry_after_s = parse_rate_limits(headers).exhausted_reset_s()
    markers = detail.markers
    setup = sorted(markers & GATEWAY_SETUP_CODES.keys())
    if setup:
        verdict = Verdict.ABORT
        message = f"{GATEWAY_SETUP_CODES[setup[0]]}: {message}"
    elif status in ABORT_STATUSES or (status == 429 and markers & QUOTA_CODES) or wrong_url:
        verdict = Verdict.ABORT
    elif status in RETRYABLE_STATUSES or status >= 500:
        verdict = Verdict.RETRY
    else:
        verdict = Verdict.ROW_ERROR
    return ApiError(
        verdict,
        message,
        status=status,
        code=detail.code,
        type=detail.type,
        request_id=headers.get("x-request-id") or headers.get("apim-request-id"),
        retry_after_s=retry_after_s,
        gateway_fault=gateway_fault,
        headers=dict(headers),
    )


def not_found_message(url: str, reason: str) -> str:
    """Which URL answered 404 without an error code, and the likely fix."""
    parts = urlsplit(url)
    shown = redact_url(f"{parts.scheme}://{parts.netloc}{parts.path}")
    text = f"POST {shown} answered 404 ({reason})"
    if "/v1/" not in parts.path and "/openai/deployments/" not in parts.path:
        root = shown.removesuffix("/chat/completions")
        return (f"{text}; most OpenAI-compatible servers serve the API under /v1: try "
                f"endpoint.base_url: {root}/v1")
    return f"{text}; check endpoint.base_url"


@dataclass(frozen=True, slots=True)
class ErrorDetail:
    """What an error body says: a one-line message (``HTTP 429 code type: text``),
    and the body's ``code`` and ``type`` fit to store and print (see :func:`server_text`);
    ``markers`` are the two as the server sent them, for classifying only."""

    message: str
    code: str | None
    type: str | None
    markers: frozenset[str] = frozenset()


def describe_error(status: int, data: Any, *,
                   clean: Callable[[str], str] = mask_key_shapes) -> ErrorDetail:
    """Pull message, code and type out of any of the error shapes servers send.

    A gateway that wraps a backend's error (LiteLLM) puts the HTTP status again in
    ``code`` and the backend's own error object, as JSON or as a Python literal, inside
    its message: the status is shown once, and the backend's code, type and message win.
    """
    detail: Any = data
    if isinstance(data, dict):
        detail = data.get("error", data)
    message: Any = None
    code: Any = None
    kind: Any = None
    if isinstance(detail, dict):
        message = detail.get("message") or detail.get("detail")
        code = detail.get("code")
        kind = detail.get("type")
    elif isinstance(detail, str):
        message = detail
    if message is None and isinstance(data, dict):
        message = data.get("detail") or data.get("message")
    code, kind = _meaningful(code, status), _meaningful(kind, status)
    if isinstance(message, str):
        inner = _wrapped_error(message)
        if inner is not None:
            message = inner.get("message") or message
            code = _meaningful(inner.get("code"), status) or code
            kind = _meaningful(inner.get("type"), status) or kind
    markers = frozenset(value for value in (code, kind) if value)
    code = None if code is None else server_text(code, clean, MAX_LABEL_CHARS)
    kind = None if kind is None else server_text(kind, clean, MAX_LABEL_CHARS)
    label = " ".join(part for part in (code, kind) if part)
    prefix = f"HTTP {status}" + (f" {label}" if label else "")
    text = server_text(message, clean) if message not in (None, "") else "no error message"
    return ErrorDetail(f"{prefix}: {text}", code=code, type=kind, markers=markers)


def _meaningful(value: Any, status: int) -> str | None:
    """A code or type worth showing: not empty, not the status again, not ``"None"``."""
    if value is None or isinstance(value, (dict, list)):
        return None
    text = str(value).strip()
    if text in ("", "None", "null", str(status)):
        return None
    return text


_WRAPPED_ERROR = re.compile(r"""\{\s*["']error["']\s*:""")


def _wrapped_error(message: str) -> dict[str, Any] | None:
    """The backend's error object embedded in a gateway's message, if there is one.

    Parsed as a structure (JSON, else a Python literal as LiteLLM prints it), never
    by searching the text for particular words.
    """
    match = _WRAPPED_ERROR.search(message)
    if match is None:
        return None
    fragment = message[match.start():]
    end = _balanced_end(fragment)
    if end is None:
        return None
    fragment = fragment[:end]
    parsed: Any
    try:
        parsed = orjson.loads(fragment)
    except orjson.JSONDecodeError:
        try:
            parsed = ast.literal_eval(fragment)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return None
    inner = parsed.get("error") if isinstance(parsed, dict) else None
    return inner if isinstance(inner, dict) else None


def _balanced_end(text: str) -> int | None:
    """Index just past the brace that closes the one opening ``text`` (quotes respected)."""
    depth = 0
    quote: str | None = None
    escaped = False
    for index, char in enumerate(text):
        if quote is not None:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = None
        elif char in "\"'":
            quote = char
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return index + 1
    return None


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


def one_line(text: str, limit: int | None = MAX_MESSAGE_CHARS) -> str:
    """``text`` on one line (every run of whitespace, line breaks of any kind included,
    is one space), cut to ``limit`` characters."""
    flat = " ".join(text.split())
    return flat if limit is None or len(flat) <= limit else flat[: limit - 1] + "…"


def server_text(value: object, clean: Callable[[str], str] = mask_key_shapes,
                limit: int | None = MAX_MESSAGE_CHARS) -> str:
    """Any field a server supplied, fit to store and print: secrets masked by ``clean``
    (before the cut: a key cut in half would no longer be recognised), on one line (a
    newline in it would forge a line of a log), cut to ``limit``. Every error code, type
    and message from a server passes here before it reaches a row, a log or a file."""
    return one_line(clean(str(value)), limit)


def _reply_text(message: dict[str, Any]) -> str | None:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        texts = [part.get("text", "") for part in content
                 if isinstance(part, dict) and part.get("type") == "text"]
        return "".join(texts) if texts else None
    tool_calls = message.get("tool_calls")
    if tool_calls:
        return orjson.dumps(tool_calls).decode()
    return None


def _nested(data: dict[str, Any], outer: str, inner: str) -> Any:
    block = data.get(outer)
    return block.get(inner) if isinstance(block, dict) else None


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _token_count(value: Any) -> int | None:
    """A usage count as the server sent it; a negative one is no count at all."""
    count = _int_or_none(value)
    return None if count is None or count < 0 else count


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None
