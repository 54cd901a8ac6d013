"""One exception family for everything batcher reports to a user.

Each family maps to one exit code of the contract, so the CLI never has to
guess: configuration, data and checkpoint mistakes are the user's (exit 2),
a server's verdict on the account stops the run (exit 3), an interruption
keeps the checkpoint (exit 130). Lower layers (aiohttp, pyarrow, pydantic)
are translated into these at one boundary each, never by matching text.

The tree, with each family's exit code::

    BatcherError                  1   (a failed row is data, not an exception)
    +-- UserError                 2   the job, its input or the command line is wrong
    |   +-- ConfigError               the job file or an option
    |   +-- DataError                 the input
    |   +-- CheckpointError           the checkpoint is another job's, or damaged
    |       +-- RunInProgress     75  another run of the job holds its lock: skipped
    +-- OutputError               2   results or checkpoint could not be written
    +-- RunAborted                3   the server's verdict on the account
    |   +-- BudgetReached             the next request could pass the budget
    +-- Interrupted          130/143  Ctrl-C or SIGTERM; the checkpoint is consistent

``ApiError`` (one failed request, with its ``Verdict``) is not a BatcherError:
it never reaches the user as such, it becomes a row's error or a RunAborted.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import Enum

# How the user says "discard the checkpoint" where they are: the command's flag,
# or the Python API's argument (set by batcher.api for its calls), so advice in an
# error reads right in a terminal and in a notebook alike.
FRESH_OPTION: ContextVar[str] = ContextVar("batcher_fresh_option", default="--fresh")


def fresh_option() -> str:
    return FRESH_OPTION.get()


class BatcherError(Exception):
    """Base of every error batcher raises on purpose."""

    exit_code = 1
    label = "error"  # how the command line introduces it: "batcher: error: ..."


class UserError(BatcherError):
    """The job, its input or the command line is wrong; nothing was sent."""

    exit_code = 2


class ConfigError(UserError):
    """The job file or a command-line option is invalid."""


class DataError(UserError):
    """The input file cannot be used as it is."""


class CheckpointError(UserError):
    """The checkpoint belongs to another job, or another run holds it."""


class RunInProgress(CheckpointError):
    """Another run of the same job holds its lock. Nothing was sent or written;
    a nightly run that finds the last one still going is skipped, not failed:
    its own exit code (EX_TEMPFAIL, "try again later") keeps it apart from a bad
    job (2) in a cron log and an alert rule."""

    exit_code = 75
    label = "skipped"


class OutputError(BatcherError):
    """The results or checkpoint could not be written (disk full, permissions)."""

    exit_code = 2


class RunAborted(BatcherError):
    """The server refused the account itself (bad key, no quota, a repeating
    terminal error): going on would fail every row or burn money."""

    exit_code = 3


class BudgetReached(RunAborted):
    """The next request could take the run past ``limits.max_cost_usd`` or
    ``limits.max_total_tokens``: nothing more is sent; a raised budget resumes."""


class Interrupted(BatcherError):
    """Ctrl-C or SIGTERM: the checkpoint is consistent and the run can resume."""

    exit_code = 130

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Verdict(Enum):
    """What one failed request means for its row and for the run."""

    RETRY = "retry"  # transient: try the same request again later
    ROW_ERROR = "row_error"  # this request can never succeed as sent
    ABORT = "abort"  # the account is refused: stop the whole run


@dataclass
class ApiError(Exception):
    """One failed request, already classified.

    ``message`` is a one-line, secret-free reason suitable for the results
    file; ``retry_after_s`` is the server's own hint, when it gave one.
    """

    verdict: Verdict
    message: str
    status: int | None = None
    code: str | None = None
    type: str | None = None
    request_id: str | None = None
    retry_after_s: float | None = None
    gateway_fault: bool = False
    """The gateway itself failed (not the model behind it): fatal until a request succeeds,
    since a gateway that has never answered is misconfigured, not overloaded."""
    headers: dict[str, str] = field(default_factory=dict, repr=False)  # for rate-limit state

    def __str__(self) -> str:
        return self.message

    @property
    def signature(self) -> str:
        """What makes two failures "the same": status, code and type, or the
        kind of transport failure (the text before the first colon)."""
        if self.status is None:
            return self.message.split(":", 1)[0]
        return " ".join(str(part) for part in (f"HTTP {self.status}", self.code, self.type)
                        if part)

    @property
    def is_rate_limit(self) -> bool:
        return self.status == 429 and self.verdict is Verdict.RETRY
