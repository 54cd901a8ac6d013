"""The OpenAI chat-completions wire format: request bodies and replies.

Pure functions over bytes, no I/O, so every provider quirk is tested without a
network. A 200 that is no usable completion is a transient fault; what an
error response means is ``batcher.transport.failures``'s, what its rate-limit
headers say is ``batcher.transport.ratelimits``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from batcher.errors import ApiError, Verdict
from batcher.redact import mask_key_shapes
from batcher.transport.failures import describe_error


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
