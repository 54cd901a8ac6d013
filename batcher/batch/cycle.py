"""``mode: batch``: a job's rows through the provider's Batch API, at half the price.

One command does the whole cycle and is safe to repeat, from cron or by hand:

1. **Plan** (``batcher.batch.shards``). Rows whose request has no ``ok``
   answer in the checkpoint and is not in a batch of this cycle become
   request lines (``custom_id`` is the row's position and request key,
   ``batcher.store.keys``), cut into shard files within the service's
   limits. Each shard is written whole and then recorded in the state file
   before anything is uploaded. The input is keyed once per invocation.
2. **Submit** (``batcher.batch.service``). Each recorded shard without a
   batch id is looked up in the service's batch list first, and only then
   uploaded and created, so a kill never makes a second batch of a shard.
3. **Poll and collect** (``batcher.batch.collect``). Without ``--wait`` the
   command says what is running and exits 0; the next run polls. A batch
   that ends is downloaded and reconciled line by line against its shard.
4. **Finish.** When no batch is open, rows new to the cycle (appended to the
   input meanwhile) go into a new round, and so do unfinished (expired) rows
   unless ``fallback: online`` is set: then every row still not ``ok`` goes
   through the ordinary online run (``batcher.batch.fallback``), which writes
   the results. Otherwise, when no round is left, the results are written
   exactly as online mode writes them.

Every call to the service goes through the retry engine
(``batcher.limits.retry``). The state file (``<checkpoint>.batch/state.json``,
``batcher.batch.state``) is replaced atomically at every step; the folder also
holds the shard files until the cycle ends.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from datetime import UTC, datetime

from batcher.batch.collect import Collector
from batcher.batch.fallback import finish_online
from batcher.batch.service import Service, count
from batcher.batch.shards import BatchPlan, Planner
from batcher.batch.state import BatchState
from batcher.errors import Interrupted
from batcher.limits.retry import Retrying, RetryPolicy
from batcher.online.runner import RunOptions, RunReport, Runtime
from batcher.online.stopping import signals_handled
from batcher.plan.finish import write_results_file
from batcher.plan.paths import work_folder
from batcher.plan.preflight import Prepared
from batcher.progress import RunStats
from batcher.records import RowResult
from batcher.redact import Redactor
from batcher.store.checkpoint import Checkpoint
from batcher.transport.client import BatchClient, ChatClient, Endpoint
from batcher.transport.failures import server_text

_BATCH_CONNECTIONS = 4
_MAX_SAID_CHARS = 1000  # a line of the log, whatever the service put in it


class BatchRun:
    """Drives one job's batch cycle as far as it can go in this invocation."""

    def __init__(self, prepared: Prepared, endpoint: Endpoint, redactor: Redactor,
                 checkpoint: Checkpoint, options: RunOptions, runtime: Runtime, *,
                 say: Callable[[str], None]) -> None:
        self.prepared = prepared
        self.job = prepared.job
        self._spec = prepared.job.batch
        self._endpoint = endpoint
        self._redactor = redactor
        self._checkpoint = checkpoint
        self._options = options
        self._runtime = runtime
        # One line each, secrets masked: the messages quote the service (statuses, ids,
        # validation errors), and a newline in one would forge a line of the log.
        self._say: Callable[[str], None] = lambda text: say(
            server_text(text, redactor.clean, _MAX_SAID_CHARS))
        self._retrying = Retrying(RetryPolicy.from_spec(self.job.retry), sleep=runtime.sleep,
                                  rng=runtime.rng, clock=runtime.clock)
        self.stats = RunStats(total_rows=prepared.row_count)
        self._state = BatchState.load(work_folder(checkpoint.path), self.job.name)
        self._planner = Planner(prepared, self._state, checkpoint, self.stats,
                                self._record, runtime.wall)
        self._collector: Collector | None = None

    async def execute(self) -> RunReport:
        """Submit, poll, collect; finish the results when every batch is done."""
        task = asyncio.ensure_future(self._cycle())
        stopped: list[int] = []

        def stop(signum: int) -> None:
            stopped.append(signum)
            task.cancel()

        with signals_handled(stop, enabled=self._options.handle_signals):
            try:
                return await task
            except asyncio.CancelledError:
                if not stopped:
                    raise
                signum = signal.Signals(stopped[0])
                raise Interrupted(
                    f"stopped by {signum.name}; the batch state is saved and submitted "
                    "batches keep running at the service: run the same command again to "
                    "collect them", exit_code=128 + int(signum)) from None

    async def _cycle(self) -> RunReport:
        """Go as far as this invocation can: finished results, or a "come back" report."""
        connections = max(_BATCH_CONNECTIONS, self.job.limits.concurrency)
        async with ChatClient(self._endpoint, self._redactor, connections) as chat:
            api = BatchClient(chat, max_download_bytes=self._spec.max_download_bytes,
                              transfer_timeout_s=self._spec.transfer_timeout_s)
            service = Service(api, self._retrying, self._state, self._spec.completion_window,
                              clean=self._redactor.clean, say=self._say,
                              wall=self._runtime.wall)
            self._collector = Collector(self.job, service, self._state, self._checkpoint,
                                        self.prepared.price, self.stats,
                                        clean=self._redactor.clean, say=self._say,
                                        wall=self._runtime.wall,
                                        progress=self._options.progress)
            pending = await self._batches(service, self._collector)
            self.stats.reused = self._planner.reused()
            if pending is not None:
                return RunReport(self.stats, 0, 0, None, pending=pending)
            report = await self._finish(chat)
        self._state.discard()
        return report

    async def _batches(self, service: Service, collector: Collector) -> str | None:
        """Submit, poll and collect; the "come back later" message, or None when done."""
        while True:
            await service.submit_planned()
            await collector.poll()
            if self._state.open_shards():
                if not self._options.wait:
                    return self._come_back_message()
                await self._runtime.sleep(self._spec.poll_interval_s)
                continue
            planned = self._planner.plan()
            if not planned:
                return None
            self._say(f"planned {count(len(planned), 'batch file')} with "
                      f"{count(sum(shard.requests for shard in planned), 'request')}")

    def _record(self, name: str, result: RowResult) -> None:
        assert self._collector is not None
        self._collector.record(name, result)

    async def _finish(self, chat: ChatClient) -> RunReport:
        self._checkpoint.refresh()
        missing = self._planner.missing()
        if self._spec.fallback == "online" and missing:
            self._say(f"sending {count(missing, 'row')} online (batch.fallback: online)")
            return await finish_online(self.prepared, chat, self._checkpoint, self._options,
                                       self._runtime, self.stats)
        # Sources: reused (stored before this run) or sent.
        written = write_results_file(self.prepared, self._checkpoint, self._planner.keys)
        return RunReport(self.stats, written.rows, written.failed_rows, written.path,
                         results_rewritten=written.rewritten, tally=written.tally,
                         price=self.prepared.price)

    def _come_back_message(self) -> str:
        shards = self._state.open_shards()
        requests = sum(shard.requests for shard in shards)
        created = [shard.created_at for shard in shards if shard.created_at is not None]
        since = datetime.fromtimestamp(min(created), UTC).strftime("%Y-%m-%d %H:%M UTC") \
            if created else "now"
        return (f"{count(len(shards), 'batch')} ({count(requests, 'request')}) running at "
                f"the service since {since}, answered within {self._spec.completion_window} at "
                "half the online price; run the same command again to collect the results "
                "(or add --wait)")


def describe_plan(plan: BatchPlan) -> str:
    """The dry run's batch line: shards and requests (the estimate's cost is
    already at the Batch API price)."""
    return (f"mode batch: {count(plan.requests, 'request')} in "
            f"{count(plan.shards, 'batch file')}")
