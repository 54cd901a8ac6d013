"""The mock server over real loopback HTTP, plus its pure parts (limiter, durations, replies)."""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import math
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from conftest import wait_until
from hypothesis import given
from hypothesis import strategies as st

from batcher.mock_server import FaultRule, MockConfig, MockServer, reply_for
from batcher.mock_server.calls import parse_call
from batcher.mock_server.limit_replies import go_duration
from batcher.mock_server.ratelimit import RateLimiter
from batcher.mock_server.stats import PRESENT

# A warning raised in the server thread (unclosed session, unawaited task...) fails the test.
pytestmark = pytest.mark.filterwarnings("error")

KEY = "sk-mock-test-0123456789abcdef"
REQUEST_ID = re.compile(r"^req_[0-9a-f]{32}$")
GO_DURATION = re.compile(r"^(\d+h)?(\d+m)?(\d+(\.\d+)?s|\d+ms)$")
PACKAGE = Path(__file__).resolve().parent.parent / "batcher" / "mock_server"


@dataclass
class Resp:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def send(
    url: str,
    body: object = None,
    *,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
    method: str = "POST",
) -> Resp:
    """One request with urllib; HTTP errors come back as responses, not exceptions."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return Resp(response.status, response.headers, response.read())
    except urllib.error.HTTPError as error:
        with error:
            return Resp(error.code, error.headers, error.read())


def chat(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}], **extra}


def post(srv: MockServer, prompt: str, *, key: str | None = KEY, **extra: Any) -> Resp:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return send(srv.base_url + "/chat/completions", chat(prompt, **extra), headers=headers)


def contains(actual: Any, expected: Any) -> bool:
    """Whether ``expected`` is a sub-tree of ``actual`` (dict keys recursively, leaves equal)."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(
            k in actual and contains(actual[k], v) for k, v in expected.items()
        )
    return bool(actual == expected)


def sdk(srv: MockServer, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url, api_key=key, max_retries=0, timeout=10)


@pytest.fixture(scope="module")
def srv() -> Iterator[MockServer]:
    """A shared server with generous limits, so every reply carries x-ratelimit headers."""
    config = MockConfig(requests_per_minute=1_000_000, tokens_per_minute=10**9)
    with MockServer(config) as server:
        yield server


# --------------------------------------------------------------------------- success


def test_openai_sdk_parses_a_completion(srv: MockServer) -> None:
    prompt = "Summarize the ticket about the broken kettle, please, in one short line."
    completion = sdk(srv).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}],
    )
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "gpt-4o-mini"
    choice = completion.choices[0]
    assert choice.message.content == reply_for(prompt) == reply_for(prompt, "Be brief.")
    assert choice.message.refusal is None and choice.finish_reason == "stop"
    assert completion.usage is not None
    usage = completion.usage
    assert usage.prompt_tokens == math.ceil(len("Be brief.") / 4) + math.ceil(len(prompt) / 4) + 9
    assert usage.completion_tokens == math.ceil(len(reply_for(prompt)) / 4)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 0


def test_wire_shape_and_headers(srv: MockServer) -> None:
    resp = post(srv, "shape check")
    assert resp.status == 200
    body = resp.json()
    assert list(body) == [
        "id",
        "object",
        "created",
        "model",
        "choices",
        "usage",
        "service_tier",
        "system_fingerprint",
    ]
    assert body["choices"][0] == {
        "index": 0,
        "message": {
            "role": "assistant",
            "content": reply_for("shape check"),
            "refusal": None,
            "annotations": [],
        },
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert set(body["usage"]["prompt_tokens_details"]) == {"cached_tokens", "audio_tokens"}
    assert REQUEST_ID.match(resp.headers["x-request-id"])
    for name in ("requests", "tokens"):
        assert resp.headers[f"x-ratelimit-limit-{name}"].isdigit()
        assert resp.headers[f"x-ratelimit-remaining-{name}"].isdigit()
        assert GO_DURATION.match(resp.headers[f"x-ratelimit-reset-{name}"])


def test_n_choices_and_truncation_at_max_tokens(srv: MockServer) -> None:
    prompt = "a prompt whose reply is longer than three tokens"
    body = post(srv, prompt, n=3).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert {c["message"]["content"] for c in body["choices"]} == {reply_for(prompt)}
    assert body["usage"]["completion_tokens"] == 3 * math.ceil(len(reply_for(prompt)) / 4)

    for cap in ("max_tokens", "max_completion_tokens"):
        body = send(srv.base_url + "/chat/completions", chat(prompt, **{cap: 3})).json()
        assert body["choices"][0]["message"]["content"] == reply_for(prompt)[:12]
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 3


def test_reply_for_is_deterministic_unique_and_marked() -> None:
    one = reply_for("What is the capital of France? Answer in one word only please")
    assert one == reply_for("What is the capital of France? Answer in one word only please")
    assert one.startswith("[simulated] ")
    assert '"What is the capital of France? Answer in ..."' in one
    assert reply_for("prompt a") != reply_for("prompt b")
    assert reply_for("prompt a", system="anything") == reply_for("prompt a")


def test_model_name_override_and_unknown_fields_ignored() -> None:
    with MockServer(MockConfig(model_name="served-model")) as server:
        body = chat("hello", temperature=0, seed=3, some_future_field={"x": 1})
        headers = {"X-Stainless-Retry-Count": "0", "OpenAI-Organization": "org-1"}
        resp = send(server.base_url + "/chat/completions", body, headers=headers)
        assert resp.status == 200 and resp.json()["model"] == "served-model"


# --------------------------------------------------------------------------- bad requests


@pytest.mark.parametrize(
    ("raw", "param", "fragment"),
    [
        (b"{not json", None, "could not parse the JSON body"),
        (b"[1, 2]", None, "could not parse the JSON body"),
        (json.dumps({"model": "m"}).encode(), "messages", "Missing required parameter"),
        (json.dumps({"model": "m", "messages": []}).encode(), "messages", "non-empty"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), "model", "model"),
        (json.dumps(chat("x", n=0)).encode(), "n", "Invalid 'n'"),
        (json.dumps(chat("x", max_tokens="9")).encode(), "max_tokens", "Invalid type"),
    ],
)
def test_invalid_bodies_are_openai_400s(
    srv: MockServer, raw: bytes, param: str | None, fragment: str
) -> None:
    resp = send(srv.base_url + "/chat/completions", raw=raw)
    assert resp.status == 400
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert fragment in error["message"]


def test_unknown_fault_marker_is_a_loud_400(srv: MockServer) -> None:
    resp = post(srv, "[[fault:429x]] typo")
    assert resp.status == 400 and "Unknown mock fault '429x'" in resp.json()["error"]["message"]


# --------------------------------------------------------------------------- faults

OPENAI_SHAPED = {"message", "type", "param", "code"}
ERROR_FAULTS: list[tuple[str, int, dict[str, Any], bool]] = [
    ("429", 429, {"error": {"type": "requests", "code": "rate_limit_exceeded"}}, True),
    ("429_bare", 429, {"error": {"type": "requests", "code": "rate_limit_exceeded"}}, False),
    ("quota", 429, {"error": {"type": "insufficient_quota", "code": "insufficient_quota"}}, False),
    (
        "credit",
        429,
        {"error": {"type": "insufficient_quota", "code": "credit_balance_exhausted"}},
        False,
    ),
    ("401", 401, {"error": {"type": "invalid_request_error", "code": "invalid_api_key"}}, False),
    ("403", 403, {"error": {"type": "request_forbidden"}}, False),
    ("400", 400, {"error": {"param": "messages", "code": None}}, False),
    ("context", 400, {"error": {"param": "messages", "code": "context_length_exceeded"}}, False),
    ("404", 404, {"error": {"type": "invalid_request_error", "code": "model_not_found"}}, False),
    ("422", 422, {"error": {"type": "invalid_request_error"}}, False),
    ("500", 500, {"error": {"type": "server_error", "code": None}}, False),
    ("503", 503, {"error": {"type": "service_unavailable_error"}}, True),
    ("503_bare", 503, {"error": {"type": "service_unavailable_error"}}, False),
    ("error_200", 200, {"error": {"type": "server_error"}}, False),
    ("azure_429", 429, {"error": {"code": "429"}}, True),
    (
        "azure_filter",
        400,
        {"error": {"type": None, "param": "prompt", "code": "content_filter", "status": 400}},
        False,
    ),
]
EXACT_BODIES = [
    (
        "llama_loading",
        503,
        {"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}},
    ),
    ("vllm_401", 401, {"error": "Unauthorized"}),
    ("detail_500", 500, {"detail": "Internal error"}),
]


@pytest.mark.parametrize(("kind", "status", "expected", "retry"), ERROR_FAULTS)
def test_error_faults(
    srv: MockServer, kind: str, status: int, expected: dict[str, Any], retry: bool
) -> None:
    resp = post(srv, f"[[fault:{kind}]] error fault {kind}")
    assert resp.status == status
    assert resp.headers.get_content_type() == "application/json"
    body = resp.json()
    assert contains(body, expected), body
    if not kind.startswith("azure"):
        assert set(body["error"]) == OPENAI_SHAPED
    assert REQUEST_ID.match(resp.headers["x-request-id"])
    if retry:
        assert resp.headers["retry-after-ms"] == "50"  # fault_retry_after_s = 0.05
        assert resp.headers["retry-after"] == "1"
    else:
        assert "retry-after" not in resp.headers and "retry-after-ms" not in resp.headers
    has_ratelimit = "x-ratelimit-limit-requests" in resp.headers
    assert has_ratelimit == (kind != "429_bare")


def test_fault_messages_look_real(srv: MockServer) -> None:
    message = post(srv, "[[fault:429]] msg").json()["error"]["message"]
    assert message.startswith("Rate limit reached for gpt-4o-mini in organization")
    assert "Please try again in 50ms." in message
    assert "sk-mock-***...cdef" in post(srv, "[[fault:401]] x").json()["error"]["message"]
    assert "ResponsibleAIPolicyViolation" in post(srv, "[[fault:azure_filter]] x").body.decode()
    assert "Please retry after 1 second" in post(srv, "[[fault:azure_429]] x").body.decode()


@pytest.mark.parametrize(("kind", "status", "expected"), EXACT_BODIES)
def test_other_servers_error_bodies(
    srv: MockServer, kind: str, status: int, expected: dict[str, Any]
) -> None:
    resp = post(srv, f"[[fault:{kind}]] exact {kind}")
    assert resp.status == status and resp.json() == expected


def test_502_html_and_malformed(srv: MockServer) -> None:
    resp = post(srv, "[[fault:502_html]] gateway")
    assert resp.status == 502 and resp.headers.get_content_type() == "text/html"
    assert b"502 Bad Gateway" in resp.body

    resp = post(srv, "[[fault:malformed]] broken json")
    assert resp.status == 200 and resp.headers.get_content_type() == "application/json"
    assert resp.body.startswith(b'{"id":"chatcmpl-')
    with pytest.raises(json.JSONDecodeError):
        resp.json()


def test_odd_but_valid_completions(srv: MockServer) -> None:
    body = post(srv, "[[fault:empty_choices]] e").json()
    assert body["object"] == "chat.completion" and body["choices"] == []

    prompt = "[[fault:no_usage]] no usage please"
    body = post(srv, prompt).json()
    assert "usage" not in body and body["choices"][0]["message"]["content"] == reply_for(prompt)

    choice = post(srv, "[[fault:null_content_refusal]] r").json()["choices"][0]
    assert choice["message"]["content"] is None and isinstance(choice["message"]["refusal"], str)
    assert choice["finish_reason"] == "stop"

    choice = post(srv, "[[fault:content_filter]] f").json()["choices"][0]
    assert choice["message"]["content"] is None and choice["finish_reason"] == "content_filter"

    prompt = "[[fault:length]] cut me short"
    choice = post(srv, prompt).json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert reply_for(prompt).startswith(choice["message"]["content"])


@pytest.mark.parametrize(
    ("kind", "exc", "code"),
    [
        ("400", openai.BadRequestError, None),
        ("context", openai.BadRequestError, "context_length_exceeded"),
        ("401", openai.AuthenticationError, "invalid_api_key"),
        ("403", openai.PermissionDeniedError, "unsupported_country_region_territory"),
        ("404", openai.NotFoundError, "model_not_found"),
        ("422", openai.UnprocessableEntityError, None),
        ("429", openai.RateLimitError, "rate_limit_exceeded"),
        ("quota", openai.RateLimitError, "insufficient_quota"),
        ("500", openai.InternalServerError, None),
        ("503", openai.InternalServerError, "server_is_overloaded"),
    ],
)
def test_openai_sdk_exception_classes(
    srv: MockServer, kind: str, exc: type[openai.APIStatusError], code: str | None
) -> None:
    with pytest.raises(exc) as caught:
        sdk(srv).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": f"[[fault:{kind}]] sdk"}]
        )
    assert caught.value.code == code
    assert caught.value.request_id is not None and REQUEST_ID.match(caught.value.request_id)


def test_openai_sdk_parses_odd_completions(srv: MockServer) -> None:
    client = sdk(srv)

    def ask(prompt: str) -> Any:
        return client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}]
        )

    filtered = ask("[[fault:content_filter]] sdk").choices[0]
    assert filtered.finish_reason == "content_filter" and filtered.message.content is None
    assert ask("[[fault:length]] sdk").choices[0].finish_reason == "length"
    refused = ask("[[fault:null_content_refusal]] sdk").choices[0].message
    assert refused.content is None and refused.refusal
    assert ask("[[fault:no_usage]] sdk").usage is None
    assert ask("[[fault:empty_choices]] sdk").choices == []


def test_scripted_faults_count_attempts_per_prompt() -> None:
    with MockServer(MockConfig()) as server:
        twice = "[[fault:429*2]] rate limited twice"
        assert [post(server, twice).status for _ in range(4)] == [429, 429, 200, 200]
        chain = "[[fault:429*1]] [[fault:500*2]] a chain"
        assert [post(server, chain).status for _ in range(4)] == [429, 500, 200, 200]
        always = "[[fault:503_bare]] always"
        assert [post(server, always).status for _ in range(3)] == [503, 503, 503]
        stats = server.stats.snapshot()
        assert stats["prompts"][twice] == 4 and stats["ok_prompts"][twice] == 2
        assert stats["prompts"][always] == 3 and always not in stats["ok_prompts"]

        assert send(server.root_url + "/_mock/reset", {}).json() == {"reset": True}
        assert server.stats.snapshot()["requests_total"] == 0
        assert post(server, twice).status == 429  # attempt counters were reset too


def test_fault_rules_first_n_and_seeded_rate() -> None:
    with MockServer(MockConfig(faults=[FaultRule("500", first_n=2)])) as server:
        assert [post(server, f"p{i}").status for i in range(4)] == [500, 500, 200, 200]

    def statuses(seed: int) -> list[int]:
        rule = FaultRule("503_bare", rate=0.5)
        with MockServer(MockConfig(faults=[rule], seed=seed)) as server:
            return [post(server, f"seeded {i}").status for i in range(20)]

    first = statuses(7)
    assert first == statuses(7)
    assert set(first) == {200, 503}


def test_fault_config_is_validated() -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        FaultRule("nope")
    with pytest.raises(ValueError, match="between 0 and 1"):
        FaultRule("500", rate=1.5)
    with pytest.raises(ValueError, match="less than one per"):
        MockConfig(requests_per_minute=30, window_s=1)


# --------------------------------------------------------------------------- transport faults


def test_drop_closes_the_connection(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    with MockServer(MockConfig()) as server:

        async def via_aiohttp() -> None:
            async with aiohttp.ClientSession() as session:
                url = server.base_url + "/chat/completions"
                async with session.post(url, json=chat("[[fault:drop]] gone")) as response:
                    await response.read()

        with pytest.raises(aiohttp.ServerDisconnectedError):
            asyncio.run(via_aiohttp())
        with pytest.raises(openai.APIConnectionError):
            sdk(server).chat.completions.create(
                model="m", messages=[{"role": "user", "content": "[[fault:drop]] sdk"}]
            )
        assert post(server, "[[fault:drop*0]] not dropped").status == 200
        stats = server.stats.snapshot()
        assert stats["dropped"] == 2 and stats["by_status"] == {200: 1}
    assert not [r for r in caplog.records if r.name.startswith(("aiohttp", "asyncio"))]


def test_stall_makes_the_client_time_out() -> None:
    with MockServer(MockConfig(stall_s=2)) as server:

        async def stalled() -> None:
            timeout = aiohttp.ClientTimeout(total=0.3)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                url = server.base_url + "/chat/completions"
                async with session.post(url, json=chat("[[fault:stall]] slow")) as response:
                    await response.read()

        started = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            asyncio.run(stalled())
        assert time.monotonic() - started < 1.5


def test_stop_with_a_stalled_request_returns_promptly(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    server = MockServer(MockConfig(stall_s=30)).start()
    outcome: list[object] = []

    def client() -> None:
        try:
            outcome.append(post(server, "[[fault:stall]] forever"))
        except OSError as exc:  # the connection is dropped when the server stops
            outcome.append(exc)

    thread = threading.Thread(target=client)
    thread.start()
    wait_until(lambda: server.stats.in_flight > 0, timeout=5, what="the request in flight")
    assert server.stats.in_flight == 1

    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 3
    thread.join(5)
    assert len(outcome) == 1 and isinstance(outcome[0], OSError)
    assert server.stats.snapshot()["dropped"] == 1
    assert not [r for r in caplog.records if r.name.startswith(("aiohttp", "asyncio"))]


# --------------------------------------------------------------------------- keys


def test_key_styles_and_401_bodies() -> None:
    with MockServer(MockConfig(api_key=KEY)) as server:
        url = server.base_url + "/chat/completions"
        for headers in ({"Authorization": f"Bearer {KEY}"}, {"api-key": KEY}, {"X-Api-Key": KEY}):
            assert send(url, chat("k"), headers=headers).status == 200, headers

        missing = send(url, chat("k"))
        assert missing.status == 401
        assert "didn't provide an API key" in missing.json()["error"]["message"]

        wrong = "sk-wrong-key-9876543210zyxw"
        resp = send(url, chat("k"), headers={"Authorization": f"Bearer {wrong}"})
        error = resp.json()["error"]
        assert resp.status == 401 and error["code"] == "invalid_api_key"
        assert error["type"] == "invalid_request_error" and error["param"] is None
        assert "Incorrect API key provided: sk-wrong***...zyxw." in error["message"]
        assert wrong not in resp.body.decode()

        with pytest.raises(openai.AuthenticationError):
            sdk(server, key=wrong).chat.completions.create(
                model="m", messages=[{"role": "user", "content": "k"}]
            )
        models = server.base_url + "/models"
        assert send(models, headers={"api-key": KEY}, method="GET").status == 200
        assert send(models, method="GET").status == 401


def test_echo_key_in_errors_leaks_the_sent_key() -> None:
    with MockServer(MockConfig(api_key=KEY, echo_key_in_errors=True)) as server:
        wrong = "sk-wrong-key-9876543210zyxw"
        resp = post(server, "k", key=wrong)
        assert resp.status == 401 and wrong in resp.json()["error"]["message"]
        # With the right key, other error messages carry it too.
        assert KEY in post(server, "[[fault:400]] echo").json()["error"]["message"]
        assert KEY in post(server, "[[fault:401]] echo").json()["error"]["message"]
        assert KEY not in post(server, "no error").body.decode()


# --------------------------------------------------------------------------- rate limits


def test_rpm_window_of_one_second() -> None:
    config = MockConfig(requests_per_minute=60, window_s=1)
    with MockServer(config) as server:
        first = post(server, "first")
        assert first.status == 200
        assert first.headers["x-ratelimit-limit-requests"] == "60"
        assert first.headers["x-ratelimit-remaining-requests"] == "0"
        assert "x-ratelimit-limit-tokens" not in first.headers  # no TPM configured

        second = post(server, "second")
        assert second.status == 429
        error = second.json()["error"]
        assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded"
        assert "on requests per min (RPM): Limit 60, Used 1, Requested 1." in error["message"]
        assert "Please try again in " in error["message"]
        wait_ms = int(second.headers["retry-after-ms"])
        assert 0 < wait_ms <= 1000 and second.headers["retry-after"] == "1"
        assert GO_DURATION.match(second.headers["x-ratelimit-reset-requests"])
        assert second.headers["x-ratelimit-remaining-requests"] == "0"

        time.sleep(wait_ms / 1000 + 0.05)
        assert post(server, "third").status == 200  # the advertised wait is enough
        assert server.stats.snapshot()["by_status"] == {200: 2, 429: 1}


def test_tpm_charges_max_tokens_at_admission() -> None:
    config = MockConfig(tokens_per_minute=600, ratelimit_headers=True)
    with MockServer(config) as server:
        # "x": 1 token + 3 per message + 3 priming = 7; charge 7 + 500.
        first = post(server, "x", max_tokens=500)
        assert first.status == 200
        assert first.headers["x-ratelimit-limit-tokens"] == "600"
        assert first.headers["x-ratelimit-remaining-tokens"] == "93"

        second = post(server, "x", max_tokens=500)
        assert second.status == 429
        error = second.json()["error"]
        assert error["type"] == "tokens"
        assert "tokens per min (TPM): Limit 600, Used 507, Requested 507." in error["message"]
        assert 58 <= int(second.headers["retry-after"]) <= 60

        assert post(server, "x", max_tokens=86).status == 200  # 93 left; refusals cost none
        too_large = post(server, "x", max_completion_tokens=1000)
        assert too_large.status == 429 and "retry-after" not in too_large.headers
        assert "Request too large" in too_large.json()["error"]["message"]


def test_ratelimit_headers_can_be_switched_off() -> None:
    with MockServer(MockConfig(requests_per_minute=600, ratelimit_headers=False)) as server:
        resp = post(server, "quiet")
        assert resp.status == 200 and "x-ratelimit-limit-requests" not in resp.headers


def test_limiter_arithmetic_on_an_explicit_clock() -> None:
    limiter = RateLimiter(60, None, 1.0)
    assert limiter.admit(0.0, 10).admitted
    refused = limiter.admit(0.25, 10)
    assert refused.rejection is not None
    # The refused request took a slot too, so the wait runs to its own expiry.
    assert refused.rejection.retry_after_s == pytest.approx(1.0)
    assert not limiter.admit(1.0, 10).admitted  # early retry: refused again, and counted
    assert limiter.admit(2.0, 10).admitted

    tokens = RateLimiter(None, 600, 60.0)
    assert tokens.admit(0.0, 500).admitted
    refused = tokens.admit(1.0, 200)
    assert refused.rejection is not None and refused.rejection.kind == "tokens"
    assert refused.rejection.retry_after_s == pytest.approx(59.0)
    assert tokens.admit(2.0, 100).admitted
    too_large = tokens.admit(3.0, 601)
    assert too_large.rejection is not None and too_large.rejection.retry_after_s is None
    assert tokens.headers(3.0) == {
        "x-ratelimit-limit-tokens": "600",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "59s",
    }
    assert tokens.admit(60.0, 500).admitted  # the first 500 expired at t=60


def test_tpm_charge_counts_n_and_the_larger_cap() -> None:
    body = chat("x", n=3, max_tokens=10, max_completion_tokens=20)
    call = parse_call(json.dumps(body).encode())
    assert call.prompt_tokens == 7 and call.max_tokens == 10 and call.charge == 7 + 20 * 3


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.0004, "1ms"),
        (0.12, "120ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (26.604, "26.604s"),
        (60, "1m0s"),
        (360, "6m0s"),
        (85656.648, "23h47m36.648s"),
    ],
)
def test_go_duration(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text


def _parse_go_duration(text: str) -> float:
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|h|m|s)", text))


@given(st.floats(min_value=0, max_value=10**6, allow_nan=False))
def test_go_duration_round_trips_to_the_millisecond(seconds: float) -> None:
    text = go_duration(seconds)
    assert GO_DURATION.match(text)
    assert seconds <= _parse_go_duration(text) + 1e-6 < seconds + 0.001 + 1e-6


# --------------------------------------------------------------------------- routes and stats


def test_routes(srv: MockServer) -> None:
    assert post(srv, "v1").status == 200
    bare = send(srv.root_url + "/chat/completions", chat("bare")).json()
    assert bare["choices"][0]["message"]["content"] == reply_for("bare")
    assert send(srv.root_url + "/openai/v1/chat/completions", chat("azure v1")).status == 200
    models = send(srv.base_url + "/models", method="GET")
    assert models.status == 200 and models.json()["object"] == "list"
    assert send(srv.root_url + "/health", method="GET").json() == {"status": "ok"}
    unknown = send(srv.base_url + "/nope", method="GET")
    assert unknown.status == 404
    assert unknown.json()["error"]["message"] == "Invalid URL (GET /v1/nope)"


def test_azure_deployment_route() -> None:
    with MockServer(MockConfig(api_key=KEY)) as server:
        client = openai.AzureOpenAI(
            azure_endpoint=server.root_url, api_key=KEY, api_version="2024-10-21", max_retries=0
        )
        completion = client.chat.completions.create(
            model="my-deployment", messages=[{"role": "user", "content": "azure hello"}]
        )
        assert completion.model == "my-deployment"
        assert completion.choices[0].message.content == reply_for("azure hello")
        stats = server.stats.snapshot()
        path = "/openai/deployments/my-deployment/chat/completions?api-version=2024-10-21"
        assert stats["paths_seen"][-1] == path
        assert stats["headers_seen"][-1]["api-key"] == PRESENT

        url = server.root_url + "/openai/deployments/my-deployment/chat/completions"
        resp = send(url, {"messages": [{"role": "user", "content": "x"}]}, headers={"api-key": KEY})
        assert resp.status == 404
        assert resp.json() == {"error": {"code": "404", "message": "Resource not found"}}


def test_stats_counters_and_endpoints() -> None:
    with MockServer(MockConfig(latency_s=0.3)) as server:
        threads = [threading.Thread(target=post, args=(server, f"c{i}")) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        post(server, "[[fault:500]] counted")
        send(server.root_url + "/health", method="GET")  # not counted
        stats = server.stats.snapshot()
        assert stats["requests_total"] == 5
        assert stats["by_status"] == {200: 4, 500: 1}
        assert stats["max_in_flight"] >= 2 and stats["in_flight"] == 0
        assert stats["prompts"]["c0"] == 1 and stats["ok_prompts"]["c0"] == 1
        assert stats["headers_seen"][-1]["authorization"] == f"Bearer {PRESENT}"
        assert stats["paths_seen"][-1] == "/v1/chat/completions"

        over_http = send(server.root_url + "/_mock/stats", method="GET").json()
        assert over_http["requests_total"] == 5 and over_http["by_status"] == {"200": 4, "500": 1}
        send(server.root_url + "/_mock/reset", {})
        assert server.stats.snapshot()["prompts"] == {}


# --------------------------------------------------------------------------- lifecycle


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "example.com", ""])
def test_refuses_non_loopback_hosts(host: str) -> None:
    with pytest.raises(ValueError, match="not a loopback address"):
        MockConfig(host=host)
    config = MockConfig()
    config.host = host  # mutated after validation: start() checks again
    with pytest.raises(ValueError, match="not a loopback address"):
        MockServer(config).start()


def test_localhost_binds_ipv4_loopback() -> None:
    with MockServer(MockConfig(host="localhost")) as server:
        assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
        assert post(server, "local").status == 200


def test_start_failure_is_raised_and_stop_is_idempotent() -> None:
    with MockServer() as first:
        clash = MockServer(MockConfig(port=first.port))
        with pytest.raises(RuntimeError, match="failed to start"):
            clash.start()
    first.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_forever_prints_its_url_and_stops_on_signals(sig: signal.Signals) -> None:
    code = "from batcher.mock_server import MockConfig, serve_forever; serve_forever(MockConfig())"
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=PACKAGE.parent.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.fullmatch(
            r"mock server listening on (http://127\.0\.0\.1:\d+/v1) \(replies are simulated\)\n",
            line,
        )
        assert match, line
        assert send(match.group(1) + "/chat/completions", chat("cli")).status == 200
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert stderr == ""


def test_imports_nothing_from_the_rest_of_batcher() -> None:
    allowed = set(sys.stdlib_module_names) | {"aiohttp"}
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                ok = top in allowed or name.startswith("batcher.mock_server")
                assert ok, f"{path.name} imports {name}"
