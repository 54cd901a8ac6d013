"""``fallback: online``: the rows batches left without an ``ok`` answer, sent online.

Every row still not ``ok`` when no batch is open (failed, expired, or in a
batch past ``deadline_h``, which was cancelled) goes through the ordinary
online run, with the job's limits and retries, over the cycle's one session;
that run writes the results. Its report counts the batch's answers too.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from batcher.online.runner import Run, RunOptions, RunReport, Runtime
from batcher.plan.pipeline import Sender
from batcher.plan.preflight import Prepared
from batcher.progress import RunStats
from batcher.store.checkpoint import Checkpoint
from batcher.transport.client import ChatClient


async def finish_online(prepared: Prepared, chat: ChatClient, checkpoint: Checkpoint,
                        options: RunOptions, runtime: Runtime, batch: RunStats) -> RunReport:
    """Send the rows still missing online; the report adds ``batch``'s answers."""

    @contextlib.asynccontextmanager
    async def same_session(_concurrency: int) -> AsyncIterator[Sender]:
        yield chat  # the run's one session, opened for this concurrency

    # The online run stops gracefully on a signal by itself, as in online mode.
    report = await Run(prepared, same_session, checkpoint, options, runtime).execute()
    stats = report.stats
    stats.reused = batch.reused
    stats.ok += batch.ok  # batch errors were sent again online: not counted
    stats.requests += batch.requests
    stats.prompt_tokens += batch.prompt_tokens
    stats.completion_tokens += batch.completion_tokens
    stats.cost_usd += batch.cost_usd  # batch answers, at the batch price
    return report
