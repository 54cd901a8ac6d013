"""batcher.testing: the public fakes work as its docstring shows."""

from __future__ import annotations

import asyncio
import contextlib
import random
from pathlib import Path

import pandas as pd
import pytest

import batcher
import batcher.testing
from batcher.jobload import job_from_dict
from batcher.online.runner import Run, RunOptions, Runtime
from batcher.plan.preflight import prepare
from batcher.store.checkpoint import Checkpoint
from batcher.testing import FakeClock, FunctionSender, MockConfig, MockServer, reply_for


def test_every_public_name_loads() -> None:
    for name in batcher.testing.__all__:
        assert getattr(batcher.testing, name) is not None, name


def test_the_fake_clock_moves_only_when_slept_on_or_advanced() -> None:
    clock = FakeClock(start=100.0)
    asyncio.run(clock.sleep(2.5))
    assert (clock.clock(), clock.sleeps) == (102.5, [2.5])
    asyncio.run(clock.sleep(-1.0))  # recorded, but time never runs backwards
    clock.advance(0.5)
    assert (clock.clock(), clock.sleeps) == (103.0, [2.5, -1.0])


def test_a_dataframe_runs_against_the_mock_server(tmp_path: Path) -> None:
    frame = pd.DataFrame({"text": ["hello", "[[fault:503*1]] busy once"]})
    with MockServer(MockConfig(api_key="sk-test")) as server:
        out = batcher.run_dataframe(frame, model="gpt-4o-mini", prompt_column="text",
                                    base_url=server.base_url, api_key="sk-test",
                                    checkpoint=tmp_path / "frame.ckpt", progress=False)
        assert server.stats.snapshot()["requests_total"] == 3  # the 503 was asked again
    assert out["reply"][0] == reply_for("hello")
    assert list(out["status"]) == ["ok", "ok"]


def test_a_run_through_a_function_sender_on_the_fake_clock(tmp_path: Path) -> None:
    (tmp_path / "in.csv").write_text("id,text\na,one\nb,[busy]\n", encoding="utf-8")
    busy = iter([(503, {"error": {"message": "busy"}})])

    def answer(request: dict[str, object]) -> tuple[int, object]:
        text = request["messages"][-1]["content"]  # type: ignore[index]
        if text == "[busy]":
            return next(busy, (200, {"choices": [{"message": {"content": "free now"},
                                                  "finish_reason": "stop"}]}))
        return 200, {"choices": [{"message": {"content": f"echo: {text}"},
                                  "finish_reason": "stop"}]}

    job = job_from_dict({"name": "fake", "input": {"path": "in.csv", "id_column": "id"},
                         "prompt": {"column": "text"}, "model": "m",
                         "endpoint": {"base_url": "http://127.0.0.1:9/v1"},
                         "retry": {"base_delay_s": 4.0},
                         "output": {"path": "out.jsonl"}},
                        base_dir=tmp_path, source="job", require_output=True)
    sender, clock = FunctionSender(answer), FakeClock()
    assert job.output is not None
    with Checkpoint(job.output.checkpoint_path) as checkpoint:
        run = Run(prepare(job), lambda _concurrency: contextlib.nullcontext(sender), checkpoint,
                  RunOptions(progress=False, handle_signals=False),
                  Runtime(clock=clock.clock, sleep=clock.sleep, rng=random.Random(1)))
        report = asyncio.run(run.execute())
    assert (report.rows, report.failed_rows) == (2, 0)
    assert len(sender.requests) == 3
    assert any(0 < slept <= 4.0 for slept in clock.sleeps)  # the backoff, on the fake clock


def test_the_readmes_testing_example_runs_as_written(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The README shows batcher.testing in use: that block, executed as it stands."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("**Test aids for embedders**"):]
    block = section[section.index("```python\n") + len("```python\n"):section.index("```\n\n")]
    monkeypatch.chdir(tmp_path)  # nothing it writes lands in the checkout
    exec(compile(block, "README.md", "exec"), {})  # its own asserts are the test
