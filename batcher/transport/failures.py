"""What a failed response means: its verdict for the row and the run, and its text.

Errors are classified by HTTP status and the body's ``code``/``type`` only, never
by message text, and the parser accepts the shapes real servers send: OpenAI's
four-key error, Azure's string code and null type, vLLM's ``{"error":
"Unauthorized"}`` and numeric codes, llama.cpp's ``{"detail": ...}``, a
gateway's wrapped backend error, and HTML pages from proxies. Every field a
server supplies is masked and flattened by :func:`server_text` before it is
stored or shown. Pure functions, no I/O.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

from batcher.errors import ApiError, Verdict
from batcher.redact import mask_key_shapes, redact_url
from batcher.transport.ratelimits import parse_rate_limits, parse_retry_after

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
