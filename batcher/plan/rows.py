"""A row on its way: pending, keyed in its batch, ready to send, finished.

Plain data that every step of a row's path passes on (``batcher.plan.jobplan``
makes them, ``batcher.plan.pipeline`` sends them, the drivers journal them);
:class:`SharedRequests`, which hands one request's outcome to its identical
rows when a job shares duplicates; and :class:`IdenticalFailures`, which
stops a run whose rows all fail the same way, on one machine or on Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from batcher.errors import ApiError, RunAborted
from batcher.limits.retry import FailureStreak
from batcher.records import RowResult


class Rejection(Protocol):
    """Why a reply is not acceptable (``batcher.structured.ReplyProblem`` is one)."""

    @property
    def message(self) -> str: ...  # one line, for the results' ``error``
    @property
    def retryable(self) -> bool: ...  # whether asking again may help
    @property
    def signature(self) -> str: ...  # what makes two failed rows fail "the same way"


@dataclass(slots=True)
class PendingRow:
    """A row the store holds no ``ok`` answer for."""

    position: int
    key: bytes
    text: str | None  # the user message, or None with the reason in ``problem``
    problem: str | None = None
    request_hash: bytes = b""  # made only when identical requests are shared


@dataclass(slots=True)
class BatchPlan:
    """One input batch, keyed: which of its rows are answered, which pending."""

    start: int
    keys: np.ndarray  # (rows, 16) key bytes, in input order
    pending: list[PendingRow]

    @property
    def reused(self) -> int:
        return len(self.keys) - len(self.pending)


@dataclass(slots=True)
class RowRequest:
    """One row, ready to send."""

    position: int
    key: bytes
    request_hash: bytes
    body: bytes
    prompt_tokens_estimate: int


@dataclass(slots=True)
class Outcome:
    """How a row ended: its result, and the last error when it failed."""

    result: RowResult
    failure: ApiError | Rejection | None = None


class SharedRequests:
    """``duplicates: share``: identical requests in one run are sent once.

    The first row with a request leads (it is sent); rows with the same
    request that come while it is in flight wait for its outcome, and rows
    that come after it is stored take it from the store. Memory: one entry
    per distinct request of the run, so it is opt-in.
    """

    def __init__(self) -> None:
        self._state: dict[bytes, list[PendingRow] | tuple[int, int]] = {}

    def arrive(self, row: PendingRow) -> list[PendingRow] | tuple[int, int] | None:
        """None: the row leads, send it. A list: it waits (now in the list).
        A place: the outcome is stored there already."""
        state = self._state.get(row.request_hash)
        if state is None:
            self._state[row.request_hash] = []
            return None
        if isinstance(state, list):
            state.append(row)
        return state

    def waiting(self, request_hash: bytes) -> list[PendingRow]:
        state = self._state.get(request_hash)
        return state if isinstance(state, list) else []

    def stored(self, request_hash: bytes, place: tuple[int, int]) -> None:
        self._state[request_hash] = place


class IdenticalFailures:
    """Stops a run (``RunAborted``) once ``retry.stop_after_identical_failures``
    finished rows in a row failed the same way: one bad row is the row's
    problem, twenty identical failures (a 400 for an unknown parameter, a
    server that is down) are the job's, and going on would burn the input.

    ``kept`` ends the message: what the user keeps (the checkpoint, the journals).
    """

    def __init__(self, limit: int, kept: str) -> None:
        self._streak = FailureStreak(limit)
        self._kept = kept

    def record(self, outcome: Outcome) -> None:
        failure = outcome.failure
        if self._streak.record(failure.signature if failure else None):
            raise RunAborted(
                f"stopped after {self._streak.count} rows in a row failed the same way "
                f"({failure.message if failure else ''}); fix the job and run again, "
                f"{self._kept} (retry.stop_after_identical_failures sets the count)")
