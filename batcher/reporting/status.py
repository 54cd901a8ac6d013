"""``batcher status JOB.yaml``: how far a job has got, read from its checkpoint.

Works while a run is going (from another terminal) and after it stopped.
The checkpoint is only read: no lock is taken and nothing is written, so the
run is not disturbed; a line the run is writing at that moment is left out.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from batcher.config import Job
from batcher.online.runner import prepare
from batcher.plan.preflight import Prepared
from batcher.pricing import NoPrice
from batcher.progress import duration
from batcher.store.journal import read_journal, run_in_progress
from batcher.store.keys import KEY_BYTES, split
from batcher.tally import Tally

RATE_WINDOW_S = 60.0
_CHUNK = 65_536  # stored answers matched to rows at a time


@dataclass(frozen=True)
class JobStatus:
    job: str
    total_rows: int
    tally: Tally
    running: bool | None  # None: cannot tell on this platform
    rows_per_minute: float  # over the last minute
    cost_note: str | None  # why cost is unknown or partial
    note: str | None = None  # e.g. the checkpoint belongs to another version of the job

    @property
    def remaining(self) -> int:
        return max(0, self.total_rows - self.tally.ok)

    @property
    def eta_s(self) -> float | None:
        """Seconds to go at the last minute's rate, while the run is going."""
        if not self.running or self.rows_per_minute <= 0:
            return None
        return self.remaining * 60.0 / self.rows_per_minute

    def as_dict(self) -> dict[str, Any]:
        tally = self.tally
        return {
            "job": self.job, "running": self.running, "rows_total": self.total_rows,
            "rows_done": tally.done, "rows_ok": tally.ok, "rows_error": tally.errors,
            "errors_by_class": tally.errors_by_class(), "tokens": tally.tokens(),
            "cost_usd": round(tally.cost_usd, 6), "cost_note": self.cost_note,
            "rows_per_minute": round(self.rows_per_minute, 1),
            "eta_s": None if self.eta_s is None else round(self.eta_s, 1), "note": self.note,
        }

    def describe(self) -> str:
        tally = self.tally
        state = {True: "running", False: "not running", None: "state unknown"}[self.running]
        lines = [f"{self.job}: {state}; {tally.ok:,}/{self.total_rows:,} rows done"
                 + (f", {tally.errors:,} in error" if tally.errors else "")]
        if tally.errors:
            classes = ", ".join(f"{name} x{count}"
                                for name, count in tally.errors_by_class().items())
            lines.append(f"errors: {classes}")
        lines.append(f"tokens: {tally.total_tokens:,} ({tally.prompt_tokens:,} prompt, "
                     f"{tally.cached_tokens:,} of them cached; {tally.completion_tokens:,} "
                     "completion)")
        cost = f"cost so far: ${tally.cost_usd:,.4f}"
        lines.append(cost + (f" ({self.cost_note})" if self.cost_note else ""))
        if self.running:
            eta = self.eta_s
            lines.append(f"rate: {self.rows_per_minute:,.0f} rows/min over the last minute; "
                         + ("ETA unknown (nothing finished in the last minute)" if eta is None
                            else f"ETA {duration(eta)}"))
        if self.note:
            lines.append(f"note: {self.note}")
        return "\n".join(lines)


def job_status(job: Job, *, now: float | None = None) -> JobStatus:
    """Read the job's checkpoint (raises ``CheckpointError`` when there is none)."""
    assert job.output is not None
    path = job.output.checkpoint_path
    prepared = prepare(job, allow_empty=True)
    rows = _RowsByKey(prepared)
    moment = time.time() if now is None else now
    tally = Tally(rate_window=(moment - RATE_WINDOW_S, moment))
    elsewhere = 0
    for chunk in _chunks(read_journal(path), _CHUNK):
        for position, record in zip(rows.positions(chunk), chunk, strict=True):
            if position < 0:
                elsewhere += 1  # a row no longer in the input, or an earlier request
            else:
                tally.add(position, record)
    note = None
    if elsewhere:
        note = (f"{elsewhere:,} stored answers are not for the input's rows as they are now "
                "(rows removed or edited, or another model or params); they are kept for a "
                "run that asks for them again")
    cost_note = None
    if tally.unpriced_rows:
        price = prepared.online_price
        cost_note = (f"{tally.unpriced_rows:,} rows without a cost: "
                     + (price.reason if isinstance(price, NoPrice) else "no usage reported"))
    return JobStatus(job.name, prepared.rows, tally, run_in_progress(path),
                     tally.rows_per_minute(), cost_note, note)


class _RowsByKey:
    """Finds the input row whose request key a stored answer has."""

    def __init__(self, prepared: Prepared) -> None:
        keys = list(prepared.input_keys())
        high, low = split(np.concatenate(keys) if keys else np.zeros((0, KEY_BYTES), np.uint8))
        self._order = np.lexsort((low, high))
        self._high, self._low = high[self._order], low[self._order]

    def positions(self, records: list[dict[str, Any]]) -> np.ndarray:
        """Each record's row position in the input, or -1."""
        found = np.full(len(records), -1, dtype=np.int64)
        if not len(self._high) or not records:
            return found
        keys = np.frombuffer(b"".join(bytes.fromhex(record["k"]) for record in records),
                             dtype=np.uint8).reshape(-1, KEY_BYTES)
        high, low = split(keys)
        first = np.searchsorted(self._high, high)
        for index, place in enumerate(first.tolist()):  # along runs of equal first halves
            while place < len(self._high) and self._high[place] == high[index]:
                if self._low[place] == low[index]:
                    found[index] = self._order[place]
                    break
                place += 1
        return found


def _chunks(records: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
