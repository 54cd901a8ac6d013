"""Polling a cycle's batches and collecting the ones that ended.

A batch that ends (completed, expired, cancelled or failed) is downloaded and
reconciled line by line against its shard file (``batcher.batch.lines``):
every request gets exactly one outcome in the checkpoint, stored under its
key (so the input may change while batches run), or is left unfinished
(expired) for the next round. Only then is the batch marked collected, so a
kill during a download just downloads again. A batch past ``deadline_h`` is
cancelled; polling goes on until it is ``cancelled``, its finished lines are
kept and the rest go online.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path

from batcher.batch.lines import reconcile, shard_ids
from batcher.batch.service import Service
from batcher.batch.state import COLLECTED, BatchState, ShardRecord, key_of, position_of
from batcher.config import Job
from batcher.plan.usage import row_cost
from batcher.pricing import NoPrice, Price
from batcher.progress import RunStats
from batcher.records import RowResult
from batcher.store.checkpoint import Checkpoint
from batcher.transport.batchwire import Batch

FINAL_STATUSES = frozenset({"completed", "expired", "cancelled", "failed"})
_SHOWN_VALIDATION_ERRORS = 5


class Collector:
    """Polls the open batches and stores the answers of those that ended."""

    def __init__(self, job: Job, service: Service, state: BatchState, checkpoint: Checkpoint,
                 price: Price | NoPrice, stats: RunStats, *, clean: Callable[[str], str],
                 say: Callable[[str], None], wall: Callable[[], float], progress: bool) -> None:
        self._job = job
        self._service = service
        self._state = state
        self._checkpoint = checkpoint
        self._price = price if isinstance(price, Price) else None
        self._clean = clean
        self._say = say
        self._wall = wall
        self._progress = progress
        self.stats = stats

    async def poll(self) -> None:
        state = self._state
        for shard in state.open_shards():
            batch_id = shard.batch_id
            if batch_id is None:
                continue
            batch = await self._service.call(
                functools.partial(self._service.api.retrieve, batch_id), "check a batch")
            status = batch.status
            if status != shard.status:
                shard.status = status
                state.save()
            if status in FINAL_STATUSES:
                await self._collect(shard, batch)
                continue
            if self._progress:
                self._say(f"batch {batch_id}: {status}, {batch.done:,}/{shard.requests:,} "
                          "requests done")
            if status != "cancelling" and self._past_deadline(shard):
                await self._cancel_late(shard, batch_id)

    def _past_deadline(self, shard: ShardRecord) -> bool:
        deadline_h = self._job.batch.deadline_h
        if deadline_h is None or shard.created_at is None:
            return False
        return self._wall() - shard.created_at > deadline_h * 3600

    async def _cancel_late(self, shard: ShardRecord, batch_id: str) -> None:
        batch = await self._service.cancel(batch_id)
        if batch is None:
            return
        shard.status = batch.status
        self._state.save()
        self._say(f"batch {batch_id}: not done {self._job.batch.deadline_h:g} h after it was "
                  "created; cancelling it: its finished requests are kept, the rest go online")

    async def _collect(self, shard: ShardRecord, batch: Batch) -> None:
        state = self._state
        status = batch.status
        files: list[Path] = []
        # Named after the shard, never after an id the server chose.
        stem = Path(shard.file).stem
        for kind, file_id in (("output", batch.output_file_id), ("error", batch.error_file_id)):
            if file_id is None:
                continue
            dest = state.folder / f"{stem}.{kind}.jsonl"
            await self._service.call(
                functools.partial(self._service.api.download, file_id, dest),
                "download batch results")
            files.append(dest)
        problems = list(batch.problems)
        output = self._job.output
        outcome = reconcile(shard_ids(state.folder / shard.file), _lines(files), status,
                            problems,
                            schema=output.reply_schema if output is not None else None,
                            clean=self._clean)
        unfinished: list[str] = []
        for name, line in outcome.outcomes.items():
            if line.result is None:
                unfinished.append(name)
            else:
                self.stats.requests += 1
                self.record(name, line.result)
        shard.unfinished = unfinished
        shard.status = COLLECTED
        state.save()
        for path in files:
            with contextlib.suppress(OSError):
                path.unlink()
        self._say(f"batch {batch.id} {status}: {outcome.describe()}")
        if status == "failed":
            for problem in problems[:_SHOWN_VALIDATION_ERRORS]:
                line_no = problem["line"]
                where = f"line {line_no}: " if line_no is not None else ""
                self._say(f"  validation error: {where}{problem['code']}: "
                          f"{problem['message']}")
        if status == "completed" and not outcome.counts["ok"]:
            self._say(f"batch {batch.id}: reported completed, but no request in it "
                      "succeeded")

    def record(self, name: str, result: RowResult) -> None:
        """Store a request's outcome under the key its custom id names."""
        result.cost_usd = row_cost(self._price, result.prompt_tokens, result.completion_tokens,
                                   result.cached_tokens, result.reasoning_tokens)
        result.finished_at = round(self._wall(), 3)
        position = position_of(name)
        self._checkpoint.append([(key_of(name), position)], result)
        self.stats.record(position, result)


def _lines(paths: list[Path]) -> Iterator[bytes]:
    for path in paths:
        with path.open("rb") as handle:
            yield from handle
