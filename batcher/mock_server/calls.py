"""Turn a chat-completion request body into the few facts the mock needs.

Validation mirrors OpenAI's 400s closely enough that a client's handling of a
bad request can be tested, and no malformed body can crash a handler into a
500. Unknown fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .instances import schema_in_prompt
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
    structured: bool = False
    """The request asks for JSON: a ``response_format`` of ``json_schema`` or
    ``json_object``, or a JSON Schema in the prompt."""
    schema: dict[str, Any] | None = None
    """The JSON Schema the answer must follow, when there is one."""
    answer_format: str = "text"
    """How the request asked for its answer: ``text``, ``json_schema``,
    ``json_schema+strict``, ``json_object``, ``json_object+schema`` or
    ``prompt+schema`` (counted in the stats' ``answer_formats``)."""


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
    answer_format, schema = _structured(body.get("response_format"), prompt)
    return Call(
        model=model,
        prompt=prompt,
        n=n,
        max_tokens=min(caps) if caps else None,
        prompt_tokens=prompt_tokens,
        charge=prompt_tokens + (max(caps) if caps else 0) * n,
        structured=answer_format != "text",
        schema=schema,
        answer_format=answer_format,
    )


def _structured(response_format: object, prompt: str) -> tuple[str, dict[str, Any] | None]:
    """How the answer is asked for (see ``Call.answer_format``) and its schema: OpenAI's
    ``json_schema``, llama-cpp-python's ``json_object`` with a ``schema``, or a schema in
    the prompt."""
    if response_format is None or response_format == {"type": "text"}:
        schema = schema_in_prompt(prompt)
        return ("text" if schema is None else "prompt+schema"), schema
    if not isinstance(response_format, dict):
        raise BadRequest("Invalid type for 'response_format': expected an object.",
                         "response_format", "invalid_type")
    kind = response_format.get("type")
    if kind == "json_object":
        schema = response_format.get("schema")
        if isinstance(schema, dict):
            return "json_object+schema", schema
        return "json_object", None
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise BadRequest("Missing required parameter: 'response_format.json_schema.name'.",
                             "response_format.json_schema.name", "missing_required_parameter")
        schema = spec.get("schema")
        label = "json_schema+strict" if spec.get("strict") is True else "json_schema"
        return label, schema if isinstance(schema, dict) else {}
    raise BadRequest(f"Invalid value: '{kind}'. Supported values are: 'text', 'json_object', "
                     "and 'json_schema'.", "response_format.type", "invalid_value")
