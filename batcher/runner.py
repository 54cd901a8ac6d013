"""One run of a job: check everything, send what is left, write the results.

The order is what makes the guarantees hold:

1. Check the job, the input (columns, ids) and the endpoint before any
   request, so a mistake costs nothing (exit 2).
2. Open the checkpoint (lock, fingerprint, torn-line repair) and skip the
   rows it already holds as ``ok``.
3. Stream the input through a bounded queue to a fixed set of workers; each
   finished row is journaled before the worker takes its next row.
4. Only when every row has an outcome, write the results in input order,
   atomically.

A stop request (Ctrl-C, SIGTERM) lets in-flight requests finish for a short
grace period, then cancels them; rows not journaled are simply sent again
by the next run.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pyarrow as pa

from batcher.checkpoint import Checkpoint
from batcher.client import ChatClient, Endpoint
from batcher.config import Job
from batcher.errors import (
    ApiError,
    BatcherError,
    DataError,
    Interrupted,
    RunAborted,
    Verdict,
)
from batcher.inputs import InputReader, scan_input
from batcher.limits import Clock, OutputEstimate, RateLimiter, Sleep
from batcher.outputs import attach_results, results_schema, write_results
from batcher.pricing import price_for
from batcher.progress import Progress, RunStats
from batcher.prompts import PromptRenderer, RenderedRow
from batcher.records import RESULT_COLUMNS, STATUS_OK, RowResult
from batcher.redact import Redactor
from batcher.retry import FailureStreak, RetryPolicy
from batcher.wire import parse_rate_limits, request_body

FINGERPRINT_VERSION = 1


class RunControl:
    """Lets code outside the run's event loop (a notebook's main thread, say)
    ask the run to stop, exactly as Ctrl-C would."""

    def __init__(self) -> None:
        self._run: Run | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_before_start: int | None = None

    def attach(self, run: Run, loop: asyncio.AbstractEventLoop) -> None:
        self._run, self._loop = run, loop
        if self._stop_before_start is not None:
            run.request_stop(self._stop_before_start)

    def request_stop(self, signum: int = signal.SIGINT) -> None:
        """Thread-safe: graceful on the first call, immediate on the second."""
        if self._run is None or self._loop is None:
            self._stop_before_start = signum
            return
        with contextlib.suppress(RuntimeError):  # the loop already closed: nothing to stop
            self._loop.call_soon_threadsafe(self._run.request_stop, signum)


@dataclass(frozen=True)
class RunOptions:
    fresh: bool = False
    limit: int | None = None
    progress: bool = True
    bar: bool | None = None  # None: a bar only on a terminal
    grace_s: float = 10.0  # how long in-flight requests may finish after a stop request
    handle_signals: bool = True  # only possible from the main thread
    allow_empty_input: bool = False  # an input with no rows is a valid, empty job
    control: RunControl | None = None


@dataclass
class RunReport:
    """What a finished run did; ``exit_code`` follows the contract."""

    stats: RunStats
    rows: int
    failed_rows: int
    results_path: Path | None

    @property
    def exit_code(self) -> int:
        return 1 if self.failed_rows else 0


@dataclass(frozen=True)
class Estimate:
    rows: int
    pending_rows: int
    prompt_tokens: int
    completion_tokens: int | None  # None when the job sets no max_tokens
    cost_usd: float | None
    note: str | None = None  # something the run would trip over

    def describe(self, model: str) -> str:
        text = (f"{self.rows} rows ({self.pending_rows} to send, "
                f"{self.rows - self.pending_rows} already done); about "
                f"{self.prompt_tokens:,} prompt tokens to send")
        if self.completion_tokens is None:
            text += "; completion tokens unknown (params set no max_tokens)"
        else:
            text += f" and at most {self.completion_tokens:,} completion tokens"
        if self.cost_usd is not None:
            text += f"; at most ${self.cost_usd:,.2f} at {model}'s list price"
        if self.note:
            text += f"\nnote: {self.note}"
        return text


@dataclass
class Prepared:
    """A job checked against its input, ready to run or estimate."""

    job: Job
    reader: InputReader
    rows: int
    fingerprint: str
    limit: int | None

    @property
    def row_count(self) -> int:
        return self.rows if self.limit is None else min(self.rows, self.limit)


def prepare(job: Job, limit: int | None = None, *, allow_empty: bool = False) -> Prepared:
    """Everything that can be checked without sending a request (exit 2 on failure).

    A file with a header (or a schema) and no rows is bad input: a nightly
    export that came out empty should fail loudly, not "succeed" with nothing.
    ``allow_empty`` is for callers where no rows is a normal case (an empty
    DataFrame from the Python API).
    """
    reader = InputReader(job.input.path)
    _check_columns(job, reader)
    summary = scan_input(reader, job.input.id_column, limit)
    if summary.rows == 0 and not allow_empty and limit != 0:
        raise DataError(f"{job.input.path}: the input has no rows (only a header); "
                        "nothing to send")
    return Prepared(job, reader, summary.rows, fingerprint(job, summary.digest), limit)


def fingerprint(job: Job, input_digest: str) -> str:
    """What makes two runs the same job: the input's bytes and everything that
    shapes a request. Limits, retries and the endpoint's URL are left out, so
    a resume may change them."""
    identity = {
        "v": FINGERPRINT_VERSION,
        "input": input_digest,
        "id_column": job.input.id_column,
        "prompt": job.prompt.model_dump(),
        "model": job.model,
        "params": job.params,
    }
    return hashlib.blake2b(orjson.dumps(identity, option=orjson.OPT_SORT_KEYS),
                           digest_size=16).hexdigest()


def estimate(prepared: Prepared, checkpoint: Checkpoint | None = None) -> Estimate:
    """Rows and tokens a run would send (for ``--dry-run``)."""
    job = prepared.job
    prompt_tokens = 0
    pending = 0
    for row in _unfinished_rows(prepared, checkpoint):
        if row.messages is not None:
            pending += 1
            prompt_tokens += row.prompt_tokens_estimate
    max_output = job.max_output_tokens
    completion = None if max_output is None else max_output * pending * int(
        job.params.get("n", 1) or 1)
    price = price_for(job.model)
    cost = None
    if price is not None and completion is not None:
        cost = price.cost(prompt_tokens, completion)
    return Estimate(prepared.row_count, pending, prompt_tokens, completion, cost)


def _unfinished_rows(prepared: Prepared, checkpoint: Checkpoint | None) -> Iterator[RenderedRow]:
    """Every row within the limit that the checkpoint does not hold as ``ok``,
    rendered; a batch that is all done is skipped without rendering it."""
    renderer = PromptRenderer(prepared.job.prompt)
    position = 0
    for batch in _limited(prepared.reader, prepared.limit):
        start, position = position, position + batch.num_rows
        if checkpoint is not None and checkpoint.count_done(start, position) == batch.num_rows:
            continue
        for row in renderer.render(batch, start):
            if checkpoint is None or not checkpoint.is_done(row.position):
                yield row


def _limited(reader: InputReader, limit: int | None) -> Iterator[pa.RecordBatch]:
    seen = 0
    for batch in reader.batches():
        if limit is not None and seen + batch.num_rows > limit:
            batch = batch.slice(0, max(0, limit - seen))
        if batch.num_rows:
            yield batch
        seen += batch.num_rows
        if limit is not None and seen >= limit:
            return


def _check_columns(job: Job, reader: InputReader) -> None:
    names = reader.schema.names
    path = job.input.path
    wanted = [("input.id_column", job.input.id_column)] if job.input.id_column else []
    key = "prompt.column" if job.prompt.column is not None else "prompt.template"
    wanted += [(key, name) for name in job.prompt.columns()]
    for setting, column in wanted:
        if column not in names:
            listed = ", ".join(_printable(name) for name in names) or "none"
            raise DataError(f"{path}: {setting} names column '{_printable(column)}', which the "
                            f"input does not have (columns: {listed})")
    clashes = [name for name in names if name in RESULT_COLUMNS]
    if clashes:
        raise DataError(f"{path}: input column '{clashes[0]}' has the name of a results column; "
                        "rename it in the input")


def _printable(name: str) -> str:
    """A column name fit for a one-line message (line breaks and the like escaped)."""
    return name if name.isprintable() else name.encode("unicode_escape").decode("ascii")


# -- running ---------------------------------------------------------------------------------


@dataclass(slots=True)
class _WorkItem:
    position: int
    body: bytes
    prompt_tokens_estimate: int


_DONE = None


@dataclass
class Runtime:
    """The injectable parts: time, randomness and where the progress goes."""

    clock: Clock = time.monotonic
    sleep: Sleep = asyncio.sleep
    rng: random.Random = field(default_factory=random.Random)


class Run:
    """Sends one prepared job's pending rows and records every outcome."""

    def __init__(self, prepared: Prepared, endpoint: Endpoint, redactor: Redactor,
                 checkpoint: Checkpoint, options: RunOptions, runtime: Runtime) -> None:
        self.prepared = prepared
        self.job = prepared.job
        self._endpoint = endpoint
        self._redactor = redactor
        self._checkpoint = checkpoint
        self._options = options
        self._runtime = runtime
        self._policy = RetryPolicy(self.job.retry.max_attempts, self.job.retry.base_delay_s,
                                   self.job.retry.max_delay_s)
        self._limiter = RateLimiter(self.job.limits.requests_per_minute,
                                    self.job.limits.tokens_per_minute,
                                    runtime.clock, runtime.sleep)
        self._output_estimate = OutputEstimate()
        self._streak = FailureStreak(self.job.retry.stop_after_identical_failures)
        self.stats = RunStats(total_rows=prepared.row_count,
                              already_done=checkpoint.count_done(0, prepared.row_count))
        self._progress: Progress | None = None
        self._stop_signal: int | None = None
        self._stop_event: asyncio.Event | None = None
        self._work_future: asyncio.Future[None] | None = None

    # -- public ---------------------------------------------------------------------------

    async def execute(self) -> RunReport:
        """Send every pending row, then write the results (raises on abort/stop)."""
        self._stop_event = asyncio.Event()
        if self._options.control is not None:
            self._options.control.attach(self, asyncio.get_running_loop())
        self._progress = Progress(self.stats, enabled=self._options.progress,
                                  bar=self._options.bar)
        try:
            with self._signals_handled():
                await self._dispatch()
                self._progress.close()
                report = self._write_results()
                # A signal during that synchronous write is queued on the loop's
                # wakeup pipe; two loop turns deliver it to request_stop.
                for _ in range(2):
                    await asyncio.sleep(0)
                if self._stopping:
                    raise self._interrupted(
                        f"while writing the results; {report.results_path} is complete")
        finally:
            self._progress.close()
        return report

    def request_stop(self, signum: int = signal.SIGINT) -> None:
        """Stop sending new requests; a second request cancels in-flight ones too."""
        if self._stop_event is None:
            return
        if self._stopping and self._work_future is not None:
            self._work_future.cancel()  # impatient second Ctrl-C: no grace period
            return
        self._stop_signal = signum
        self._stop_event.set()

    @property
    def _stopping(self) -> bool:
        return self._stop_event is not None and self._stop_event.is_set()

    # -- dispatch -------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        assert self._stop_event is not None
        work = self._work_future = asyncio.ensure_future(self._send_all())
        stop = asyncio.ensure_future(self._stop_event.wait())
        try:
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            work.cancel()
            stop.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
            raise
        if work.done():
            stop.cancel()
            work.result()
            return
        # Stop requested: let requests already on the wire finish, briefly.
        try:
            await asyncio.wait_for(asyncio.shield(work), self._options.grace_s)
        except (TimeoutError, asyncio.CancelledError):
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
        else:
            with contextlib.suppress(Exception):
                work.result()
        raise self._interrupted(f"{self._checkpoint.rows_recorded} rows are in the checkpoint; "
                                "run the same command again to resume")

    def _interrupted(self, detail: str) -> Interrupted:
        signum = signal.Signals(self._stop_signal or signal.SIGINT)
        return Interrupted(f"stopped by {signum.name}; {detail}", exit_code=128 + int(signum))

    async def _send_all(self) -> None:
        concurrency = self.job.limits.concurrency
        queue: asyncio.Queue[_WorkItem | None] = asyncio.Queue(maxsize=concurrency * 2)
        try:
            async with (ChatClient(self._endpoint, self._redactor, concurrency) as client,
                        asyncio.TaskGroup() as group):
                group.create_task(self._produce(queue, concurrency))
                for _ in range(concurrency):
                    group.create_task(self._work(queue, client))
        except BaseExceptionGroup as group:
            # One worker's abort cancels the rest; report the cause, not the cancellations.
            raise _first_cause(group) from None

    async def _produce(self, queue: asyncio.Queue[_WorkItem | None], workers: int) -> None:
        job = self.job
        for row in _unfinished_rows(self.prepared, self._checkpoint):
            if self._stopping:
                break  # stop reading the input too, not just sending
            if row.messages is None:
                self._finish(row.position, RowResult.failed(row.problem or "", 0))
                continue
            body = request_body(job.model, row.messages, job.params)
            await queue.put(_WorkItem(row.position, body, row.prompt_tokens_estimate))
        for _ in range(workers):
            await queue.put(_DONE)

    async def _work(self, queue: asyncio.Queue[_WorkItem | None], client: ChatClient) -> None:
        while (item := await queue.get()) is not _DONE:
            if self._stopping:
                continue  # drain without sending: the next run picks these rows up
            outcome = await self._attempt_row(item, client)
            if outcome is None:
                continue
            result, failure = outcome
            self._finish(item.position, result)
            if self._streak.record(failure.signature if failure else None):
                raise RunAborted(
                    f"stopped after {self._streak.count} rows in a row failed the same way "
                    f"({failure.message if failure else ''}); fix the job and run again, the "
                    "checkpoint is kept (retry.stop_after_identical_failures sets the count)")

    async def _attempt_row(self, item: _WorkItem, client: ChatClient
                           ) -> tuple[RowResult, ApiError | None] | None:
        """Send one row until it succeeds, fails for good (with the last error),
        or the run stops (None)."""
        max_output = self.job.max_output_tokens
        n_choices = int(self.job.params.get("n", 1) or 1)
        attempts = 0
        while True:
            output_guess = max_output if max_output is not None else self._output_estimate.value
            reservation = await self._limiter.acquire(
                item.prompt_tokens_estimate + output_guess * n_choices)
            if self._stopping:
                return None
            attempts += 1
            self.stats.requests += 1
            try:
                response = await client.complete(item.body)
            except ApiError as error:
                self._limiter.observe(parse_rate_limits(error.headers), reservation.tokens)
                if error.verdict is Verdict.ABORT:
                    raise RunAborted(f"the server refused the run: {error.message}; the "
                                     "checkpoint is kept, fix the cause and run again") from None
                if error.is_rate_limit:
                    self.stats.rate_limited += 1
                    self._limiter.on_rate_limited()
                delay = self._policy.delay_before_retry(attempts, error, self._runtime.rng)
                if delay is None:
                    return RowResult.failed(error.message, attempts), error
                await self._runtime.sleep(delay)
                if self._stopping:
                    return None
                continue
            self._limiter.observe(parse_rate_limits(response.headers), reservation.tokens)
            completion = response.completion
            if completion.completion_tokens is not None:
                self._output_estimate.observe(completion.completion_tokens)
            self._limiter.settle(reservation, _charged_tokens(
                completion.prompt_tokens, completion.completion_tokens, max_output, n_choices))
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
                latency_s=round(response.latency_s, 4),
            ), None

    def _finish(self, position: int, result: RowResult) -> None:
        self._checkpoint.append(position, result)
        assert self._progress is not None
        self._progress.update(result)

    # -- results --------------------------------------------------------------------------

    def _write_results(self) -> RunReport:
        output = self.job.output
        assert output is not None
        schema = results_schema(self.prepared.reader.schema)
        failed = 0

        def batches() -> Iterator[pa.RecordBatch]:
            nonlocal failed
            position = 0
            for batch in _limited(self.prepared.reader, self.prepared.limit):
                records = self._checkpoint.read(position, position + batch.num_rows)
                failed += sum(1 for record in records
                              if record is None or record["status"] != STATUS_OK)
                yield attach_results(batch, records, schema)
                position += batch.num_rows

        rows = write_results(output.path, schema, batches())
        self._checkpoint.sync()
        return RunReport(self.stats, rows, failed, output.path)

    @contextlib.contextmanager
    def _signals_handled(self) -> Iterator[None]:
        if not self._options.handle_signals:
            yield
            return
        loop = asyncio.get_running_loop()
        installed = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, self.request_stop, signum)
                installed.append(signum)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread, or a platform without signal support
        try:
            yield
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)


def _first_cause(group: BaseExceptionGroup) -> BaseException:
    """The exception that brought a task group down: a ``BatcherError`` if any."""
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


def _charged_tokens(prompt: int | None, completion: int | None, max_output: int | None,
                    n_choices: int) -> int | None:
    """Tokens the server counts against TPM: it keeps the whole ``max_tokens``
    reservation, so only the prompt part is reconciled when one is set."""
    if prompt is None:
        return None
    if max_output is not None:
        return prompt + max_output * n_choices
    return None if completion is None else prompt + completion

