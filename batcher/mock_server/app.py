"""The aiohttp application: routes, the key check and the order of decisions.

A chat request goes through: parse body (for stats) -> key check (401) ->
body validation (400) -> rate limits (429, counted toward RPM) -> fault choice
-> ``latency_s`` -> reply. Only admitted requests wait ``latency_s``; refusals
are immediate, like a real gateway's.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from .batch_routes import BatchContext, Dropped, add_batch_routes
from .batches import BatchStore
from .calls import BadRequest, Call, parse_call
from .config import MockConfig
from .fault_replies import FaultContext, render_fault
from .faults import FaultPlanner, UnknownFault
from .ratelimit import RateLimiter
from .responses import Reply, dumps, error_body, invalid_key_body, new_request_id, success_reply
from .sleeper import Sleeper
from .stats import MockStats

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_MAX_BODY_BYTES = 64 * 1024 * 1024
"""aiohttp's 1 MiB default would refuse long prompts that a real API accepts."""


class MockState:
    """Everything the handlers share; lives on the server's event loop."""

    def __init__(self, config: MockConfig, stats: MockStats) -> None:
        self.config = config
        self.stats = stats
        self.limiter = RateLimiter(
            config.requests_per_minute,
            config.tokens_per_minute,
            config.window_s,
            send_headers=config.ratelimit_headers,
            window_kind=config.window_kind,
            remaining_off_by_one=config.remaining_off_by_one,
            scope=config.ratelimit_scope,
            rejection_style=config.rejection_style,
            background_rpm=config.background_rpm,
            background_tokens=config.background_tokens,
            report_limit=config.report_limit,
            now=time.monotonic(),
        )
        self.planner = FaultPlanner(config.faults, config.seed)
        self.sleeper = Sleeper()

    def check_key(self, headers: Mapping[str, str],
                  query: Mapping[str, str]) -> tuple[bool, str | None]:
        """Accept ``Authorization: Bearer``, Azure's ``api-key``, ``X-Api-Key``, or
        an ``api_key`` query parameter (as some gateways take it).

        Returns whether the key matched and the key that was sent (first style
        found), which a 401 message masks or, for leak tests, echoes.
        """
        sent: list[str] = []
        auth = headers.get("Authorization")
        if auth is not None:
            scheme, _, token = auth.partition(" ")
            if scheme.lower() == "bearer":
                sent.append(token.strip())
        sent.extend(v for v in (headers.get("api-key"), headers.get("X-Api-Key"),
                                query.get("api_key")) if v is not None)
        expected = self.config.api_key
        if expected is None:
            return True, sent[0] if sent else None
        for key in sent:
            if hmac.compare_digest(key.encode(), expected.encode()):
                return True, key
        return False, sent[0] if sent else None

    def reset(self) -> None:
        self.stats.reset()
        self.planner.reset()
        self.limiter.reset()


STATE = web.AppKey("mock_state", MockState)


def _with_key(body: object, key: str) -> object:
    """Append the sent key to an error message, as a careless server might."""
    if not isinstance(body, dict):
        return body
    error = body.get("error")
    if not isinstance(error, dict):
        return body
    message = error.get("message")
    if not isinstance(message, str) or key in message:
        return body
    return {**body, "error": {**error, "message": f"{message} (API key sent: {key})"}}


def _respond(
    reply: Reply,
    ratelimit: Mapping[str, str],
    *,
    echo_key: str | None = None,
) -> web.Response:
    """Build the HTTP response; ``echo_key`` leaks that key into any JSON error message."""
    headers = dict(reply.headers)
    if reply.ratelimit_headers:
        headers.update(ratelimit)
    body = reply.body
    if not isinstance(body, bytes):
        if echo_key is not None and reply.status >= 400:
            body = _with_key(body, echo_key)
        body = dumps(body)
    return web.Response(
        status=reply.status, body=body, content_type=reply.content_type, headers=headers
    )


def _json(status: int, body: object) -> web.Response:
    return web.Response(status=status, body=dumps(body), content_type="application/json")


def _drop(request: web.Request) -> web.Response:
    """Close the connection without answering."""
    if request.transport is not None:
        request.transport.close()
    return Dropped()


@web.middleware
async def _observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Stamp ``x-request-id`` on every response and count API traffic in the stats."""
    path = request.path
    if path == "/health" or path.startswith("/_mock/"):
        response = await handler(request)
        response.headers["x-request-id"] = new_request_id()
        return response
    stats = request.app[STATE].stats
    stats.request_started(request.path_qs, request.headers)
    status: int | None = None  # stays None when no response is sent (dropped or cancelled)
    try:
        response = await handler(request)
        if not isinstance(response, Dropped):
            status = response.status
            response.headers["x-request-id"] = new_request_id()
        return response
    except web.HTTPException as exc:  # e.g. 413 from request.read() on a huge body
        status = exc.status
        raise
    except Exception:
        status = 500  # aiohttp answers any other exception with a 500
        raise
    finally:
        stats.request_finished(status)


async def _chat(request: web.Request, deployment: str | None) -> web.Response:
    state = request.app[STATE]
    config = state.config
    raw = await request.read()
    parsed: Call | BadRequest
    try:
        parsed = parse_call(raw, deployment)
        state.stats.record_prompt(parsed.prompt)
        state.stats.record_answer_format(parsed.answer_format)
    except BadRequest as exc:
        parsed = exc

    limiter = state.limiter
    now = time.monotonic()
    key_ok, sent_key = state.check_key(request.headers, request.query)
    echo = sent_key if config.echo_key_in_errors else None
    if not key_ok:
        body = invalid_key_body(sent_key, echo=config.echo_key_in_errors)
        return _respond(Reply(401, body), limiter.headers(now), echo_key=echo)
    if isinstance(parsed, BadRequest):
        body = error_body(parsed.message, "invalid_request_error", parsed.param, parsed.code)
        return _respond(Reply(400, body), limiter.headers(now), echo_key=echo)
    call = parsed

    model = config.model_name or call.model
    ratelimit: Mapping[str, str] = {}
    if limiter.enabled:
        verdict = limiter.admit(now, call.charge)
        ratelimit = verdict.headers
        if verdict.rejection is not None:
            headers = limiter.rejection_headers(verdict.rejection)
            body = limiter.error_body(model, verdict.rejection)
            return _respond(Reply(429, body, headers=headers), ratelimit, echo_key=echo)

    try:
        kind = state.planner.choose(call.prompt)
    except UnknownFault as exc:
        body = error_body(str(exc), "invalid_request_error")
        return _respond(Reply(400, body), ratelimit, echo_key=echo)

    if config.latency_s and await state.sleeper.sleep(config.latency_s):
        return _drop(request)
    if kind == "drop":
        return _drop(request)
    if kind == "stall":
        if await state.sleeper.sleep(config.stall_s):
            return _drop(request)
        kind = None

    if kind is None:
        reply = success_reply(call, model, config.seed, cached_tokens=config.cached_tokens,
                              reasoning_tokens=config.reasoning_tokens)
    else:
        fault = FaultContext(call, model, config.fault_retry_after_s, sent_key,
                             config.echo_key_in_errors, config.seed)
        reply = render_fault(kind, fault)
    if reply.completion:
        state.stats.record_ok(call.prompt)
    return _respond(reply, ratelimit, echo_key=echo)


async def _chat_completions(request: web.Request) -> web.Response:
    return await _chat(request, None)


async def _azure_deployment(request: web.Request) -> web.Response:
    """Azure's classic route: the deployment names the model; ``api-version`` is required."""
    if "api-version" not in request.query:
        return _json(404, {"error": {"code": "404", "message": "Resource not found"}})
    return await _chat(request, request.match_info["deployment"])


async def _models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    key_ok, sent_key = state.check_key(request.headers, request.query)
    if not key_ok:
        body = invalid_key_body(sent_key, echo=state.config.echo_key_in_errors)
        return _respond(Reply(401, body), {})
    model = state.config.model_name or "mock-model"
    entry = {"id": model, "object": "model", "created": 0, "owned_by": "batcher-mock"}
    return _json(200, {"object": "list", "data": [entry]})


async def _health(request: web.Request) -> web.Response:
    return _json(200, {"status": "ok"})


async def _stats(request: web.Request) -> web.Response:
    state = request.app[STATE]
    limiter = state.limiter
    background = {"admitted": limiter.background_admitted, "dropped": limiter.background_dropped}
    admitted = limiter.admitted
    windows = {"window_s": admitted.window_s, "requests": admitted.requests,
               "tokens": admitted.tokens}
    return _json(200, {**state.stats.public(), "background": background,
                       "admitted_per_window": windows})


async def _reset(request: web.Request) -> web.Response:
    """Clear stats, per-prompt attempt counts, the fault RNG and the rate-limit windows."""
    request.app[STATE].reset()
    return _json(200, {"reset": True})


async def _invalid_url(request: web.Request) -> web.Response:
    """OpenAI's answer to an unknown path or method."""
    message = f"Invalid URL ({request.method} {request.path})"
    return _json(404, error_body(message, "invalid_request_error"))


async def _wake_sleepers(app: web.Application) -> None:
    app[STATE].sleeper.wake_all()


def build_app(config: MockConfig, stats: MockStats) -> web.Application:
    """The mock's aiohttp application, sharing ``stats`` with whoever started it."""
    app = web.Application(middlewares=[_observe], client_max_size=_MAX_BODY_BYTES)
    app[STATE] = MockState(config, stats)
    app.on_shutdown.append(_wake_sleepers)
    router = app.router
    for path in ("/v1/chat/completions", "/chat/completions", "/openai/v1/chat/completions"):
        router.add_post(path, _chat_completions)
    router.add_post("/openai/deployments/{deployment}/chat/completions", _azure_deployment)
    router.add_get("/v1/models", _models)
    state = app[STATE]
    add_batch_routes(app, BatchContext(BatchStore(config, stats), config, state.check_key,
                                       state.sleeper))
    router.add_get("/health", _health)
    router.add_get("/_mock/stats", _stats)
    router.add_post("/_mock/reset", _reset)
    router.add_route("*", "/{tail:.*}", _invalid_url)
    return app
