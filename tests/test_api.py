"""The Python API over real HTTP to the mock server: frames in, frames out, resume."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import TEST_KEY, MakeMock, job_dict, prompts_csv, wait_until, write_job

import batcher
import batcher.api
import batcher.api.bridge
import batcher.online.runner
from batcher.mock_server import MockServer, reply_for
from batcher.pricing import Price, Usage, resolve_price
from batcher.records import RESULT_COLUMNS

KEY_ENV = "BATCHER_TEST_KEY"


@pytest.fixture
def keyed_server(monkeypatch: pytest.MonkeyPatch, make_mock: MakeMock) -> MockServer:
    monkeypatch.setenv(KEY_ENV, TEST_KEY)
    server: MockServer = make_mock(api_key=TEST_KEY)
    return server


def endpoint(server: MockServer, **extra: Any) -> dict[str, Any]:
    """Keyword arguments for a run against ``server``, quiet and quick."""
    return {"model": "gpt-4o-mini", "base_url": server.base_url, "api_key_env": KEY_ENV,
            "progress": False, **extra}


def reviews(count: int) -> pd.DataFrame:
    """A frame with a non-default index and columns the prompt does not read."""
    return pd.DataFrame(
        {"product": [f"Gadget {i}" for i in range(count)],
         "text": [f"Review {i}: works as described." for i in range(count)],
         "stars": list(range(count)),
         "meta": [{"i": i} if i % 2 else f"note {i}" for i in range(count)]},  # not Arrow-able
        index=pd.Index([f"r{i:03d}" for i in range(count)], name="review_id"))


def sent(server: MockServer) -> dict[str, int]:
    prompts: dict[str, int] = server.stats.snapshot()["prompts"]
    return prompts


def answered(server: MockServer) -> int:
    return sum(server.stats.snapshot()["ok_prompts"].values())


@pytest.fixture
def when() -> Iterator[Callable[[Callable[[], bool], Callable[[], object]], None]]:
    """``when(ready, act)``: a helper thread runs ``act()`` once ``ready()`` holds."""
    threads: list[threading.Thread] = []

    def arm(ready: Callable[[], bool], act: Callable[[], object]) -> None:
        def watch() -> None:
            wait_until(ready, timeout=20, what="the moment to act")
            act()

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        threads.append(thread)

    yield arm
    for thread in threads:
        thread.join(5)


def ctrl_c() -> None:
    """A real SIGINT to this process: the main thread, blocked waiting for the run,
    gets it exactly where a user's Ctrl-C or a Jupyter kernel interrupt lands."""
    os.kill(os.getpid(), signal.SIGINT)


def test_dataframe_in_dataframe_out(keyed_server: MockServer) -> None:
    frame = reviews(12)
    original = frame.copy()
    out = batcher.run_dataframe(frame, prompt_column="text", **endpoint(keyed_server))
    assert list(out.columns) == [*frame.columns, *RESULT_COLUMNS]
    pd.testing.assert_index_equal(out.index, frame.index)
    pd.testing.assert_frame_equal(out[list(frame.columns)], frame)  # input columns untouched
    pd.testing.assert_frame_equal(frame, original)  # the caller's frame is not modified
    assert list(out["reply"]) == [reply_for(text) for text in frame["text"]]
    assert set(out["status"]) == {"ok"} and out["error"].isna().all()
    assert str(out["total_tokens"].dtype) == "Int64" and (out["total_tokens"] > 0).all()
    assert str(out["latency_s"].dtype) == "float64"
    assert sent(keyed_server) == dict.fromkeys(frame["text"], 1)

    summary = out.attrs["batcher"]
    assert summary["rows"] == 12 and summary["ok"] == 12 and summary["errors"] == 0
    assert summary["requests"] == 12 and summary["from_checkpoint"] == 0
    assert summary["prompt_tokens"] == int(out["prompt_tokens"].sum())
    assert summary["completion_tokens"] == int(out["completion_tokens"].sum())
    price = resolve_price("gpt-4o-mini")
    assert isinstance(price, Price)
    assert summary["cost_usd"] == pytest.approx(
        price.cost(Usage(summary["prompt_tokens"], summary["completion_tokens"])))
    assert summary["elapsed_s"] > 0 and summary["simulated"] is False
    json.dumps(out.attrs)  # pandas' Parquet writer stores attrs as JSON: they must be plain


def test_sync_call_works_inside_a_running_event_loop(keyed_server: MockServer) -> None:
    async def notebook_cell() -> pd.DataFrame:
        asyncio.get_running_loop()  # as in Jupyter: a loop is running in this thread
        return batcher.run_dataframe(["one", "two", "three"], **endpoint(keyed_server))

    out = asyncio.run(notebook_cell())
    assert list(out["prompt"]) == ["one", "two", "three"]
    assert list(out["reply"]) == [reply_for(p) for p in ("one", "two", "three")]


def test_async_twin_runs_in_the_callers_loop(keyed_server: MockServer) -> None:
    async def main() -> list[pd.DataFrame]:
        return list(await asyncio.gather(
            batcher.arun_dataframe(["a1", "a2"], **endpoint(keyed_server)),
            batcher.arun_dataframe(pd.Series(["b1", "b2", "b3"], name="question"),
                                   **endpoint(keyed_server)),
            batcher.arun_dataframe(["a1", "a2"], **endpoint(keyed_server)),  # the same call twice
        ))

    first, second, again = asyncio.run(main())
    assert list(first["reply"]) == [reply_for("a1"), reply_for("a2")]
    assert list(second.columns)[:1] == ["question"] and set(second["status"]) == {"ok"}
    pd.testing.assert_series_equal(first["reply"], again["reply"])


def test_template_system_params_and_limit(keyed_server: MockServer) -> None:
    frame = reviews(6)
    out = batcher.run_dataframe(
        frame, template="Review of {product} ({stars} stars):\n{text}", system="Be brief.",
        params={"temperature": 0, "max_tokens": 500}, concurrency=2, requests_per_minute=6000,
        limit=4, **endpoint(keyed_server))
    assert len(out) == 4 and list(out.index) == list(frame.index[:4])
    expected = [f"Review of {p} ({s} stars):\n{t}"
                for p, s, t in zip(frame["product"], frame["stars"], frame["text"], strict=True)]
    assert list(out["reply"]) == [reply_for(prompt) for prompt in expected[:4]]
    assert sorted(sent(keyed_server)) == sorted(expected[:4])


def test_failed_rows_are_data_and_the_summary_counts_them(keyed_server: MockServer) -> None:
    out = batcher.run_dataframe(["fine", "[[fault:400]] refused", "", "also fine"],
                                **endpoint(keyed_server))
    assert list(out["status"]) == ["ok", "error", "error", "ok"]
    assert out["error"][1].startswith("HTTP 400") and out["error"][2].startswith("prompt is empty")
    assert out["total_tokens"].isna().tolist() == [False, True, True, False]
    assert str(out["total_tokens"].dtype) == "Int64"
    summary = out.attrs["batcher"]
    assert (summary["ok"], summary["errors"]) == (2, 2)


def test_api_key_is_held_in_memory_only(tmp_path: Path, make_mock: MakeMock,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    server = make_mock(api_key=TEST_KEY, echo_key_in_errors=True)
    checkpoint = tmp_path / "keyed.ckpt"
    out = batcher.run_dataframe(["hello", "[[fault:400]] echo the key"], model="gpt-4o-mini",
                                base_url=server.base_url, api_key=TEST_KEY,
                                checkpoint=checkpoint, progress=False)
    assert list(out["status"]) == ["ok", "error"]
    assert TEST_KEY not in str(out["error"][1])
    assert KEY_ENV not in os.environ and batcher.api.KEY_ENV not in os.environ
    for path in tmp_path.iterdir():
        assert TEST_KEY not in path.read_text(errors="replace")
    with pytest.raises(batcher.RunAborted) as caught:
        batcher.run_dataframe(["hi"], model="gpt-4o-mini", base_url=server.base_url,
                              api_key="sk-wrong-but-secret-0123456789", progress=False)
    assert "sk-wrong-but-secret" not in str(caught.value)


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"requests_per_minute": -5}, batcher.ConfigError,
     "limits.requests_per_minute: must be a positive number"),
    ({"concurrency": 2.5}, batcher.ConfigError, "limits.concurrency: must be a whole number"),
    ({"mock": {"latency": 1}}, batcher.ConfigError, "endpoint.mock.latency: unknown key"),
    ({"params": {"messages": []}}, batcher.ConfigError, "params.messages: is set by batcher"),
    ({"base_url": None}, batcher.ConfigError, "set exactly one of endpoint.base_url"),
    ({"endpoint": {"base_url": "http://x"}}, batcher.ConfigError,
     "endpoint.base_url: given twice"),
    ({"api_key_env": "sk-proj-abcdefghijklmnop1234"}, batcher.ConfigError,
     "looks like a literal API key"),
    ({"prompt_column": "body"}, batcher.DataError,
     "prompt.column names column 'body', which the DataFrame does not have"),
    ({"prompt_column": None, "template": "{text} {nope}"}, batcher.DataError,
     "prompt.template names column 'nope'"),
    ({"checkpoint": "results.parquet"}, batcher.ConfigError, "is a data file"),
    ({"limit": -1}, batcher.ConfigError, "limit: must be a whole number"),
])
def test_keyword_mistakes_read_like_job_file_mistakes(
        keyed_server: MockServer, kwargs: dict[str, Any], error: type[Exception],
        message: str) -> None:
    settings = {**endpoint(keyed_server), "prompt_column": "text", **kwargs}
    with pytest.raises(error, match=r"^batcher\.run_dataframe\(\.\.\.\): ") as caught:
        batcher.run_dataframe(reviews(3), **settings)
    assert message in str(caught.value)
    assert keyed_server.stats.snapshot()["requests_total"] == 0


def test_bad_data_is_refused_before_sending(keyed_server: MockServer) -> None:
    clash = reviews(2).assign(reply="already here")
    with pytest.raises(batcher.DataError, match="already has a column 'reply'"):
        batcher.run_dataframe(clash, prompt_column="text", **endpoint(keyed_server))
    with pytest.raises(batcher.DataError, match="list of prompt strings"):
        batcher.run_dataframe("one prompt", **endpoint(keyed_server))
    mixed = pd.DataFrame({"text": ["a", 1, b"x"]})
    with pytest.raises(batcher.DataError, match="column 'text'"):
        batcher.run_dataframe(mixed, prompt_column="text", **endpoint(keyed_server))
    assert keyed_server.stats.snapshot()["requests_total"] == 0


def test_empty_frame_gives_an_empty_result(keyed_server: MockServer) -> None:
    out = batcher.run_dataframe(pd.DataFrame({"text": pd.Series([], dtype="str")}),
                                prompt_column="text", **endpoint(keyed_server))
    assert len(out) == 0 and list(out.columns) == ["text", *RESULT_COLUMNS]
    assert out.attrs["batcher"]["rows"] == 0


def test_interrupt_keeps_the_checkpoint_and_the_same_call_resumes(
        tmp_path: Path, make_mock: MakeMock, when: Any) -> None:
    server = make_mock(latency_s=0.05)
    checkpoint = tmp_path / "nb" / "reviews.ckpt"

    def call() -> pd.DataFrame:
        # A new frame each time, as after a kernel restart: same data, same bytes.
        return batcher.run_dataframe(reviews(40), prompt_column="text", model="gpt-4o-mini",
                                     base_url=server.base_url, concurrency=2,
                                     checkpoint=checkpoint, progress=False)

    when(lambda: answered(server) >= 5, ctrl_c)
    with pytest.raises(KeyboardInterrupt, match=r"kept in the checkpoint .*reviews\.ckpt.*resume"):
        call()
    first = dict(sent(server))
    assert 5 <= len(first) < 40
    assert checkpoint.exists()

    out = call()
    assert set(out["status"]) == {"ok"} and len(out) == 40
    assert list(out["reply"]) == [reply_for(text) for text in reviews(40)["text"]]
    # The stop was graceful: requests in flight finished and were journaled, so
    # no row was sent twice; the second call sent only the rest.
    assert sent(server) == dict.fromkeys(reviews(40)["text"], 1)
    summary = out.attrs["batcher"]
    assert summary["from_checkpoint"] == len(first)
    assert summary["requests"] == 40 - len(first)

    again = call()  # after success the checkpoint answers everything: nothing is sent
    assert again.attrs["batcher"]["requests"] == 0
    assert server.stats.snapshot()["requests_total"] == 40
    assert set(again["source"]) == {"reused"}  # with the original replies, usage and latency
    pd.testing.assert_frame_equal(again.drop(columns=["source"]), out.drop(columns=["source"]))

    batcher.run_dataframe(reviews(40), prompt_column="text", model="gpt-4o-mini",
                          base_url=server.base_url, checkpoint=checkpoint, fresh=True,
                          progress=False)
    assert server.stats.snapshot()["requests_total"] == 80


def test_a_second_interrupt_cancels_a_stalled_request(
        tmp_path: Path, make_mock: MakeMock, when: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    server = make_mock(stall_s=30)
    prompts = ["first", "second", "[[fault:stall*1]] hangs once", "fourth"]
    stops: list[int] = []

    class RecordingControl(batcher.online.runner.RunControl):
        def request_stop(self, signum: int = signal.SIGINT) -> None:
            super().request_stop(signum)
            stops.append(signum)

    def main_thread_waiting() -> bool:
        frame = sys._current_frames().get(threading.main_thread().ident or 0)
        return frame is not None and frame.f_code.co_name == "wait" and frame.f_code.co_filename \
            == threading.__file__

    monkeypatch.setattr(batcher.api.bridge, "RunControl", RecordingControl)
    settings: dict[str, Any] = {"model": "gpt-4o-mini", "base_url": server.base_url,
                                "concurrency": 1, "checkpoint": tmp_path / "stall.ckpt",
                                "progress": False}
    when(lambda: prompts[2] in sent(server), ctrl_c)  # graceful: the stalled request may finish
    when(lambda: len(stops) == 1 and main_thread_waiting(), ctrl_c)  # impatient: cancel it
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt, match="resume"):
        batcher.run_dataframe(prompts, **settings)
    assert time.monotonic() - started < 5  # not the 10 s grace, let alone the 30 s stall
    assert len(stops) == 2

    out = batcher.run_dataframe(prompts, **settings)
    assert set(out["status"]) == {"ok"} and out.attrs["batcher"]["from_checkpoint"] == 2
    assert sent(server) == {"first": 1, "second": 1, prompts[2]: 2, "fourth": 1}


def test_without_a_checkpoint_an_interrupted_call_resumes_in_this_session(
        make_mock: MakeMock, when: Any) -> None:
    server = make_mock(latency_s=0.05)
    settings: dict[str, Any] = {"prompt_column": "text", "model": "gpt-4o-mini",
                                "base_url": server.base_url, "concurrency": 2,
                                "progress": False}
    when(lambda: answered(server) >= 5, ctrl_c)
    with pytest.raises(KeyboardInterrupt, match="for this Python session"):
        batcher.run_dataframe(reviews(30), **settings)
    done_first = len(sent(server))
    out = batcher.run_dataframe(reviews(30), **settings)
    assert set(out["status"]) == {"ok"}
    assert sent(server) == dict.fromkeys(reviews(30)["text"], 1)
    assert out.attrs["batcher"]["from_checkpoint"] == done_first
    # Once it succeeded, the same call (a cell run twice) sends nothing again (issue 12).
    again = batcher.run_dataframe(reviews(30), **settings)
    assert list(again["reply"]) == list(out["reply"])
    assert server.stats.snapshot()["requests_total"] == 30
    assert set(again["source"]) == {"reused"}


def test_run_a_job_file_a_job_dict_and_the_async_twin(
        tmp_path: Path, keyed_server: MockServer, capsys: pytest.CaptureFixture[str]) -> None:
    source = prompts_csv(tmp_path, 15)
    job = job_dict(keyed_server.base_url, source, tmp_path / "out.csv")
    path = write_job(tmp_path / "job.yaml", job)

    result = batcher.run(path, limit=5)
    assert result.exit_code == 0 and result.results_path == tmp_path / "out.csv"
    assert result.summary.rows == 5 and result.summary.requests == 5
    assert "5 rows: 5 ok, 0 errors" in capsys.readouterr().err
    assert list(result.frame["id"]) == [f"row{i:04d}" for i in range(5)]  # CSV ids stay text
    assert str(result.frame["total_tokens"].dtype) == "Int64"
    assert result.frame.attrs["batcher"]["rows"] == 5

    result = batcher.run(job, progress=False)  # a dict in the job file's shape
    assert result.summary.rows == 15 and result.summary.from_checkpoint == 5
    assert result.summary.requests == 10

    result = asyncio.run(batcher.arun(str(path), fresh=True, progress=False))
    assert result.summary.requests == 15 and len(result.frame) == 15
    assert keyed_server.stats.snapshot()["requests_total"] == 30

    with pytest.raises(batcher.ConfigError, match=r"^batcher.run\(...\): limits.concurrency"):
        batcher.run({**job, "limits": {"concurrency": 0}})


def test_cancelling_the_async_twin_keeps_finished_rows_for_the_same_call(
        tmp_path: Path, make_mock: MakeMock, when: Any) -> None:
    server = make_mock(latency_s=0.05)
    settings: dict[str, Any] = {"prompt_column": "text", "model": "gpt-4o-mini",
                                "base_url": server.base_url, "concurrency": 2,
                                "checkpoint": tmp_path / "async.ckpt", "progress": False}

    async def cancel_midway() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(batcher.arun_dataframe(reviews(30), **settings))
        when(lambda: answered(server) >= 5, lambda: loop.call_soon_threadsafe(task.cancel))
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_midway())
    out = asyncio.run(batcher.arun_dataframe(reviews(30), **settings))
    assert set(out["status"]) == {"ok"} and out.attrs["batcher"]["from_checkpoint"] >= 5
    counts = sent(server)
    assert set(counts) == set(reviews(30)["text"])
    # Cancelling is immediate: only the requests in flight at that moment went twice.
    assert sum(count - 1 for count in counts.values()) <= 2


@pytest.mark.parametrize("suffix", ["csv", "jsonl", "parquet"])
def test_a_job_results_frame_is_typed_the_same_for_every_format(
        tmp_path: Path, keyed_server: MockServer, suffix: str) -> None:
    source = tmp_path / "in.csv"
    source.write_text('id,text\n007,fine\n008,[[fault:400]] refused\n')
    result = batcher.run(job_dict(keyed_server.base_url, source, tmp_path / f"out.{suffix}"),
                         progress=False)
    frame = result.frame
    assert result.exit_code == 1 and result.summary.errors == 1
    assert list(frame["id"]) == ["007", "008"]
    assert list(frame["status"]) == ["ok", "error"]
    for column in ("prompt_tokens", "completion_tokens", "total_tokens", "attempts"):
        assert str(frame[column].dtype) == "Int64", column
    assert frame["total_tokens"].isna().tolist() == [False, True]
    assert pd.isna(frame["reply"][1]) and frame["error"][1].startswith("HTTP 400")


def test_mock_true_runs_the_built_in_server_and_says_so(
        capsys: pytest.CaptureFixture[str]) -> None:
    out = batcher.run_dataframe(["ping"], model="gpt-4o-mini", mock={"latency_s": 0})
    assert out["reply"][0] == reply_for("ping")
    assert out.attrs["batcher"]["simulated"] is True
    err = capsys.readouterr().err
    assert "replies are simulated" in err and "1 row: 1 ok" in err


def test_the_public_api_is_exactly_all() -> None:
    public = {name for name in dir(batcher)  # dir(): the lazy names too (PEP 562)
              if not name.startswith("_") and not inspect.ismodule(getattr(batcher, name))}
    public -= {"annotations"}  # from __future__
    assert public == set(batcher.__all__) - {"__version__"}
    for name in ("run", "arun", "run_dataframe", "arun_dataframe"):
        function = getattr(batcher, name)
        assert function.__doc__ and ">>>" in function.__doc__, name
    assert (Path(batcher.__file__).parent / "py.typed").exists()
