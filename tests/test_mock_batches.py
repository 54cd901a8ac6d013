"""The mock server's Files and Batches API, driven by the official openai SDK
(so the shapes are checked by a real client) and by raw HTTP for the edges."""

from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from batcher.mock_server import MockConfig, MockServer, reply_for

KEY = "sk-test-batches-0123456789"


@pytest.fixture
def server() -> Iterator[MockServer]:
    with MockServer(MockConfig(api_key=KEY)) as srv:
        yield srv


def _client(srv: MockServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url, api_key=KEY, max_retries=0)


def _line(custom_id: str, prompt: str, model: str = "gpt-4o-mini") -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": prompt}]}}


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def _submit(client: openai.OpenAI, lines: list[dict[str, Any]],
            metadata: dict[str, str] | None = None) -> str:
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(_jsonl(lines))),
                                   purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata=metadata)
    assert batch.status == "validating"
    assert batch.request_counts is not None and batch.request_counts.total == 0
    return batch.id


def _wait(client: openai.OpenAI, batch_id: str, timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        assert time.monotonic() < deadline, batch.status
        time.sleep(0.02)


def _read(client: openai.OpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    if file_id is None:
        return {}
    lines = client.files.content(file_id).content.splitlines()
    parsed = [json.loads(line) for line in lines]
    return {line["custom_id"]: line for line in parsed}


def test_a_batch_completes_with_every_answer_matched_by_custom_id(server: MockServer) -> None:
    client = _client(server)
    lines = [_line(f"r{i}", f"Prompt {i}") for i in range(40)]
    batch = _wait(client, _submit(client, lines, {"batcher_job": "demo"}))
    assert batch.status == "completed"
    assert batch.request_counts.model_dump() == {"total": 40, "completed": 40, "failed": 0}
    assert batch.error_file_id is None
    assert batch.completed_at is not None and batch.in_progress_at is not None
    output = _read(client, batch.output_file_id)
    assert set(output) == {f"r{i}" for i in range(40)}
    for i in range(40):
        line = output[f"r{i}"]
        assert line["error"] is None and line["response"]["status_code"] == 200
        assert line["response"]["request_id"].startswith("req_")
        content = line["response"]["body"]["choices"][0]["message"]["content"]
        assert content == reply_for(f"Prompt {i}")
    raw = client.files.content(batch.output_file_id).content.splitlines()
    order = [json.loads(line)["custom_id"] for line in raw]
    assert order != [f"r{i}" for i in range(40)], "the output must not come in input order"
    assert server.stats.snapshot()["counters"]["batches_created"] == 1


def test_statuses_advance_over_the_configured_time() -> None:
    with MockServer(MockConfig(api_key=KEY, batch_phase_s=0.3)) as srv:
        client = _client(srv)
        batch_id = _submit(client, [_line("a", "hello")])
        seen: list[str] = []
        deadline = time.monotonic() + 10
        while not seen or seen[-1] != "completed":
            status = client.batches.retrieve(batch_id).status
            if not seen or seen[-1] != status:
                seen.append(status)
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert seen == ["validating", "in_progress", "finalizing", "completed"]


def test_error_lines_of_every_kind_and_missing_ids(server: MockServer) -> None:
    client = _client(server)
    lines = [_line("ok", "fine"), _line("bad", "[[fault:400]] no"),
             _line("zero", "[[batch:status0]]"), _line("lost", "[[batch:missing]]"),
             _line("err", "[[batch:line_error]]"), _line("boom", "[[fault:500]]")]
    batch = _wait(client, _submit(client, lines))
    assert batch.status == "completed"
    assert batch.request_counts.model_dump() == {"total": 6, "completed": 2, "failed": 4}
    output, errors = _read(client, batch.output_file_id), _read(client, batch.error_file_id)
    assert set(output) == {"ok", "zero"}
    assert output["zero"]["response"]["status_code"] == 0
    assert set(errors) == {"bad", "err", "boom"}
    assert errors["bad"]["response"]["status_code"] == 400
    assert errors["bad"]["response"]["body"]["error"]["type"] == "invalid_request_error"
    assert errors["bad"]["error"] is None
    assert errors["err"]["response"] is None and errors["err"]["error"]["code"] == "server_error"
    assert errors["boom"]["response"]["status_code"] == 500


def test_a_completed_batch_whose_lines_all_failed(server: MockServer) -> None:
    client = _client(server)
    batch = _wait(client, _submit(client, [_line(f"r{i}", f"[[fault:400]] {i}")
                                           for i in range(5)]))
    assert batch.status == "completed"
    assert batch.output_file_id is None
    assert batch.request_counts.model_dump() == {"total": 5, "completed": 0, "failed": 5}


def test_failed_validation_reports_each_problem_by_line(server: MockServer) -> None:
    client = _client(server)
    lines = [_line("a", "fine"), _line("a", "duplicate id"), _line("c", "[[batch:invalid]]"),
             _line("d", "other model", model="gpt-4o")]
    batch = _wait(client, _submit(client, lines))
    assert batch.status == "failed" and batch.failed_at is not None
    assert batch.output_file_id is None and batch.error_file_id is None
    problems = {(error.code, error.line) for error in batch.errors.data}
    assert ("duplicate_custom_id", 2) in problems
    assert ("invalid_request", 3) in problems
    assert ("mismatched_model", None) in problems


def test_a_bom_fails_validation(server: MockServer) -> None:
    client = _client(server)
    uploaded = client.files.create(
        file=("in.jsonl", io.BytesIO(b"\xef\xbb\xbf" + _jsonl([_line("a", "x")]))),
        purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    assert _wait(client, batch.id).status == "failed"


def test_expired_batch_keeps_finished_lines(server: MockServer) -> None:
    client = _client(server)
    lines = [_line("done1", "quick"), _line("late", "[[batch:slow]]"), _line("done2", "fast")]
    batch = _wait(client, _submit(client, lines))
    assert batch.status == "expired" and batch.expired_at is not None
    assert set(_read(client, batch.output_file_id)) == {"done1", "done2"}
    late = _read(client, batch.error_file_id)["late"]
    assert late["response"] is None and late["error"]["code"] == "batch_expired"


def test_cancel_gives_partial_results() -> None:
    with MockServer(MockConfig(api_key=KEY, batch_phase_s=0.2)) as srv:
        client = _client(srv)
        batch_id = _submit(client, [_line(f"r{i}", f"p{i}") for i in range(6)])
        assert client.batches.cancel(batch_id).status == "cancelling"
        batch = _wait(client, batch_id)
        assert batch.status == "cancelled" and batch.cancelled_at is not None
        assert set(_read(client, batch.output_file_id)) == {"r0", "r1", "r2"}
        with pytest.raises(openai.APIStatusError):
            client.batches.cancel(batch_id)


def test_list_pages_newest_first_with_metadata(server: MockServer) -> None:
    client = _client(server)
    ids = [_submit(client, [_line("a", "x")], {"batcher_shard": str(i)}) for i in range(5)]
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == ids[::-1][:2]
    assert first.has_more
    assert first.data[0].metadata == {"batcher_shard": "4"}
    every = [b.id for b in client.batches.list(limit=2)]  # the SDK follows has_more/after
    assert every == ids[::-1]


def _post(srv: MockServer, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    request = urllib.request.Request(srv.base_url + path, data=body, method="POST",
                                     headers={"Authorization": f"Bearer {KEY}", **headers})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _multipart(content: bytes, purpose: str = "batch") -> tuple[bytes, dict[str, str]]:
    boundary = "batcherboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n"
            f"{purpose}\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"in.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n").encode()
    body += content + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_a_file_over_the_size_limit_gets_413() -> None:
    with MockServer(MockConfig(api_key=KEY, batch_file_max_bytes=1000)) as srv:
        status, body = _post(srv, "/files", *_multipart(b"x" * 5000))
        assert status == 413
        assert set(body["error"]) == {"message", "type", "param", "code"}
        status, body = _post(srv, "/files", *_multipart(_jsonl([_line("a", "b")])))
        assert status == 200 and body["purpose"] == "batch" and body["id"].startswith("file-")


@pytest.mark.parametrize(("payload", "param"), [
    ({"input_file_id": "file-nope", "endpoint": "/v1/chat/completions",
      "completion_window": "24h"}, "input_file_id"),
    ({"input_file_id": "x", "endpoint": "/v1/chat/completions",
      "completion_window": "1h"}, "completion_window"),
    ({"input_file_id": "x", "endpoint": "/v2/nothing", "completion_window": "24h"}, "endpoint"),
    ({"input_file_id": "x", "endpoint": "/v1/chat/completions", "completion_window": "24h",
      "metadata": {"k": "v" * 600}}, "metadata"),
])
def test_bad_batch_requests_are_400(server: MockServer, payload: dict[str, Any],
                                    param: str) -> None:
    status, body = _post(server, "/batches", json.dumps(payload).encode(),
                         {"Content-Type": "application/json"})
    assert status == 400
    assert body["error"]["param"] == param


def test_wrong_key_is_401_on_every_batch_route(server: MockServer) -> None:
    bad = openai.OpenAI(base_url=server.base_url, api_key="sk-wrong-key-000000", max_retries=0)
    calls: list[Callable[[], Any]] = [
        lambda: bad.batches.list(), lambda: bad.batches.retrieve("batch_x"),
        lambda: bad.files.create(file=("a.jsonl", io.BytesIO(b"{}\n")), purpose="batch"),
    ]
    for call in calls:
        with pytest.raises(openai.AuthenticationError):
            call()


def test_unknown_batch_is_404(server: MockServer) -> None:
    with pytest.raises(openai.NotFoundError):
        _client(server).batches.retrieve("batch_missing")


def test_flex_resource_unavailable_is_a_429_that_is_not_quota(server: MockServer) -> None:
    client = _client(server)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(
            model="o4-mini", service_tier="flex",
            messages=[{"role": "user", "content": "[[fault:flex_429]] hi"}])
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["code"] == "resource_unavailable" and error["type"] != "insufficient_quota"
