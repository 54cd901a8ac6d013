"""Parsing and classifying real-world response shapes (no network needed)."""

from __future__ import annotations

import orjson
import pytest

from batcher.errors import ApiError, Verdict
from batcher.transport.failures import classify_error
from batcher.transport.ratelimits import parse_retry_after
from batcher.transport.wire import parse_completion


def body(data: object) -> bytes:
    return orjson.dumps(data)


OPENAI_OK = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello", "refusal": None},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29,
              "prompt_tokens_details": {"cached_tokens": 4},
              "completion_tokens_details": {"reasoning_tokens": 2}},
}


def test_parses_openai_completion_with_usage_details() -> None:
    completion = parse_completion(body(OPENAI_OK))
    assert completion.reply == "Hello"
    assert completion.finish_reason == "stop"
    assert (completion.prompt_tokens, completion.completion_tokens, completion.total_tokens) == (
        19, 10, 29)
    assert (completion.cached_tokens, completion.reasoning_tokens) == (4, 2)


def test_missing_usage_gives_nulls_not_a_crash() -> None:
    data = {**OPENAI_OK}
    del data["usage"]
    completion = parse_completion(body(data))
    assert completion.prompt_tokens is None and completion.total_tokens is None


def test_tool_calls_with_null_content_are_kept() -> None:
    data = {**OPENAI_OK, "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None,
        "tool_calls": [{"id": "c1", "type": "function",
                        "function": {"name": "f", "arguments": "{}"}}]}}]}
    completion = parse_completion(body(data))
    assert completion.finish_reason == "tool_calls"
    assert completion.reply is not None and '"name":"f"' in completion.reply


@pytest.mark.parametrize("raw", [
    b'{"id": "x", "choices": [',  # truncated
    body({**OPENAI_OK, "choices": []}),
    body({"error": {"message": "boom", "type": "server_error", "param": None, "code": None}}),
    b"[1, 2]",
])
def test_unusable_200_bodies_are_retryable(raw: bytes) -> None:
    with pytest.raises(ApiError) as caught:
        parse_completion(raw)
    assert caught.value.verdict is Verdict.RETRY


@pytest.mark.parametrize(("status", "data", "verdict"), [
    (401, {"error": {"message": "Incorrect API key", "type": "invalid_request_error",
                     "param": None, "code": "invalid_api_key"}}, Verdict.ABORT),
    (403, {"error": {"message": "Country not supported", "type": "request_forbidden",
                     "param": None, "code": "unsupported_country_region_territory"}},
     Verdict.ABORT),
    (401, {"error": "Unauthorized"}, Verdict.ABORT),  # vLLM
    (429, {"error": {"message": "quota", "type": "insufficient_quota", "param": None,
                     "code": "insufficient_quota"}}, Verdict.ABORT),
    (429, {"error": {"message": "x", "type": "insufficient_quota", "param": None,
                     "code": "credit_balance_exhausted"}}, Verdict.ABORT),
    (429, {"error": {"message": "Rate limit reached", "type": "tokens", "param": None,
                     "code": "rate_limit_exceeded"}}, Verdict.RETRY),
    (429, {"error": {"code": "429", "message": "Please retry after 37 seconds."}},
     Verdict.RETRY),  # Azure
    (400, {"error": {"message": "too long", "type": "invalid_request_error",
                     "param": "messages", "code": "context_length_exceeded"}}, Verdict.ROW_ERROR),
    (400, {"error": {"message": "filtered", "type": None, "param": "prompt",
                     "code": "content_filter", "status": 400,
                     "innererror": {"code": "ResponsibleAIPolicyViolation"}}}, Verdict.ROW_ERROR),
    (404, {"error": {"message": "The model `x` does not exist.", "type": "NotFoundError",
                     "param": "model", "code": 404}}, Verdict.ROW_ERROR),  # vLLM numeric code
    (422, {"detail": [{"loc": ["body"], "msg": "field required"}]}, Verdict.ROW_ERROR),
    (500, {"detail": "Internal error"}, Verdict.RETRY),  # llama.cpp python server
    (503, {"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}},
     Verdict.RETRY),
    (408, None, Verdict.RETRY),
    (409, None, Verdict.RETRY),
])
def test_classification_reads_status_code_and_type(status: int, data: object,
                                                   verdict: Verdict) -> None:
    error = classify_error(status, body(data) if data is not None else b"", {})
    assert error.verdict is verdict
    assert "\n" not in error.message


def test_classification_ignores_message_text() -> None:
    # A message that *talks about* quota does not make an ordinary 429 fatal.
    error = classify_error(429, body({"error": {
        "message": "insufficient_quota exceeded your current quota", "type": "requests",
        "param": None, "code": "rate_limit_exceeded"}}), {})
    assert error.verdict is Verdict.RETRY


def test_html_502_from_a_proxy() -> None:
    error = classify_error(502, b"<html><body><h1>502 Bad Gateway</h1></body></html>",
                           {"content-type": "text/html; charset=utf-8"})
    assert error.verdict is Verdict.RETRY
    assert error.message == "HTTP 502 with a non-JSON body (text/html)"


def test_request_id_and_retry_after_are_read() -> None:
    error = classify_error(429, b"{}", {"x-request-id": "req_1", "retry-after-ms": "250",
                                        "retry-after": "1"})
    assert error.request_id == "req_1"
    assert error.retry_after_s == pytest.approx(0.25)


@pytest.mark.parametrize(("headers", "expected"), [
    ({"retry-after-ms": "1500"}, 1.5),
    ({"retry-after": "2"}, 2.0),
    ({"retry-after": "0.5"}, 0.5),
    ({"retry-after": "Wed, 21 Oct 2015 07:28:10 GMT"}, 10.0),
    ({"retry-after": "soon"}, None),
    ({}, None),
])
def test_retry_after_forms(headers: dict[str, str], expected: float | None) -> None:
    now = 1445412480.0  # 2015-10-21 07:28:00 UTC
    assert parse_retry_after(headers, now=now) == expected
