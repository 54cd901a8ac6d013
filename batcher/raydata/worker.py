"""A Ray worker: answers the rows of one batch after another (a ``map_batches``
callable class).

Each worker keeps one event loop and one ``batcher.transport.client.ChatClient``
(one connection pool) for its life and sends each batch's rows through
``batcher.plan.pipeline.attempt_row``, with up to ``limits.concurrency``
requests in flight. Everything a row means comes from the run's
``batcher.plan.jobplan.JobPlan``, made on the driver: the messages (the reply
schema's instruction included), the keys, the request bodies, the reply
checks, the price and the result layout, so a batch comes back with the same
columns, in the same order and types, as a results file written on one machine.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa

from batcher.errors import BatcherError, RunAborted
from batcher.limits.leases import LeasedLimiter
from batcher.plan.jobplan import JobPlan
from batcher.plan.pipeline import attempt_row, first_cause
from batcher.plan.rows import PendingRow, RowRequest
from batcher.progress import RunStats
from batcher.raydata.limit import Actor, ActorLeases
from batcher.records import SOURCE_COLUMN, SOURCE_REUSED, SOURCE_SENT, RowResult
from batcher.store.answers import Answers, AnswerWriter
from batcher.transport.client import ChatClient
from batcher.transport.endpoints import resolve_endpoint


class RowsWorker:
    """Answers the rows of one batch after another (a ``map_batches`` callable class)."""

    def __init__(self, plan: JobPlan, limit: Actor, base_url: str | None,
                 journal: str | None) -> None:
        job = plan.job
        self._plan = plan
        self._limit = limit
        self._name = uuid.uuid4().hex[:12]
        self._answers = Answers(Path(journal)) if journal else None
        self._writer = AnswerWriter(Path(journal), self._name) if journal else None
        self._streak = plan.identical_failures("the finished rows are kept")
        self._loop = asyncio.new_event_loop()
        self._limiter = LeasedLimiter(ActorLeases(limit), self._name, time.monotonic,
                                      asyncio.sleep)
        try:
            endpoint, redactor = resolve_endpoint(job.endpoint, base_url=base_url)
        except BatcherError as error:
            limit.fail.remote(str(error), error.exit_code)
            raise
        self._client = ChatClient(endpoint, redactor, job.limits.concurrency)
        self._loop.run_until_complete(self._client.__aenter__())
        self._stats = RunStats()
        self._sending = plan.sending(self._client, self._limiter, self._stats, asyncio.sleep,
                                     random.Random())

    def __call__(self, table: pa.Table) -> pa.Table:
        try:
            return self._loop.run_until_complete(self._answer(table))
        except RunAborted as error:
            self._limiter.stop(str(error))
            self._loop.run_until_complete(self._report())
            raise
        except BatcherError as error:
            self._limit.fail.remote(str(error), error.exit_code)
            raise

    async def _answer(self, table: pa.Table) -> pa.Table:
        # The input's own metadata describes the input's file, not this slice of it.
        layout = self._plan.layout(table.schema.remove_metadata())
        if not table.num_rows:
            return layout.schema.empty_table()
        batch = table.combine_chunks().to_batches()[0].replace_schema_metadata(None)
        # A distributed read keeps no positions: without an id column a row is its request.
        keys, prompts = self._plan.keys(batch, None)
        records: list[dict[str, Any] | None] = (
            [None] * batch.num_rows if self._answers is None else self._answers.find(keys))
        for record in records:
            if record is not None:
                record[SOURCE_COLUMN] = SOURCE_REUSED
        self._limiter.count({"reused": sum(record is not None for record in records)})
        pending = []
        for offset, record in enumerate(records):
            if record is not None:
                continue
            request = self._plan.request(PendingRow(offset, keys[offset].tobytes(),
                                                    prompts.texts[offset],
                                                    prompts.problems.get(offset)))
            if isinstance(request, RowResult):
                records[offset] = {**request.to_dict(), SOURCE_COLUMN: SOURCE_SENT}
                self._count(request)
            else:
                pending.append(request)
        slots = asyncio.Semaphore(self._plan.job.limits.concurrency)

        async def answer(request: RowRequest) -> None:
            async with slots:
                outcome = await attempt_row(request, self._sending)
            assert outcome is not None  # a worker never stops midway: it has no stop flag
            outcome.result.finished_at = round(time.time(), 3)
            if self._writer is not None:
                self._writer.append(request.key, outcome.result)
            records[request.position] = {**outcome.result.to_dict(), SOURCE_COLUMN: SOURCE_SENT}
            self._count(outcome.result)
            self._streak.record(outcome)

        try:
            async with asyncio.TaskGroup() as group:
                for request in pending:
                    group.create_task(answer(request))
        except BaseExceptionGroup as group:
            raise first_cause(group) from None
        await self._report()
        return pa.Table.from_batches([layout.attach(batch, records)])

    def _count(self, result: RowResult) -> None:
        self._limiter.count({"ok" if result.ok else "errors": 1,
                             "prompt_tokens": result.prompt_tokens or 0,
                             "completion_tokens": result.completion_tokens or 0,
                             "cost_nano_usd": round((result.cost_usd or 0.0) * 1e9)})

    async def _report(self) -> None:
        stats = self._stats
        self._limiter.count({"requests": stats.requests, "rate_limited": stats.rate_limited})
        stats.requests = stats.rate_limited = 0
        await self._limit.report.remote(self._limiter.take_feedback())
