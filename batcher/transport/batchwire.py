"""The Batch API's objects as a server sends them, checked once where they arrive.

A batch object, a page of the batch list and an uploaded file's id come from
the server and go on into URLs, local file names, the state file and messages.
Each is parsed here into a small typed value, or refused with a one-line
reason: an ``ApiError`` with ``Verdict.ROW_ERROR`` (not retried: the same
server gives the same answer), which the batch run turns into exit 3 before
anything of it is saved.

What batcher acts on must be right: ids (used in URLs, and a path-shaped one
could name a file outside the work folder), the status, the file ids.
What it only shows or uses as a hint (request counts, the creation time,
validation messages) is taken when it makes sense and dropped when not.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from batcher.errors import ApiError, Verdict
from batcher.transport.failures import one_line

SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,255}")
"""A batch or file id batcher accepts: OpenAI's ``batch_abc``/``file-abc``, UUIDs, and
the like; never a path (no ``/``, no leading ``.``), never empty, at most 256 characters."""
ID_SHAPE = "1 to 256 letters, digits, '_', '-' or '.', starting with a letter or digit"
STATUS = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
LATEST_TIME_S = 253_402_300_799.0
"""9999-12-31 23:59:59 UTC: the last second a ``datetime`` can show."""
_SHOWN_CHARS = 60
_TEXT_CHARS = 500

Clean = Callable[[str], str]


def _verbatim(text: str) -> str:
    return text


def is_safe_id(value: object) -> bool:
    return isinstance(value, str) and SAFE_ID.fullmatch(value) is not None


def time_or_none(value: object) -> float | None:
    """``value`` as a Unix time a ``datetime`` can show, or None (a bool, NaN, a negative
    number, a far future or anything but a number)."""
    if (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and 0 <= value <= LATEST_TIME_S):
        return float(value)
    return None


def is_time(value: object) -> bool:
    return time_or_none(value) is not None


def unusable(reason: str, clean: Clean = _verbatim) -> ApiError:
    """A server answer batcher will not use: one line, secret-free, not retried."""
    return ApiError(Verdict.ROW_ERROR, one_line(clean(reason)), status=200)


def shown(value: object, clean: Clean = _verbatim) -> str:
    """A server value quoted in a message: its repr (escapes, quotes), masked, then cut."""
    text = clean(repr(value))
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "..."


def safe_id(value: object, what: str, clean: Clean = _verbatim) -> str:
    """``value`` if it is an id of the safe shape; else the error naming ``what``."""
    if is_safe_id(value):
        assert isinstance(value, str)
        return value
    raise unusable(f"the service gave {what} {shown(value, clean)}, which is not an id "
                   f"batcher accepts ({ID_SHAPE}); nothing of it was saved", clean)


@dataclass(frozen=True)
class Batch:
    """The fields of a batch object batcher uses, checked."""

    id: str
    status: str
    created_at: float | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    done: int = 0
    """``request_counts.completed + failed``: shown while it runs."""
    problems: tuple[dict[str, Any], ...] = ()
    """``errors.data`` of a failed batch: ``{"line": int | None, "code": str, "message": str}``."""


def parse_batch(data: Any, *, clean: Clean = _verbatim, status: str | None = None) -> Batch:
    """A batch object from the server; ``status`` is the one to assume when it has none
    (a creation's or a cancel's answer), else a missing status is an error."""
    if not isinstance(data, dict):
        raise unusable("the service's answer is not a batch object", clean)
    batch_id = safe_id(data.get("id"), "a batch the id", clean)
    given = data.get("status")
    if given is None:
        given = status
    if not isinstance(given, str) or not STATUS.fullmatch(given):
        raise unusable(f"batch {batch_id}: the service gave the status {shown(given, clean)}, "
                       "which is not a batch status; nothing of it was saved", clean)
    files = {name: data.get(name) for name in ("output_file_id", "error_file_id")}
    for name, value in files.items():
        if value is not None:
            safe_id(value, f"batch {batch_id} the {name}", clean)
    counts = data.get("request_counts")
    done = 0
    if isinstance(counts, dict):
        done = sum(value for value in (counts.get("completed"), counts.get("failed"))
                   if isinstance(value, int) and not isinstance(value, bool) and value > 0)
    errors = data.get("errors")
    listed = errors.get("data") if isinstance(errors, dict) else None
    problems = tuple(_problem(entry, clean) for entry in listed
                     if isinstance(entry, dict)) if isinstance(listed, list) else ()
    return Batch(batch_id, given, time_or_none(data.get("created_at")),
                 files["output_file_id"], files["error_file_id"], done, problems)


def _problem(entry: dict[str, Any], clean: Clean) -> dict[str, Any]:
    line = entry.get("line")

    def text(value: Any) -> str:
        return one_line(clean(str(value)))[:_TEXT_CHARS] if value not in (None, "") else ""

    return {"line": line if isinstance(line, int) and not isinstance(line, bool) else None,
            "code": text(entry.get("code")), "message": text(entry.get("message"))}


@dataclass(frozen=True)
class Listed:
    """One entry of the batch list: enough to tell whose it is, and the raw object to
    parse when it is this job's (an entry of another tool's is never refused)."""

    job: str | None
    shard: str | None
    created_at: float | None
    raw: dict[str, Any]


@dataclass(frozen=True)
class Page:
    batches: tuple[Listed, ...]
    has_more: bool
    last_id: str | None
    """The cursor for the next page: the last entry's id."""


def parse_page(data: Any, *, clean: Clean = _verbatim) -> Page:
    """One page of ``GET /batches``."""
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise unusable("the service's batch list has no list of batches (data)", clean)
    batches = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        metadata = entry.get("metadata")
        metadata = metadata if isinstance(metadata, dict) else {}
        job, shard = metadata.get("batcher_job"), metadata.get("batcher_shard")
        batches.append(Listed(job if isinstance(job, str) else None,
                              shard if isinstance(shard, str) else None,
                              time_or_none(entry.get("created_at")), entry))
    last = batches[-1].raw.get("id") if batches else None
    assert isinstance(data, dict)
    return Page(tuple(batches), data.get("has_more") is True,
                last if isinstance(last, str) else None)
