"""One run of a prepared job: dispatch the pending rows to workers, stop on
request, then write the results.

The order is what makes the guarantees hold:

1. ``batcher.plan.preflight`` has checked the job, the input and the endpoint
   before any request, so a mistake costs nothing (exit 2).
2. The checkpoint is open (lock, torn-line repair, index of its keys); rows
   whose request it already answers are reused, not sent.
3. The input streams through a bounded queue to a fixed set of workers; each
   row travels ``batcher.plan.pipeline`` and is journaled under its request key
   before its worker takes the next row.
4. Only when every row has an outcome are the results written in input
   order, atomically (``batcher.plan.finish``).

A stop request (Ctrl-C, SIGTERM) lets in-flight requests finish for a short
grace period, then cancels them; rows not journaled are simply sent again
by the next run.

What a row means (its key, its request, the results' layout, the price, the
budget) is ``batcher.plan``'s, the same for every driver; the path of one row
is ``batcher.plan.pipeline``'s; how a run is asked to stop,
``batcher.online.stopping``'s. What is left here is how requests travel on one
machine: a queue, workers and the journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

import numpy as np

from batcher.errors import ApiError, Interrupted
from batcher.limits.pacing import Clock, RateLimiter, Sleep
from batcher.online.stopping import RunControl, signals_handled
from batcher.plan.budgets import budget_reached, open_budget
from batcher.plan.finish import RunReport, write_results_file
from batcher.plan.pipeline import Sender, Sending, attempt_row, first_cause
from batcher.plan.preflight import Prepared, prepare
from batcher.plan.rows import PendingRow, Rejection, RowRequest, SharedRequests
from batcher.progress import Progress, RunStats
from batcher.records import SOURCE_REUSED, SOURCE_SENT, SOURCE_SHARED, SOURCES, RowResult
from batcher.store.checkpoint import Checkpoint
from batcher.store.keys import KEY_BYTES
from batcher.store.unsettled import Unsettled

# Kept importable from here, where every run starts: prepare, the run's options and
# report, the control a notebook stops it with.
__all__ = ["Run", "RunControl", "RunOptions", "RunReport", "Runtime", "SenderFactory",
           "prepare"]

SenderFactory = Callable[[int], AbstractAsyncContextManager[Sender]]
"""Opens the run's one sender (one connection pool) for a given concurrency."""


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
    wait: bool = True  # mode: batch: poll until done, or submit and return


@dataclass
class Runtime:
    """The injectable parts: time and randomness."""

    clock: Clock = time.monotonic
    wall: Callable[[], float] = time.time  # when a row finished, as recorded
    sleep: Sleep = asyncio.sleep
    rng: random.Random = field(default_factory=random.Random)


_DONE = None


class Run:
    """Sends one prepared job's pending rows and records every outcome."""

    def __init__(self, prepared: Prepared, senders: SenderFactory, checkpoint: Checkpoint,
                 options: RunOptions, runtime: Runtime) -> None:
        self.prepared = prepared
        self.job = prepared.job
        self._senders = senders
        self._checkpoint = checkpoint
        self._options = options
        self._runtime = runtime
        self._streak = prepared.identical_failures("the checkpoint is kept")
        self.stats = RunStats(total_rows=prepared.row_count)
        self._shared = SharedRequests() if self.job.duplicates == "share" else None
        # Each row's key and where its answer came from, for the results (17 bytes a row).
        self._keys = np.zeros((prepared.row_count, KEY_BYTES), dtype=np.uint8)
        self._sources = np.zeros(prepared.row_count, dtype=np.uint8)
        self._progress: Progress | None = None
        self._stop_signal: int | None = None
        self._stop_event: asyncio.Event | None = None
        self._work_future: asyncio.Future[None] | None = None
        self._budget = open_budget(prepared, checkpoint, fresh=options.fresh)

    # -- public ---------------------------------------------------------------------------

    async def execute(self) -> RunReport:
        """Send every pending row, then write the results (raises on abort/stop)."""
        self._stop_event = asyncio.Event()
        if self._options.control is not None:
            self._options.control.attach(self, asyncio.get_running_loop())
        self._progress = Progress(self.stats, enabled=self._options.progress,
                                  bar=self._options.bar, label=self.job.name)
        try:
            with signals_handled(self.request_stop, enabled=self._options.handle_signals):
                await self._dispatch()
                self._progress.close()
                if self._budget is not None and self._budget.reached:
                    raise budget_reached(self.prepared, self._budget, self._checkpoint)
                written = write_results_file(self.prepared, self._checkpoint, self._keys,
                                             self._sources)
                # A signal during that synchronous write is queued on the loop's
                # wakeup pipe. Three loop turns deliver it to request_stop: one
                # reads the pipe, one runs the handler, and this task is resumed
                # ahead of each (it is first in the ready queue every turn).
                for _ in range(3):
                    await asyncio.sleep(0)
                if self._stopping:
                    raise self._interrupted(
                        f"while writing the results; {written.path} is complete")
        finally:
            self._progress.close()
            if self._budget is not None and isinstance(self._budget.ledger, Unsettled):
                self._budget.ledger.close()
        return RunReport(self.stats, written.rows, written.failed_rows, written.path,
                         results_rewritten=written.rewritten, tally=written.tally,
                         price=self.prepared.online_price)

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

    @property
    def _halted(self) -> bool:
        """Stopping, or out of budget: either way nothing more is sent."""
        return self._stopping or (self._budget is not None and self._budget.reached)

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
        queue: asyncio.Queue[RowRequest | None] = asyncio.Queue(maxsize=concurrency * 2)
        runtime = self._runtime
        limiter = RateLimiter(self.job.limits.requests_per_minute,
                              self.job.limits.tokens_per_minute, runtime.clock, runtime.sleep)
        try:
            async with (self._senders(concurrency) as sender, asyncio.TaskGroup() as group):
                sending = self.prepared.sending(sender, limiter, self.stats, runtime.sleep,
                                                runtime.rng, stopping=lambda: self._halted,
                                                budget=self._budget)
                group.create_task(self._produce(queue, concurrency))
                for _ in range(concurrency):
                    group.create_task(self._work(queue, sending))
        except BaseExceptionGroup as group:
            # One worker's abort cancels the rest; report the cause, not the cancellations.
            raise first_cause(group) from None

    async def _produce(self, queue: asyncio.Queue[RowRequest | None], workers: int) -> None:
        assert self._progress is not None
        reused, sent, shared = (SOURCES.index(name) for name in (SOURCE_REUSED, SOURCE_SENT,
                                                                  SOURCE_SHARED))
        for plan in self.prepared.plans(self._checkpoint):
            if self._halted:
                break  # stop reading the input too, not just sending
            end = plan.start + len(plan.keys)
            self._keys[plan.start:end] = plan.keys
            self._sources[plan.start:end] = reused
            self._progress.reuse(plan.reused)
            for row in plan.pending:
                if self._halted:
                    break
                self._sources[row.position] = sent
                request = self.prepared.request(row)
                if isinstance(request, RowResult):
                    # The input's fault: reported, never stored (see batcher.plan.finish).
                    self._progress.update(row.position, request)
                    continue
                if self._shared is not None:
                    state = self._shared.arrive(row)
                    if state is not None:
                        self._sources[row.position] = shared
                        if isinstance(state, tuple):  # its twin's answer is stored already
                            self._share(row, self._checkpoint.record_at(state))
                        continue
                await queue.put(request)
        for _ in range(workers):
            await queue.put(_DONE)

    async def _work(self, queue: asyncio.Queue[RowRequest | None], sending: Sending) -> None:
        while (request := await queue.get()) is not _DONE:
            if self._halted:
                continue  # drain without sending: the next run picks these rows up
            outcome = await attempt_row(request, sending)
            if outcome is None:
                continue
            self._journal(request, outcome.result, outcome.failure)
            self._streak.record(outcome)

    def _journal(self, request: RowRequest, result: RowResult,
                 failure: ApiError | Rejection | None) -> None:
        """Store the outcome under the row's key, and under the keys of the
        identical rows waiting for it, in one write."""
        result.finished_at = round(self._runtime.wall(), 3)
        assert self._progress is not None
        waiting = self._shared.waiting(request.request_hash) if self._shared else []
        place = self._checkpoint.append(
            [(request.key, request.position), *((row.key, row.position) for row in waiting)],
            result)
        self._progress.update(request.position, result)
        for row in waiting:
            self._progress.update(row.position, result, shared=True)
        if self._shared is not None:
            self._shared.stored(request.request_hash, place)

    def _share(self, row: PendingRow, result: RowResult) -> None:
        assert self._progress is not None
        self._checkpoint.append([(row.key, row.position)], result)
        self._progress.update(row.position, result, shared=True)
