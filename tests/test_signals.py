"""SIGTERM and SIGINT: a graceful stop that journals the replies in flight, a second
Ctrl-C that cancels at once, a grace period that ends even when the server hangs."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import (
    TEST_KEY,
    MakeMock,
    cli,
    job_dict,
    one_error_line,
    prompt_text,
    prompts_csv,
    read_journal,
    run_job,
    start_run,
    wait_until,
    write_job,
)

from batcher.errors import Interrupted
from batcher.mock_server import FaultRule, MockServer
from batcher.online.runner import RunControl


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_gracefully_and_journals_in_flight_replies(
        tmp_path: Path, make_mock: MakeMock, signum: signal.Signals) -> None:
    rows, concurrency = 24, 4
    server: MockServer = make_mock(api_key=TEST_KEY, latency_s=0.2)
    source = prompts_csv(tmp_path, rows)
    checkpoint = tmp_path / "out.ckpt"
    job = write_job(tmp_path / "job.yaml", job_dict(
        server.base_url, source, tmp_path / "out.csv", limits={"concurrency": concurrency}))
    process = start_run(job)
    wait_until(lambda: len(read_journal(checkpoint)[1]) >= concurrency
               and server.stats.in_flight > 0, process, what="rows done and requests in flight")
    journaled_before = len(read_journal(checkpoint)[1])
    signalled = time.monotonic()
    process.send_signal(signum)
    _out, err = process.communicate(timeout=60)
    elapsed = time.monotonic() - signalled

    assert process.returncode == 128 + signum, (process.returncode, err)
    line = one_error_line(err)
    assert signal.Signals(signum).name in line and "run the same command again" in line
    assert elapsed < 10 + 8, elapsed  # the grace period is 10 s; in-flight replies take 0.2 s
    header, records, tail = read_journal(checkpoint)
    assert header is not None and tail == b""  # a consistent checkpoint, no torn line
    stats = server.stats.snapshot()
    journaled = {prompt_text(row["i"]) for row in records if row["status"] == "ok"}
    # Every reply the server sent (in-flight ones included, finished in the grace
    # period) was journaled, and nothing was sent after the stop.
    assert set(stats["ok_prompts"]) == journaled
    assert len(records) > journaled_before
    assert stats["requests_total"] == len(records)
    assert not (tmp_path / "out.csv").exists()

    result = cli("run", str(job), "-q")
    assert result.returncode == 0, result.stderr
    prompts = server.stats.snapshot()["prompts"]
    assert set(prompts) == {prompt_text(i) for i in range(rows)}
    assert set(prompts.values()) == {1}  # no row was sent twice


def test_a_second_ctrl_c_cancels_hung_requests_at_once(tmp_path: Path, make_mock: MakeMock) -> None:
    server: MockServer = make_mock(api_key=TEST_KEY, faults=[FaultRule("stall", rate=1.0)],
                                   stall_s=60)
    job = write_job(tmp_path / "job.yaml", job_dict(
        server.base_url, prompts_csv(tmp_path, 10), tmp_path / "out.csv",
        endpoint={"timeout_s": 60}, limits={"concurrency": 2}))
    process = start_run(job)
    wait_until(lambda: server.stats.in_flight >= 1, process, what="a request in flight")
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert process.poll() is None  # the first Ctrl-C waits (grace) for in-flight replies
    process.send_signal(signal.SIGINT)
    started = time.monotonic()
    _out, err = process.communicate(timeout=30)
    assert time.monotonic() - started < 8
    assert process.returncode == 130, err
    one_error_line(err)
    header, records, tail = read_journal(tmp_path / "out.ckpt")
    assert header is not None and records == [] and tail == b""


def test_the_grace_period_ends_a_stop_even_when_the_server_hangs(tmp_path: Path,
                                                                 make_mock: MakeMock) -> None:
    server: MockServer = make_mock(faults=[FaultRule("stall", rate=1.0)], stall_s=60)
    job = write_job(tmp_path / "job.yaml", job_dict(
        server.base_url, prompts_csv(tmp_path, 10), tmp_path / "out.csv",
        endpoint={"timeout_s": 60}, limits={"concurrency": 3}))
    control = RunControl()

    def stop_when_in_flight() -> None:
        try:
            wait_until(lambda: server.stats.in_flight >= 1, timeout=30, what="a request")
        finally:
            control.request_stop(signal.SIGTERM)

    stopper = threading.Thread(target=stop_when_in_flight)
    stopper.start()
    started = time.monotonic()
    with pytest.raises(Interrupted) as caught:
        run_job(job, control=control, grace_s=0.5)
    stopper.join()
    assert caught.value.exit_code == 143
    assert time.monotonic() - started < 15
    header, records, tail = read_journal(tmp_path / "out.ckpt")
    assert header is not None and records == [] and tail == b""

