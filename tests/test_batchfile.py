"""Batch request lines, sharding within limits, and strict reconciliation (no network)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from batcher.batch.lines import (
    LineKind,
    ShardWriter,
    reconcile,
    request_line,
    shard_digest,
    shard_ids,
    starts_new_shard,
)
from batcher.batch.state import custom_id, key_of, position_of
from batcher.transport.wire import request_body


def _body(text: str) -> bytes:
    return request_body("gpt-4o-mini", [{"role": "user", "content": text}], {"max_tokens": 8})


def test_a_request_line_carries_the_online_body_unchanged() -> None:
    body = _body("héllo {json} \"quoted\"")
    line = json.loads(request_line("7-abc", body))
    assert line == {"custom_id": "7-abc", "method": "POST", "url": "/v1/chat/completions",
                    "body": json.loads(body)}


def test_custom_ids_name_the_row_and_its_request_key_and_map_back() -> None:
    key = bytes(range(16))
    name = custom_id(42, key)
    assert position_of(name) == 42 and key_of(name) == key
    assert custom_id(1, key) != custom_id(1, bytes(16))


@pytest.mark.parametrize(("max_requests", "max_bytes", "expected"), [
    (4, 10_000, [4, 4, 2]),
    (100, 3 * 200, [3, 3, 3, 1]),
    (2, 3 * 200, [2, 2, 2, 2, 2]),
])
def test_shards_respect_both_limits(tmp_path: Path, max_requests: int, max_bytes: int,
                                    expected: list[int]) -> None:
    writer = ShardWriter(tmp_path, "salt", max_requests, max_bytes)
    shards = []
    overhead = len(request_line("0-x", b'{"pad":""}'))
    lines = [request_line(f"{i}-x", b'{"pad":"' + b"a" * (200 - overhead) + b'"}')
             for i in range(10)]
    for i, line in enumerate(lines):
        assert len(line) == 200
        closed = writer.add(f"{i}-x", line)
        if closed:
            shards.append(closed)
    last = writer.close()
    assert last is not None
    shards.append(last)
    assert [len(shard.custom_ids) for shard in shards] == expected
    for shard in shards:
        assert shard.size <= max_bytes and shard.path.stat().st_size == shard.size
        assert shard_ids(shard.path) == list(shard.custom_ids)
        assert shard.digest == shard_digest("salt", shard.custom_ids)
    assert not list(tmp_path.glob(".shard-*")), "no temporary file is left behind"


def test_a_line_over_the_byte_limit_does_not_fit(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, "s", 10, 50)
    assert not writer.fits(b"x" * 51)
    assert writer.fits(b"x" * 50)


def test_the_dry_run_shard_rule_matches_the_writer() -> None:
    assert not starts_new_shard(0, 0, 500, 1, 100)  # an empty shard always takes a line
    assert starts_new_shard(1, 10, 10, 1, 100)
    assert starts_new_shard(3, 95, 10, 50, 100)
    assert not starts_new_shard(3, 90, 10, 50, 100)


def _ok(key: str, text: str = "fine") -> bytes:
    body = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}
    return _line(key, {"status_code": 200, "request_id": "req_1", "body": body}, None)


def _line(key: str, response: Any, error: Any) -> bytes:
    return orjson.dumps({"id": "batch_req_1", "custom_id": key, "response": response,
                         "error": error})


def test_every_submitted_id_gets_exactly_one_outcome_matched_by_id() -> None:
    submitted = ["a", "b", "c", "d", "e", "f", "g"]
    bad_request = {"status_code": 400, "request_id": "r",
                   "body": {"error": {"message": "nope", "type": "invalid_request_error",
                                      "param": None, "code": None}}}
    lines = [
        _ok("c", "for c"), _ok("a", "for a"),
        _line("b", bad_request, None),
        _line("d", {"status_code": 0, "request_id": "r", "body": {}}, None),
        _line("e", None, {"code": "server_error", "message": "boom"}),
        _line("f", {"status_code": 200, "request_id": "r", "body": {"not": "a completion"}},
              None),
        _ok("zzz"), _ok("a", "second a"), b"", b"not json",
    ]
    outcome = reconcile(submitted, lines, "completed")
    assert set(outcome.outcomes) == set(submitted)
    kinds = {key: value.kind for key, value in outcome.outcomes.items()}
    assert kinds == {"a": LineKind.OK, "b": LineKind.HTTP_ERROR, "c": LineKind.OK,
                     "d": LineKind.HTTP_ERROR, "e": LineKind.LINE_ERROR,
                     "f": LineKind.BAD_BODY, "g": LineKind.MISSING}
    results = {key: value.result for key, value in outcome.outcomes.items()}
    assert results["a"] is not None and results["a"].reply == "for a"
    assert results["c"] is not None and results["c"].reply == "for c"
    assert results["c"].prompt_tokens == 5 and results["c"].attempts == 1
    for key in "bdefg":
        result = results[key]
        assert result is not None and result.status == "error" and result.reply is None
    assert "HTTP 400" in str(outcome.outcomes["b"].result)
    assert "status_code 0" in str(outcome.outcomes["d"].result)
    assert outcome.unknown_ids == 1 and outcome.duplicates == 1
    assert outcome.describe() == ("2 ok, 2 http error, 1 line error, 1 bad body, 1 missing, "
                                  "1 unknown ids ignored, 1 duplicate lines ignored")


def test_expired_lines_and_ids_of_an_expired_batch_are_unfinished() -> None:
    expired = _line("b", None, {"code": "batch_expired", "message": "too late"})
    outcome = reconcile(["a", "b", "c"], [_ok("a"), expired], "expired")
    kinds = {key: value.kind for key, value in outcome.outcomes.items()}
    assert kinds == {"a": LineKind.OK, "b": LineKind.UNFINISHED, "c": LineKind.UNFINISHED}
    assert outcome.outcomes["b"].result is None


def test_ids_a_cancelled_batch_never_ran_are_errors() -> None:
    outcome = reconcile(["a", "b"], [_ok("a")], "cancelled")
    result = outcome.outcomes["b"].result
    assert outcome.outcomes["b"].kind is LineKind.CANCELLED
    assert result is not None and "cancelled" in (result.error or "")


def test_a_failed_batch_gives_each_row_its_validation_error() -> None:
    problems: list[dict[str, Any]] = [
        {"code": "invalid_request", "message": "line two is bad", "line": 2},
        {"code": "mismatched_model", "message": "two models", "line": None}]
    outcome = reconcile(["a", "b", "c"], [], "failed", problems)
    errors = {key: value.result.error for key, value in outcome.outcomes.items()
              if value.result is not None}
    assert errors == {"a": "batch: failed validation: two models",
                      "b": "batch: failed validation: line two is bad",
                      "c": "batch: failed validation: two models"}
    assert all(value.kind is LineKind.INVALID for value in outcome.outcomes.values())
