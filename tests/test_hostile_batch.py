"""Issue 20 (items 4, 12, 13 and the batch half of 17): a hostile Batch API costs nothing.

Each test runs ``batcher run`` (in-process, click's runner) against a real
aiohttp server on 127.0.0.1 that plays the Files and Batches API straight
except for the one answer under test: a path-shaped id, a huge or endless
answer, a list that ignores its cursor, an object with a list where a string
belongs. The command must end in a clear message (an error row, or exit 3
naming the cause), never in a traceback, a file written outside the work
folder, or a run that never ends; and what the server said must not poison
the state file for the next run.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pytest
from aiohttp import BodyPartReader, web
from conftest import Ran, cli, job_dict, write_csv, write_job
from security_servers import ServerThread

Answer = Callable[[web.Request], Awaitable[web.StreamResponse]]
PROMPTS = ["one", "two", "three"]


def json_answer(data: Any) -> Answer:
    async def answer(_request: web.Request) -> web.StreamResponse:
        return web.Response(body=orjson.dumps(data), content_type="application/json")

    return answer


def batch_object(batch_id: str = "batch_1", status: Any = "completed",
                 **fields: Any) -> dict[str, Any]:
    return {"id": batch_id, "object": "batch", "endpoint": "/v1/chat/completions",
            "input_file_id": "file-in", "completion_window": "24h", "status": status,
            "created_at": int(time.time()), "output_file_id": "file-out",
            "error_file_id": None,
            "request_counts": {"total": len(PROMPTS), "completed": 0, "failed": 0},
            "metadata": {}, **fields}


def completion_line(custom_id: str, **fields: Any) -> dict[str, Any]:
    body = {"id": "chatcmpl-1", "object": "chat.completion", "created": 0,
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": f"answer to {custom_id}"}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}
    return {"id": f"req-{custom_id}", "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": "r", "body": body}, "error": None,
            **fields}


class HostileBatches(ServerThread):
    """A Files and Batches API on 127.0.0.1, in a thread of its own.

    By default it answers like the real one: the upload gets a file id, the
    creation a batch, the list is empty, the poll says ``completed`` and the
    output file answers every uploaded request. A test replaces one
    ``answers[kind]`` (``upload``, ``create``, ``list``, ``retrieve``, ``cancel``,
    ``content``) with its hostile answer. ``paths`` records every request's path
    as it arrived; ``calls`` counts requests by kind.
    """

    def __init__(self) -> None:
        super().__init__()
        self.paths: list[str] = []
        self.calls: Counter[str] = Counter()
        self.custom_ids: list[str] = []
        self.answers: dict[str, Answer] = {
            "upload": json_answer({"id": "file-in", "object": "file", "purpose": "batch"}),
            "create": json_answer(batch_object(status="validating")),
            "list": json_answer({"object": "list", "data": [], "has_more": False}),
            "retrieve": json_answer(batch_object()),
            "cancel": json_answer(batch_object(status="cancelling")),
            "content": self._output,
        }
        self.base_url = ""

    def __enter__(self) -> HostileBatches:
        super().__enter__()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self.base_url = f"http://127.0.0.1:{self.serve_app(app)}/v1"
        return self

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.paths.append(request.raw_path)
        method, path = request.method, request.path
        if method == "POST" and path == "/v1/files":
            kind = "upload"
            await self._read_upload(request)
        elif path == "/v1/batches":
            kind = "create" if method == "POST" else "list"
        elif path.endswith("/cancel"):
            kind = "cancel"
        elif path.endswith("/content"):
            kind = "content"
        else:
            kind = "retrieve"
        self.calls[kind] += 1
        return await self.answers[kind](request)

    async def _read_upload(self, request: web.Request) -> None:
        reader = await request.multipart()
        async for part in reader:
            if isinstance(part, BodyPartReader) and part.name == "file":
                lines = (await part.read()).splitlines()
                self.custom_ids = [orjson.loads(line)["custom_id"] for line in lines]

    async def _output(self, _request: web.Request) -> web.StreamResponse:
        lines = b"".join(orjson.dumps(completion_line(name)) + b"\n" for name in self.custom_ids)
        return web.Response(body=lines, content_type="application/octet-stream")


@pytest.fixture
def server() -> Iterator[HostileBatches]:
    with HostileBatches() as hostile:
        yield hostile


def batch_job(folder: Path, server: HostileBatches, *, batch: dict[str, Any] | None = None,
              **overrides: Any) -> Path:
    source = write_csv(folder / "in.csv", ["id", "text"],
                       [[f"r{i}", text] for i, text in enumerate(PROMPTS)])
    job = job_dict(server.base_url, source, folder / "out.csv", mode="batch",
                   batch={"poll_interval_s": 0.05, **(batch or {})},
                   retry={"max_attempts": 2, "base_delay_s": 0.01, "max_delay_s": 0.02},
                   **overrides)
    return write_job(folder / "job.yaml", job)


def run(job: Path, *args: str) -> Ran:
    """``batcher run``; an exception escaping it fails the test (a user's traceback)."""
    return cli("run", str(job), "-q", *args)


def state_file(folder: Path) -> Path:
    return folder / "out.ckpt.batch" / "state.json"


def aborted(ran: Ran, *fragments: str) -> str:
    """The one error line of a run that stopped with exit 3, holding each fragment."""
    assert ran.returncode == 3, (ran.returncode, ran.stdout, ran.stderr)
    lines = [line for line in ran.stderr.splitlines() if line.startswith("batcher: error: ")]
    assert len(lines) == 1, ran.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_the_hostile_server_plays_the_batch_api_straight_by_default(
        tmp_path: Path, server: HostileBatches) -> None:
    ran = run(batch_job(tmp_path, server))
    assert ran.returncode == 0, ran.stderr
    frame = pd.read_csv(tmp_path / "out.csv")
    assert (frame["status"] == "ok").all(), frame
    assert not (tmp_path / "out.ckpt.batch").exists()


# -- item 4: ids from the server never name a path ------------------------------------------


@pytest.mark.parametrize("shape", ["absolute path", "parent folder"])
def test_item4_a_batch_id_shaped_like_a_path_is_refused_before_state_is_saved(
        tmp_path: Path, server: HostileBatches, shape: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.output.jsonl"
    victim.write_text("precious\n")
    # <work folder>/<id>.output.jsonl is the victim, for either shape of id.
    batch_id = str(outside / "victim") if shape == "absolute path" else "../outside/victim"
    server.answers["create"] = json_answer(batch_object(batch_id, "validating"))
    server.answers["retrieve"] = json_answer(batch_object(batch_id))
    job = batch_job(tmp_path, server)

    for _ in range(2):  # and the next run does not trust it either
        line = aborted(run(job), "not an id batcher accepts", "nothing of it was saved")
        assert "letters, digits" in line
        assert victim.read_text() == "precious\n"
        state = orjson.loads(state_file(tmp_path).read_bytes())
        assert [shard["batch_id"] for shard in state["shards"]] == [None]
    assert server.calls["retrieve"] == server.calls["content"] == 0


def test_item4_a_file_id_shaped_like_a_path_never_reaches_a_url_or_the_state(
        tmp_path: Path, server: HostileBatches) -> None:
    server.answers["retrieve"] = json_answer(batch_object(output_file_id="../../../victim"))
    job = batch_job(tmp_path, server)
    aborted(run(job), "output_file_id", "'../../../victim'", "not an id batcher accepts")
    assert server.calls["content"] == 0
    assert all(path.startswith("/v1/") for path in server.paths), server.paths
    assert b"victim" not in state_file(tmp_path).read_bytes()


def test_item4_an_uploaded_file_id_shaped_like_a_path_is_refused(
        tmp_path: Path, server: HostileBatches) -> None:
    server.answers["upload"] = json_answer({"id": "/etc/passwd", "object": "file"})
    aborted(run(batch_job(tmp_path, server)), "'/etc/passwd'", "not an id batcher accepts")
    assert server.calls["create"] == 0
    assert b"passwd" not in state_file(tmp_path).read_bytes()


# -- item 12: no answer is read past a cap, no call runs without end ---------------------------


def streamed(chunks: Callable[[], Iterator[bytes]], pause_s: float = 0.0) -> Answer:
    """An answer sent chunk by chunk (no Content-Length), ``pause_s`` apart; it stops
    when the client hangs up."""
    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            for chunk in chunks():
                await response.write(chunk)
                await asyncio.sleep(pause_s)
        except (ConnectionError, RuntimeError):
            pass  # the client hung up
        return response

    return answer


def test_item12_a_huge_poll_answer_is_not_read_past_endpoint_max_response_bytes(
        tmp_path: Path, server: HostileBatches) -> None:
    padded = orjson.dumps(batch_object(padding="x" * (4 << 20)))  # a valid batch, 4 MiB

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(padded), 1 << 16):
            yield padded[start:start + (1 << 16)]

    server.answers["retrieve"] = streamed(chunks)
    job = batch_job(tmp_path, server, endpoint={"max_response_bytes": 65536})
    aborted(run(job), "could not check a batch", "larger than endpoint.max_response_bytes "
            "(65,536 bytes)")
    assert server.calls["content"] == 0


def test_item12_a_huge_output_file_is_refused_past_batch_max_download_bytes(
        tmp_path: Path, server: HostileBatches) -> None:
    line = orjson.dumps(completion_line("0-00", padding="y" * 4000)) + b"\n"

    def chunks() -> Iterator[bytes]:  # 4 MB of lines, no Content-Length to go by
        for _ in range(40):
            yield line * 25

    server.answers["content"] = streamed(chunks)
    job = batch_job(tmp_path, server, batch={"max_download_bytes": 1_000_000})
    aborted(run(job), "could not download batch results",
            "larger than batch.max_download_bytes (1,000,000 bytes)")
    left = {path.name for path in (tmp_path / "out.ckpt.batch").iterdir()}
    assert left == {"state.json", *(shard["file"] for shard in orjson.loads(
        state_file(tmp_path).read_bytes())["shards"])}, "nothing of the download is kept"
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.timeout(60)
def test_item12_a_slow_drip_download_is_stopped_by_batch_transfer_timeout_s(
        tmp_path: Path, server: HostileBatches) -> None:
    def forever() -> Iterator[bytes]:
        while True:
            yield b" "  # one byte at a time, each well within endpoint.timeout_s

    server.answers["content"] = streamed(forever, pause_s=0.05)
    job = batch_job(tmp_path, server, batch={"transfer_timeout_s": 0.5})
    aborted(run(job), "could not download batch results",
            "took longer than batch.transfer_timeout_s (0.5 s)")
    assert server.calls["content"] == 2  # retry.max_attempts, each bounded


@pytest.mark.parametrize(("key", "value"), [("max_download_bytes", 0),
                                            ("transfer_timeout_s", -1)])
def test_item12_the_caps_are_validated(tmp_path: Path, server: HostileBatches, key: str,
                                       value: int) -> None:
    ran = cli("validate", str(batch_job(tmp_path, server, batch={key: value})))
    assert ran.returncode == 2, ran.stderr
    assert f"batch.{key}: must be a positive number" in ran.stderr, ran.stderr


# -- item 13: a list that ignores its cursor -------------------------------------------------


@pytest.mark.timeout(60)
def test_item13_a_batch_list_that_ignores_after_stops_with_a_clear_error(
        tmp_path: Path, server: HostileBatches) -> None:
    others = [batch_object(f"batch_other{i}", metadata={"batcher_job": "another job"})
              for i in range(3)]
    server.answers["list"] = json_answer({"object": "list", "data": others, "has_more": True})
    job = batch_job(tmp_path, server)
    aborted(run(job), "does not move on", "`after`", "creates none")
    assert server.calls["list"] == 2
    assert server.calls["create"] == 0, "never a batch that may be a second one"
    assert state_file(tmp_path).exists()


# -- item 17 (batch): bad server data is an error row or a clear exit 3, never a traceback ------


def hostile_objects(server: HostileBatches, case: str) -> None:
    now = int(time.time())
    if case == "a list as the shard in the batch list":
        listed = batch_object("batch_9", metadata={"batcher_job": "test-job",
                                                   "batcher_shard": ["x"]})
        server.answers["list"] = json_answer({"data": [listed], "has_more": False})
    elif case == "a list as the request counts":
        server.answers["retrieve"] = json_answer(batch_object(status="in_progress",
                                                              request_counts=[1, 2]))
    elif case == "a creation time past the year 9999":
        server.answers["create"] = json_answer(batch_object(status="validating",
                                                            created_at=2 ** 62))
        server.answers["retrieve"] = json_answer(batch_object(status="in_progress",
                                                              created_at=2 ** 62))
    elif case == "a list as a line's error code":
        async def content(_request: web.Request) -> web.StreamResponse:
            lines = [completion_line(name) for name in server.custom_ids]
            lines[0] = {"custom_id": server.custom_ids[0], "response": None,
                        "error": {"code": ["batch_expired"], "message": "no"}}
            body = b"".join(orjson.dumps(line) + b"\n" for line in lines)
            return web.Response(body=body, content_type="application/octet-stream")

        server.answers["content"] = content
    elif case == "strings as a failed batch's errors":
        server.answers["retrieve"] = json_answer(batch_object(
            status="failed", output_file_id=None, created_at=now,
            errors={"object": "list", "data": ["line 1 is bad", 7]}))
    else:
        assert case == "a list as the status"
        server.answers["retrieve"] = json_answer(batch_object(status=["completed"]))


@pytest.mark.parametrize("case", [
    "a list as the shard in the batch list",
    "a list as the request counts",
    "a creation time past the year 9999",
    "a list as a line's error code",
    "strings as a failed batch's errors",
    "a list as the status",
])
def test_item17_malformed_batch_json_is_an_error_row_or_a_clear_exit_3_never_a_traceback(
        tmp_path: Path, server: HostileBatches, case: str) -> None:
    hostile_objects(server, case)
    job = batch_job(tmp_path, server)
    first = cli("run", str(job))  # a traceback fails the test right here
    second = cli("run", str(job))  # and nothing the first run saved poisons the next one
    if case == "a list as the status":
        for ran in (first, second):
            aborted(ran, "could not check a batch", "the status ['completed']",
                    "not a batch status")
        assert b"['completed']" not in state_file(tmp_path).read_bytes()
        return
    if case in ("a list as the request counts", "a creation time past the year 9999"):
        for ran in (first, second):  # still running: the odd field is only shown
            assert ran.returncode == 0, ran.stderr
            assert "running at the service since" in ran.stdout, ran.stdout
        return
    assert first.returncode == (0 if case == "a list as the shard in the batch list" else 1), (
        first.stderr)
    frame = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    if case == "a list as a line's error code":
        assert list(frame["status"]) == ["error", "ok", "ok"]
        assert "batch_expired" in frame["error"][0]
    elif case == "strings as a failed batch's errors":
        assert (frame["status"] == "error").all()
        assert frame["error"].str.contains("failed validation").all()
    else:
        assert (frame["status"] == "ok").all()
        assert server.calls["create"] == 1, "the odd entry is someone else's, not ours"


@pytest.mark.parametrize("damage", [
    {"whole": []},
    {"shards": "not a list"},
    {"shard": {"surprise": 1}},
    {"shard": {"created_at": "yesterday"}},
    {"shard": {"batch_id": "../../elsewhere"}},
    {"shard": {"file": "/etc/passwd"}},
    {"shard": {"unfinished": [["0-00"]]}},
])
def test_item17_a_state_file_already_poisoned_is_a_clear_error_not_a_traceback(
        tmp_path: Path, server: HostileBatches, damage: dict[str, Any]) -> None:
    server.answers["retrieve"] = json_answer(batch_object(status="in_progress"))
    job = batch_job(tmp_path, server)
    assert run(job).returncode == 0
    path = state_file(tmp_path)
    state = orjson.loads(path.read_bytes())
    if "whole" in damage:
        state = damage["whole"]
    elif "shards" in damage:
        state["shards"] = damage["shards"]
    else:
        state["shards"][0].update(damage["shard"])
    path.write_bytes(orjson.dumps(state))

    ran = run(job)
    assert ran.returncode == 2, (ran.stdout, ran.stderr)
    assert "the batch state is damaged" in ran.stderr and "--fresh" in ran.stderr
    fresh = run(job, "--fresh")  # the way out it names works
    assert fresh.returncode == 0, fresh.stderr
