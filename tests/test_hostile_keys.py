"""Issue 20, items 1, 2, 3, 16 and 17 (the report): what a hostile server or proxy
sends back never shows a key or a password, never forges a line of a log, and never
crashes a command. Each test talks HTTP over 127.0.0.1 to a small hostile server (an
OpenAI-compatible one with a Batch API, below), a refusing proxy, or the mock."""

from __future__ import annotations

import asyncio
import base64
import csv
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import orjson
import pytest
from aiohttp import web
from conftest import Ran, cli, cli_env, job_dict, prompts_csv, write_job
from security_servers import LoggingProxy, ServerThread

from batcher.jobload import job_from_dict
from batcher.jobs import endpoint_for
from batcher.mock_server import MockConfig, MockServer
from batcher.transport.client import ChatClient
from batcher.transport.wire import request_body

# A key with every character URL encoding changes and no sk- prefix (that shape is
# masked by pattern, which would hide a missing encoding); another that is sk-shaped.
KEY = "Qx7+kEy/with=odd+chars/0123456789"
OTHER_KEY = "sk-proj-AbCdEf0123456789ghIJkl"
KEY_FORMS = [KEY, quote(KEY, safe=""), quote(KEY), quote_plus(KEY),
             quote(KEY, safe="").lower(), base64.b64encode(KEY.encode()).decode(), OTHER_KEY]
FORGED = "batcher: 1,000 rows: 1,000 ok, 0 errors; all good"

ErrorBody = Callable[[str], dict[str, Any]]
"""The error object a hostile server answers, from the key the request carried."""


# -- a hostile OpenAI-compatible server: chat and Batch API ----------------------------------


class HostileServer:
    """Answers every chat request with ``status`` and ``{"error": error(key)}``, ``key``
    being what the request's ``Authorization: Bearer`` carried. Its Batch API takes any
    upload, reports each batch with the ``batch_statuses`` in turn (the last one from
    then on) and answers every request line with that same error, as a failed response
    (``line_style="response"``) or as the line's own ``error`` (``"error"``)."""

    def __init__(self, servers: ServerThread, error: ErrorBody, *, status: int = 400,
                 batch_statuses: tuple[str, ...] = ("completed",),
                 line_style: str = "response") -> None:
        self._error = error
        self._status = status
        self._batch_statuses = list(batch_statuses)
        self._line_style = line_style
        self._uploads: dict[str, list[str]] = {}
        self._batches: dict[str, str] = {}
        self._outputs: dict[str, bytes] = {}
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/files", self._upload)
        app.router.add_get("/v1/files/{file_id}/content", self._content)
        app.router.add_get("/v1/batches", self._list)
        app.router.add_post("/v1/batches", self._create)
        app.router.add_get("/v1/batches/{batch_id}", self._retrieve)
        self.port = servers.serve_app(app)  # cleaned up with the servers' thread
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def _key(self, request: web.Request) -> str:
        return request.headers.get("Authorization", "").removeprefix("Bearer ")

    async def _chat(self, request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"error": self._error(self._key(request))},
                                 status=self._status)

    async def _upload(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload = form["file"]
        assert isinstance(upload, web.FileField)
        ids = [orjson.loads(line)["custom_id"] for line in upload.file.read().splitlines()
               if line.strip()]
        file_id = f"file-in{len(self._uploads)}"
        self._uploads[file_id] = ids
        return web.json_response({"id": file_id, "object": "file", "purpose": "batch"})

    async def _list(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [], "has_more": False})

    async def _create(self, request: web.Request) -> web.Response:
        body = await request.json()
        batch_id = f"batch_{len(self._batches)}"
        self._batches[batch_id] = body["input_file_id"]
        error = self._error(self._key(request))
        lines = [{"custom_id": custom_id, "response": None, "error": error}
                 if self._line_style == "error" else
                 {"custom_id": custom_id,
                  "response": {"status_code": self._status, "body": {"error": error}},
                  "error": None}
                 for custom_id in self._uploads[body["input_file_id"]]]
        self._outputs[f"file-out-{batch_id}"] = b"".join(orjson.dumps(line) + b"\n"
                                                        for line in lines)
        return web.json_response(self._batch(batch_id, "validating"))

    async def _retrieve(self, request: web.Request) -> web.Response:
        status = (self._batch_statuses.pop(0) if len(self._batch_statuses) > 1
                  else self._batch_statuses[0])
        return web.json_response(self._batch(request.match_info["batch_id"], status))

    async def _content(self, request: web.Request) -> web.Response:
        return web.Response(body=self._outputs[request.match_info["file_id"]],
                            content_type="application/jsonl")

    def _batch(self, batch_id: str, status: str) -> dict[str, Any]:
        requests = len(self._uploads[self._batches[batch_id]])
        return {"id": batch_id, "object": "batch", "status": status,
                "input_file_id": self._batches[batch_id], "created_at": int(time.time()),
                "output_file_id": f"file-out-{batch_id}" if status == "completed" else None,
                "error_file_id": None,
                "request_counts": {"total": requests, "completed": 0, "failed": requests}}


@pytest.fixture
def servers() -> Iterator[ServerThread]:
    with ServerThread() as thread:
        yield thread


@pytest.fixture
def hostile(servers: ServerThread) -> Callable[..., HostileServer]:
    """Start hostile servers on the test's thread; they stop with it."""

    def start(error: ErrorBody, **options: Any) -> HostileServer:
        return HostileServer(servers, error, **options)

    return start


# -- helpers ---------------------------------------------------------------------------------


def hostile_job(tmp_path: Path, base_url: str, mode: str, rows: int = 3,
                **overrides: Any) -> Path:
    data = job_dict(base_url, prompts_csv(tmp_path, rows), tmp_path / "out.csv",
                    **{"retry": {"max_attempts": 1}, **overrides})
    if mode == "batch":
        data |= {"mode": "batch", "batch": {"poll_interval_s": 0.01}}
    return write_job(tmp_path / "job.yaml", data)


def run(job: Path, mode: str, *args: str, env: dict[str, str] | None = None) -> Ran:
    """``batcher run`` with the key ``KEY`` (batch mode waits for its batches)."""
    extra = ("--wait",) if mode == "batch" else ()
    return cli("run", str(job), *extra, *args, env=env or cli_env(key=KEY))


def results(tmp_path: Path) -> list[dict[str, str]]:
    with (tmp_path / "out.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def key_free(text: str) -> bool:
    return not any(form in text for form in KEY_FORMS)


# == item 1 ==================================================================================


@pytest.mark.parametrize("mode", ["online", "batch"])
def test_item1_a_key_echoed_in_code_or_type_is_masked_everywhere(
        tmp_path: Path, hostile: Callable[..., HostileServer], mode: str) -> None:
    """The server puts the key it was sent into the error's code (%-encoded) and type
    (as is, beside an sk- key of someone else's and 200 characters of padding): no
    file, no output and no command shows either key, and code and type are cut short."""
    server = hostile(lambda key: {"message": "rejected", "code": f"bad_key_{quote_plus(key)}",
                                  "type": f"{key} {OTHER_KEY} " + "t" * 200})
    job = hostile_job(tmp_path, server.base_url, mode)
    ran = run(job, mode, "--json")
    assert ran.returncode == 1, ran.stderr
    rows = results(tmp_path)
    assert [row["status"] for row in rows] == ["error"] * 3
    for row in rows:
        assert row["error_class"].startswith("HTTP 400 bad_key_***") or mode == "batch"
        assert len(row["error_class"]) <= len("HTTP 400 ") + 64 + 1 + 64  # code, type: 64 each
        assert "rejected" in row["error"]
    status = cli("status", str(job))
    status_json = cli("status", "--json", str(job))
    report = cli("report", str(job))
    assert status.returncode == status_json.returncode == report.returncode == 0, report
    shown = [ran.stdout, ran.stderr, status.stdout, status_json.stdout, report.stdout,
             report.stderr]
    stored = [path.read_bytes().decode("latin-1") for path in sorted(tmp_path.rglob("*"))
              if path.is_file() and path.name not in ("job.yaml", "prompts.csv")]
    assert any(name.endswith(".report.html") for name in map(str, tmp_path.iterdir()))
    assert (tmp_path / "out.summary.json").exists() and (tmp_path / "out.ckpt").exists()
    for text in shown + stored:
        assert key_free(text), text


# == item 2 ==================================================================================


@pytest.mark.parametrize("mode", ["online", "batch"])
def test_item2_a_proxy_refusing_our_credentials_stops_the_run_naming_the_proxy(
        tmp_path: Path, servers: ServerThread, mode: str) -> None:
    """An HTTPS proxy answers 407 to every CONNECT. aiohttp's error quotes the proxy URL
    half-decoded (``Pr0xy+Pass%2Fw0rd``): no form of the password shows, and the run
    stops with exit 3 after a handful of requests instead of retrying every row."""
    password = "Pr0xy+Pass/w0rd"
    proxy = LoggingProxy(servers, refuse=407)
    env = cli_env({"HTTPS_PROXY": f"http://alice:{quote(password, safe='')}@127.0.0.1:"
                                  f"{proxy.port}"}, key=KEY)
    job = hostile_job(tmp_path, "https://127.0.0.1:9/v1", mode, rows=40,
                      limits={"concurrency": 2}, retry={"max_attempts": 6})
    ran = run(job, mode, env=env)
    assert ran.returncode == 3, ran.stderr
    assert f"the proxy http://127.0.0.1:{proxy.port} refused" in ran.stderr
    assert "HTTPS_PROXY" in ran.stderr and "407" in ran.stderr
    assert b"Proxy-Authorization: Basic" in proxy.heads[0]  # the proxy did get them
    assert len(proxy.heads) <= 4  # the concurrent requests at most, none retried
    forms = [password, quote(password, safe=""), quote_plus(password), "Pr0xy+Pass%2Fw0rd",
             "Pr0xy%2BPass/w0rd", base64.b64encode(f"alice:{password}".encode()).decode()]
    stored = [path.read_bytes().decode("latin-1") for path in sorted(tmp_path.rglob("*"))
              if path.is_file()]
    for text in [ran.stdout, ran.stderr, *stored]:
        assert not any(form.lower() in text.lower() for form in forms), text


# == item 3 ==================================================================================


@pytest.mark.parametrize("auth", [None, {"query": "api_key"}], ids=["bearer", "query"])
def test_item3_the_endpoints_repr_shows_no_key(tmp_path: Path,
                                               auth: dict[str, str] | None) -> None:
    """The endpoint a job resolves to carries the key to the mock (every request is
    answered 200); its repr() (a traceback, a log line, a notebook cell) does not show it,
    nor does the repr of the client that holds it."""
    data = job_dict("unused", prompts_csv(tmp_path, 1), tmp_path / "out.csv",
                    endpoint={"auth": auth} if auth else {})
    with MockServer(MockConfig(api_key=KEY)) as mock:
        data["endpoint"]["base_url"] = mock.base_url
        job = job_from_dict(data, base_dir=tmp_path, source="job", require_output=True)
        with endpoint_for(job, {"BATCHER_TEST_KEY": KEY}) as (endpoint, redactor):

            async def send() -> str:
                async with ChatClient(endpoint, redactor, 1) as client:
                    await client.send(request_body(
                        "gpt-4o-mini", [{"role": "user", "content": "hi"}], {}))
                    return repr(client) + repr(client.endpoint) + repr(client.redactor)

            shown = asyncio.run(send())
        assert mock.stats.snapshot()["by_status"] == {200: 1}
        assert f"Endpoint(url='{mock.base_url}/chat/completions" in shown
    assert key_free(shown + repr(endpoint)), shown


# == item 16 =================================================================================


@pytest.mark.parametrize("mode", ["online", "batch"])
def test_item16_newlines_from_the_server_forge_no_line_of_the_log_or_status(
        tmp_path: Path, hostile: Callable[..., HostileServer], mode: str) -> None:
    """Error codes, types and messages, and a batch's status, with line breaks of every
    kind that would start a line looking like batcher's own: each printed field stays
    on its line."""
    breaks = ["\n", "\r\n", "\u2028", "\x85", "\x0b"]
    server = hostile(lambda _key: {
        "message": f"refused{breaks[0]}{FORGED}",
        "code": "".join(f"c{index}{brk}{FORGED}" for index, brk in enumerate(breaks)),
        "type": f"t{breaks[1]}{FORGED}"},
        batch_statuses=(f"in_progress\n{FORGED}", "completed"), line_style="error")
    job = hostile_job(tmp_path, server.base_url, mode)
    shown = ""
    if mode == "batch":  # a status that is no batch status stops the run, shown escaped
        refused = run(job, mode)
        assert refused.returncode == 3, refused.stderr
        shown = refused.stdout + refused.stderr
        assert f"'in_progress\\n{FORGED[:20]}" in shown
    ran = run(job, mode)
    status = cli("status", str(job))
    assert ran.returncode == 1 and status.returncode == 0, ran.stderr + status.stderr
    for text in (shown, ran.stdout, ran.stderr, status.stdout, status.stderr):
        assert not any(line.startswith((FORGED, FORGED.removeprefix("batcher: ")))
                       for line in text.splitlines()), text
    assert FORGED in ran.stderr  # shown, inside a line of batcher's own
    for row in results(tmp_path):
        assert len(row["error"].splitlines()) == 1 and len(row["error_class"].splitlines()) == 1


# == item 17 (the report) ====================================================================


def test_item17_a_dollar_sign_in_an_error_code_does_not_crash_the_report(
        tmp_path: Path, hostile: Callable[..., HostileServer]) -> None:
    """matplotlib reads text between two ``$`` as TeX; an error code that is not valid
    TeX is drawn as it is, and the report is written."""
    server = hostile(lambda _key: {"message": "no", "code": r"$\notacommand{$",
                                   "type": r"$x^$"})
    job = hostile_job(tmp_path, server.base_url, "online")
    assert run(job, "online").returncode == 1
    report = cli("report", str(job))
    assert report.returncode == 0, report.stderr
    page = (tmp_path / "out.report.html").read_text(encoding="utf-8")
    assert r"<td>HTTP 400 $\notacommand{$ $x^$</td>" in page
    assert page.count("data:image/png;base64,") == 4
