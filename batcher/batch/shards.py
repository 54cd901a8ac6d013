"""Planning a batch cycle's shards, keying the input once per run.

:class:`Planner` reads and keys the input at most once per invocation, when
it is first needed: the pass that plans a round renders and writes the rows
no batch of the cycle holds, and keeps every row's request key in one
``(rows, 16)`` array (16 bytes a row, not a Python object), which the
finish (rows still missing, the results write) and the summary (rows reused)
read instead of the input. Which requests a batch of the cycle already
holds is read from the shard files themselves into the same compact form.

A later round in the same invocation (lines a batch left unfinished,
``fallback: none``) takes those lines from the shard files they were
submitted in: the request is the same, so the input is not read again.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from batcher.batch.lines import (
    Shard,
    ShardWriter,
    request_line,
    shard_lines,
    starts_new_shard,
)
from batcher.batch.state import COLLECTED, BatchState, ShardRecord, custom_id, key_of
from batcher.plan.preflight import Prepared
from batcher.progress import RunStats
from batcher.records import RowResult
from batcher.store.checkpoint import Checkpoint
from batcher.store.keys import KEY_BYTES, shared_digest

_KEY = np.dtype((np.void, KEY_BYTES))


@dataclass(frozen=True)
class BatchPlan:
    """What a dry run of ``mode: batch`` would submit."""

    requests: int
    shards: int


def plan_shards(prepared: Prepared, checkpoint: Checkpoint | None) -> BatchPlan:
    """Count the requests and shard files a run would submit now (nothing is written)."""
    job = prepared.job
    spec = job.batch
    requests = shards = lines = size = 0
    for row in (row for plan in prepared.plans(checkpoint) for row in plan.pending):
        request = prepared.request(row)
        if isinstance(request, RowResult):
            continue
        length = len(request_line(custom_id(row.position, row.key), request.body))
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


class KeySet:
    """Request keys to test rows against: sorted, 16 bytes each."""

    def __init__(self, keys: np.ndarray) -> None:
        self._sorted = np.sort(_as_void(keys))

    def holds(self, keys: np.ndarray) -> np.ndarray:
        """For each of ``(n, 16)`` ``keys``: is it in the set?"""
        wanted = _as_void(keys)
        if not len(self._sorted):
            return np.zeros(len(wanted), dtype=bool)
        at = np.searchsorted(self._sorted, wanted)
        at[at == len(self._sorted)] = 0
        found: np.ndarray = self._sorted[at] == wanted
        return found


def _stacked(keys: list[np.ndarray]) -> np.ndarray:
    """Several ``(n, 16)`` key arrays as one (none: an empty one)."""
    return np.concatenate([np.zeros((0, KEY_BYTES), np.uint8), *keys])


def _as_void(keys: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(keys, dtype=np.uint8).reshape(-1, KEY_BYTES).view(_KEY).ravel()


def shard_keys(path: Path) -> np.ndarray:
    """The request keys of a shard file's lines, as ``(n, 16)`` bytes."""
    keys = bytearray()
    for name, _line in shard_lines(path):
        keys += key_of(name)
    return np.frombuffer(bytes(keys), dtype=np.uint8).reshape(-1, KEY_BYTES)


Record = Callable[[str, RowResult], None]
"""Stores a request's outcome in the checkpoint under its custom id."""


class Planner:
    """Plans the rounds of one invocation's batch cycle."""

    def __init__(self, prepared: Prepared, state: BatchState, checkpoint: Checkpoint,
                 stats: RunStats, record: Record, wall: Callable[[], float]) -> None:
        self._prepared = prepared
        self._state = state
        self._checkpoint = checkpoint
        self._stats = stats
        self._record = record
        self._wall = wall
        self._keys: np.ndarray | None = None
        self._input_planned = False  # the first round plans from the input, later ones not

    def reused(self) -> int:
        """Rows whose ``ok`` answer was in the checkpoint before this run."""
        keys, store = self.keys, self._checkpoint
        return int((store.answered(keys) & store.stored_before_run(keys)).sum())

    def missing(self) -> int:
        """Rows with no ``ok`` answer yet (after :meth:`Checkpoint.refresh`)."""
        return int((~self._checkpoint.answered(self.keys)).sum())

    @property
    def keys(self) -> np.ndarray:
        """Every row's request key in input order; keys the input unless a round did."""
        if self._keys is None:
            keys = np.zeros((self._prepared.row_count, KEY_BYTES), dtype=np.uint8)
            start = 0
            prepared = self._prepared
            for these in prepared.input_keys():
                keys[start:start + len(these)] = these
                start += len(these)
            self._keys = keys[:start]
        return self._keys

    def plan(self) -> list[ShardRecord]:
        """Write and record the shard files of a new round; the shards planned.

        The first round of an invocation takes the rows of the input that no
        batch of this cycle holds; every round takes the lines a collected
        batch left unfinished and no later batch holds, when they go in a new
        batch (``fallback: none``; with ``fallback: online`` they go online).
        """
        state = self._state
        self._remove_strays()
        spec = self._prepared.job.batch
        salt = f"{shared_digest(self._prepared.job).hex()}:{os.urandom(8).hex()}"
        writer = ShardWriter(state.folder, salt, spec.max_requests_per_file,
                             spec.max_bytes_per_file)
        planned_at = self._wall()
        before = len(state.shards)

        def record(shard: Shard | None) -> None:
            if shard is not None:
                state.shards.append(ShardRecord(shard.digest, shard.path.name,
                                                len(shard.custom_ids), planned_at))
                state.save()

        self._checkpoint.refresh()  # answers collected by this run count as answered
        held = [shard_keys(state.folder / shard.file) for shard in state.shards]
        try:
            if not self._input_planned:
                self._from_input(writer, record, KeySet(_stacked(held)))
                self._input_planned = True
            if spec.fallback == "none":
                self._unfinished(writer, record, held)
            record(writer.close())
        finally:
            writer.discard()
        return state.shards[before:]

    def _from_input(self, writer: ShardWriter, record: Callable[[Shard | None], None],
                    held: KeySet) -> None:
        """The invocation's one pass over the input: keys every row, and writes the
        request of each row that is neither answered nor in a batch of the cycle."""
        prepared = self._prepared
        keys = np.zeros((prepared.row_count, KEY_BYTES), dtype=np.uint8)
        end = 0
        for plan in prepared.plans(self._checkpoint):
            end = plan.start + len(plan.keys)
            keys[plan.start:end] = plan.keys
            if not plan.pending:
                continue
            claimed = held.holds(plan.keys[[row.position - plan.start
                                            for row in plan.pending]])
            for row, in_batch in zip(plan.pending, claimed.tolist(), strict=True):
                if in_batch:
                    continue
                request = prepared.request(row)
                if isinstance(request, RowResult):
                    # The input's fault: counted, never stored (see batcher.plan.finish).
                    self._stats.record(row.position, request)
                    continue
                name = custom_id(row.position, row.key)
                self._write(writer, record, name, request_line(name, request.body))
        self._keys = keys[:end]

    def _write(self, writer: ShardWriter, record: Callable[[Shard | None], None], name: str,
               line: bytes) -> None:
        if not writer.fits(line):
            self._record(name, RowResult.failed(
                f"the request ({len(line):,} bytes) is larger than "
                "batch.max_bytes_per_file", 0, "batch request too large"))
            return
        record(writer.add(name, line))

    def _unfinished(self, writer: ShardWriter, record: Callable[[Shard | None], None],
                    held: list[np.ndarray]) -> None:
        """Lines collected batches left unfinished, again, from their shard files: those
        of a row still in the input, unanswered, and in no later batch of the cycle."""
        left = [(index, shard) for index, shard in enumerate(self._state.shards[:len(held)])
                if shard.status == COLLECTED and shard.unfinished]
        if not left:
            return
        rows = KeySet(self.keys)
        for index, shard in left:
            later = KeySet(_stacked(held[index + 1:]))
            names = shard.unfinished
            keys = np.frombuffer(b"".join(key_of(name) for name in names),
                                 np.uint8).reshape(-1, KEY_BYTES)
            again = rows.holds(keys) & ~later.holds(keys) & ~self._checkpoint.answered(keys)
            wanted = {name for name, send in zip(names, again.tolist(), strict=True) if send}
            if not wanted:
                continue
            for name, line in shard_lines(self._state.folder / shard.file):
                if name in wanted:
                    self._write(writer, record, name, line)

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
