"""The Batch API's files, without I/O to the network: request lines, shards, reconciliation.

A request line is ``{"custom_id", "method": "POST", "url", "body"}`` with
the very body online mode would send. :class:`ShardWriter` cuts lines into
files within the service's limits (requests and bytes per file; a job has
one model, so each file has one). :func:`reconcile` turns a finished
batch's output and error lines into exactly one outcome per submitted
``custom_id``, matched by id and never by order: a 2xx line with a chat
completion is ``ok``; a non-2xx line (``status_code`` 0 included), a line
with ``error`` set, a body that is no completion and an id in neither file
are errors with their reason; lines the batch never ran (expired) are
``unfinished``, to be sent again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import IO, Any

import orjson

from batcher.errors import ApiError
from batcher.io.safefiles import open_private, private_folder
from batcher.records import STATUS_ERROR, STATUS_OK, RowResult
from batcher.redact import mask_key_shapes
from batcher.structured import ReplyProblem, ReplySchema
from batcher.transport.failures import classify_error, one_line, server_text
from batcher.transport.wire import parse_completion

Clean = Callable[[str], str]

BATCH_URL = "/v1/chat/completions"
UNFINISHED_CODES = frozenset({"batch_expired"})
"""Line ``error.code`` values that mean "never ran", not "failed"."""
CANCELLED_CODES = frozenset({"batch_cancelled"})


def request_line(custom_id: str, body: bytes) -> bytes:
    """One JSONL line of a batch input file; ``body`` is the online request body."""
    return orjson.dumps({"custom_id": custom_id, "method": "POST", "url": BATCH_URL,
                         "body": orjson.Fragment(body)}) + b"\n"


@dataclass(frozen=True)
class Shard:
    """One input file written to disk: its lines' ids in order, and their digest."""

    path: Path
    custom_ids: tuple[str, ...]
    size: int
    digest: str
    """A hash of the salt and the ids: the ``batcher_shard`` metadata that finds the batch."""


def shard_digest(salt: str, custom_ids: Iterable[str]) -> str:
    hasher = hashlib.blake2b(salt.encode(), digest_size=12)
    for custom_id in custom_ids:
        hasher.update(b"\n" + custom_id.encode())
    return hasher.hexdigest()


def starts_new_shard(lines: int, size: int, line: int, max_requests: int,
                     max_bytes: int) -> bool:
    """Whether a ``line``-byte line goes in a new file after ``lines`` lines of ``size``."""
    return lines > 0 and (lines >= max_requests or size + line > max_bytes)


class ShardWriter:
    """Cut request lines into files of at most ``max_requests`` lines and ``max_bytes``.

    Each file is written beside its final name and renamed when complete, so
    a file on disk is always whole; the folder is made 0700 and each file 0600
    (they hold every prompt). ``add`` returns the shard it closed, if
    adding the line closed one.
    """

    def __init__(self, folder: Path, salt: str, max_requests: int, max_bytes: int) -> None:
        self._folder = folder
        self._salt = salt
        self._max_requests = max_requests
        self._max_bytes = max_bytes
        self._ids: list[str] = []
        self._size = 0
        self._handle: IO[bytes] | None = None
        self._temp: Path | None = None

    def fits(self, line: bytes) -> bool:
        """Whether a line can go in any shard at all."""
        return len(line) <= self._max_bytes

    def add(self, custom_id: str, line: bytes) -> Shard | None:
        assert self.fits(line), "check fits() first"
        closed = None
        if starts_new_shard(len(self._ids), self._size, len(line), self._max_requests,
                            self._max_bytes):
            closed = self.close()
        if self._handle is None:
            private_folder(self._folder, "batch work folder")
            self._temp = self._folder / f".shard-{os.urandom(6).hex()}.tmp"
            self._handle = os.fdopen(open_private(self._temp, "batch file",
                                                  os.O_WRONLY | os.O_EXCL), "wb")
        self._handle.write(line)
        self._ids.append(custom_id)
        self._size += len(line)
        return closed

    def close(self) -> Shard | None:
        """Finish the open file, if any, and return it as a shard."""
        if self._handle is None or self._temp is None:
            return None
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        ids = tuple(self._ids)
        digest = shard_digest(self._salt, ids)
        path = self._folder / f"shard-{digest}.jsonl"
        self._temp.replace(path)
        shard = Shard(path, ids, self._size, digest)
        self._handle, self._temp, self._ids, self._size = None, None, [], 0
        return shard

    def discard(self) -> None:
        """Drop the file being written (the run stopped before it was complete)."""
        if self._handle is not None and self._temp is not None:
            self._handle.close()
            with contextlib.suppress(OSError):
                self._temp.unlink()
        self._handle, self._temp, self._ids, self._size = None, None, [], 0


def shard_lines(path: Path) -> Iterator[tuple[str, bytes]]:
    """Each request line of a shard file with its ``custom_id``, in file order."""
    with path.open("rb") as handle:
        for raw in handle:
            if raw.strip():
                yield str(orjson.loads(raw)["custom_id"]), raw


def shard_ids(path: Path) -> list[str]:
    """The ``custom_id`` of every line of a shard file, in file order."""
    return [name for name, _line in shard_lines(path)]


class LineKind(Enum):
    OK = "ok"
    HTTP_ERROR = "http_error"  # response.status_code not 2xx (0 included)
    LINE_ERROR = "line_error"  # the line's error is set
    BAD_BODY = "bad_body"  # a 2xx whose body is not a chat completion
    BAD_REPLY = "bad_reply"  # a completion whose reply fails output.schema (reply kept)
    MISSING = "missing"  # in neither file of a finished batch
    INVALID = "invalid"  # the batch failed validation
    CANCELLED = "cancelled"  # the batch was cancelled before this line ran
    UNFINISHED = "unfinished"  # the batch expired before this line ran: send it again


@dataclass(frozen=True)
class Outcome:
    kind: LineKind
    result: RowResult | None  # None for UNFINISHED: the row has no answer yet


@dataclass
class Reconciliation:
    """Exactly one outcome per submitted id, and counts by kind."""

    outcomes: dict[str, Outcome] = field(default_factory=dict)
    unknown_ids: int = 0  # lines naming an id that was not submitted (ignored)
    duplicates: int = 0  # second lines for an id (the first one counts)

    @property
    def counts(self) -> Counter[str]:
        return Counter(outcome.kind.value for outcome in self.outcomes.values())

    def describe(self) -> str:
        counts = self.counts
        parts = [f"{counts[kind.value]} {kind.value.replace('_', ' ')}" for kind in LineKind
                 if counts[kind.value]]
        if self.unknown_ids:
            parts.append(f"{self.unknown_ids} unknown ids ignored")
        if self.duplicates:
            parts.append(f"{self.duplicates} duplicate lines ignored")
        return ", ".join(parts) or "no lines"


def _error(kind: LineKind, reason: str, clean: Clean = mask_key_shapes) -> Outcome:
    """A failed row; ``reason`` may quote the service, so it is masked and made one line."""
    return Outcome(kind, RowResult.failed(server_text(f"batch: {reason}", clean), 1,
                                          f"batch {kind.value}"))


def _line_outcome(line: dict[str, Any], schema: ReplySchema | None, clean: Clean) -> Outcome:
    error = line.get("error")
    response = line.get("response")
    if isinstance(error, dict) and error:
        code = error.get("code")
        code = code if isinstance(code, str) or code is None else one_line(str(code))
        if code in UNFINISHED_CODES:
            return Outcome(LineKind.UNFINISHED, None)
        if code in CANCELLED_CODES:
            return _error(LineKind.CANCELLED, "the batch was cancelled before this request ran")
        return _error(LineKind.LINE_ERROR,
                      f"{code or 'error'}: {error.get('message') or ''}", clean)
    if not isinstance(response, dict):
        return _error(LineKind.LINE_ERROR, "a line with neither a response nor an error")
    status = response.get("status_code")
    body = orjson.dumps(response.get("body"))
    if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status < 300:
        if status == 0 or not isinstance(status, int):
            return _error(LineKind.HTTP_ERROR,
                          f"status_code {status!r}: the request got no HTTP answer")
        return _error(LineKind.HTTP_ERROR, classify_error(status, body, {}, clean=clean).message,
                      clean)
    try:
        completion = parse_completion(body, clean=clean)
    except ApiError as problem:
        return _error(LineKind.BAD_BODY, problem.message, clean)
    choices = completion.choices
    chosen, rejected = 0, None
    if schema is not None:  # the same check as online; asking again is the fallback's job
        verdict = schema.check_choices([(c.reply, c.finish_reason, c.refusal) for c in choices])
        if isinstance(verdict, ReplyProblem):
            rejected = one_line(f"batch: {verdict.message}")
        else:
            chosen = verdict[0]
    choice = choices[chosen]
    return Outcome(LineKind.OK if rejected is None else LineKind.BAD_REPLY, RowResult(
        reply=choice.reply, finish_reason=choice.finish_reason,
        prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens,
        total_tokens=completion.total_tokens, cached_tokens=completion.cached_tokens,
        reasoning_tokens=completion.reasoning_tokens, refusal=choice.refusal,
        status=STATUS_OK if rejected is None else STATUS_ERROR, error=rejected, attempts=1,
        latency_s=None, replies=[c.reply for c in choices] if len(choices) > 1 else None))


def reconcile(submitted: Sequence[str], lines: Iterable[bytes], status: str,
              validation_errors: Sequence[dict[str, Any]] = (), *,
              schema: ReplySchema | None = None, clean: Clean = mask_key_shapes) -> Reconciliation:
    """Outcomes for ``submitted`` (in the input file's order) from a batch in a
    final ``status``, its output and error file ``lines``, and for a ``failed``
    batch its ``errors.data``; with the job's reply ``schema``, a completion
    whose replies all fail it is a ``bad_reply`` error with the reply kept.
    ``clean`` (the run's redactor's) masks secrets in every error the service wrote,
    exactly as online errors are masked."""
    result = Reconciliation()
    wanted = set(submitted)
    if status == "failed":
        by_line: dict[int, str] = {}
        general = "the input file failed validation"
        for problem in validation_errors:
            message = server_text(problem.get("message") or problem.get("code") or "", clean)
            line = problem.get("line")
            if isinstance(line, int) and 1 <= line <= len(submitted):
                by_line.setdefault(line, message)
            elif message:
                general = message
        for number, custom_id in enumerate(submitted, start=1):
            reason = by_line.get(number, general)
            result.outcomes[custom_id] = _error(LineKind.INVALID,
                                                f"failed validation: {reason}", clean)
        return result
    for raw in lines:
        if not raw.strip():
            continue
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue  # a line we cannot read names no id; its id ends up missing
        line_id = line.get("custom_id") if isinstance(line, dict) else None
        if not isinstance(line_id, str) or line_id not in wanted:
            result.unknown_ids += 1
            continue
        if line_id in result.outcomes:
            result.duplicates += 1
            continue
        result.outcomes[line_id] = _line_outcome(line, schema, clean)
    for custom_id in submitted:
        if custom_id in result.outcomes:
            continue
        if status == "expired":
            result.outcomes[custom_id] = Outcome(LineKind.UNFINISHED, None)
        elif status == "cancelled":
            result.outcomes[custom_id] = _error(
                LineKind.CANCELLED, "the batch was cancelled before this request ran")
        else:
            result.outcomes[custom_id] = _error(
                LineKind.MISSING, "the request is in neither the output nor the error file")
    return result
