"""HTTP routes of the Files and Batches API over :class:`~.batches.BatchStore`.

``POST /v1/files`` (multipart, streamed: a ``purpose=batch`` file over
``batch_file_max_bytes`` is read to its end and refused with a 413),
``GET /v1/files/{id}`` and ``/content``, ``POST /v1/batches``,
``GET /v1/batches`` (newest first, ``limit``/``after``), ``GET
/v1/batches/{id}`` and ``POST /v1/batches/{id}/cancel``.

Uploaded files hold prompts, so every call needs a key, even on a server
started without one (which then accepts any key): files and batches belong
to the key that made them, and no other key, and no request without a key,
can read, list or use them.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from aiohttp import BodyPartReader, web

from .batches import ApiProblem, BatchStore
from .config import MockConfig
from .responses import dumps, error_body, invalid_key_body
from .sleeper import Sleeper

KeyCheck = Callable[[Mapping[str, str], Mapping[str, str]], tuple[bool, str | None]]
_CHUNK = 1 << 16
_MAX_LIST_LIMIT = 100


@dataclass
class BatchContext:
    store: BatchStore
    config: MockConfig
    check_key: KeyCheck
    sleeper: Sleeper


BATCHES = web.AppKey("mock_batches", BatchContext)


class Dropped(web.Response):
    """Returned after the connection was closed on purpose; it is never sent."""


def _json(status: int, body: object) -> web.Response:
    return web.Response(status=status, body=dumps(body), content_type="application/json")


def _problem(problem: ApiProblem) -> web.Response:
    return _json(problem.status, problem.body)


NO_KEY_MESSAGE = ("You didn't provide an API key. The Files and Batches API needs one even "
                  "on a server started without a key (any key then): each file and batch is "
                  "served only to the key that made it.")


def _owner(request: web.Request) -> str | web.Response:
    """Who is calling (a hash of the key sent), or the 401 that refuses the call."""
    context = request.app[BATCHES]
    ok, sent = context.check_key(request.headers, request.query)
    if not ok:
        return _json(401, invalid_key_body(sent, echo=context.config.echo_key_in_errors))
    if not sent:
        return _json(401, error_body(NO_KEY_MESSAGE, "invalid_request_error", None,
                                     "missing_api_key"))
    return hashlib.sha256(sent.encode()).hexdigest()


async def _delay(request: web.Request, seconds: float) -> bool:
    """Wait ``seconds``; True when shutdown cut the wait short (drop the connection)."""
    if not seconds:
        return False
    if await request.app[BATCHES].sleeper.sleep(seconds):
        if request.transport is not None:
            request.transport.close()
        return True
    return False


async def _upload(request: web.Request) -> web.StreamResponse:
    owner = _owner(request)
    if isinstance(owner, web.Response):
        return owner
    context = request.app[BATCHES]
    try:
        reader = await request.multipart()
    except (AssertionError, ValueError, KeyError):  # not multipart/form-data
        return _json(400, error_body("The request must be multipart/form-data with 'file' and "
                                     "'purpose' fields.", "invalid_request_error"))
    purpose: str | None = None
    filename = "upload.jsonl"
    content = bytearray()
    too_big = False
    limit = context.config.batch_file_max_bytes
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            continue
        if part.name == "purpose":
            purpose = (await part.text()).strip()
        elif part.name == "file":
            filename = part.filename or filename
            while chunk := await part.read_chunk(_CHUNK):
                if not too_big:
                    content.extend(chunk)
                    # Keep reading to the end, so the client sees the 413 and not a reset.
                    too_big = len(content) > limit
                    if too_big:
                        content.clear()
        else:
            await part.release()
    if purpose is None:
        return _json(400, error_body("Missing required parameter: 'purpose'.",
                                     "invalid_request_error", "purpose",
                                     "missing_required_parameter"))
    if too_big and purpose == "batch":
        return _json(413, error_body(
            f"File is too large: the Batch API accepts files of at most {limit} bytes.",
            "invalid_request_error", "file", "file_too_large"))
    try:
        stored = context.store.add_file(filename, purpose, bytes(content), time.time(), owner)
    except ApiProblem as problem:
        return _problem(problem)
    if await _delay(request, context.config.upload_latency_s):
        return Dropped()
    return _json(200, stored.describe())


async def _file(request: web.Request) -> web.Response:
    owner = _owner(request)
    if isinstance(owner, web.Response):
        return owner
    try:
        stored = request.app[BATCHES].store.file(request.match_info["file_id"], owner)
    except ApiProblem as problem:
        return _problem(problem)
    return _json(200, stored.describe())


async def _file_content(request: web.Request) -> web.Response:
    owner = _owner(request)
    if isinstance(owner, web.Response):
        return owner
    context = request.app[BATCHES]
    try:
        stored = context.store.file(request.match_info["file_id"], owner)
    except ApiProblem as problem:
        return _problem(problem)
    context.store.stats.count("file_downloads")
    if await _delay(request, context.config.download_latency_s):
        return Dropped()
    return web.Response(status=200, body=stored.content, content_type="application/octet-stream")


async def _create(request: web.Request) -> web.Response:
    owner = _owner(request)
    if isinstance(owner, web.Response):
        return owner
    context = request.app[BATCHES]
    try:
        payload = json.loads(await request.read())
    except ValueError:
        payload = None
    try:
        batch = context.store.create(payload, time.time(), owner)
    except ApiProblem as problem:
        return _problem(problem)
    if await _delay(request, context.config.create_latency_s):
        return Dropped()
    return _json(200, batch.describe())


async def _retrieve(request: web.Request) -> web.Response:
    owner = _owner(request)
    if isinstance(owner, web.Response):
        return owner
    try:
        batch = request.app[BATCHES].store.get(request.match_info["batch_id"], time.time(),
                                                owner)
    except ApiProblem as problem:
        return _problem(problem)
    return _json(200, batch.describe())


async def _list(request: web.Request) -> web.Response:
    owner = _owner(request)
    if isinstance(owner, web.Response):
        return owner
    raw_limit = request.query.get("limit", "20")
    try:
        limit = int(raw_limit)
    except ValueError:
        limit = 0
    if not 1 <= limit <= _MAX_LIST_LIMIT:
        return _json(400, error_body(f"Invalid 'limit': expected 1..{_MAX_LIST_LIMIT}, got "
                                     f"{raw_limit!r}.", "invalid_request_error", "limit",
                                     "invalid_value"))
    listing = request.app[BATCHES].store.listing(limit, request.query.get("after"), time.time(),
                                                 owner)
    return _json(200, listing)


async def _cancel(request: web.Request) -> web.Response:
    owner = _owner(request)
    if isinstance(owner, web.Response):
        return owner
    try:
        batch = request.app[BATCHES].store.cancel(request.match_info["batch_id"], time.time(),
                                                   owner)
    except ApiProblem as problem:
        return _problem(problem)
    return _json(200, batch.describe())


def add_batch_routes(app: web.Application, context: BatchContext) -> None:
    """Serve the Files and Batches API from ``context`` (before any catch-all route)."""
    app[BATCHES] = context
    router = app.router
    router.add_post("/v1/files", _upload)
    router.add_get("/v1/files/{file_id}", _file)
    router.add_get("/v1/files/{file_id}/content", _file_content)
    router.add_post("/v1/batches", _create)
    router.add_get("/v1/batches", _list)
    router.add_get("/v1/batches/{batch_id}", _retrieve)
    router.add_post("/v1/batches/{batch_id}/cancel", _cancel)
