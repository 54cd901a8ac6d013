"""A misbehaving server: a storm of mixed faults, a server that always stalls or never
answers, a terminal error repeated row after row (the breaker)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pyarrow.parquet as pq
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
    write_job,
)

from batcher.errors import RunAborted
from batcher.mock_server import FaultRule, MockServer, reply_for

STORM = [FaultRule("500", rate=0.03), FaultRule("502_html", rate=0.03),
         FaultRule("503", rate=0.03), FaultRule("503_bare", rate=0.02),
         FaultRule("drop", rate=0.02), FaultRule("stall", rate=0.02),
         FaultRule("malformed", rate=0.02), FaultRule("error_200", rate=0.02),
         FaultRule("empty_choices", rate=0.02)]


def test_a_fault_storm_still_ends_with_every_row_ok(tmp_path: Path, make_mock: MakeMock) -> None:
    rows, max_attempts = 150, 10
    server: MockServer = make_mock(api_key=TEST_KEY, faults=STORM, stall_s=5,
                                   fault_retry_after_s=0.01, seed=3)
    output = tmp_path / "out.parquet"
    job = write_job(tmp_path / "job.yaml", job_dict(
        server.base_url, prompts_csv(tmp_path, rows), output,
        endpoint={"timeout_s": 0.5}, limits={"concurrency": 8},
        retry={"max_attempts": max_attempts, "base_delay_s": 0.01, "max_delay_s": 0.05}))
    started = time.monotonic()
    result = cli("run", str(job), "-q")
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < 60, elapsed

    table = pq.read_table(output).to_pydict()
    assert table["status"] == ["ok"] * rows
    assert table["reply"] == [reply_for(prompt_text(i)) for i in range(rows)]
    assert max(table["attempts"]) <= max_attempts
    stats = server.stats.snapshot()
    assert sum(table["attempts"]) == stats["requests_total"]  # every request accounted for
    # The storm really blew: at least 15% of responses were faults of many kinds.
    faulted = stats["requests_total"] - rows
    assert faulted >= 0.15 * stats["requests_total"], stats["by_status"]
    assert {500, 502, 503} <= set(stats["by_status"]) and stats["dropped"] > 0


def test_a_server_that_always_stalls_trips_the_breaker_quickly(tmp_path: Path,
                                                               make_mock: MakeMock) -> None:
    server: MockServer = make_mock(api_key=TEST_KEY, faults=[FaultRule("stall", rate=1.0)],
                                   stall_s=60)
    job = write_job(tmp_path / "job.yaml", job_dict(
        server.base_url, prompts_csv(tmp_path, 40), tmp_path / "out.csv",
        endpoint={"timeout_s": 0.3}, limits={"concurrency": 4},
        retry={"max_attempts": 2, "stop_after_identical_failures": 5}))
    started = time.monotonic()
    result = cli("run", str(job), "-q")
    assert time.monotonic() - started < 45
    assert result.returncode == 3, result.stderr
    line = one_error_line(result.stderr)
    assert "timed out" in line and "stop_after_identical_failures" in line
    assert server.stats.snapshot()["requests_total"] <= (5 + 4) * 2


def test_a_server_that_always_stalls_never_hangs_the_run(tmp_path: Path,
                                                         make_mock: MakeMock) -> None:
    server: MockServer = make_mock(faults=[FaultRule("stall", rate=1.0)], stall_s=60)
    job = write_job(tmp_path / "job.yaml", job_dict(
        server.base_url, prompts_csv(tmp_path, 6), tmp_path / "out.jsonl",
        endpoint={"timeout_s": 0.3}, limits={"concurrency": 3},
        retry={"max_attempts": 2, "stop_after_identical_failures": 1000}))
    started = time.monotonic()
    report = run_job(job)
    assert time.monotonic() - started < 30
    assert report.exit_code == 1 and report.failed_rows == 6
    results = [orjson.loads(line) for line in (tmp_path / "out.jsonl").read_bytes().splitlines()]
    assert all(row["status"] == "error" and "timed out" in row["error"]
               and row["attempts"] == 2 for row in results)


@contextlib.contextmanager
def hung_tcp_server(mode: str) -> Iterator[int]:
    """A loopback TCP server that never answers properly: ``silent`` reads the
    request and says nothing, ``trickle`` sends a body one byte at a time forever,
    ``backlog`` never even accepts the connection."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    stop = threading.Event()
    connections: list[socket.socket] = []

    def serve_one(connection: socket.socket) -> None:
        with contextlib.suppress(OSError):
            connection.recv(65536)
            if mode == "trickle":
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                   b"Content-Length: 100000\r\n\r\n{")
                while not stop.wait(0.05):
                    connection.sendall(b" ")
            else:
                stop.wait(60)

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            connections.append(connection)
            threading.Thread(target=serve_one, args=(connection,), daemon=True).start()

    acceptor = threading.Thread(target=accept, daemon=True)
    if mode != "backlog":
        acceptor.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        if acceptor.is_alive():
            acceptor.join(5)
        for connection in connections:
            connection.close()
        listener.close()


@pytest.mark.parametrize("mode", ["silent", "trickle", "backlog"])
def test_a_hung_server_never_hangs_the_run(tmp_path: Path, mode: str) -> None:
    with hung_tcp_server(mode) as port:
        job = write_job(tmp_path / "job.yaml", job_dict(
            f"http://127.0.0.1:{port}/v1", prompts_csv(tmp_path, 2), tmp_path / "out.jsonl",
            endpoint={"timeout_s": 0.25}, limits={"concurrency": 2},
            retry={"max_attempts": 2}))
        started = time.monotonic()
        report = run_job(job)
        assert time.monotonic() - started < 30
    assert report.exit_code == 1 and report.failed_rows == 2
    results = [orjson.loads(line) for line in (tmp_path / "out.jsonl").read_bytes().splitlines()]
    assert all(row["attempts"] == 2 and "timed out" in row["error"] for row in results), results


# == a repeating terminal error ===============================================================


def test_a_repeating_terminal_error_stops_the_run_with_exit_3(tmp_path: Path,
                                                              make_mock: MakeMock) -> None:
    rows, concurrency, limit = 100, 4, 5
    broken: MockServer = make_mock(api_key=TEST_KEY, faults=[FaultRule("400", rate=1.0)])
    job_data = job_dict(broken.base_url, prompts_csv(tmp_path, rows), tmp_path / "out.csv",
                        limits={"concurrency": concurrency},
                        retry={"stop_after_identical_failures": limit})
    job = write_job(tmp_path / "job.yaml", job_data)
    result = cli("run", str(job), "-q")
    assert result.returncode == 3, result.stderr
    line = one_error_line(result.stderr)
    assert "HTTP 400" in line and "the mock server rejected this request" in line
    assert f"{limit} rows in a row" in line
    assert broken.stats.snapshot()["requests_total"] <= limit + concurrency
    assert not (tmp_path / "out.csv").exists()
    _header, records, _tail = read_journal(tmp_path / "out.ckpt")
    assert records and all(row["status"] == "error" for row in records)

    # Fixed (another endpoint may serve a resumed job): the failed rows are sent again.
    healthy: MockServer = make_mock(api_key=TEST_KEY)
    job_data["endpoint"]["base_url"] = healthy.base_url
    write_job(job, job_data)
    result = cli("run", str(job), "-q")
    assert result.returncode == 0, result.stderr
    assert healthy.stats.snapshot()["requests_total"] == rows


@pytest.mark.parametrize(("fault", "attempts", "signature"), [
    ("400", 1, "HTTP 400"),      # terminal for the row
    ("500", 2, "HTTP 500"),      # retried, then given up
    ("404", 1, "HTTP 404"),
])
def test_the_breaker_default_stops_within_twenty_rows(tmp_path: Path, make_mock: MakeMock,
                                                      fault: str, attempts: int,
                                                      signature: str) -> None:
    server: MockServer = make_mock(faults=[FaultRule(fault, rate=1.0)])
    job = write_job(tmp_path / "job.yaml", job_dict(
        server.base_url, prompts_csv(tmp_path, 80), tmp_path / "out.csv",
        limits={"concurrency": 4}, retry={"max_attempts": 2}))
    with pytest.raises(RunAborted) as caught:
        run_job(job)
    assert signature in str(caught.value) and "\n" not in str(caught.value)
    assert server.stats.snapshot()["requests_total"] <= (20 + 4) * attempts

