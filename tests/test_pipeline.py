"""The row pipeline driven by an in-process fake sender: no socket, no server.

Each test's server is a plain function from a request body to a status and
a reply body (``FunctionSender``), and time is a recorded fake, so retries,
validation and the whole run are checked without waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from batcher.errors import ApiError, RunAborted
from batcher.jobload import job_from_dict
from batcher.limits.pacing import RateLimiter
from batcher.limits.retry import RetryPolicy
from batcher.online.runner import Run, RunOptions, Runtime
from batcher.plan.pipeline import Sending, attempt_row
from batcher.plan.preflight import prepare
from batcher.plan.rows import RowRequest
from batcher.progress import RunStats
from batcher.store.checkpoint import Checkpoint
from batcher.testing import FakeClock, FunctionSender
from batcher.transport.wire import Completion


def reply(text: str, tokens: int = 5) -> tuple[int, Any]:
    return 200, {"choices": [{"message": {"role": "assistant", "content": text},
                              "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": tokens, "completion_tokens": 2,
                           "total_tokens": tokens + 2}}


def echo(request: dict[str, Any]) -> tuple[int, Any]:
    return reply(f"echo: {request['messages'][-1]['content']}")



def sending(sender: FunctionSender, time: FakeClock, **extra: Any) -> Sending:
    return Sending(sender, RateLimiter(None, None, time.clock, time.sleep),
                   RetryPolicy(max_attempts=3, base_delay_s=1.0), RunStats(), time.sleep,
                   random.Random(7), **extra)


def request(text: str) -> RowRequest:
    return RowRequest(0, b"k" * 16, b"r" * 16,
                      b'{"model":"m","messages":[{"role":"user","content":"%s"}]}'
                      % text.encode(), 10)


def test_a_row_is_sent_once_and_its_reply_becomes_an_ok_result() -> None:
    sender, time = FunctionSender(echo), FakeClock()
    parts = sending(sender, time)
    outcome = asyncio.run(attempt_row(request("hello"), parts))
    assert outcome is not None and outcome.failure is None
    assert outcome.result.status == "ok" and outcome.result.reply == "echo: hello"
    assert (outcome.result.attempts, outcome.result.total_tokens) == (1, 7)
    assert parts.stats.requests == 1 and len(sender.requests) == 1 and time.sleeps == []


def test_a_transient_error_is_retried_after_a_backoff() -> None:
    answers = iter([(503, {"error": {"message": "overloaded", "type": "server_error"}}),
                    reply("second time lucky")])
    time = FakeClock()
    parts = sending(FunctionSender(lambda _request: next(answers)), time)
    outcome = asyncio.run(attempt_row(request("x"), parts))
    assert outcome is not None and outcome.result.reply == "second time lucky"
    assert outcome.result.attempts == 2 and parts.stats.requests == 2
    assert len(time.sleeps) == 1 and 0 <= time.sleeps[0] <= 1.0


def test_a_row_error_is_not_retried_and_keeps_its_reason() -> None:
    sender = FunctionSender(lambda _request: (400, {"error": {
        "message": "unknown parameter: foo", "type": "invalid_request_error"}}))
    outcome = asyncio.run(attempt_row(request("x"), sending(sender, FakeClock())))
    assert outcome is not None and outcome.result.status == "error"
    assert isinstance(outcome.failure, ApiError) and outcome.failure.status == 400
    assert "unknown parameter" in (outcome.result.error or "")
    assert outcome.result.attempts == 1


def test_a_bad_key_aborts_the_run() -> None:
    sender = FunctionSender(lambda _request: (401, {"error": {"message": "bad key",
                                                              "code": "invalid_api_key"}}))
    with pytest.raises(RunAborted, match="refused the run"):
        asyncio.run(attempt_row(request("x"), sending(sender, FakeClock())))
    assert len(sender.requests) == 1


@dataclass(frozen=True)
class NoLabel:
    message: str = "no label in reply"
    retryable: bool = True
    signature: str = "no label"


def test_a_validator_retries_a_rejected_reply_and_accepts_a_good_one() -> None:
    answers = iter([reply("not json"), reply('{"label": "positive"}')])

    def must_be_json(completion: Completion) -> int | NoLabel:
        return 0 if (completion.reply or "").startswith("{") else NoLabel()

    time = FakeClock()
    parts = sending(FunctionSender(lambda _request: next(answers)), time, validate=must_be_json,
                    invalid_reply_retries=1)
    outcome = asyncio.run(attempt_row(request("x"), parts))
    assert outcome is not None and outcome.result.reply == '{"label": "positive"}'
    assert outcome.result.attempts == 2 and time.sleeps == []  # asked again at once
    assert outcome.result.completion_tokens == 4  # both replies' tokens


def test_a_reply_rejected_every_time_fails_the_row_with_the_reason() -> None:
    parts = sending(FunctionSender(echo), FakeClock(), validate=lambda _c: NoLabel(),
                    invalid_reply_retries=2)
    outcome = asyncio.run(attempt_row(request("x"), parts))
    assert outcome is not None and outcome.result.status == "error"
    assert outcome.result.error == "no label in reply"
    assert outcome.result.reply == "echo: x"  # the raw reply is kept
    assert outcome.result.attempts == 3 and parts.stats.requests == 3
    assert outcome.failure == NoLabel()


def test_a_rejection_that_asking_again_cannot_fix_is_final() -> None:
    parts = sending(FunctionSender(echo), FakeClock(),
                    validate=lambda _c: NoLabel(retryable=False), invalid_reply_retries=2)
    outcome = asyncio.run(attempt_row(request("x"), parts))
    assert outcome is not None and outcome.result.attempts == 1


def test_a_stop_between_attempts_leaves_the_row_without_an_outcome() -> None:
    stop = False

    def failing(_request: dict[str, Any]) -> tuple[int, Any]:
        nonlocal stop
        stop = True
        return 503, {"error": {"message": "down"}}

    parts = sending(FunctionSender(failing), FakeClock(), stopping=lambda: stop)
    assert asyncio.run(attempt_row(request("x"), parts)) is None


def test_a_whole_run_through_a_fake_sender(tmp_path: Path) -> None:
    (tmp_path / "in.csv").write_text("id,text\na,one\nb,two\nc,\nd,four\n", encoding="utf-8")
    job = job_from_dict({"name": "fake", "input": {"path": "in.csv", "id_column": "id"},
                         "prompt": {"column": "text"}, "model": "m",
                         "endpoint": {"base_url": "http://127.0.0.1:9/v1"},
                         "limits": {"concurrency": 2},
                         "output": {"path": "out.jsonl"}},
                        base_dir=tmp_path, source="job", require_output=True)
    prepared = prepare(job)
    sender = FunctionSender(echo)
    time = FakeClock()
    assert job.output is not None
    with Checkpoint(job.output.checkpoint_path) as checkpoint:
        run = Run(prepared, lambda _concurrency: contextlib.nullcontext(sender), checkpoint,
                  RunOptions(progress=False, handle_signals=False),
                  Runtime(clock=time.clock, sleep=time.sleep, rng=random.Random(1)))
        report = asyncio.run(run.execute())
    assert (report.rows, report.failed_rows) == (4, 1)  # the empty prompt is an error row
    assert sorted(r["messages"][-1]["content"] for r in sender.requests) == ["four", "one", "two"]
    lines = (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()
    assert [line.split('"reply":')[1].split(",")[0] for line in lines] == [
        '"echo: one"', '"echo: two"', "null", '"echo: four"']
