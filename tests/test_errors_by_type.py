"""Errors built once and classified by type, never by a library's message text;
the mock's faults rendered from the one table that also lists them."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from batcher.errors import DataError, Verdict
from batcher.io.inputs import InputReader
from batcher.mock_server import MockConfig, MockServer
from batcher.mock_server.calls import parse_call
from batcher.mock_server.fault_replies import FAULT_KINDS, FAULTS, FaultContext
from batcher.redact import Redactor
from batcher.transport.failures import classify_error
from batcher.transport.wire import parse_completion

KEY = "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789"


@pytest.mark.parametrize("rows_before", [1, 5000])
def test_a_csv_body_that_is_not_utf8_is_found_by_line(tmp_path: Path, rows_before: int) -> None:
    # Read directly, without the scan's text pass first: a bad byte in the header's
    # read buffer (1 row before it) or far past it (5,000 rows; pyarrow's one exception
    # type) is found by batcher's own decoder, which names the line.
    path = tmp_path / "in.csv"
    path.write_bytes(b"id,text\n" + b"a,fine\n" * rows_before + b"b,caf\xe9\n")
    with pytest.raises(DataError, match=rf"in\.csv: line {rows_before + 2}: not valid UTF-8"):
        list(InputReader(path).batches())


@pytest.mark.parametrize(("line", "problem"), [
    (b'{"id": "b", "text": "caf\xe9"}', "not valid UTF-8"),
    (b'{"id": "b", "text": ', "not valid JSON"),
    (b'{"id": "b", "text": "\xff"', "not valid UTF-8"),
])
def test_a_bad_jsonl_line_is_classified_by_decoding_it(tmp_path: Path, line: bytes,
                                                       problem: str) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"id": "a", "text": "fine"}\n' + line + b"\n")
    with pytest.raises(DataError, match=rf"in\.jsonl: line 2: {problem}$"):
        list(InputReader(path, batch_rows=1).batches())


def test_an_api_error_is_built_whole_with_the_echoed_key_cleaned() -> None:
    body = json.dumps({"error": {"message": f"Incorrect API key provided: {KEY}.",
                                 "type": "invalid_request_error", "code": "invalid_api_key"}})
    headers = {"x-request-id": "req_9", "retry-after": "3"}
    error = classify_error(401, body.encode(), headers, clean=Redactor([KEY]).clean)
    assert error.verdict is Verdict.ABORT
    assert KEY not in error.message and "***" in error.message
    assert (error.status, error.code, error.type) == (401, "invalid_api_key",
                                                      "invalid_request_error")
    assert (error.request_id, error.retry_after_s, error.headers) == ("req_9", 3.0, headers)


def test_an_error_inside_a_200_is_cleaned_too() -> None:
    body = json.dumps({"error": {"message": f"upstream said {KEY}", "type": "server_error"}})
    with pytest.raises(Exception, match=r"HTTP 200 carrying an error") as caught:
        parse_completion(body.encode(), clean=Redactor([KEY]).clean)
    assert KEY not in str(caught.value)


def test_the_fault_table_is_the_list_of_kinds() -> None:
    assert frozenset(FAULTS) == FAULT_KINDS
    assert {kind for kind, render in FAULTS.items() if render is None} == {"drop", "stall"}


def test_every_rendered_fault_comes_back_over_http_as_its_table_entry_builds_it() -> None:
    with MockServer(MockConfig()) as server:
        for kind, render in FAULTS.items():
            if render is None:
                continue
            prompt = f"[[fault:{kind}]] table check"
            payload = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
            raw = json.dumps(payload).encode()
            call = parse_call(raw)
            expected = render(FaultContext(call, "m", 0.05, None, echo_key=False))
            request = urllib.request.Request(f"{server.base_url}/chat/completions", data=raw,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    status, content_type = response.status, response.headers.get_content_type()
            except urllib.error.HTTPError as error:
                status, content_type = error.code, error.headers.get_content_type()
            assert (status, content_type) == (expected.status, expected.content_type), kind
