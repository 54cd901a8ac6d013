"""What one run did, in one type: the CLI prints it, the Python API returns it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from batcher.config import Job
from batcher.pricing import price_for
from batcher.runner import RunReport


@dataclass(frozen=True)
class Summary:
    """What one run did.

    ``rows``, ``ok`` and ``errors`` count every row of the results, those
    taken from the checkpoint included. ``requests``, the token counts and
    ``cost_usd`` cover what *this run* sent: rows already in the checkpoint
    cost nothing again; answers from the Batch API count at half the list
    price. ``cost_usd`` is None when the model's list price is unknown; with
    ``simulated`` (the built-in mock server) it is what the same tokens would
    cost.

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

    @classmethod
    def of(cls, job: Job, report: RunReport, elapsed_s: float) -> Summary:
        stats = report.stats
        price = price_for(job.model)
        # Batch answers cost half the list price (the Batch API's discount).
        cost = None if price is None else round(
            price.cost(stats.prompt_tokens, stats.completion_tokens)
            - price.cost(*stats.batch_tokens) / 2, 6)
        return cls(
            model=job.model, rows=report.rows, ok=report.rows - report.failed_rows,
            errors=report.failed_rows, from_checkpoint=stats.already_done,
            requests=stats.requests, rate_limited=stats.rate_limited,
            prompt_tokens=stats.prompt_tokens, completion_tokens=stats.completion_tokens,
            cost_usd=cost, elapsed_s=round(elapsed_s, 3),
            simulated=job.endpoint.mock is not None,
            failures=tuple(stats.error_lines()), warnings=tuple(stats.warnings()))

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

    def __str__(self) -> str:
        cost = "" if self.cost_usd is None else (
            f", ${self.cost_usd:,.4f} at {self.model}'s price")
        return (f"{_count(self.rows, 'row')}: {self.ok} ok, {_count(self.errors, 'error')} "
                f"({self.from_checkpoint} from the checkpoint); this run: "
                f"{_count(self.requests, 'request')} ({self.rate_limited} rate-limited), "
                f"{self.total_tokens:,} tokens{cost}, {self.elapsed_s:.1f} s"
                f"{' [simulated replies]' if self.simulated else ''}")


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}{'' if number == 1 else 's'}"
