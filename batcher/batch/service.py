"""A batch cycle's calls to the Files and Batches API, each through the retry engine.

Every call goes through :meth:`Service.call`: ``batcher.limits.retry`` decides
whether and when to try again; when it gives up, the run stops with the
batch state kept (exit 3), saying what could not be done and what to fix.

Submitting is safe to repeat: for each recorded shard without a batch id,
the service's batch list is searched first for a batch whose metadata names
this job and this shard (a kill between creating a batch and recording it
must not create a second one); only when none exists is the shard uploaded
and the batch created, and a create whose answer was lost is looked up
again before it is tried again. A batch's id is recorded the moment it is
known.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import TypeVar

from batcher.batch.state import BatchState, ShardRecord
from batcher.errors import ApiError, RunAborted, Verdict
from batcher.limits.retry import GaveUp, Retrying
from batcher.transport.batchwire import Batch, shown
from batcher.transport.client import BatchClient

T = TypeVar("T")
LIST_MARGIN_S = 600.0
"""How far before a shard was planned the batch list is searched (clock skew)."""
MAX_LIST_PAGES = 1000
"""Pages of the batch list read at most while looking for a shard's batch (100,000 batches)."""


def count(number: int, noun: str) -> str:
    plural = "es" if noun.endswith("ch") else "s"
    return f"{number:,} {noun}{'' if number == 1 else plural}"


def stopped(gave_up: GaveUp, what: str) -> RunAborted:
    """The run's end when a call failed for good: the state is kept for the next run."""
    error = gave_up.error
    if gave_up.aborts:
        return RunAborted(f"the server refused the run: {error.message}; the batch state "
                          "is kept, fix the cause and run again")
    hint = " (lower batch.max_bytes_per_file)" if error.status == 413 else ""
    then = "" if gave_up.verdict is Verdict.RETRY else " once that is fixed"
    return RunAborted(f"could not {what}: {error.message}{hint}{gave_up.tries()}; the batch "
                      f"state is kept, run the same command again{then}")


class Service:
    """The cycle's side of the Batch API: one job's batches, found, made and cancelled."""

    def __init__(self, api: BatchClient, retrying: Retrying, state: BatchState, window: str, *,
                 clean: Callable[[str], str], say: Callable[[str], None],
                 wall: Callable[[], float]) -> None:
        self.api = api
        self._window = window
        self._retrying = retrying
        self._state = state
        self._job = state.job_name[:512]  # metadata values are at most 512 characters
        self._clean = clean
        self._say = say
        self._wall = wall

    async def call(self, attempt: Callable[[], Awaitable[T]], what: str) -> T:
        """``attempt()`` under the job's retry policy; the run stops when it gives up."""
        try:
            return await self._retrying.call(attempt)
        except GaveUp as gave_up:
            raise stopped(gave_up, what) from None

    # -- submit -----------------------------------------------------------------------------

    async def submit_planned(self) -> None:
        waiting = [shard for shard in self._state.shards
                   if shard.batch_id is None and shard.open]
        if not waiting:
            return
        found = await self._find_existing(waiting)
        for shard in waiting:
            batch = found.get(shard.digest)
            if batch is not None:
                self._say(f"found batch {batch.id} already created for "
                          f"{shard.file}; not creating another")
            else:
                batch = await self._create(shard)
            self._adopt(shard, batch)

    async def _create(self, shard: ShardRecord) -> Batch:
        """Upload (unless done) and create; a create that may have reached the
        service is looked up before it is tried again."""
        state = self._state
        file_id = shard.file_id
        if file_id is None:
            path = state.folder / shard.file
            file_id = shard.file_id = await self.call(lambda: self.api.upload(path), "upload")
            state.save()
        create = functools.partial(
            self.api.create, file_id, self._window, {
                "batcher_job": self._job, "batcher_shard": shard.digest,
                "batcher_requests": str(shard.requests)})

        async def created_meanwhile() -> Batch | None:
            return (await self._find_existing([shard])).get(shard.digest)

        try:
            return await self._retrying.call(create, recheck=created_meanwhile)
        except GaveUp as gave_up:
            raise stopped(gave_up, "create a batch") from None

    def _adopt(self, shard: ShardRecord, batch: Batch) -> None:
        shard.batch_id = batch.id
        shard.created_at = batch.created_at if batch.created_at is not None else self._wall()
        shard.status = batch.status
        self._state.save()
        self._say(f"submitted batch {batch.id} ({count(shard.requests, 'request')})")

    async def _find_existing(self, shards: list[ShardRecord]) -> dict[str, Batch]:
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
            page = await self.call(functools.partial(self.api.list, after), "list batches")
            for listed in page.batches:
                if listed.job != self._job or listed.shard not in wanted or (
                        listed.shard in found):
                    continue
                try:  # this shard's batch: never created twice, so it must be usable
                    found[listed.shard] = self.api.parse(listed.raw)
                except ApiError as error:
                    raise RunAborted(f"the batch list holds this job's batch, but: "
                                     f"{error.message}; the batch state is kept") from None
            oldest = min((listed.created_at for listed in page.batches
                          if listed.created_at is not None), default=None)
            if (not page.has_more or not page.batches or wanted <= found.keys()
                    or (oldest is not None and oldest < since) or page.last_id is None):
                return found
            if page.last_id in cursors:
                raise RunAborted(
                    "the service's batch list does not move on: asked for the batches after "
                    f"{shown(page.last_id, self._clean)}, it answered that one again "
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

    # -- cancel -----------------------------------------------------------------------------

    async def cancel(self, batch_id: str) -> Batch | None:
        """Cancel a batch; None when the service refuses (it finished meanwhile, say)."""
        try:
            return await self._retrying.call(functools.partial(self.api.cancel, batch_id))
        except GaveUp as gave_up:
            if gave_up.verdict is Verdict.ROW_ERROR:
                self._say(f"batch {batch_id}: the cancel was refused ({gave_up.error.message}); "
                          "it is collected as it is")
                return None
            raise stopped(gave_up, "cancel a batch") from None
