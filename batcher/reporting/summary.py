"""What one run did, in one type: the CLI prints it, the Python API returns it."""

from __future__ import annotations

import contextlib
import glob
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from batcher.config import Job
from batcher.errors import OutputError
from batcher.io.safefiles import write_private
from batcher.online.runner import RunReport
from batcher.plan.paths import summary_path
from batcher.pricing import NoPrice, Price

SCHEMA_VERSION = 1


def summarize_run(job: Job, report: RunReport, elapsed_s: float) -> Summary:
    """The run's summary, also written as JSON beside its results (atomically;
    a summary that cannot be written is not worth failing a finished run)."""
    summary = Summary.of(job, report, elapsed_s)
    if report.results_path is not None:
        target = summary_path(report.results_path)
        # Temps are named by pid and a random part: others are leftovers of runs killed
        # while writing (ours are never links: the glob sees names, unlink removes names).
        with contextlib.suppress(OSError, OutputError):
            for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
                stale.unlink(missing_ok=True)
            write_private(target, orjson.dumps(summary.to_json(), option=orjson.OPT_INDENT_2),
                          "run summary")
    return summary


@dataclass(frozen=True)
class Summary:
    """What one run did.

    ``rows``, ``ok`` and ``errors`` count every row of the results. Of the
    rows, ``sent`` were answered by a request of this run, ``from_checkpoint``
    were reused from the checkpoint (an earlier run answered the same
    request) and ``shared`` took the answer of an identical row's request
    (``duplicates: share``); the results' ``source`` column says which, row
    by row. ``requests``, the token counts and ``cost_usd`` cover what *this
    run* sent: reused and shared rows cost nothing again; rows answered by a
    Batch API cost its price. ``cost_usd`` is None when the model's price is
    unknown (``cost_note`` says why); with ``simulated`` (the built-in mock
    server) it is what the same tokens would cost.

    The fields after ``simulated`` describe every row of the results
    (``tokens``, ``total_cost_usd``, ``errors_by_class``, ``latency_s``) or
    the run's pace; :meth:`to_json` is the documented, versioned shape that
    ``batcher run --json`` prints and ``NAME.summary.json`` holds.

    >>> print(frame.attrs["batcher"]["ok"])         # doctest: +SKIP
    20
    """

    model: str
    rows: int
    ok: int
    errors: int
    from_checkpoint: int
    requests: int
    rate_limited: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None
    elapsed_s: float
    simulated: bool
    # How this run's failed rows failed: a line per kind with its count and first example.
    failures: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()  # what a run that "worked" may still have got wrong
    job: str = ""
    results_path: str | None = None
    errors_by_class: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)  # by kind, every row
    total_cost_usd: float | None = None  # every row of the results
    unpriced_rows: int = 0  # answered rows without a cost
    price: str | None = None  # the price used, and where it comes from
    cost_note: str | None = None  # why a cost is unknown or partial
    latency_s: dict[str, float | None] = field(default_factory=dict)
    retries: int = 0
    requests_per_minute: float = 0.0
    requests_per_minute_limit: float | None = None
    sent: int = 0
    shared: int = 0

    @classmethod
    def of(cls, job: Job, report: RunReport, elapsed_s: float) -> Summary:
        stats, tally, price = report.stats, report.tally, report.price
        known = isinstance(price, Price)
        note = None
        if isinstance(price, NoPrice):
            note = price.reason
        elif tally.unpriced_rows:
            note = (f"{tally.unpriced_rows:,} answered rows without a cost (no usage in the "
                    "reply, usage that cannot be right, or answered before costs were "
                    "recorded)")
        return cls(
            model=job.model, rows=report.rows, ok=report.rows - report.failed_rows,
            errors=report.failed_rows, from_checkpoint=stats.reused,
            requests=stats.requests, rate_limited=stats.rate_limited,
            prompt_tokens=stats.prompt_tokens, completion_tokens=stats.completion_tokens,
            cost_usd=round(stats.cost_usd, 6) if known else None,
            elapsed_s=round(elapsed_s, 3), simulated=job.endpoint.mock is not None,
            job=job.name,
            results_path=None if report.results_path is None else str(report.results_path),
            errors_by_class=tally.errors_by_class(), tokens=tally.tokens(),
            total_cost_usd=round(tally.cost_usd, 6) if known else None,
            unpriced_rows=tally.unpriced_rows if known else tally.ok,
            price=price.describe() if isinstance(price, Price) else None, cost_note=note,
            latency_s=tally.latency_percentiles(), retries=stats.retries,
            requests_per_minute=round(stats.requests * 60 / elapsed_s, 1) if elapsed_s > 0
            else 0.0,
            requests_per_minute_limit=job.limits.requests_per_minute,
            failures=tuple(stats.error_lines()), warnings=tuple(stats.warnings()),
            sent=stats.ok + stats.errors - stats.shared, shared=stats.shared)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def exit_code(self) -> int:
        """The CLI's exit code for the same outcome: 0 all rows ok, 1 some failed."""
        return 1 if self.errors else 0

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly values (what ``frame.attrs["batcher"]`` holds)."""
        return {**asdict(self), "total_tokens": self.total_tokens}

    def lines(self) -> list[str]:
        """The summary, then a line per kind of failure and per warning."""
        return ([str(self)] + [f"failed: {line}" for line in self.failures]
                + [f"warning: {line}" for line in self.warnings])

    def to_json(self) -> dict[str, Any]:
        """The machine-readable summary (README: "Run summary"); its keys are
        stable within a ``schema_version``."""
        limit = self.requests_per_minute_limit
        return {
            "schema_version": SCHEMA_VERSION,
            "job": self.job,
            "model": self.model,
            "simulated": self.simulated,
            "exit_code": self.exit_code,
            "results_path": self.results_path,
            "rows": {"total": self.rows, "ok": self.ok, "error": self.errors,
                     "from_checkpoint": self.from_checkpoint, "sent": self.sent,
                     "shared": self.shared, "errors_by_class": self.errors_by_class},
            "tokens": self.tokens,
            "cost": {"usd": self.total_cost_usd, "this_run_usd": self.cost_usd,
                     "unpriced_rows": self.unpriced_rows, "price": self.price,
                     "note": self.cost_note},
            "latency_s": self.latency_s,
            "warnings": list(self.warnings),
            "run": {"elapsed_s": self.elapsed_s, "requests": self.requests,
                    "retries": self.retries, "rate_limited": self.rate_limited,
                    "requests_per_minute": self.requests_per_minute,
                    "requests_per_minute_limit": limit,
                    "utilization": round(self.requests_per_minute / limit, 3) if limit
                    else None},
        }

    def __str__(self) -> str:
        cost = (f", cost unknown ({self.cost_note})" if self.cost_usd is None
                else f", ${self.cost_usd:,.4f} at {self.model}'s price")
        shared = f"{self.shared:,} shared with identical rows, " if self.shared else ""
        return (f"{_count(self.rows, 'row')}: {self.ok:,} ok, {_count(self.errors, 'error')}; "
                f"{self.sent:,} sent, {shared}{self.from_checkpoint:,} reused from the "
                f"checkpoint; this run: "
                f"{_count(self.requests, 'request')} ({self.rate_limited} rate-limited), "
                f"{self.total_tokens:,} tokens{cost}, {self.elapsed_s:.1f} s"
                f"{' [simulated replies]' if self.simulated else ''}")


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}{'' if number == 1 else 's'}"
