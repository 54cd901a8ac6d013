"""The path one row travels, top to bottom: read → key → render → limit →
send → classify → journal.

- **read, key, render**: what a job means, made once for every driver by
  ``batcher.plan.jobplan``: each row's request key, looked up in the store
  (rows it already answers are reused, the rest are pending), and a pending
  row's request body (or, for a row that cannot be sent, its error outcome);
- **limit, send, classify**: :func:`attempt_row` waits for the row's turn
  under the rate limits, sends it through a :class:`Sender`, classifies the
  reply or error (what a reply is worth: ``batcher.plan.usage``) and retries
  under the policy until it has an :class:`~batcher.plan.rows.Outcome`;
- **journal**: the caller appends the outcome to the store under the row's
  key before taking the next row (the online runner's workers and the Ray
  worker do), and ``batcher.plan.rows.SharedRequests`` hands it to identical
  rows when the job shares duplicates.

These are plain functions over narrow parts (a sender, a limiter, a policy,
a clock), so every driver and the tests use them alike. A test drives them
with :class:`FunctionSender`, a plain function from request to response, in
the way of httpx's ``MockTransport``.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from batcher.errors import ApiError, BatcherError, RunAborted
from batcher.limits.budget import Budget, Hold
from batcher.limits.pacing import OutputEstimate, Reservation, Sleep
from batcher.limits.retry import Retrying, RetryPolicy
from batcher.plan.rows import Outcome, Rejection, RowRequest
from batcher.plan.usage import Spent, charged_tokens, result_of, row_cost, trusted_usage
from batcher.pricing import Price
from batcher.progress import RunStats
from batcher.records import RowResult
from batcher.structured import ReplyProblem, ReplySchema
from batcher.transport.client import Response
from batcher.transport.failures import classify_error
from batcher.transport.ratelimits import ServerLimits, parse_rate_limits
from batcher.transport.wire import Completion, parse_completion


class Sender(Protocol):
    """What the pipeline needs of a client: one request body in, one reply out.

    ``send`` raises :class:`batcher.errors.ApiError` (already classified) for
    any failure; ``batcher.transport.client.ChatClient`` is the real one.
    """

    async def send(self, body: bytes) -> Response: ...


class Limiter(Protocol):
    """What the pipeline needs of a rate limiter (``batcher.limits.pacing.RateLimiter`` on one
    machine; a worker's share of a cluster's limit in ``batcher.limits.leases``)."""

    async def acquire(self, tokens: int) -> Reservation: ...

    def settle(self, reservation: Reservation, used_tokens: int | None) -> None: ...

    def observe(self, limits: ServerLimits, next_tokens: int,
                sent: Reservation | None = None) -> None: ...

    def on_rate_limited(self, retry_after_s: float | None = None) -> None: ...


Validator = Callable[[Completion], "int | Rejection"]
"""Judges a reply: the index of the choice that is the row's answer, or why no
choice is acceptable. A retryable rejection is asked again at once (the server
did nothing wrong), up to ``Sending.invalid_reply_retries`` times; after that,
or at once when it is not retryable, the row fails with the reply kept."""


def schema_validator(schema: ReplySchema) -> Validator:
    """The validator of a job's ``output.schema``: the first choice that is valid data."""

    def judge(completion: Completion) -> int | Rejection:
        verdict = schema.check_choices(
            [(choice.reply, choice.finish_reason, choice.refusal)
             for choice in completion.choices])
        return verdict if isinstance(verdict, ReplyProblem) else verdict[0]

    return judge


# -- limit, send, classify ---------------------------------------------------------------------


def _never() -> bool:
    return False


@dataclass
class Sending:
    """What every attempt of every row in one run shares.

    ``stopping`` is polled between steps: once it is true a row gives up
    without an outcome (it is sent again by the next run). ``validate``, when
    set, is asked about every reply (see :data:`Validator`); rejected replies
    are asked again up to ``invalid_reply_retries`` times, a budget apart
    from the policy's attempts, which count failed requests.
    """

    sender: Sender
    limiter: Limiter
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
    invalid_reply_retries: int = 0

    @functools.cached_property
    def retrying(self) -> Retrying:
        """The retry engine every attempt of the run decides and sleeps through."""
        return Retrying(self.policy, sleep=self.sleep, rng=self.rng)


async def attempt_row(request: RowRequest, sending: Sending) -> Outcome | None:
    """Send one row until it succeeds, fails for good (with the last error),
    or the run stops or reaches its budget (None). Raises ``RunAborted`` on the
    server's verdict that the whole run must stop (a bad key, no quota)."""
    max_output = sending.max_output_tokens
    invalid_left = sending.invalid_reply_retries
    spent = Spent()
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
        if sending.budget is not None and hold is not None:
            sending.budget.sending(hold, request.key)
        try:
            response = await sending.sender.send(request.body)
        except ApiError as error:
            if error.status is None and sending.budget is not None and hold is not None:
                # No answer (a timeout, a dropped connection): the server may still
                # have run and billed it, so its worst case stays spent, in this run
                # and (through the budget's ledger) the next, until an answer comes.
                sending.budget.settle(hold, None, None)
            else:
                _release(sending.budget, hold, request.key)  # an error answer: not billed
            sending.limiter.observe(parse_rate_limits(error.headers), reservation.tokens,
                                    sent=reservation)
            failure = error
        else:
            sending.limiter.observe(parse_rate_limits(response.headers), reservation.tokens,
                                    sent=reservation)
            completion = trusted_usage(response.completion, len(request.body), max_output,
                                        sending.n_choices)
            if completion.completion_tokens is not None:
                sending.output_estimate.observe(completion.completion_tokens)
            sending.limiter.settle(reservation, charged_tokens(
                completion.prompt_tokens, completion.completion_tokens, max_output,
                sending.n_choices))
            cost = row_cost(sending.price, completion.prompt_tokens,
                            completion.completion_tokens, completion.cached_tokens,
                            completion.reasoning_tokens)
            if sending.budget is not None and hold is not None:
                used = (None if completion.prompt_tokens is None
                        or completion.completion_tokens is None
                        else completion.prompt_tokens + completion.completion_tokens)
                sending.budget.settle(hold, cost, used, request.key)
            spent.add(completion, cost)
            verdict = 0 if sending.validate is None else sending.validate(completion)
            if isinstance(verdict, int):
                return Outcome(result_of(completion, verdict, spent, attempts, sending.n_choices,
                                       latency_s=response.latency_s))
            if verdict.retryable and invalid_left > 0:
                invalid_left -= 1
                continue  # the server did nothing wrong: ask again at once
            return Outcome(result_of(completion, 0, spent, attempts, sending.n_choices,
                                   rejected=verdict), verdict)
        decision = sending.retrying.decide(attempts, failure, answered=sending.stats.ok > 0)
        if decision.aborts:
            raise RunAborted(f"the server refused the run: {failure.message}; the "
                             "checkpoint is kept, fix the cause and run again")
        if failure.is_rate_limit:
            sending.stats.rate_limited += 1
            sending.limiter.on_rate_limited(failure.retry_after_s)
        if decision.delay_s is None:
            return Outcome(RowResult.failed(failure.message, attempts, failure.signature),
                           failure)
        await sending.retrying.sleep(decision.delay_s)
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


def _release(budget: Budget | None, hold: Hold | None, key: bytes | None = None) -> None:
    if budget is not None and hold is not None:
        budget.release(hold, key)


def first_cause(group: BaseExceptionGroup) -> BaseException:
    """The exception that brought a task group of rows down (every driver sends its
    rows in one): a ``BatcherError`` if any, not the cancellations it caused."""
    leaves: list[BaseException] = []

    def collect(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                collect(inner)
        else:
            leaves.append(error)

    collect(group)
    for leaf in leaves:
        if isinstance(leaf, BatcherError):
            return leaf
    return leaves[0]


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
