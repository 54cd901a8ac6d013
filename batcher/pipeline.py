"""The path one row travels, top to bottom: read → render → limit → send →
classify → journal.

- **read, render**: :func:`unfinished_rows` turns input record batches into
  rendered rows, skipping what the checkpoint already holds as ``ok``;
- **request**: :func:`row_request` makes a row's request body (or, for a row
  that cannot be sent, its error outcome);
- **limit, send, classify**: :func:`attempt_row` waits for the row's turn
  under the rate limits, sends it through a :class:`Sender`, classifies the
  reply or error and retries under the policy until it has an
  :class:`Outcome`;
- **journal**: the caller appends the outcome to the checkpoint before
  taking the next row (the runner's workers do; see ``batcher.runner``).

These are plain functions over narrow parts (a sender, a limiter, a policy,
a clock), so the CLI's runner, other run modes and tests use them alike. A
test drives them with :class:`FunctionSender`, a plain function from
request to response, in the way of httpx's ``MockTransport``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
import pyarrow as pa

from batcher.budget import Budget, Hold
from batcher.checkpoint import Checkpoint
from batcher.client import Response
from batcher.config import Job
from batcher.errors import ApiError, RunAborted, Verdict
from batcher.limits import OutputEstimate, RateLimiter, Sleep
from batcher.pricing import Price, Usage
from batcher.progress import INPUT_ERROR_CLASS, RunStats
from batcher.prompts import PromptRenderer, RenderedRow
from batcher.records import STATUS_OK, RowResult
from batcher.retry import RetryPolicy
from batcher.wire import (
    Completion,
    classify_error,
    parse_completion,
    parse_rate_limits,
    request_body,
)


class Sender(Protocol):
    """What the pipeline needs of a client: one request body in, one reply out.

    ``send`` raises :class:`batcher.errors.ApiError` (already classified) for
    any failure; ``batcher.client.ChatClient`` is the real one.
    """

    async def send(self, body: bytes) -> Response: ...


Validator = Callable[[Completion], str | None]
"""Checks a reply: returns why it is unacceptable (the row is tried again,
as after a transient error), or None to accept it."""


@dataclass(slots=True)
class RowRequest:
    """One row, ready to send."""

    position: int
    body: bytes
    prompt_tokens_estimate: int


@dataclass(slots=True)
class Outcome:
    """How a row ended: its result, and the last error when it failed."""

    result: RowResult
    failure: ApiError | None = None


# -- read, render ------------------------------------------------------------------------------


def unfinished_rows(batches: Iterable[pa.RecordBatch], renderer: PromptRenderer,
                    checkpoint: Checkpoint | None) -> Iterator[RenderedRow]:
    """Every row of ``batches`` the checkpoint does not hold as ``ok``,
    rendered; a batch that is all done is skipped without rendering it."""
    position = 0
    for batch in batches:
        start, position = position, position + batch.num_rows
        if checkpoint is not None and checkpoint.count_done(start, position) == batch.num_rows:
            continue
        for row in renderer.render(batch, start):
            if checkpoint is None or not checkpoint.is_done(row.position):
                yield row


def row_request(row: RenderedRow, job: Job) -> RowRequest | RowResult:
    """The row's request, or its error result when it cannot be sent at all."""
    if row.messages is None:
        return RowResult.failed(row.problem or "", 0, INPUT_ERROR_CLASS)
    return RowRequest(row.position, request_body(job.model, row.messages, job.params),
                      row.prompt_tokens_estimate)


# -- limit, send, classify ---------------------------------------------------------------------


def _never() -> bool:
    return False


@dataclass
class Sending:
    """What every attempt of every row in one run shares.

    ``stopping`` is polled between steps: once it is true a row gives up
    without an outcome (it is sent again by the next run). ``validate``, when
    set, is asked about every reply; a rejected reply is retried like a
    transient error and the row fails with the validator's reason when the
    attempts run out.
    """

    sender: Sender
    limiter: RateLimiter
    policy: RetryPolicy
    stats: RunStats
    sleep: Sleep
    rng: random.Random
    max_output_tokens: int | None = None
    n_choices: int = 1
    output_estimate: OutputEstimate = field(default_factory=OutputEstimate)
    stopping: Callable[[], bool] = _never
    validate: Validator | None = None
    price: Price | None = None  # a row's cost_usd; None: no price known
    budget: Budget | None = None  # reserve before each attempt, settle on its reply

    @classmethod
    def for_job(cls, job: Job, sender: Sender, limiter: RateLimiter, stats: RunStats,
                sleep: Sleep, rng: random.Random, **extra: Any) -> Sending:
        """The parts that follow from the job's retry settings and params."""
        policy = RetryPolicy(job.retry.max_attempts, job.retry.base_delay_s,
                             job.retry.max_delay_s)
        return cls(sender, limiter, policy, stats, sleep, rng,
                   max_output_tokens=job.max_output_tokens,
                   n_choices=int(job.params.get("n", 1) or 1), **extra)


async def attempt_row(request: RowRequest, sending: Sending) -> Outcome | None:
    """Send one row until it succeeds, fails for good (with the last error),
    or the run stops or reaches its budget (None). Raises ``RunAborted`` on the
    server's verdict that the whole run must stop (a bad key, no quota)."""
    max_output = sending.max_output_tokens
    attempts = 0
    while True:
        hold = await _reserve(request, sending)
        if sending.budget is not None and hold is None:
            return None  # the budget is reached: the run stops
        if sending.stopping():
            _release(sending.budget, hold)
            return None
        output_guess = max_output if max_output is not None else sending.output_estimate.value
        reservation = await sending.limiter.acquire(
            request.prompt_tokens_estimate + output_guess * sending.n_choices)
        if sending.stopping():
            _release(sending.budget, hold)
            return None
        attempts += 1
        sending.stats.requests += 1
        try:
            response = await sending.sender.send(request.body)
        except ApiError as error:
            _release(sending.budget, hold)
            sending.limiter.observe(parse_rate_limits(error.headers), reservation.tokens)
            failure = error
        else:
            sending.limiter.observe(parse_rate_limits(response.headers), reservation.tokens)
            completion = response.completion
            if completion.completion_tokens is not None:
                sending.output_estimate.observe(completion.completion_tokens)
            sending.limiter.settle(reservation, _charged_tokens(
                completion.prompt_tokens, completion.completion_tokens, max_output,
                sending.n_choices))
            cost = row_cost(sending.price, completion.prompt_tokens,
                            completion.completion_tokens, completion.cached_tokens,
                            completion.reasoning_tokens)
            if sending.budget is not None and hold is not None:
                sending.budget.settle(hold, cost, completion.total_tokens)
            problem = None if sending.validate is None else sending.validate(completion)
            if problem is None:
                return Outcome(_ok_result(completion, attempts, response.latency_s, cost))
            failure = ApiError(Verdict.RETRY, f"reply rejected: {problem}")
        if failure.verdict is Verdict.ABORT:
            raise RunAborted(f"the server refused the run: {failure.message}; the "
                             "checkpoint is kept, fix the cause and run again")
        if failure.is_rate_limit:
            sending.stats.rate_limited += 1
            sending.limiter.on_rate_limited()
        delay = sending.policy.delay_before_retry(attempts, failure, sending.rng)
        if delay is None:
            return Outcome(RowResult.failed(failure.message, attempts, failure.signature),
                           failure)
        await sending.sleep(delay)
        if sending.stopping():
            return None


async def _reserve(request: RowRequest, sending: Sending) -> Hold | None:
    """Hold the attempt's worst case against the budget (None: no budget, or reached).

    The prompt's bound is the request body's length in bytes: every token of
    a byte-level tokenizer is at least one byte, and the body's JSON framing
    outweighs the chat format's few tokens per message.
    """
    budget = sending.budget
    if budget is None:
        return None
    assert sending.max_output_tokens is not None  # a budget requires max_tokens (config)
    prompt = len(request.body)
    output = sending.max_output_tokens * sending.n_choices
    cost = 0.0 if sending.price is None else sending.price.worst_case(prompt, output)
    return await budget.reserve(cost, prompt + output)


def _release(budget: Budget | None, hold: Hold | None) -> None:
    if budget is not None and hold is not None:
        budget.release(hold)


def row_cost(price: Price | None, prompt_tokens: int | None, completion_tokens: int | None,
             cached_tokens: int | None, reasoning_tokens: int | None) -> float | None:
    """A reply's cost as the provider bills it (None: no price, or no usage sent)."""
    if price is None or prompt_tokens is None or completion_tokens is None:
        return None
    return round(price.cost(Usage(prompt_tokens, completion_tokens, cached_tokens or 0,
                                  reasoning_tokens or 0)), 10)


def _ok_result(completion: Completion, attempts: int, latency_s: float,
               cost_usd: float | None) -> RowResult:
    return RowResult(
        reply=completion.reply,
        finish_reason=completion.finish_reason,
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        total_tokens=completion.total_tokens,
        cached_tokens=completion.cached_tokens,
        reasoning_tokens=completion.reasoning_tokens,
        refusal=completion.refusal,
        status=STATUS_OK,
        error=None,
        attempts=attempts,
        latency_s=round(latency_s, 4),
        cost_usd=cost_usd,
    )


def _charged_tokens(prompt: int | None, completion: int | None, max_output: int | None,
                    n_choices: int) -> int | None:
    """Tokens the server counts against TPM: it keeps the whole ``max_tokens``
    reservation, so only the prompt part is reconciled when one is set."""
    if prompt is None:
        return None
    if max_output is not None:
        return prompt + max_output * n_choices
    return None if completion is None else prompt + completion


# -- a sender for tests and embedders ----------------------------------------------------------


Handler = Callable[[dict[str, Any]], tuple[int, Any]]
"""A request body (parsed) in; an HTTP status and a JSON-able reply body out."""


class FunctionSender:
    """A :class:`Sender` that is a plain function, with no socket: the reply is
    read and classified by the same code as a real server's.

    >>> def handler(request):                                   # doctest: +SKIP
    ...     return 200, {"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}]}
    >>> sender = FunctionSender(handler)
    """

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self.requests: list[dict[str, Any]] = []

    async def send(self, body: bytes) -> Response:
        request = orjson.loads(body)
        self.requests.append(request)
        status, reply = self._handler(request)
        payload = reply if isinstance(reply, bytes) else orjson.dumps(reply)
        if status != 200:
            raise classify_error(status, payload, {})
        return Response(parse_completion(payload), 0.0, {})
