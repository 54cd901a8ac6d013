"""The Files and Batches API's state and lifecycle, free of aiohttp.

A batch walks ``validating -> in_progress -> finalizing -> completed``, each
phase lasting :attr:`MockConfig.batch_phase_s`; the status is worked out
lazily from the clock whenever the batch is read, so nothing runs in the
background. The input file is validated when ``validating`` ends (a batch
with problems becomes ``failed`` with ``errors.data``), and every line is
answered when ``in_progress`` ends, through the same parser, replies and
faults as the online endpoint. Output and error files come out shuffled.
Each line's own behaviour (``[[batch:KIND]]`` markers) is read by
``batch_lines``.

A cancel moves an unfinished batch to ``cancelling`` and, a phase later, to
``cancelled`` with the first half of its lines answered and the rest in
neither file.

Every file and batch belongs to the key that made it (an ``owner``: a hash
of the key, never the key): another key is told it does not exist, so a
server that accepts any key still serves a user's prompts to that user only.

Longer than most modules because :class:`BatchStore` is one state machine:
the calls, the clock-driven phases and the answering of lines all act on the
same files and batches.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Any

from .batch_lines import SERVED_ENDPOINT, Line, read_lines
from .calls import BadRequest, parse_call
from .config import MockConfig
from .fault_replies import FaultContext, render_fault
from .faults import FaultPlanner, UnknownFault
from .responses import dumps, error_body, new_request_id, success_reply
from .stats import MockStats

BATCH_ENDPOINTS = frozenset({
    "/v1/responses", "/v1/chat/completions", "/v1/embeddings", "/v1/completions",
    "/v1/moderations", "/v1/images/generations", "/v1/images/edits", "/v1/videos",
})
"""What ``POST /v1/batches`` accepts as ``endpoint`` (spec ``CreateBatchRequest``)."""
FILE_PURPOSES = frozenset({"assistants", "batch", "fine-tune", "vision", "user_data", "evals"})
WINDOW_S = 24 * 3600
_MAX_METADATA_KEYS = 16


class ApiProblem(Exception):
    """A refused Files/Batches call; becomes an OpenAI-style error response."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(message, "invalid_request_error", param, code)


def _new_id(prefix: str) -> str:
    return f"{prefix}{os.urandom(12).hex()}"


@dataclass
class StoredFile:
    id: str
    filename: str
    purpose: str
    content: bytes
    created_at: int
    owner: str

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": len(self.content),
                "created_at": self.created_at, "expires_at": None, "filename": self.filename,
                "purpose": self.purpose, "status": "processed", "status_details": None}


@dataclass
class Batch:
    id: str
    input_file_id: str
    endpoint: str
    metadata: dict[str, str] | None
    created: float
    owner: str
    status: str = "validating"
    times: dict[str, int | None] = field(default_factory=dict)
    phase_started: float = 0.0
    errors: list[dict[str, Any]] | None = None
    model: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    counts: dict[str, int] = field(default_factory=lambda: {
        "total": 0, "completed": 0, "failed": 0})

    def describe(self) -> dict[str, Any]:
        at = self.times
        body: dict[str, Any] = {
            "id": self.id, "object": "batch", "endpoint": self.endpoint,
            "errors": None if self.errors is None else {"object": "list", "data": self.errors},
            "input_file_id": self.input_file_id, "completion_window": "24h",
            "status": self.status, "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id, "created_at": int(self.created),
        }
        for name in ("in_progress_at", "expires_at", "finalizing_at", "completed_at",
                     "failed_at", "expired_at", "cancelling_at", "cancelled_at"):
            body[name] = at.get(name)
        body["request_counts"] = dict(self.counts)
        body["metadata"] = self.metadata
        if self.model is not None:
            body["model"] = self.model
        return body


class BatchStore:
    """Every file and batch the server holds; lives on the server's event loop."""

    def __init__(self, config: MockConfig, stats: MockStats) -> None:
        self.config = config
        self.stats = stats
        self.files: dict[str, StoredFile] = {}
        self.batches: dict[str, Batch] = {}
        self._rng = random.Random(config.seed)
        self._planner = FaultPlanner(config.faults, config.seed)
        self._runs: dict[str, int] = {}  # batches that ran each prompt, for KIND*N markers

    # -- files ------------------------------------------------------------------------------

    def add_file(self, filename: str, purpose: str, content: bytes, now: float,
                 owner: str) -> StoredFile:
        if purpose not in FILE_PURPOSES:
            raise ApiProblem(400, f"'{purpose}' is not one of {sorted(FILE_PURPOSES)} - "
                             "'purpose'", "purpose", "invalid_value")
        if purpose == "batch" and not filename.endswith(".jsonl"):
            raise ApiProblem(400, "The Batch API only supports .jsonl files.", "file")
        stored = StoredFile(_new_id("file-"), filename, purpose, content, int(now), owner)
        self.files[stored.id] = stored
        self.stats.count("files_uploaded")
        return stored

    def file(self, file_id: str, owner: str) -> StoredFile:
        stored = self.files.get(file_id)
        if stored is None or stored.owner != owner:
            raise ApiProblem(404, f"No such File object: {file_id}", "id")
        return stored

    # -- batches ----------------------------------------------------------------------------

    def create(self, request: Any, now: float, owner: str) -> Batch:
        if not isinstance(request, dict):
            raise ApiProblem(400, "We could not parse the JSON body of your request.")
        file_id = request.get("input_file_id")
        endpoint = request.get("endpoint")
        window = request.get("completion_window")
        metadata = request.get("metadata")
        if not isinstance(file_id, str):
            raise ApiProblem(400, "Missing required parameter: 'input_file_id'.",
                             "input_file_id", "missing_required_parameter")
        if endpoint not in BATCH_ENDPOINTS:
            raise ApiProblem(400, f"Invalid value: '{endpoint}'. Supported values are: "
                             f"{', '.join(sorted(BATCH_ENDPOINTS))}.", "endpoint",
                             "invalid_value")
        if endpoint != SERVED_ENDPOINT:
            raise ApiProblem(400, f"The batcher mock server only runs {SERVED_ENDPOINT} batches.",
                             "endpoint")
        if window != "24h":
            raise ApiProblem(400, f"Invalid value: '{window}'. Supported values are: '24h'.",
                             "completion_window", "invalid_value")
        _check_metadata(metadata)
        stored = self.files.get(file_id)
        if stored is None or stored.owner != owner:
            raise ApiProblem(400, f"No such File object: {file_id}", "input_file_id")
        if stored.purpose != "batch":
            raise ApiProblem(400, f"File {file_id} has purpose '{stored.purpose}'; a batch "
                             "needs purpose 'batch'.", "input_file_id")
        batch = Batch(_new_id("batch_"), file_id, endpoint, metadata, now, owner,
                      phase_started=now)
        batch.times["expires_at"] = int(now) + WINDOW_S
        self.batches[batch.id] = batch
        self.stats.count("batches_created")
        return batch

    def get(self, batch_id: str, now: float, owner: str) -> Batch:
        batch = self.batches.get(batch_id)
        if batch is None or batch.owner != owner:
            raise ApiProblem(404, f"No batch found with id '{batch_id}'.", "batch_id")
        self._advance(batch, now)
        return batch

    def listing(self, limit: int, after: str | None, now: float, owner: str) -> dict[str, Any]:
        """The owner's batches newest first, as ``GET /v1/batches`` pages them."""
        ordered = sorted((b for b in self.batches.values() if b.owner == owner),
                         key=lambda b: b.created, reverse=True)
        if after is not None:
            ids = [b.id for b in ordered]
            ordered = ordered[ids.index(after) + 1:] if after in ids else []
        page = ordered[:limit]
        for batch in page:
            self._advance(batch, now)
        data = [batch.describe() for batch in page]
        return {"object": "list", "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": len(ordered) > limit}

    def cancel(self, batch_id: str, now: float, owner: str) -> Batch:
        batch = self.get(batch_id, now, owner)
        if batch.status not in ("validating", "in_progress"):
            raise ApiProblem(409, f"Cannot cancel a batch with status '{batch.status}'.")
        batch.status = "cancelling"
        batch.times["cancelling_at"] = int(now)
        batch.phase_started = now
        self.stats.count("batches_cancelled")
        return batch

    # -- lifecycle --------------------------------------------------------------------------

    def _advance(self, batch: Batch, now: float) -> None:
        """Catch the batch up with the clock: each phase ends ``batch_phase_s`` after
        the previous one, however rarely the batch is read."""
        phase = self.config.batch_phase_s
        if batch.status == "validating" and now >= batch.phase_started + phase:
            at = batch.phase_started + phase
            lines, problems = read_lines(self.files[batch.input_file_id].content,
                                           self.config.batch_max_requests)
            batch.counts["total"] = len(lines)
            if problems:
                batch.status, batch.errors = "failed", problems
                batch.times["failed_at"] = int(at)
                return
            batch.model = lines[0].body["model"] if lines else None
            self._move(batch, "in_progress", at)
        if batch.status == "in_progress" and now >= batch.phase_started + phase:
            at = batch.phase_started + phase
            lines = self._run_lines(batch)
            if any("slow" in line.kinds for line in lines):
                self._answer(batch, lines, "batch_expired", at)
                batch.status = "expired"
                batch.times["expired_at"] = int(at)
                return
            self._answer(batch, lines, None, at)
            self._move(batch, "finalizing", at)
        if batch.status == "finalizing" and now >= batch.phase_started + phase:
            batch.status = "completed"
            batch.times["completed_at"] = int(batch.phase_started + phase)
        if batch.status == "cancelling" and now >= batch.phase_started + phase:
            at = batch.phase_started + phase
            lines = self._run_lines(batch)
            self._answer(batch, lines[: len(lines) // 2], None, at)
            batch.status = "cancelled"
            batch.times["cancelled_at"] = int(at)

    def _run_lines(self, batch: Batch) -> list[Line]:
        """The batch's lines with the markers that apply to this run of each prompt."""
        lines, _ = read_lines(self.files[batch.input_file_id].content,
                                           self.config.batch_max_requests)
        for line in lines:
            runs = self._runs[line.prompt] = self._runs.get(line.prompt, 0) + 1
            line.kinds = frozenset(kind for kind, count in line.markers
                                   if not count or runs <= int(count))
        return lines

    @staticmethod
    def _move(batch: Batch, status: str, now: float) -> None:
        batch.status = status
        batch.times[f"{status}_at"] = int(now)
        batch.phase_started = now

    def _answer(self, batch: Batch, lines: list[Line], unfinished_code: str | None,
                now: float) -> None:
        """Answer ``lines`` into shuffled output/error files and count them."""
        output: list[bytes] = []
        errors: list[bytes] = []
        completed = failed = 0
        for line in lines:
            if "missing" in line.kinds:
                failed += 1
                continue
            if "slow" in line.kinds and unfinished_code is not None:
                errors.append(_line(line.custom_id, None, {
                    "code": unfinished_code,
                    "message": "This request could not be executed before the completion "
                               "window expired."}))
                failed += 1
                continue
            if "line_error" in line.kinds:
                errors.append(_line(line.custom_id, None, {
                    "code": "server_error",
                    "message": "The server had an error while processing your request."}))
                failed += 1
                continue
            status, body = self._respond(line)
            if "status0" in line.kinds:
                status, body = 0, {}
            response = {"status_code": status, "request_id": new_request_id(), "body": body}
            if 200 <= status < 300 or status == 0:
                output.append(_line(line.custom_id, response, None))
                completed += 1
            else:
                errors.append(_line(line.custom_id, response, None))
                failed += 1
        self._rng.shuffle(output)
        self._rng.shuffle(errors)
        batch.counts = {"total": batch.counts["total"], "completed": completed, "failed": failed}
        if output:
            batch.output_file_id = self._output_file(batch, "output", output, now).id
        if errors:
            batch.error_file_id = self._output_file(batch, "error", errors, now).id

    def _respond(self, line: Line) -> tuple[int, Any]:
        try:
            call = parse_call(line.raw_body)
        except BadRequest as exc:
            return 400, error_body(exc.message, "invalid_request_error", exc.param, exc.code)
        self.stats.record_prompt(call.prompt)
        self.stats.record_answer_format(call.answer_format)
        model = self.config.model_name or call.model
        try:
            kind = self._planner.choose(call.prompt)
        except UnknownFault as exc:
            return 400, error_body(str(exc), "invalid_request_error")
        if kind is None:
            reply = success_reply(call, model, self.config.seed)
        elif kind in ("drop", "stall"):
            return 500, error_body("The server had an error while processing your request.",
                                   "server_error")
        else:
            fault = FaultContext(call, model, self.config.fault_retry_after_s, None,
                                 self.config.echo_key_in_errors, self.config.seed)
            reply = render_fault(kind, fault)
        if reply.completion:
            self.stats.record_ok(call.prompt)
        body = reply.body
        if isinstance(body, bytes):  # an HTML page or a cut body: not JSON, so say so
            return reply.status, error_body("The upstream answer was not JSON.", "server_error")
        return reply.status, body

    def _output_file(self, batch: Batch, kind: str, lines: list[bytes], now: float
                     ) -> StoredFile:
        stored = StoredFile(_new_id("file-"), f"batch_{batch.id}_{kind}.jsonl", "batch_output",
                            b"".join(lines), int(now), batch.owner)
        self.files[stored.id] = stored
        return stored


def _line(custom_id: str, response: dict[str, Any] | None,
          error: dict[str, str] | None) -> bytes:
    return dumps({"id": _new_id("batch_req_"), "custom_id": custom_id, "response": response,
                  "error": error}) + b"\n"


def _check_metadata(metadata: Any) -> None:
    """Up to 16 string pairs; keys up to 64 characters, values up to 512 (spec ``Metadata``)."""
    if metadata is None:
        return
    if not isinstance(metadata, dict) or len(metadata) > _MAX_METADATA_KEYS:
        raise ApiProblem(400, "metadata: must be an object of at most 16 string pairs.",
                         "metadata", "invalid_type")
    for key, value in metadata.items():
        if not isinstance(value, str) or len(key) > 64 or len(value) > 512:
            raise ApiProblem(400, f"metadata.{key}: keys are strings of at most 64 characters "
                             "and values strings of at most 512.", "metadata", "invalid_value")
