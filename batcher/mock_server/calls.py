"""Turn a chat-completion request body into the few facts the mock needs.

Validation mirrors OpenAI's 400s closely enough that a client's handling of a
bad request can be tested, and no malformed body can crash a handler into a
500. Unknown fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .replies import count_tokens

_PER_MESSAGE_TOKENS = 3
_REPLY_PRIMING_TOKENS = 3
_MAX_N = 128
_BAD_JSON = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
    "using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was "
    "sent was not valid JSON.)"
)


class BadRequest(Exception):
    """The body is not a valid chat-completion request; becomes an OpenAI-style 400."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


@dataclass(frozen=True, slots=True)
class Call:
    """One parsed chat-completion request."""

    model: str
    prompt: str
    """Text of the last user message: the key for replies, faults and stats."""
    n: int
    max_tokens: int | None
    """Output cap: the smaller of ``max_tokens`` and ``max_completion_tokens``."""
    prompt_tokens: int
    charge: int
    """Tokens reserved against TPM at admission: prompt + output cap x n."""


def message_text(content: object, where: str) -> str:
    """Return the text of a message's ``content`` (a string, null, or a list of parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    raise BadRequest(
        f"Invalid type for '{where}': expected a string, an array of content parts or null.",
        where,
        "invalid_type",
    )


def estimate_prompt_tokens(texts: list[str]) -> int:
    """``ceil(chars/4) + 3`` per message, plus 3 priming the reply (tiktoken's overheads)."""
    return sum(count_tokens(t) + _PER_MESSAGE_TOKENS for t in texts) + _REPLY_PRIMING_TOKENS


def _positive_int(body: dict[str, Any], name: str, upper: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"Invalid type for '{name}': expected an integer.", name, "invalid_type")
    if value < 1 or (upper is not None and value > upper):
        bound = f"between 1 and {upper}" if upper is not None else ">= 1"
        raise BadRequest(
            f"Invalid '{name}': expected a value {bound}, but got {value} instead.",
            name,
            "invalid_value",
        )
    return value


def parse_call(raw: bytes, deployment: str | None = None) -> Call:
    """Parse and check a request body; ``deployment`` (Azure) replaces the body's model."""
    try:
        body = json.loads(raw)
    except ValueError:
        raise BadRequest(_BAD_JSON) from None
    if not isinstance(body, dict):
        raise BadRequest(_BAD_JSON)
    model = deployment if deployment is not None else body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("you must provide a model parameter", "model")
    messages = body.get("messages")
    if messages is None:
        raise BadRequest(
            "Missing required parameter: 'messages'.", "messages", "missing_required_parameter"
        )
    if not isinstance(messages, list) or not messages:
        raise BadRequest(
            "Invalid 'messages': expected a non-empty array of messages.",
            "messages",
            "invalid_value",
        )
    if body.get("stream"):
        raise BadRequest("The batcher mock server does not support stream=true.", "stream")

    texts: list[str] = []
    prompt = ""
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(
                f"Invalid type for 'messages[{i}]': expected an object with a 'role'.",
                f"messages[{i}]",
                "invalid_type",
            )
        text = message_text(message.get("content"), f"messages[{i}].content")
        texts.append(text)
        if message["role"] == "user":
            prompt = text

    n = _positive_int(body, "n", _MAX_N) or 1
    caps = [
        cap
        for cap in (_positive_int(body, "max_tokens"), _positive_int(body, "max_completion_tokens"))
        if cap is not None
    ]
    prompt_tokens = estimate_prompt_tokens(texts)
    return Call(
        model=model,
        prompt=prompt,
        n=n,
        max_tokens=min(caps) if caps else None,
        prompt_tokens=prompt_tokens,
        charge=prompt_tokens + (max(caps) if caps else 0) * n,
    )
