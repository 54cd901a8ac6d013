"""A batch's input file, read and checked the way OpenAI validates it.

Each line must be a ``POST`` to the chat-completions URL with a unique
``custom_id`` and a body naming the one model of the file; a file with any
problem makes the batch ``failed`` with the problems in ``errors.data``.

Per-line behaviour is chosen by a marker in the line's last user message,
beside the online ``[[fault:KIND]]`` markers (which give the line that
status and body, with the line's ``error`` null):

* ``[[batch:invalid]]``: the line fails validation, so the batch fails;
* ``[[batch:slow]]``: the line never finishes, so the batch ``expired``;
  its line lands in the error file with ``error.code: batch_expired``;
* ``[[batch:status0]]``: an output-file line whose ``response.status_code`` is 0;
* ``[[batch:line_error]]``: ``response: null`` and ``error`` set;
* ``[[batch:missing]]``: the line is in neither file.

``[[batch:KIND*N]]`` applies to the first N batches that run that prompt only
(so ``[[batch:slow*1]]`` expires once and is answered when submitted again).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .responses import dumps

SERVED_ENDPOINT = "/v1/chat/completions"
LINE_KINDS = frozenset({"invalid", "slow", "status0", "line_error", "missing"})
_LINE_MARKER = re.compile(r"\[\[batch:([A-Za-z0-9_]+)(?:\*(\d+))?\]\]")
_BOM = b"\xef\xbb\xbf"


@dataclass
class Line:
    """One request line of a batch's input file, with its ``[[batch:...]]`` markers."""

    custom_id: str
    body: dict[str, Any]
    raw_body: bytes
    prompt: str
    markers: list[tuple[str, str]]
    kinds: frozenset[str] = frozenset()


def read_lines(content: bytes, max_requests: int
               ) -> tuple[list[Line], list[dict[str, Any]]]:
    """The file's lines, and the validation errors OpenAI would report for it."""
    problems: list[dict[str, Any]] = []

    def problem(code: str, message: str, line: int | None, param: str | None = None) -> None:
        problems.append({"code": code, "message": message, "param": param, "line": line})

    if content.startswith(_BOM):
        problem("invalid_json_line", "The file starts with a byte order mark (BOM); "
                "save it as UTF-8 without BOM.", 1)
        return [], problems
    lines: list[Line] = []
    seen: set[str] = set()
    models: set[str] = set()
    raw_lines = [raw for raw in content.split(b"\n") if raw.strip()]
    if not raw_lines:
        problem("empty_file", "The input file is empty.", None)
    if len(raw_lines) > max_requests:
        problem("too_many_requests", f"The input file has {len(raw_lines)} requests; a "
                f"batch holds at most {max_requests}.", None)
    for number, raw in enumerate(raw_lines, start=1):
        try:
            data = json.loads(raw)
        except ValueError:
            problem("invalid_json_line", f"Line {number} is not valid JSON.", number)
            continue
        custom_id = data.get("custom_id") if isinstance(data, dict) else None
        body = data.get("body") if isinstance(data, dict) else None
        if not isinstance(custom_id, str) or not custom_id:
            problem("missing_required_parameter", "Missing 'custom_id'.", number, "custom_id")
            continue
        if custom_id in seen:
            problem("duplicate_custom_id", f"The custom_id '{custom_id}' is used more than "
                    "once; custom_id must be unique within a batch.", number, "custom_id")
        seen.add(custom_id)
        if data.get("method") != "POST":
            problem("invalid_method", "Only POST is supported.", number, "method")
        if data.get("url") != SERVED_ENDPOINT:
            problem("mismatched_url", f"The url of line {number} does not match the "
                    f"batch's endpoint {SERVED_ENDPOINT}.", number, "url")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            problem("invalid_request", "The body must be an object with a 'model'.",
                    number, "body")
            continue
        models.add(body["model"])
        prompt = _last_user_text(body)
        markers: list[tuple[str, str]] = _LINE_MARKER.findall(prompt)
        for kind, _count in markers:
            if kind not in LINE_KINDS:
                problem("invalid_request", f"Unknown mock batch marker '{kind}'.", number)
        if any(kind == "invalid" for kind, _count in markers):
            problem("invalid_request", f"Line {number} was rejected by the mock server as "
                    "instructed ([[batch:invalid]]).", number, "body")
        lines.append(Line(custom_id, body, raw_line_body(data), prompt, markers))
    if len(models) > 1:
        problem("mismatched_model", "Each input file can only include requests to a single "
                f"model; this one names {len(models)}: {', '.join(sorted(models))}.", None,
                "model")
    return lines, problems


def raw_line_body(data: dict[str, Any]) -> bytes:
    return dumps(data.get("body"))


def _last_user_text(body: dict[str, Any]) -> str:
    messages = body.get("messages")
    text = ""
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict) and message.get("role") == "user":
                content = message.get("content")
                text = content if isinstance(content, str) else ""
    return text
