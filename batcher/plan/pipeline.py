"""The path one row travels, top to bottom: read → key → render → limit →
send → classify → journal.

- **read, key**: :func:`plan_batches` turns the input's record batches into
  each row's request key (``batcher.store.keys``) and looks the keys up in the
  store: rows it already answers are reused, the rest are pending;
- **render**: :func:`row_request` makes a pending row's request body (or,
  for a row that cannot be sent, its error outcome);
- **limit, send, classify**: :func:`attempt_row` waits for the row's turn
  under the rate limits, sends it through a :class:`Sender`, classifies the
  reply or error and retries under the policy until it has an
  :class:`Outcome`;
- **journal**: the caller appends the outcome to the store under the row's
  key before taking the next row (the runner's workers do; see
  ``batcher.online.runner``), and :class:`SharedRequests` hands it to identical
  rows when the job shares duplicates.

These are plain functions over narrow parts (a sender, a limiter, a policy,
a clock), so the CLI's runner, other run modes and tests use them alike. A
test drives them with :class:`FunctionSender`, a plain function from
request to response, in the way of httpx's ``MockTransport``.

Longer than most modules on purpose: the whole path of a row reads top to
bottom in one place; each step is a small function or class of its own.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
import orjson

from batcher.config import Job
from batcher.errors import ApiError, RunAborted
from batcher.io.inputs import id_strings
from batcher.limits.budget import Budget, Hold
from batcher.limits.pacing import OutputEstimate, Reservation, Sleep
from batcher.limits.retry import Retrying, RetryPolicy
from batcher.pricing import Price, Usage
from batcher.progress import INPUT_ERROR_CLASS, RunStats
from batcher.prompts import PromptRenderer
from batcher.records import STATUS_ERROR, STATUS_OK, RowResult
from batcher.store.checkpoint import Checkpoint
from batcher.store.keys import RowKeys
from batcher.structured import ReplyProblem, ReplySchema
from batcher.transport.client import Response
from batcher.transport.failures import classify_error
from batcher.transport.ratelimits import ServerLimits, parse_rate_limits
from batcher.transport.wire import Completion, parse_completion, request_body

if TYPE_CHECKING:  # record batches come from batcher.io.inputs; pyarrow is its concern
    import pyarrow as pa


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


class Rejection(Protocol):
    """Why a reply is not acceptable (``batcher.structured.ReplyProblem`` is one)."""

    @property
    def message(self) -> str: ...  # one line, for the results' ``error``
    @property
    def retryable(self) -> bool: ...  # whether asking again may help
    @property
    def signature(self) -> str: ...  # what makes two failed rows fail "the same way"


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


@dataclass(slots=True)
class PendingRow:
    """A row the store holds no ``ok`` answer for."""

    position: int
    key: bytes
    text: str | None  # the user message, or None with the reason in ``problem``
    problem: str | None = None
    request_hash: bytes = b""  # made only when identical requests are shared


@dataclass(slots=True)
class BatchPlan:
    """One input batch, keyed: which of its rows are answered, which pending."""

    start: int
    keys: np.ndarray  # (rows, 16) key bytes, in input order
    pending: list[PendingRow]

    @property
    def reused(self) -> int:
        return len(self.keys) - len(self.pending)


@dataclass(slots=True)
class RowRequest:
    """One row, ready to send."""

    position: int
    key: bytes
    request_hash: bytes
    body: bytes
    prompt_tokens_estimate: int


@dataclass(slots=True)
class Outcome:
    """How a row ended: its result, and the last error when it failed."""

    result: RowResult
    failure: ApiError | Rejection | None = None


# -- read, key, render -------------------------------------------------------------------------


def plan_batches(batches: Iterable[pa.RecordBatch], job: Job, renderer: PromptRenderer,
                 store: Checkpoint | None) -> Iterator[BatchPlan]:
    """Each batch's keys, and its rows the store does not answer with ``ok``."""
    row_keys = RowKeys(job)
    share = job.duplicates == "share"
    start = 0
    for batch in batches:
        prompts = renderer.prompts(batch)
        keys = row_keys.keys(row_ids(batch, start, job), prompts)
        answered = store.answered(keys) if store is not None else np.zeros(len(keys), bool)
        offsets = np.flatnonzero(~answered).tolist()
        hashes = row_keys.request_hashes(prompts) if share and offsets else None
        pending = [PendingRow(start + offset, keys[offset].tobytes(), prompts.texts[offset],
                              prompts.problems.get(offset),
                              b"" if hashes is None else hashes[offset].tobytes())
                   for offset in offsets]
        yield BatchPlan(start, keys, pending)
        start += batch.num_rows


def batch_keys(batches: Iterable[pa.RecordBatch], job: Job, renderer: PromptRenderer
               ) -> Iterator[np.ndarray]:
    """Each batch's row keys, and nothing else."""
    row_keys = RowKeys(job)
    start = 0
    for batch in batches:
        yield row_keys.keys(row_ids(batch, start, job), renderer.prompts(batch))
        start += batch.num_rows


def row_ids(batch: pa.RecordBatch, start: int, job: Job) -> list[str]:
    """The ids that go into the keys: the id column's, or the rows' positions."""
    id_column = job.input.id_column
    if id_column is not None:
        return id_strings(batch.column(id_column))
    return [str(row) for row in range(start, start + batch.num_rows)]


def row_request(row: PendingRow, job: Job, renderer: PromptRenderer) -> RowRequest | RowResult:
    """The row's request, or its error result when it cannot be sent at all."""
    rendered = renderer.rendered(row.position, row.text, row.problem)
    if rendered.messages is None:
        return RowResult.failed(rendered.problem or "", 0, INPUT_ERROR_CLASS)
    return RowRequest(row.position, row.key, row.request_hash,
                      request_body(job.model, rendered.messages, job.request_params),
                      rendered.prompt_tokens_estimate)


class SharedRequests:
    """``duplicates: share``: identical requests in one run are sent once.

    The first row with a request leads (it is sent); rows with the same
    request that come while it is in flight wait for its outcome, and rows
    that come after it is stored take it from the store. Memory: one entry
    per distinct request of the run, so it is opt-in.
    """

    def __init__(self) -> None:
        self._state: dict[bytes, list[PendingRow] | tuple[int, int]] = {}

    def arrive(self, row: PendingRow) -> list[PendingRow] | tuple[int, int] | None:
        """None: the row leads, send it. A list: it waits (now in the list).
        A place: the outcome is stored there already."""
        state = self._state.get(row.request_hash)
        if state is None:
            self._state[row.request_hash] = []
            return None
        if isinstance(state, list):
            state.append(row)
        return state

    def waiting(self, request_hash: bytes) -> list[PendingRow]:
        state = self._state.get(request_hash)
        return state if isinstance(state, list) else []

    def stored(self, request_hash: bytes, place: tuple[int, int]) -> None:
        self._state[request_hash] = place


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

    @classmethod
    def for_job(cls, job: Job, sender: Sender, limiter: Limiter, stats: RunStats,
                sleep: Sleep, rng: random.Random, **extra: Any) -> Sending:
        """The parts that follow from the job's retry settings, params and schema."""
        policy = RetryPolicy.from_spec(job.retry)
        schema = job.output.reply_schema if job.output is not None else None
        if schema is not None:
            extra.setdefault("validate", schema_validator(schema))
            extra.setdefault("invalid_reply_retries", job.retry.invalid_reply_retries)
        return cls(sender, limiter, policy, stats, sleep, rng,
                   max_output_tokens=job.max_output_tokens, n_choices=job.choices, **extra)

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
    spent = _Spent()
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
            completion = _trusted_usage(response.completion, len(request.body), max_output,
                                        sending.n_choices)
            if completion.completion_tokens is not None:
                sending.output_estimate.observe(completion.completion_tokens)
            sending.limiter.settle(reservation, _charged_tokens(
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
                return Outcome(_result(completion, verdict, spent, attempts, sending.n_choices,
                                       latency_s=response.latency_s))
            if verdict.retryable and invalid_left > 0:
                invalid_left -= 1
                continue  # the server did nothing wrong: ask again at once
            return Outcome(_result(completion, 0, spent, attempts, sending.n_choices,
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


def _trusted_usage(completion: Completion, body_bytes: int, max_output: int | None,
                   n_choices: int) -> Completion:
    """The completion, without its usage when that cannot be right: more prompt
    tokens than the request had bytes, more output than ``max_tokens`` allowed,
    parts larger than their whole (negative counts are dropped when parsed). Such
    usage is treated as missing: no cost is made up from it, and a budget keeps
    the request's worst case."""
    prompt, output = completion.prompt_tokens, completion.completion_tokens
    output_bound = None if max_output is None else max_output * n_choices
    plausible = (
        (prompt is None or prompt <= body_bytes)
        and (output is None or output_bound is None or output <= output_bound)
        and (completion.cached_tokens or 0) <= (prompt or 0)
        and (completion.reasoning_tokens or 0) <= (output or 0)
        and (completion.total_tokens is None or output_bound is None
             or completion.total_tokens <= body_bytes + output_bound))
    if plausible:
        return completion
    return dataclasses.replace(completion, prompt_tokens=None, completion_tokens=None,
                               total_tokens=None, cached_tokens=None, reasoning_tokens=None)


def row_cost(price: Price | None, prompt_tokens: int | None, completion_tokens: int | None,
             cached_tokens: int | None, reasoning_tokens: int | None) -> float | None:
    """A reply's cost as the provider bills it (None: no price, or no usage sent)."""
    if price is None or prompt_tokens is None or completion_tokens is None:
        return None
    return round(price.cost(Usage(prompt_tokens, completion_tokens, cached_tokens or 0,
                                  reasoning_tokens or 0)), 10)


@dataclass(slots=True)
class _Spent:
    """Tokens and cost over every reply a row got: a rejected reply asked again costs
    too, so the row's columns add them all up."""

    prompt: int | None = None
    completion: int | None = None
    total: int | None = None
    cost_usd: float | None = None

    def add(self, completion: Completion, cost_usd: float | None) -> None:
        self.prompt = _plus(self.prompt, completion.prompt_tokens)
        self.completion = _plus(self.completion, completion.completion_tokens)
        self.total = _plus(self.total, completion.total_tokens)
        self.cost_usd = _plus(self.cost_usd, cost_usd)


_N = TypeVar("_N", int, float)


def _plus(total: _N | None, more: _N | None) -> _N | None:
    return total if more is None else (more if total is None else total + more)


def _result(completion: Completion, chosen: int, spent: _Spent, attempts: int,
            n_choices: int, *, latency_s: float | None = None,
            rejected: Rejection | None = None) -> RowResult:
    """The row's outcome from its last reply: the chosen choice's text, every choice's
    when the job asks for several, and why it failed when it was ``rejected`` (the
    reply is kept either way)."""
    choice = completion.choices[chosen] if chosen < len(completion.choices) else None
    return RowResult(
        reply=choice.reply if choice else completion.reply,
        finish_reason=choice.finish_reason if choice else completion.finish_reason,
        prompt_tokens=spent.prompt,
        completion_tokens=spent.completion,
        total_tokens=spent.total,
        cached_tokens=completion.cached_tokens,
        reasoning_tokens=completion.reasoning_tokens,
        refusal=choice.refusal if choice else completion.refusal,
        status=STATUS_OK if rejected is None else STATUS_ERROR,
        error=None if rejected is None else rejected.message,
        attempts=attempts,
        latency_s=None if latency_s is None else round(latency_s, 4),
        cost_usd=None if spent.cost_usd is None else round(spent.cost_usd, 10),
        error_class=None if rejected is None else rejected.signature,
        replies=[c.reply for c in completion.choices] if n_choices > 1 else None,
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
