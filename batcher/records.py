"""The outcome of one input row: what the checkpoint stores and the results hold."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

STATUS_OK = "ok"
STATUS_ERROR = "error"


@dataclass(slots=True)
class RowResult:
    """One row's outcome. Field order is the results file's column order."""

    # The contract's columns, in its order ...
    reply: str | None
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    status: str
    error: str | None
    attempts: int
    latency_s: float | None
    # ... then what some servers add.
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    refusal: str | None = None
    # ... then what batcher adds: the row's cost at the run's price (None: no
    # price known, or the server sent no usage), the kind of failure, and
    # when the outcome was recorded (Unix time, seconds).
    cost_usd: float | None = None
    error_class: str | None = None
    finished_at: float | None = None
    # Every choice's content, when the job asks for several (params.n > 1).
    replies: list[str | None] | None = None

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def failed(cls, reason: str, attempts: int, error_class: str | None = None) -> RowResult:
        return cls(
            reply=None,
            finish_reason=None,
            prompt_tokens=None,
            completion_tokens=None,
            total_tokens=None,
            status=STATUS_ERROR,
            error=reason,
            attempts=attempts,
            latency_s=None,
            error_class=error_class,
        )


RESULT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(RowResult))
# Fields whose column only some jobs have: ``replies`` when params.n > 1.
OPTIONAL_COLUMNS: tuple[str, ...] = ("replies",)

# Where a row's answer came from in this run; not stored (it depends on the run).
SOURCE_COLUMN = "source"
SOURCE_SENT = "sent"  # this run decided it: a request sent now (or a prompt that failed)
SOURCE_REUSED = "reused"  # the stored answer of an earlier run to the same request
SOURCE_SHARED = "shared"  # ``duplicates: share``: the answer to an identical request
SOURCES: tuple[str, ...] = (SOURCE_SENT, SOURCE_REUSED, SOURCE_SHARED)

RESULT_COLUMNS: tuple[str, ...] = (
    *(name for name in RESULT_FIELDS if name not in OPTIONAL_COLUMNS), SOURCE_COLUMN)
INTEGER_COLUMNS = frozenset(
    {"prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens",
     "attempts"}
)
FLOAT_COLUMNS = frozenset({"latency_s", "cost_usd", "finished_at"})
