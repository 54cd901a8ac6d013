"""Response bodies in OpenAI's exact wire shapes.

Kept free of aiohttp so the shapes can be read (and reused) on their own; the
app turns them into HTTP responses.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .calls import Call
from .instances import instance_for, rng_for
from .replies import count_tokens, reply_for, truncate_to_tokens

SYSTEM_FINGERPRINT = "fp_mock"
KEYS_URL = "https://platform.openai.com/account/api-keys"


@dataclass(frozen=True, slots=True)
class Reply:
    """An HTTP reply before it becomes an aiohttp response."""

    status: int
    body: object
    """A JSON-able object, or ``bytes`` sent as they are."""
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)
    ratelimit_headers: bool = True
    """False for replies that must carry no ``x-ratelimit-*`` headers."""
    completion: bool = False
    """True when this is a 200 ``chat.completion`` with choices (counted in ``ok_prompts``)."""


def dumps(obj: object) -> bytes:
    """Compact JSON, as the real API sends it."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def new_request_id() -> str:
    """An ``x-request-id`` value in OpenAI's ``req_<32 hex>`` form."""
    return "req_" + os.urandom(16).hex()


def error_body(
    message: str, type_: str | None, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error envelope; all four keys are always present (spec ``Error``)."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def mask_key(key: str) -> str:
    """Mask a key the way OpenAI's 401 message does (``sk-VKMIs***...wjh3``).

    Short keys show less, so the mask never reveals most of a secret.
    """
    if len(key) >= 16:
        return f"{key[:8]}***...{key[-4:]}"
    if len(key) >= 8:
        return f"{key[:2]}***...{key[-2:]}"
    return "***"


def invalid_key_body(sent: str | None, *, echo: bool) -> dict[str, Any]:
    """The 401 body for a missing or wrong key; ``echo`` leaks the full key on purpose."""
    if sent is None:
        return error_body(
            "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY). "
            f"You can obtain an API key from {KEYS_URL}.",
            "invalid_request_error",
        )
    shown = sent if echo else mask_key(sent)
    return error_body(
        f"Incorrect API key provided: {shown}. You can find your API key at {KEYS_URL}.",
        "invalid_request_error",
        None,
        "invalid_api_key",
    )


def usage_body(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
               reasoning_tokens: int = 0) -> dict[str, Any]:
    """``usage`` with the ``*_details`` objects OpenAI includes today; cached
    tokens are part of the prompt's, reasoning tokens part of the completion's."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def completion_body(
    model: str,
    prompt_tokens: int,
    contents: list[str | None],
    finish_reason: str | list[str],
    *,
    refusal: str | None = None,
    with_usage: bool = True,
    cached_tokens: int = 0,
    reasoning_tokens: int = 0,
) -> dict[str, Any]:
    """A ``chat.completion`` with one choice per entry of ``contents`` (and of
    ``finish_reason``, when that is a list)."""
    reasons = finish_reason if isinstance(finish_reason, list) else [finish_reason] * len(contents)
    choices: list[dict[str, Any]] = [
        {
            "index": i,
            "message": {
                "role": "assistant",
                "content": content,
                "refusal": refusal,
                "annotations": [],
            },
            "logprobs": None,
            "finish_reason": reason,
        }
        for i, (content, reason) in enumerate(zip(contents, reasons, strict=True))
    ]
    body: dict[str, Any] = {
        "id": "chatcmpl-" + os.urandom(12).hex(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if with_usage:
        completion_tokens = sum(count_tokens(c or refusal or "") + reasoning_tokens
                                for c in contents)
        body["usage"] = usage_body(prompt_tokens, completion_tokens,
                                   min(cached_tokens, prompt_tokens),
                                   reasoning_tokens * len(contents))
    body["service_tier"] = "default"
    body["system_fingerprint"] = SYSTEM_FINGERPRINT
    return body


def structured_values(call: Call, seed: int) -> list[Any]:
    """The JSON value each choice answers a structured request with: an instance of the
    schema (deterministic by seed, prompt and choice), or ``{"reply": ...}`` without one."""
    if call.schema is None:
        return [{"reply": reply_for(call.prompt)}] * call.n
    return [instance_for(call.schema, rng_for(seed, call.prompt, index))
            for index in range(call.n)]


def success_reply(call: Call, model: str, seed: int = 0, *, cached_tokens: int = 0,
                  reasoning_tokens: int = 0) -> Reply:
    """The normal answer: ``n`` copies of :func:`reply_for`, or for a structured request
    one JSON value per choice, cut at the request's token cap, which (as OpenAI's does)
    covers reasoning and visible tokens together."""
    cap = call.max_tokens
    if cap is not None:
        reasoning_tokens = min(reasoning_tokens, cap)
        cap -= reasoning_tokens
    if call.structured:
        texts = [dumps(value).decode() for value in structured_values(call, seed)]
    else:
        texts = [reply_for(call.prompt)] * call.n
    cut_texts = [truncate_to_tokens(text, cap) for text in texts]
    body = completion_body(model, call.prompt_tokens, [text for text, _ in cut_texts],
                           ["length" if cut else "stop" for _, cut in cut_texts],
                           cached_tokens=cached_tokens, reasoning_tokens=reasoning_tokens)
    return Reply(200, body, completion=True)
