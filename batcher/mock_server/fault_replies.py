"""What each fault looks like on the wire: one table, the source of the list of kinds.

``FAULTS`` maps every fault kind to the function that builds its reply, so a
kind cannot be listed without a reply or rendered without being listed.
``drop`` and ``stall`` map to None: they change how the app answers (it closes
the connection, or waits), not what it says, so the app handles those two
itself. Bodies copy real traffic as recorded in the wire reference (OpenAI,
Azure, vLLM, llama.cpp) and LiteLLM's proxy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .calls import Call
from .instances import violate
from .limit_replies import RATE_LIMITS_URL, go_duration, retry_headers
from .replies import reply_for
from .responses import (
    Reply,
    completion_body,
    dumps,
    error_body,
    invalid_key_body,
    structured_values,
)

HUGE_REPLY_CHARS = 16 << 20
"""The ``huge`` fault's reply: a runaway 16 MiB answer, for clients that cap bodies."""

_SERVER_ERROR = "The server had an error while processing your request. Sorry about that!"
_QUOTA = (
    "You exceeded your current quota, please check your plan and billing details. For more "
    "information on this error, read the docs: "
    "https://platform.openai.com/docs/guides/error-codes/api-errors."
)
_CREDIT = (
    "Your credit balance is too low to access the API. Please go to Plans & Billing to "
    "upgrade or purchase credits."
)
_OVERLOADED = "The engine is currently overloaded, please try again later."
_BAD_GATEWAY_HTML = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>cloudflare</center>\r\n"
    "</body>\r\n</html>\r\n"
)
_AZURE_429 = (
    "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version "
    "2024-10-21 have exceeded call rate limit of your current OpenAI S0 pricing tier. "
    "Please retry after 1 second. Please go here: https://aka.ms/oai/quotaincrease if you "
    "would like to further increase the default rate limit."
)
_AZURE_FILTER = {
    "error": {
        "message": (
            "The response was filtered due to the prompt triggering Azure OpenAI's content "
            "management policy. Please modify your prompt and retry. To learn more about our "
            "content filtering policies please read our documentation: "
            "https://go.microsoft.com/fwlink/?linkid=2198766"
        ),
        "type": None,
        "param": "prompt",
        "code": "content_filter",
        "status": 400,
        "innererror": {
            "code": "ResponsibleAIPolicyViolation",
            "content_filter_result": {
                "hate": {"filtered": False, "severity": "safe"},
                "jailbreak": {"filtered": False, "detected": False},
                "self_harm": {"filtered": False, "severity": "safe"},
                "sexual": {"filtered": False, "severity": "safe"},
                "violence": {"filtered": True, "severity": "medium"},
            },
        },
    }
}
_FLEX_UNAVAILABLE = (
    "Resource Unavailable: flex processing has no capacity for this request right now. "
    "Please retry later or use service_tier 'auto'."
)
_REFUSAL = "I'm sorry, but I can't help with that. [simulated refusal]"
_FAULT_LIMIT = 500
"""The RPM quoted in a ``429`` fault's message; no real limit is involved."""


@dataclass(frozen=True, slots=True)
class FaultContext:
    """What a fault's reply may depend on."""

    call: Call
    model: str
    retry_after_s: float  # MockConfig.fault_retry_after_s
    sent_key: str | None
    echo_key: bool  # MockConfig.echo_key_in_errors
    seed: int = 0  # MockConfig.seed: structured answers are drawn from it


Render = Callable[[FaultContext], Reply]


def _rate_limited(fault: FaultContext) -> dict[str, Any]:
    return error_body(
        f"Rate limit reached for {fault.model} in organization org-mock on requests per min "
        f"(RPM): Limit {_FAULT_LIMIT}, Used {_FAULT_LIMIT}, Requested 1. Please try again in "
        f"{go_duration(fault.retry_after_s)}. Visit {RATE_LIMITS_URL} to learn more.",
        "requests",
        None,
        "rate_limit_exceeded",
    )


def _overloaded() -> dict[str, Any]:
    return error_body(_OVERLOADED, "service_unavailable_error", None, "server_is_overloaded")


def _context_too_long(fault: FaultContext) -> Reply:
    message = (
        "This model's maximum context length is 8192 tokens. However, your messages "
        f"resulted in {max(8193, fault.call.prompt_tokens)} tokens. "
        "Please reduce the length of the messages."
    )
    body = error_body(message, "invalid_request_error", "messages", "context_length_exceeded")
    return Reply(400, body)


def _litellm_context(fault: FaultContext) -> Reply:
    """LiteLLM wrapping its backend's error: the status again as a string ``code``, the
    backend's own error object printed (as a Python literal) into the message."""
    inner = {"error": {"message": (
        "This model's maximum context length is 8192 tokens. However, your messages "
        f"resulted in {max(8193, fault.call.prompt_tokens)} tokens."),
        "type": "invalid_request_error", "param": "messages",
        "code": "context_length_exceeded"}}
    message = f"litellm.BadRequestError: OpenAIException - Error code: 400 - {inner!r}"
    return Reply(400, {"error": {"message": message, "type": None, "param": None,
                                 "code": "400"}})


def _malformed(fault: FaultContext) -> Reply:
    text = reply_for(fault.call.prompt)
    whole = dumps(completion_body(fault.model, fault.call.prompt_tokens, [text], "stop"))
    return Reply(200, whole[: len(whole) // 2])


def _completion(fault: FaultContext, content: str | None, finish_reason: str,
                **options: Any) -> Reply:
    """A 200 completion with ``n`` copies of ``content``, counted as a completion."""
    body = completion_body(fault.model, fault.call.prompt_tokens, [content] * fault.call.n,
                           finish_reason, **options)
    return Reply(200, body, completion=True)


def _broken_structured(kind: str) -> Render:
    """A 200 whose JSON answer is unusable: single-quoted like a Python dict
    (``bad_json``), cut in half with ``finish_reason: length`` (``truncated_json``),
    or well-formed with the first property of the wrong type (``schema_violation``)."""

    def render(fault: FaultContext) -> Reply:
        call = fault.call
        values = structured_values(call, fault.seed)
        finish = "stop"
        if kind == "schema_violation":
            texts = [dumps(violate(value, call.schema or {})).decode() for value in values]
        elif kind == "bad_json":
            texts = [dumps(value).decode().replace('"', "'") for value in values]
        else:
            texts = [text[: max(1, len(text) // 2)] for text in
                     (dumps(value).decode() for value in values)]
            finish = "length"
        contents: list[str | None] = list(texts)
        body = completion_body(fault.model, call.prompt_tokens, contents, finish)
        return Reply(200, body, completion=True)

    return render


def _half_reply(fault: FaultContext) -> str:
    text = reply_for(fault.call.prompt)
    return text[: len(text) // 2]


FAULTS: dict[str, Render | None] = {
    "429": lambda f: Reply(429, _rate_limited(f), headers=retry_headers(f.retry_after_s)),
    "429_bare": lambda f: Reply(429, _rate_limited(f), ratelimit_headers=False),
    # service_tier "flex" when capacity is short: a 429 that is not billed and not a
    # quota verdict. The wording and code are inferred; no real body is recorded in the
    # wire reference. No retry-after: the client backs off itself.
    "flex_429": lambda f: Reply(429, error_body(
        _FLEX_UNAVAILABLE, "server_error", None, "resource_unavailable")),
    "quota": lambda f: Reply(
        429, error_body(_QUOTA, "insufficient_quota", None, "insufficient_quota")),
    "credit": lambda f: Reply(
        429, error_body(_CREDIT, "insufficient_quota", None, "credit_balance_exhausted")),
    "401": lambda f: Reply(401, invalid_key_body(f.sent_key, echo=f.echo_key)),
    "403": lambda f: Reply(403, error_body(
        "Country, region, or territory not supported", "request_forbidden", None,
        "unsupported_country_region_territory")),
    "400": lambda f: Reply(400, error_body(
        "Invalid 'messages': the mock server rejected this request as instructed.",
        "invalid_request_error", "messages")),
    "context": _context_too_long,
    "404": lambda f: Reply(404, error_body(
        f"The model `{f.model}` does not exist or you do not have access to it.",
        "invalid_request_error", None, "model_not_found")),
    "422": lambda f: Reply(422, error_body(
        "Unprocessable Entity: the request could not be processed.", "invalid_request_error")),
    "500": lambda f: Reply(500, error_body(_SERVER_ERROR, "server_error")),
    "502_html": lambda f: Reply(502, _BAD_GATEWAY_HTML.encode(), content_type="text/html"),
    "503": lambda f: Reply(503, _overloaded(), headers=retry_headers(f.retry_after_s)),
    "503_bare": lambda f: Reply(503, _overloaded()),
    "llama_loading": lambda f: Reply(
        503, {"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}}),
    "vllm_401": lambda f: Reply(401, {"error": "Unauthorized"}),
    "detail_500": lambda f: Reply(500, {"detail": "Internal error"}),
    "azure_429": lambda f: Reply(429, {"error": {"code": "429", "message": _AZURE_429}},
                                 headers=retry_headers(f.retry_after_s)),
    "azure_filter": lambda f: Reply(400, _AZURE_FILTER),
    "litellm_context": _litellm_context,
    # LiteLLM without its database: a key other than its master key, and no key at all.
    "litellm_no_db": lambda f: Reply(400, {"error": {
        "message": "No connected db.", "type": "no_db_connection", "param": "None",
        "code": "400"}}),
    "litellm_no_key": lambda f: Reply(500, b"Internal Server Error", content_type="text/plain",
                                      ratelimit_headers=False),
    "malformed": _malformed,
    "error_200": lambda f: Reply(200, error_body(_SERVER_ERROR, "server_error")),
    "empty_choices": lambda f: Reply(
        200, completion_body(f.model, f.call.prompt_tokens, [], "stop")),
    "no_usage": lambda f: _completion(f, reply_for(f.call.prompt), "stop", with_usage=False),
    "null_content_refusal": lambda f: _completion(f, None, "stop", refusal=_REFUSAL),
    "content_filter": lambda f: _completion(f, None, "content_filter"),
    "huge": lambda f: _completion(f, "x" * HUGE_REPLY_CHARS, "stop"),
    "length": lambda f: _completion(f, _half_reply(f), "length"),
    "bad_json": _broken_structured("bad_json"),
    "truncated_json": _broken_structured("truncated_json"),
    "schema_violation": _broken_structured("schema_violation"),
    "drop": None,  # the app closes the connection without answering
    "stall": None,  # the app waits MockConfig.stall_s, then answers normally
}

#: Every fault the server can inject, by name. A ``[[fault:KIND]]`` marker or a
#: :class:`~batcher.mock_server.config.FaultRule` naming anything else is an
#: error, so a typo in a test is loud instead of silently producing a normal reply.
FAULT_KINDS: frozenset[str] = frozenset(FAULTS)


def render_fault(kind: str, fault: FaultContext) -> Reply:
    """The reply for ``kind`` (any fault except ``drop`` and ``stall``)."""
    render = FAULTS[kind]
    if render is None:
        raise ValueError(f"render_fault: {kind!r} is handled by the app, not rendered")
    return render(fault)
