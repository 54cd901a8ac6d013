"""``batcher status JOB.yaml``: how far a job has got, read from its checkpoint.

Works while a run is going (from another terminal) and after it stopped.
The checkpoint is only read: no lock is taken and nothing is written, so the
run is not disturbed; a line the run is writing at that moment is left out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from batcher.checkpoint import read_journal, run_in_progress
from batcher.config import Job
from batcher.pricing import NoPrice, resolve_price
from batcher.runner import prepare
from batcher.tally import Tally

RATE_WINDOW_S = 60.0


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
                            else f"ETA {_duration(eta)}"))
        if self.note:
            lines.append(f"note: {self.note}")
        return "\n".join(lines)


def job_status(job: Job, *, now: float | None = None) -> JobStatus:
    """Read the job's checkpoint (raises ``CheckpointError`` when there is none)."""
    assert job.output is not None
    path = job.output.checkpoint_path
    prepared = prepare(job, allow_empty=True)
    fingerprint, records = read_journal(path)
    tally = Tally()
    for record in records:
        tally.add(record["i"], record)
    note = None
    if fingerprint != prepared.fingerprint:
        note = ("the checkpoint was made by a different version of the job (the input, model, "
                "prompt or params changed); a run would stop and ask for --fresh")
    cost_note = None
    if tally.unpriced_rows:
        price = resolve_price(job.model, pricing=job.pricing, base_url=job.endpoint.base_url)
        cost_note = (f"{tally.unpriced_rows:,} rows without a cost: "
                     + (price.reason if isinstance(price, NoPrice) else "no usage reported"))
    moment = time.time() if now is None else now
    return JobStatus(job.name, prepared.rows, tally, run_in_progress(path),
                     tally.rows_per_minute(moment, RATE_WINDOW_S), cost_note, note)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"
