"""A careless (or hostile) ``output.schema`` costs nothing (issue 20, items 14 and 15).

A schema's regular expressions are matched in time linear in the reply, so a
pattern that would make a backtracking engine run for ages neither hangs a
run nor makes it deaf to SIGTERM; and no schema keyword ever makes batcher
fetch anything: a remote reference is refused before anything is sent.

What only a process shows (a run stuck in a regex ignores signals) runs as a
real ``batcher run``; the rest runs in this process.
"""

from __future__ import annotations

import http.server
import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    TEST_KEY,
    MakeMock,
    cli,
    job_dict,
    one_error_line,
    prompts_csv,
    read_journal,
    start_run,
    wait_until,
    write_job,
)

from batcher.errors import ConfigError
from batcher.jobload import job_from_dict
from batcher.mock_server import MockServer
from batcher.structured import ParsedReply, ProblemKind, ReplyProblem, ReplySchema

#: 64 a's and a b: ``^(a+)+$`` fails on it only after trying 2**64 ways to split the a's.
EVIL_TEXT = "a" * 64 + "b"
EVIL_PATTERN = "^(a+)+$"

#: A schema whose reply makes a backtracking engine take ages, and what the row becomes.
#: ``pattern``: the reply's string is EVIL_TEXT (the mock answers ``const`` as given), which
#: the pattern fails. ``patternProperties``: the reply's key is EVIL_TEXT, which the key
#: pattern does not match, so the reply is valid.
CATASTROPHIC: dict[str, tuple[dict[str, Any], str]] = {
    "pattern": ({"type": "object", "properties": {
        "word": {"type": "string", "const": EVIL_TEXT, "pattern": EVIL_PATTERN}},
        "required": ["word"]}, f"does not match {EVIL_PATTERN!r}"),
    "patternProperties": ({"type": "object", "properties": {EVIL_TEXT: {"type": "string"}},
                           "patternProperties": {EVIL_PATTERN: {"type": "integer"}}}, ""),
    # Not a pattern, the same harm: jsonschema compares every pair of objects.
    "uniqueItems": ({"type": "object", "properties": {"items": {
        "type": "array", "minItems": 20_000, "maxItems": 20_000, "uniqueItems": True,
        "items": {"type": "object", "properties": {
            "a": {"type": "integer", "minimum": 0, "maximum": 10**9},
            "b": {"type": "integer", "minimum": 0, "maximum": 10**9}}}}}}, ""),
}


@pytest.mark.parametrize("keyword", sorted(CATASTROPHIC))
def test_item14_a_catastrophic_pattern_neither_hangs_nor_ignores_sigterm(
        tmp_path: Path, make_mock: MakeMock, keyword: str) -> None:
    server: MockServer = make_mock(api_key=TEST_KEY, latency_s=0.2)
    schema, problem = CATASTROPHIC[keyword]
    checkpoint = tmp_path / "out.ckpt"
    job = write_job(tmp_path / "job.yaml", job_dict(
        server.base_url, prompts_csv(tmp_path, 40), tmp_path / "out.parquet",
        params={"max_tokens": 10**6}, limits={"concurrency": 1},
        retry={"invalid_reply_retries": 0},
        output={"path": str(tmp_path / "out.parquet"), "schema": schema}))
    process = start_run(job)
    try:
        wait_until(lambda: server.stats.requests_total >= 1 and server.stats.in_flight == 0,
                   process, what="the first reply")
        # The first reply is being checked now. A linear-time check journals its row and
        # asks the next at once; a backtracking one is still at it after this wait.
        give_up = time.monotonic() + 5
        while not read_journal(checkpoint)[1] and time.monotonic() < give_up:
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        try:
            _out, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("batcher run was still running 60 s after SIGTERM: the reply check "
                        f"on a catastrophic {keyword} hung the run")
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

    assert process.returncode == 143, err
    assert "SIGTERM" in one_error_line(err)
    _header, records, _tail = read_journal(checkpoint)
    assert records, "no row was checked before the stop"
    first = records[0]
    if problem:
        assert first["status"] == "error" and problem in first["error"], first
    else:
        assert first["status"] == "ok", first


@pytest.mark.parametrize(("schema", "where"), [
    ({"type": "object", "properties": {"pair": {"type": "string", "pattern": r"^(\w)\1$"}}},
     r"properties.pair.pattern: '^(\\w)\\1$'"),
    ({"type": "object", "properties": {"code": {"type": "string"}},
      "patternProperties": {"^(?!x)": {"type": "string"}}},
     "patternProperties.^(?!x): '^(?!x)'"),
])
def test_item14_a_pattern_rejected_by_the_linear_engine_is_refused_before_sending(
        tmp_path: Path, make_mock: MakeMock, schema: dict[str, Any], where: str) -> None:
    server: MockServer = make_mock(api_key=TEST_KEY)
    job = write_job(tmp_path / "job.yaml", job_dict(
        server.base_url, prompts_csv(tmp_path, 3), tmp_path / "out.parquet",
        output={"path": str(tmp_path / "out.parquet"), "schema": schema}))
    for command in ("validate", "run"):
        result = cli(command, str(job))
        assert result.returncode == 2, (command, result.stderr)
        line = one_error_line(result.stderr)
        assert f"output.schema: {where} cannot be matched in time linear" in line, line
        assert "no backreferences and no lookaround" in line, line
    assert server.stats.snapshot()["requests_total"] == 0


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"a": {"type": "string"}},
     "patternProperties": {"^x": {"type": "string"}}, "unevaluatedProperties": False},
    {"type": "object", "properties": {"a": {"type": "object", "unevaluatedProperties": False}},
     "$defs": {"b": {"patternProperties": {"^x": {"type": "string"}}}}},
])
def test_item14_unevaluated_properties_beside_pattern_properties_is_refused(
        tmp_path: Path, schema: dict[str, Any]) -> None:
    job = job_dict("http://127.0.0.1:9/v1", prompts_csv(tmp_path, 1), tmp_path / "out.csv",
                   output={"path": str(tmp_path / "out.csv"), "schema": schema})
    with pytest.raises(ConfigError, match=r"output\.schema: (properties\.a\.)?"
                       r"unevaluatedProperties: not supported .* patternProperties"):
        job_from_dict(job, base_dir=tmp_path, source="job.yaml", require_output=True)


def test_item14_patterns_keep_their_meaning() -> None:
    schema = ReplySchema({
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": r"^[A-Z]{2}-\d{3}$"},
                       "accent": {"type": "string", "pattern": r"^caf\u00e9$"},
                       "tags": {"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}}},
        "patternProperties": {"^x_": {"type": "integer"}},
        "additionalProperties": False,
    })
    good = '{"code": "AB-123", "accent": "café", "tags": {"ok": 1}, "x_n": 3}'
    assert isinstance(schema.check(good, "stop", None), ParsedReply)
    for bad, rule in [('{"code": "AB-12"}', "properties.code.pattern"),
                      ('{"code": "AB-123\\n"}', "properties.code.pattern"),
                      ('{"accent": "cafe"}', "properties.accent.pattern"),
                      ('{"x_n": "three"}', "patternProperties.^x_.type"),
                      ('{"tags": {"Bad": 1}}', "properties.tags.propertyNames.pattern"),
                      ('{"other": 1}', "additionalProperties")]:
        verdict = schema.check(bad, "stop", None)
        assert isinstance(verdict, ReplyProblem), bad
        assert verdict.kind is ProblemKind.SCHEMA
        assert f"(schema rule {rule})" in verdict.message, verdict.message


def test_item14_unique_items_keeps_its_meaning() -> None:
    schema = ReplySchema({"type": "object", "properties": {
        "xs": {"type": "array", "uniqueItems": True}}})
    cases: list[tuple[list[Any], bool]] = [
        ([1, 1.0], False), ([True, 1], True), ([None, False, 0, ""], True),
        ([{"a": 1, "b": [1, 2]}, {"b": [1.0, 2], "a": 1}], False), ([[1], [True]], True),
        ([{"a": i} for i in range(50_000)], True)]
    for items, unique in cases:
        verdict = schema.check(json.dumps({"xs": items}), "stop", None)
        assert isinstance(verdict, ParsedReply) is unique, (items[:3], verdict)


# -- item 15: no schema keyword reaches the network ------------------------------------------


class Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every request with a schema that accepts anything, and records it."""

    seen: list[str]

    def do_GET(self) -> None:
        self.seen.append(f"{self.command} {self.path}")
        body = b'{"type": "string"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/schema+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[str]]]:
    """A loopback HTTP server that records every request: its base URL and the log."""
    seen: list[str] = []
    handler = type("Recording", (Recorder,), {"seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _remote_forms(base: str, folder: Path) -> dict[str, tuple[dict[str, Any], str]]:
    """Each way a schema could name something outside itself: the schema, and the key
    path the refusal must name."""
    (folder / "other.json").write_text('{"type": "string"}')
    word = {"type": "string"}
    return {
        "$dynamicRef": ({"type": "object", "properties": {
            "word": {"$dynamicRef": f"{base}/dynamic.json#meta"}}},
            "properties.word.$dynamicRef"),
        "$ref http": ({"type": "object", "properties": {
            "word": {"$ref": f"{base}/ref.json"}}}, "properties.word.$ref"),
        "$ref file": ({"type": "object", "properties": {
            "word": {"$ref": (folder / "other.json").as_uri()}}}, "properties.word.$ref"),
        "$ref relative": ({"$id": f"{base}/root.json", "type": "object", "properties": {
            "word": {"$ref": "other.json"}}}, "properties.word.$ref"),
        "$schema": ({"$schema": f"{base}/meta.json", "type": "object",
                     "properties": {"word": word}}, "$schema"),
        "nested $id": ({"type": "object", "properties": {
            "word": {"$id": f"{base}/word.json", "type": "string"}}}, "properties.word.$id"),
        "$recursiveRef": ({"$schema": "https://json-schema.org/draft/2019-09/schema",
                           "type": "object", "properties": {
                               "word": {"$recursiveRef": f"{base}/recursive.json"}}},
                          "properties.word.$recursiveRef"),
    }


FORMS = ["$dynamicRef", "$ref http", "$ref file", "$ref relative", "$schema", "nested $id",
         "$recursiveRef"]


@pytest.mark.parametrize("form", FORMS)
def test_item15_a_remote_reference_never_reaches_the_network(
        tmp_path: Path, make_mock: MakeMock, recorder: tuple[str, list[str]],
        form: str) -> None:
    base, seen = recorder
    server: MockServer = make_mock(api_key=TEST_KEY)
    schema, where = _remote_forms(base, tmp_path)[form]
    job = write_job(tmp_path / "job.yaml", job_dict(
        server.base_url, prompts_csv(tmp_path, 3), tmp_path / "out.parquet",
        output={"path": str(tmp_path / "out.parquet"), "schema": schema}))
    ran = {command: cli(command, str(job)) for command in ("run", "validate")}
    assert seen == [], f"the schema made batcher fetch {seen}"
    assert server.stats.snapshot()["requests_total"] == 0
    for command, result in ran.items():
        assert result.returncode == 2, (command, result.returncode, result.stderr)
        line = one_error_line(result.stderr)
        assert f"output.schema: {where}: " in line, line


def test_item15_references_inside_the_schema_still_work() -> None:
    schema = ReplySchema({
        "$schema": "http://json-schema.org/draft-07/schema",  # known: no "#", still draft 7
        "$id": "https://example.org/label.json",  # the top's $id is only a name
        "type": "object",
        "definitions": {"word": {"$id": "#word", "type": "string"}},
        "properties": {"a": {"$ref": "#word"}, "b": {"$ref": "#/definitions/word"}},
    })
    assert isinstance(schema.check('{"a": "x", "b": "y"}', "stop", None), ParsedReply)
    assert isinstance(schema.check('{"a": 1}', "stop", None), ReplyProblem)
    anchored = ReplySchema({
        "type": "object", "$dynamicAnchor": "node",
        "$defs": {"word": {"$anchor": "word", "type": "string"}},
        "properties": {"a": {"$ref": "#word"}, "next": {"$dynamicRef": "#node"}},
    })
    assert isinstance(anchored.check('{"a": "x", "next": {"a": "y"}}', "stop", None),
                      ParsedReply)
    assert isinstance(anchored.check('{"next": {"a": 2}}', "stop", None), ReplyProblem)
    assert anchored.resolve({"$ref": "#word"}) == {"$anchor": "word", "type": "string"}


def test_item15_the_validator_cannot_fetch_even_what_the_load_checks_let_through(
        recorder: tuple[str, list[str]]) -> None:
    """The second line of defence: a reference the checks at load time did not see (here
    put into the compiled schema behind their back) ends the reply's check as a schema
    problem, and nothing is fetched."""
    base, seen = recorder
    schema = ReplySchema({"type": "object", "properties": {"word": {"type": "string"}}})
    schema.schema["properties"]["word"] = {"$dynamicRef": f"{base}/late.json"}
    verdict = schema.check('{"word": "x"}', "stop", None)
    assert isinstance(verdict, ReplyProblem) and verdict.kind is ProblemKind.SCHEMA
    assert "cannot be followed" in verdict.message, verdict.message
    assert seen == []
