"""Which fault a request gets, and what each fault looks like on the wire.

Faults come from two places:

* a marker in the last user message: ``[[fault:KIND]]`` faults every attempt
  at that prompt; ``[[fault:KIND*N]]`` only its first N attempts. With several
  markers the first one that applies to the current attempt wins, so
  ``[[fault:429*1]] [[fault:500*2]]`` gives 429, then 500, then a reply;
* :class:`~batcher.mock_server.config.FaultRule` entries in the config,
  applied by request count (``first_n``) or by chance (``rate``, seeded).

A marker beats a rule. ``drop`` and ``stall`` change how the app answers, not
what it says, so the app handles those two itself; :func:`render_fault`
builds the reply for every other kind. Bodies copy real traffic as recorded
in the wire reference (OpenAI, Azure, vLLM, llama.cpp).
"""

from __future__ import annotations

import random
import re

from .calls import Call
from .config import FAULT_KINDS, FaultRule, MockConfig
from .ratelimit import RATE_LIMITS_URL, go_duration, retry_headers
from .replies import reply_for
from .responses import Reply, completion_body, dumps, error_body, invalid_key_body

_MARKER = re.compile(r"\[\[fault:([A-Za-z0-9_]+)(?:\*(\d+))?\]\]")
_MARKER_PREFIX = "[[fault:"
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


class UnknownFault(ValueError):
    """A prompt carries a ``[[fault:...]]`` marker naming no known fault."""

    def __init__(self, kind: str) -> None:
        known = ", ".join(sorted(FAULT_KINDS))
        super().__init__(f"Unknown mock fault {kind!r} in a [[fault:...]] marker; known: {known}.")


class FaultPlanner:
    """Decide the fault for each admitted request; stateful, owned by the event loop."""

    def __init__(self, rules: list[FaultRule], seed: int) -> None:
        self._rules = list(rules)
        self._seed = seed
        self.reset()

    def reset(self) -> None:
        """Forget attempt counts, restart request numbering and reseed the RNG."""
        self._rng = random.Random(self._seed)
        self._attempts: dict[str, int] = {}
        self._requests = 0

    def choose(self, prompt: str) -> str | None:
        """Return the fault kind for this attempt at ``prompt``, or None for a normal reply."""
        self._requests += 1
        by_rule = self._from_rules()
        return self._from_markers(prompt) or by_rule

    def _from_rules(self) -> str | None:
        chosen: str | None = None
        for rule in self._rules:
            # Draw for every rule on every request so one rule's outcome never
            # shifts the random stream another rule sees.
            draw = self._rng.random() if rule.rate else 1.0
            if chosen is None and (self._requests <= rule.first_n or draw < rule.rate):
                chosen = rule.kind
        return chosen

    def _from_markers(self, prompt: str) -> str | None:
        if _MARKER_PREFIX not in prompt:
            return None
        markers: list[tuple[str, str]] = _MARKER.findall(prompt)
        for kind, _ in markers:
            if kind not in FAULT_KINDS:
                raise UnknownFault(kind)
        if not markers:
            return None
        attempt = self._attempts.get(prompt, 0) + 1
        self._attempts[prompt] = attempt
        for kind, count in markers:
            if not count or attempt <= int(count):
                return kind
        return None


def _error(status: int, body: object, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, body, headers=headers or {})


def render_fault(
    kind: str, call: Call, model: str, config: MockConfig, sent_key: str | None
) -> Reply:
    """Build the reply for ``kind`` (any fault except ``drop`` and ``stall``)."""
    wait = config.fault_retry_after_s
    rate_limited = error_body(
        f"Rate limit reached for {model} in organization org-mock on requests per min (RPM): "
        f"Limit {_FAULT_LIMIT}, Used {_FAULT_LIMIT}, Requested 1. "
        f"Please try again in {go_duration(wait)}. Visit {RATE_LIMITS_URL} to learn more.",
        "requests",
        None,
        "rate_limit_exceeded",
    )
    overloaded = error_body(_OVERLOADED, "service_unavailable_error", None, "server_is_overloaded")
    n = call.n
    text = reply_for(call.prompt)
    match kind:
        case "429":
            return _error(429, rate_limited, retry_headers(wait))
        case "429_bare":
            return Reply(429, rate_limited, ratelimit_headers=False)
        case "flex_429":
            # service_tier "flex" when capacity is short: a 429 that is not billed and
            # not a quota verdict. The wording and code are inferred; no real body is
            # recorded in the wire reference. No retry-after: the client backs off itself.
            body = error_body(_FLEX_UNAVAILABLE, "server_error", None, "resource_unavailable")
            return _error(429, body)
        case "quota":
            return _error(429, error_body(_QUOTA, "insufficient_quota", None, "insufficient_quota"))
        case "credit":
            body = error_body(_CREDIT, "insufficient_quota", None, "credit_balance_exhausted")
            return _error(429, body)
        case "401":
            return _error(401, invalid_key_body(sent_key, echo=config.echo_key_in_errors))
        case "403":
            body = error_body(
                "Country, region, or territory not supported",
                "request_forbidden",
                None,
                "unsupported_country_region_territory",
            )
            return _error(403, body)
        case "400":
            body = error_body(
                "Invalid 'messages': the mock server rejected this request as instructed.",
                "invalid_request_error",
                "messages",
            )
            return _error(400, body)
        case "context":
            message = (
                "This model's maximum context length is 8192 tokens. However, your messages "
                f"resulted in {max(8193, call.prompt_tokens)} tokens. "
                "Please reduce the length of the messages."
            )
            body = error_body(
                message, "invalid_request_error", "messages", "context_length_exceeded"
            )
            return _error(400, body)
        case "404":
            message = f"The model `{model}` does not exist or you do not have access to it."
            return _error(
                404, error_body(message, "invalid_request_error", None, "model_not_found")
            )
        case "422":
            message = "Unprocessable Entity: the request could not be processed."
            return _error(422, error_body(message, "invalid_request_error"))
        case "500":
            return _error(500, error_body(_SERVER_ERROR, "server_error"))
        case "502_html":
            return Reply(502, _BAD_GATEWAY_HTML.encode(), content_type="text/html")
        case "503":
            return _error(503, overloaded, retry_headers(wait))
        case "503_bare":
            return _error(503, overloaded)
        case "llama_loading":
            body = {"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}}
            return _error(503, body)
        case "vllm_401":
            return _error(401, {"error": "Unauthorized"})
        case "detail_500":
            return _error(500, {"detail": "Internal error"})
        case "azure_429":
            return _error(
                429, {"error": {"code": "429", "message": _AZURE_429}}, retry_headers(wait)
            )
        case "azure_filter":
            return _error(400, _AZURE_FILTER)
        case "malformed":
            whole = dumps(completion_body(model, call.prompt_tokens, [text], "stop"))
            return Reply(200, whole[: len(whole) // 2])
        case "error_200":
            return _error(200, error_body(_SERVER_ERROR, "server_error"))
        case "empty_choices":
            return _error(200, completion_body(model, call.prompt_tokens, [], "stop"))
        case "no_usage":
            body = completion_body(model, call.prompt_tokens, [text] * n, "stop", with_usage=False)
            return Reply(200, body, completion=True)
        case "null_content_refusal":
            body = completion_body(model, call.prompt_tokens, [None] * n, "stop", refusal=_REFUSAL)
            return Reply(200, body, completion=True)
        case "content_filter":
            body = completion_body(model, call.prompt_tokens, [None] * n, "content_filter")
            return Reply(200, body, completion=True)
        case "huge":
            body = completion_body(model, call.prompt_tokens, ["x" * HUGE_REPLY_CHARS] * n,
                                   "stop")
            return Reply(200, body, completion=True)
        case "length":
            half = text[: len(text) // 2]
            body = completion_body(model, call.prompt_tokens, [half] * n, "length")
            return Reply(200, body, completion=True)
    raise ValueError(f"render_fault: {kind!r} is not a renderable fault")
