"""``mode: batch``: a job's rows through the provider's Batch API, at half the price.

One command does the whole cycle and is safe to repeat, from cron or by hand:

1. **Plan.** Rows whose request has no ``ok`` answer in the checkpoint and is
   not in a batch of this cycle become request lines (``custom_id`` is the
   row's position and request key, ``batcher.store.keys``), cut into
   shard files within the service's limits. Each shard is written whole and
   then recorded in the state file before anything is uploaded.
2. **Submit.** For each recorded shard without a batch id, the service's
   batch list is searched first for a batch whose metadata names this job
   and this shard (a kill between creating a batch and recording it must not
   create a second one); only when none exists is the shard uploaded and the
   batch created. Its id is recorded the moment it is known.
3. **Poll.** Without ``--wait`` the command says what is running and exits 0;
   the next run polls. A batch that ends (completed, expired, cancelled or
   failed) is downloaded and reconciled line by line against its shard: every
   request gets exactly one outcome in the checkpoint, stored under its key
   (so the input may change while batches run), or is left unfinished
   (expired) for the next round. Only then is the batch marked collected, so
   a kill during a download just downloads again.
4. **Finish.** When no batch is open, rows new to the cycle (appended to the
   input meanwhile) go into a new round, and so do unfinished (expired) rows
   unless ``fallback: online`` is set: then every row still not ``ok``
   (failed, expired, or in a batch past ``deadline_h``, which is cancelled)
   goes through the ordinary online run, same limits and retries, which
   writes the results. Otherwise, when no round is left, the results are
   written exactly as online mode writes them.

The state file (``<checkpoint>.batch/state.json``, ``batcher.batch.state``) is
replaced atomically at every step; the folder also holds the shard files until
the cycle ends.

Longer than most modules because :class:`BatchRun` is one state machine: its
steps share the state, the checkpoint, the retry verdict and the clock, and read
best in the order above, in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from batcher.batch.lines import Shard, ShardWriter, reconcile, request_line, shard_ids
from batcher.batch.state import (
    COLLECTED,
    BatchState,
    ShardRecord,
    custom_id,
    key_of,
    position_of,
)
from batcher.errors import (
    ApiError,
    Interrupted,
    RunAborted,
    Verdict,
)
from batcher.limits.retry import RetryPolicy
from batcher.online.runner import Run, RunOptions, RunReport, Runtime
from batcher.online.stopping import signals_handled
from batcher.plan.finish import write_results_file
from batcher.plan.paths import work_folder
from batcher.plan.pipeline import Sender
from batcher.plan.preflight import Prepared
from batcher.plan.usage import row_cost
from batcher.pricing import Price
from batcher.progress import RunStats
from batcher.records import RowResult
from batcher.redact import Redactor
from batcher.store.checkpoint import Checkpoint
from batcher.store.keys import shared_digest
from batcher.transport.batchwire import Batch, shown
from batcher.transport.client import BatchClient, ChatClient, Endpoint
from batcher.transport.wire import server_text

T = TypeVar("T")
FINAL_STATUSES = frozenset({"completed", "expired", "cancelled", "failed"})
LIST_MARGIN_S = 600.0
"""How far before a shard was planned the batch list is searched (clock skew)."""
MAX_LIST_PAGES = 1000
"""Pages of the batch list read at most while looking for a shard's batch (100,000 batches)."""
_BATCH_CONNECTIONS = 4
_SHOWN_VALIDATION_ERRORS = 5
_MAX_SAID_CHARS = 1000  # a line of the log, whatever the service put in it


# -- planning -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchPlan:
    """What a dry run of ``mode: batch`` would submit."""

    requests: int
    shards: int


def starts_new_shard(lines: int, size: int, line: int, max_requests: int,
                     max_bytes: int) -> bool:
    return lines > 0 and (lines >= max_requests or size + line > max_bytes)


def plan_shards(prepared: Prepared, checkpoint: Checkpoint | None) -> BatchPlan:
    """Count the requests and shard files a run would submit now (nothing is written)."""
    job = prepared.job
    spec = job.batch
    requests = shards = lines = size = 0
    for row in (row for plan in prepared.plans(checkpoint) for row in plan.pending):
        request = prepared.request(row)
        if isinstance(request, RowResult):
            continue
        body = request.body
        length = len(request_line(custom_id(row.position, row.key), body))
        if length > spec.max_bytes_per_file:
            continue
        if starts_new_shard(lines, size, length, spec.max_requests_per_file,
                            spec.max_bytes_per_file):
            lines = size = 0
        if lines == 0:
            shards += 1
        lines += 1
        size += length
        requests += 1
    return BatchPlan(requests, shards)


# -- the run ------------------------------------------------------------------------------


class BatchRun:
    """Drives one job's batch cycle as far as it can go in this invocation."""

    def __init__(self, prepared: Prepared, endpoint: Endpoint, redactor: Redactor,
                 checkpoint: Checkpoint, options: RunOptions, runtime: Runtime, *,
                 say: Callable[[str], None], wall: Callable[[], float] = time.time) -> None:
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
        self._wall = wall
        self._policy = RetryPolicy(self.job.retry.max_attempts, self.job.retry.base_delay_s,
                                   self.job.retry.max_delay_s)
        self.stats = RunStats(total_rows=prepared.row_count)
        self.stats.reused = prepared.row_count - sum(
            len(plan.pending) for plan in prepared.plans(checkpoint))
        self.kinds: Counter[str] = Counter()
        self._state = BatchState.load(work_folder(checkpoint.path), self.job.name)

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
            pending = await self._batches(api)
            if pending is not None:
                return RunReport(self.stats, 0, 0, None, pending=pending)
            report = await self._finish(chat)
        self._state.discard()
        return report

    async def _batches(self, api: BatchClient) -> str | None:
        """Submit, poll and collect; the "come back later" message, or None when done."""
        state = self._state
        while True:
            await self._submit_planned(api)
            await self._poll(api)
            if state.open_shards():
                if not self._options.wait:
                    return self._come_back_message()
                await self._runtime.sleep(self._spec.poll_interval_s)
                continue
            if self._plan():
                continue
            return None

    # -- plan -------------------------------------------------------------------------------

    def _plan(self) -> bool:
        """Write shard files for the rows no batch of this cycle holds; True if any."""
        state = self._state
        # Requests in a batch of this cycle, by key, are not planned again; only
        # rows new to the cycle are (appended to the input meanwhile, say). The
        # ones a batch left unfinished go in a new batch too, unless the online
        # fallback is to finish them (with the failed ones) in _finish.
        resubmit = self._spec.fallback == "none"
        claimed: set[str] = set()
        for shard in state.shards:
            claimed.update(name.split("-", 1)[1] for name in shard_ids(state.folder / shard.file))
            if resubmit and shard.status == COLLECTED:
                claimed.difference_update(name.split("-", 1)[1] for name in shard.unfinished)
        self._remove_strays()
        job = self.job
        spec = self._spec
        salt = f"{shared_digest(job).hex()}:{os.urandom(8).hex()}"
        writer = ShardWriter(state.folder, salt, spec.max_requests_per_file,
                             spec.max_bytes_per_file)
        planned_at = self._wall()
        before = len(state.shards)

        def record(shard: Shard | None) -> None:
            if shard is None:
                return
            state.shards.append(ShardRecord(shard.digest, shard.path.name,
                                            len(shard.custom_ids), planned_at))
            state.save()

        self._checkpoint.refresh()  # answers collected by this run count as answered
        try:
            for plan in self.prepared.plans(self._checkpoint):
                for row in plan.pending:
                    if row.key.hex() in claimed:
                        continue
                    request = self.prepared.request(row)
                    if isinstance(request, RowResult):
                        # The input's fault: counted, never stored (see batcher.plan.finish).
                        self.stats.record(row.position, request)
                        continue
                    name = custom_id(row.position, row.key)
                    line = request_line(name, request.body)
                    if not writer.fits(line):
                        self._record(name, RowResult.failed(
                            f"the request ({len(line):,} bytes) is larger than "
                            "batch.max_bytes_per_file", 0, "batch request too large"))
                        continue
                    record(writer.add(name, line))
            record(writer.close())
        finally:
            writer.discard()
        planned = state.shards[before:]
        if planned:
            total = sum(shard.requests for shard in planned)
            self._say(f"planned {_count(len(planned), 'batch file')} with "
                      f"{_count(total, 'request')}")
        return bool(planned)

    def _remove_strays(self) -> None:
        """Shard files no state entry names: left by a kill before they were recorded."""
        folder = self._state.folder
        if not folder.exists():
            return
        known = {shard.file for shard in self._state.shards}
        for entry in folder.iterdir():
            stray_shard = entry.name.startswith("shard-") and entry.name not in known
            if stray_shard or entry.name.startswith(".shard-"):
                with contextlib.suppress(OSError):
                    entry.unlink()

    # -- submit -----------------------------------------------------------------------------

    async def _submit_planned(self, api: BatchClient) -> None:
        state = self._state
        waiting = [shard for shard in state.shards if shard.batch_id is None and shard.open]
        if not waiting:
            return
        found = await self._find_existing(api, waiting)
        for shard in waiting:
            batch = found.get(shard.digest)
            if batch is not None:
                self._say(f"found batch {batch.id} already created for "
                          f"{shard.file}; not creating another")
            else:
                batch = await self._create(api, shard)
            self._adopt(shard, batch)

    async def _create(self, api: BatchClient, shard: ShardRecord) -> Batch:
        """Upload (unless done) and create; a create that may have reached the
        service is looked up before it is tried again."""
        state = self._state
        if shard.file_id is None:
            path = state.folder / shard.file
            shard.file_id = await self._with_retries(lambda: api.upload(path), "upload")
            state.save()
        file_id = shard.file_id
        metadata = {"batcher_job": self.job.name[:512], "batcher_shard": shard.digest,
                    "batcher_requests": str(shard.requests)}
        attempts = 0
        while True:
            attempts += 1
            try:
                return await api.create(file_id, self._spec.completion_window, metadata)
            except ApiError as error:
                delay = self._verdict(error, attempts, "create a batch")
            await self._runtime.sleep(delay)
            existing = (await self._find_existing(api, [shard])).get(shard.digest)
            if existing is not None:
                return existing

    def _adopt(self, shard: ShardRecord, batch: Batch) -> None:
        shard.batch_id = batch.id
        shard.created_at = batch.created_at if batch.created_at is not None else self._wall()
        shard.status = batch.status
        self._state.save()
        self._say(f"submitted batch {batch.id} ({_count(shard.requests, 'request')})")

    async def _find_existing(self, api: BatchClient, shards: list[ShardRecord]
                             ) -> dict[str, Batch]:
        """Batches of this job whose ``batcher_shard`` is one of ``shards``', newest first.

        A list that does not move on (the server ignores ``after``, or pages in a
        circle) is an error, not an endless loop: without the whole list batcher
        cannot tell whether a shard's batch exists, and a second one is paid twice.
        """
        wanted = {shard.digest for shard in shards}
        since = min(shard.planned_at for shard in shards) - LIST_MARGIN_S
        found: dict[str, Batch] = {}
        after: str | None = None
        cursors: set[str] = set()
        for _ in range(MAX_LIST_PAGES):
            page = await self._with_retries(functools.partial(api.list, after), "list batches")
            for listed in page.batches:
                if (listed.job != self.job.name[:512] or listed.shard not in wanted
                        or listed.shard in found):
                    continue
                try:  # this shard's batch: never created twice, so it must be usable
                    found[listed.shard] = api.parse(listed.raw)
                except ApiError as error:
                    raise RunAborted(f"the batch list holds this job's batch, but: "
                                     f"{error.message}; the batch state is kept") from None
            oldest = min((listed.created_at for listed in page.batches
                          if listed.created_at is not None), default=None)
            if (not page.has_more or not page.batches or wanted <= found.keys()
                    or (oldest is not None and oldest < since)):
                return found
            if page.last_id is None:
                return found
            if page.last_id in cursors:
                raise RunAborted(
                    "the service's batch list does not move on: asked for the batches after "
                    f"{shown(page.last_id, self._redactor.clean)}, it answered that one again "
                    "(it ignores the `after` cursor); batcher cannot tell whether this "
                    "job's batch already exists, so it creates none (a second one would be "
                    "billed twice); the batch state is kept, run again once the service "
                    "pages its batch list")
            cursors.add(page.last_id)
            after = page.last_id
        raise RunAborted(f"the service's batch list goes on past {MAX_LIST_PAGES:,} pages "
                         "without reaching the batches of this job's time; batcher cannot "
                         "tell whether this job's batch already exists, so it creates none; "
                         "the batch state is kept")

    # -- poll and collect -------------------------------------------------------------------

    async def _poll(self, api: BatchClient) -> None:
        state = self._state
        for shard in state.open_shards():
            batch_id = shard.batch_id
            if batch_id is None:
                continue
            batch = await self._with_retries(functools.partial(api.retrieve, batch_id),
                                             "check a batch")
            status = batch.status
            if status != shard.status:
                shard.status = status
                state.save()
            if status in FINAL_STATUSES:
                await self._collect(api, shard, batch)
                continue
            done = batch.done
            if self._options.progress:
                self._say(f"batch {batch_id}: {status}, {done:,}/{shard.requests:,} "
                          "requests done")
            if status != "cancelling" and self._past_deadline(shard):
                await self._cancel_late(api, shard)

    def _past_deadline(self, shard: ShardRecord) -> bool:
        deadline_h = self._spec.deadline_h
        if deadline_h is None or shard.created_at is None:
            return False
        return self._wall() - shard.created_at > deadline_h * 3600

    async def _cancel_late(self, api: BatchClient, shard: ShardRecord) -> None:
        """Past the deadline: cancel the batch. Polling goes on until it is
        ``cancelled``; its finished lines are kept and the rest go online."""
        assert shard.batch_id is not None
        batch_id = shard.batch_id
        attempts = 0
        while True:
            attempts += 1
            try:
                batch = await api.cancel(batch_id)
                break
            except ApiError as error:
                if error.verdict is Verdict.ROW_ERROR:  # it finished meanwhile, say
                    self._say(f"batch {batch_id}: the cancel was refused ({error.message}); "
                              "it is collected as it is")
                    return
                delay = self._verdict(error, attempts, "cancel a batch")
            await self._runtime.sleep(delay)
        shard.status = batch.status
        self._state.save()
        self._say(f"batch {batch_id}: not done {self._spec.deadline_h:g} h after it was "
                  "created; cancelling it: its finished requests are kept, the rest go online")

    async def _collect(self, api: BatchClient, shard: ShardRecord, batch: Batch) -> None:
        state = self._state
        assert shard.batch_id is not None
        status = batch.status
        files: list[Path] = []
        # Named after the shard, never after an id the server chose.
        stem = Path(shard.file).stem
        for kind, file_id in (("output", batch.output_file_id), ("error", batch.error_file_id)):
            if file_id is None:
                continue
            dest = state.folder / f"{stem}.{kind}.jsonl"
            await self._with_retries(functools.partial(api.download, file_id, dest),
                                     "download batch results")
            files.append(dest)
        problems = list(batch.problems)
        submitted = shard_ids(state.folder / shard.file)
        output = self.job.output
        outcome = reconcile(submitted, _lines(files), status, problems,
                            schema=output.reply_schema if output is not None else None,
                            clean=self._redactor.clean)
        unfinished: list[str] = []
        for name, line in outcome.outcomes.items():
            if line.result is None:
                unfinished.append(name)
            else:
                self.stats.requests += 1
                self._record(name, line.result)
        self.kinds.update(outcome.counts)
        shard.unfinished = unfinished
        shard.status = COLLECTED
        state.save()
        for path in files:
            with contextlib.suppress(OSError):
                path.unlink()
        self._say(f"batch {shard.batch_id} {status}: {outcome.describe()}")
        if status == "failed":
            for problem in problems[:_SHOWN_VALIDATION_ERRORS]:
                line_no = problem["line"]
                where = f"line {line_no}: " if line_no is not None else ""
                self._say(f"  validation error: {where}{problem['code']}: "
                          f"{problem['message']}")
        if status == "completed" and not outcome.counts["ok"]:
            self._say(f"batch {shard.batch_id}: reported completed, but no request in it "
                      "succeeded")

    def _record(self, name: str, result: RowResult) -> None:
        price = self.prepared.price
        result.cost_usd = row_cost(price if isinstance(price, Price) else None,
                                   result.prompt_tokens, result.completion_tokens,
                                   result.cached_tokens, result.reasoning_tokens)
        result.finished_at = round(self._runtime.wall(), 3)
        position = position_of(name)
        self._checkpoint.append([(key_of(name), position)], result)
        self.stats.record(position, result)

    # -- finish -----------------------------------------------------------------------------

    async def _finish(self, chat: ChatClient) -> RunReport:
        prepared = self.prepared
        self._checkpoint.refresh()
        missing = sum(len(plan.pending) for plan in prepared.plans(self._checkpoint))
        if self._spec.fallback == "online" and missing:
            self._say(f"sending {_count(missing, 'row')} online (batch.fallback: online)")

            @contextlib.asynccontextmanager
            async def same_session(_concurrency: int) -> AsyncIterator[Sender]:
                yield chat  # the run's one session, opened for this concurrency

            # The online run stops gracefully on a signal by itself, as in online mode.
            online = Run(prepared, same_session, self._checkpoint, self._options, self._runtime)
            report = await online.execute()
            stats = report.stats
            stats.reused = self.stats.reused
            stats.ok += self.stats.ok  # batch errors were sent again online: not counted
            stats.requests += self.stats.requests
            stats.prompt_tokens += self.stats.prompt_tokens
            stats.completion_tokens += self.stats.completion_tokens
            stats.cost_usd += self.stats.cost_usd  # batch answers, at the batch price
            return report
        written = write_results_file(prepared, self._checkpoint)  # sources: reused or sent
        return RunReport(self.stats, written.rows, written.failed_rows, written.path,
                         results_rewritten=written.rewritten, tally=written.tally,
                         price=prepared.price)

    def _come_back_message(self) -> str:
        shards = self._state.open_shards()
        requests = sum(shard.requests for shard in shards)
        created = [shard.created_at for shard in shards if shard.created_at is not None]
        since = datetime.fromtimestamp(min(created), UTC).strftime("%Y-%m-%d %H:%M UTC") \
            if created else "now"
        return (f"{_count(len(shards), 'batch')} ({_count(requests, 'request')}) running at "
                f"the service since {since}, answered within {self._spec.completion_window} at "
                "half the online price; run the same command again to collect the results "
                "(or add --wait)")

    # -- plumbing ---------------------------------------------------------------------------

    async def _with_retries(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        attempts = 0
        while True:
            attempts += 1
            try:
                return await call()
            except ApiError as error:
                delay = self._verdict(error, attempts, what)
            await self._runtime.sleep(delay)

    def _verdict(self, error: ApiError, attempts: int, what: str) -> float:
        """The wait before trying again, or the exception that ends the run."""
        if error.verdict is Verdict.ABORT:
            raise RunAborted(f"the server refused the run: {error.message}; the batch state "
                             "is kept, fix the cause and run again") from None
        delay = self._policy.delay_before_retry(attempts, error, self._runtime.rng)
        if delay is None:
            hint = (" (lower batch.max_bytes_per_file)" if error.status == 413 else "")
            then = "" if error.verdict is Verdict.RETRY else " once that is fixed"
            raise RunAborted(f"could not {what}: {error.message}{hint}; the batch state is "
                             f"kept, run the same command again{then}") from None
        return delay


def _lines(paths: list[Path]) -> Iterator[bytes]:
    for path in paths:
        with path.open("rb") as handle:
            yield from handle


def _count(number: int, noun: str) -> str:
    plural = "es" if noun.endswith("ch") else "s"
    return f"{number:,} {noun}{'' if number == 1 else plural}"


def describe_plan(plan: BatchPlan) -> str:
    """The dry run's batch line: shards and requests (the estimate's cost is
    already at the Batch API price)."""
    return (f"mode batch: {_count(plan.requests, 'request')} in "
            f"{_count(plan.shards, 'batch file')}")

