"""Attack tests: crashes, signals, overlapping runs, a full disk, a misbehaving
server, broken input and leaked secrets. Each test tries to make batcher lose
a row, pay for one twice, hang, corrupt a file, print a traceback or show the
key; the assertions are the contract's promises.

Real ``batcher run`` processes are started where the promise is about the
process (signals, kills, exit codes, stderr); the rest run in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import orjson
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from conftest import TEST_KEY, job_dict, prompts_csv, write_csv, write_job

from batcher.checkpoint import Checkpoint
from batcher.config import load_job
from batcher.errors import BatcherError, Interrupted, RunAborted
from batcher.jobs import arun_job, dry_run
from batcher.mock_server import FaultRule, MockServer, reply_for
from batcher.records import RowResult
from batcher.runner import RunControl, RunOptions, RunReport, prepare

ENV = {"BATCHER_TEST_KEY": TEST_KEY}
PROXY_VARIABLES = {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "ws_proxy",
                   "wss_proxy"}


def prompt_text(i: int) -> str:
    """The prompt ``prompts_csv`` writes for row ``i``."""
    return f"Prompt number {i}: say something."


# -- process helpers ----------------------------------------------------------------------


def cli_env(extra: dict[str, str] | None = None, key: str = TEST_KEY) -> dict[str, str]:
    """The environment of a ``batcher`` subprocess: no inherited proxy settings."""
    env = {name: value for name, value in os.environ.items()
           if name.lower() not in PROXY_VARIABLES}
    env["BATCHER_TEST_KEY"] = key
    env.update(extra or {})
    return env


def start_run(job: Path, *args: str, env: dict[str, str] | None = None,
              preexec_fn: Callable[[], None] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "batcher", "run", str(job), "-q", *args],
        env=env or cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=preexec_fn)


def cli(*args: str, env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "batcher", *args], capture_output=True,
                          text=True, env=env or cli_env(), preexec_fn=preexec_fn,
                          timeout=timeout, check=False)


def cli_many(*commands: tuple[str, ...], env: dict[str, str] | None = None
             ) -> list[subprocess.CompletedProcess[str]]:
    """Several ``batcher`` commands at once (each is mostly interpreter start-up)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda args: cli(*args, env=env), commands))


def wait_until(condition: Callable[[], bool], process: subprocess.Popen[str] | None = None,
               timeout: float = 60, what: str = "condition", interval: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"process ended (rc {process.returncode}) before {what}: "
                                 f"{out} {err}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def names(folder: Path) -> list[str]:
    return [path.name for path in folder.iterdir()]


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("batcher: error: "), stderr
    return lines[0]


def file_size_limit(limit: int) -> Callable[[], None]:
    """A ``preexec_fn``: writes past ``limit`` bytes fail with EFBIG, like a full disk."""
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


# -- checkpoint helpers --------------------------------------------------------------------


def read_journal(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]], bytes]:
    """Header, row records and any unterminated tail; every whole line must be JSON."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, [], b""
    complete, _, tail = data.rpartition(b"\n")
    records = [orjson.loads(line) for line in complete.split(b"\n")] if complete else []
    if not records:
        return None, [], tail
    header, *rows = records
    assert header.get("batcher_checkpoint") == 1, header
    return header, rows, tail


def journal_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def ok_positions(path: Path) -> set[int]:
    latest: dict[int, dict[str, Any]] = {}
    for row in read_journal(path)[1]:
        latest[row["i"]] = row
    return {i for i, row in latest.items() if row["status"] == "ok"}


def check_journal_replies(path: Path, texts: list[str]) -> None:
    """Every ok line in the journal holds the reply to its own row's prompt."""
    for row in read_journal(path)[1]:
        if row["status"] == "ok":
            assert row["reply"] == reply_for(texts[row["i"]]), row


def make_journaled_job(folder: Path, rows: int, suffix: str = ".parquet") -> Path:
    """A job whose checkpoint already holds every row as ok: a run only writes results."""
    source = prompts_csv(folder, rows)
    job = write_job(folder / "job.yaml", job_dict("http://127.0.0.1:9/v1", source,
                                                  folder / f"out{suffix}"))
    prepared = prepare(load_job(job))
    with Checkpoint(folder / "out.ckpt", prepared.fingerprint) as checkpoint:
        for i in range(rows):
            checkpoint.append(i, RowResult(
                reply=reply_for(prompt_text(i)), finish_reason="stop", prompt_tokens=9,
                completion_tokens=9, total_tokens=18, status="ok", error=None, attempts=1,
                latency_s=0.01))
    return job


def run_in_process(job_path: Path, environ: dict[str, str] | None = None,
                   **options: Any) -> RunReport:
    options.setdefault("progress", False)
    options.setdefault("handle_signals", False)
    return asyncio.run(arun_job(load_job(job_path), RunOptions(**options),
                                environ=ENV if environ is None else environ))


# == crash safety: SIGKILL at random moments =================================================

KILL_ROWS = 240
KILL_CONCURRENCY = 6
TEMP_NAME = re.compile(r"^\.out\.parquet\..+\.tmp$")


def test_random_sigkills_then_one_more_run_lose_nothing_and_resend_only_in_flight(
        tmp_path: Path, make_mock: Any) -> None:
    """At least 10 SIGKILLs across one job, some mid-send, some at the final results
    write; one more run then gives exactly one correct row per input row."""
    server: MockServer = make_mock(api_key=TEST_KEY, latency_s=0.015)
    # A wide extra column makes the results write long enough to be hit by a kill.
    texts = [prompt_text(i) for i in range(KILL_ROWS)]
    filler = "".join(random.Random(7).choices("abcdefghij klmnop", k=4000))
    source = write_csv(tmp_path / "in.csv", ["id", "text", "notes"],
                       [[f"row{i:04d}", texts[i], filler[i:i + 3000]] for i in range(KILL_ROWS)])
    output = tmp_path / "out.parquet"
    checkpoint = tmp_path / "out.ckpt"
    job = write_job(tmp_path / "job.yaml", job_dict(
        server.base_url, source, output, limits={"concurrency": KILL_CONCURRENCY}))
    expected_files = {"in.csv", "job.yaml", "out.parquet", "out.ckpt", "out.ckpt.lock"}

    rng = random.Random(20240611)
    kills = end_kills = 0
    temps_seen: set[str] = set()
    torn_tails = 0
    for _attempt in range(30):
        if kills >= 10 and end_kills >= 3:
            break
        done = len(ok_positions(checkpoint))
        lines = journal_lines(checkpoint)
        process = start_run(job)
        at_end = done >= KILL_ROWS - 25 or kills >= 7
        if not at_end:
            # Mid-send: once this run has journaled something, after a random delay.
            wait_until(lambda lines=lines: journal_lines(checkpoint) > max(lines, 1), process,
                       what="a row journaled")
            time.sleep(rng.uniform(0, 0.12))
        elif done < KILL_ROWS:
            # The checkpoint fills up, then the results are written: kill right there.
            wait_until(lambda: len(ok_positions(checkpoint)) == KILL_ROWS, process,
                       what="every row journaled", interval=0.001)
            time.sleep(rng.choice([0, 0, rng.uniform(0, 0.02)]))
        else:
            # Nothing left to send: kill the moment the temporary results file appears.
            def temp_or_exit(process: subprocess.Popen[str] = process) -> bool:
                return process.poll() is not None or any(
                    name.endswith(".tmp") for name in names(tmp_path))
            wait_until(temp_or_exit, what="the results write", interval=0.0002)
            time.sleep(rng.choice([0, 0, rng.uniform(0, 0.005)]))
        journal_full_at_kill = len(ok_positions(checkpoint)) == KILL_ROWS
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
        if process.returncode == -signal.SIGKILL:
            kills += 1
            end_kills += journal_full_at_kill
        else:
            assert process.returncode == 0, process.returncode

        # After every kill: no corrupt or half-written file anywhere.
        _header, _rows, tail = read_journal(checkpoint)  # every whole line parses
        torn_tails += bool(tail)
        check_journal_replies(checkpoint, texts)
        for name in names(tmp_path):
            if name not in expected_files:
                assert TEMP_NAME.match(name), f"unexpected file {name!r} after a kill"
                temps_seen.add(name)
        if output.exists():  # only ever a complete results file
            assert pq.read_table(output).num_rows == KILL_ROWS

    assert kills >= 10 and end_kills >= 3, (kills, end_kills)

    result = cli("run", str(job), "-q")
    assert result.returncode == 0, result.stderr
    table = pq.read_table(output).to_pydict()
    assert table["id"] == [f"row{i:04d}" for i in range(KILL_ROWS)]
    assert table["status"] == ["ok"] * KILL_ROWS
    assert table["reply"] == [reply_for(text) for text in texts]
    header, rows, tail = read_journal(checkpoint)
    assert header is not None and tail == b""
    assert {row["i"] for row in rows} == set(range(KILL_ROWS))

    # Only requests in flight at a kill may have been sent again.
    prompts = server.stats.snapshot()["prompts"]
    assert set(prompts) == set(texts)
    resent = sum(count - 1 for count in prompts.values())
    assert resent <= kills * KILL_CONCURRENCY, (resent, kills)
    # A leftover temp from a kill mid-write must at least be an obvious, hidden temp
    # (test_a_temp_left_by_a_killed_results_write_is_cleaned_up asks for more).
    leftovers = [name for name in names(tmp_path) if name not in expected_files]
    assert all(TEMP_NAME.match(name) for name in leftovers), leftovers
    print(f"kills={kills} end_kills={end_kills} resent={resent} torn_tails={torn_tails} "
          f"temps_seen={len(temps_seen)} leftover_temps={len(leftovers)}")


def test_a_temp_left_by_a_killed_results_write_is_cleaned_up(tmp_path: Path,
                                                            mock_server: MockServer) -> None:
    source = prompts_csv(tmp_path, 5)
    job = write_job(tmp_path / "job.yaml",
                    job_dict(mock_server.base_url, source, tmp_path / "out.parquet"))
    # Exactly what a SIGKILL during write_results leaves (NamedTemporaryFile's name).
    stale = tmp_path / ".out.parquet.k1ll3d_x.tmp"
    stale.write_bytes(b"PAR1 half a parquet file")
    assert run_in_process(job).exit_code == 0
    assert not stale.exists()


@pytest.mark.parametrize("signum", [
    signal.SIGTERM,
    signal.SIGINT,
])
def test_a_signal_during_the_results_write_keeps_everything(tmp_path: Path,
                                                            signum: signal.Signals) -> None:
    job = make_journaled_job(tmp_path, 40_000)
    output = tmp_path / "out.parquet"
    output.write_bytes(b"OLD RESULTS")
    process = start_run(job)
    wait_until(lambda: any(name.endswith(".tmp") for name in names(tmp_path)), process,
               what="the results write", interval=0.0005)
    process.send_signal(signum)
    _out, err = process.communicate(timeout=60)
    if process.returncode == 0:
        pytest.skip("the write finished before the signal arrived")
    assert output.read_bytes() == b"OLD RESULTS"  # never half-written
    assert "Traceback" not in err and "Aborted" not in err, err
    assert process.returncode in (128 + signum, -signum), (process.returncode, err)
    result = cli("run", str(job), "-q")
    assert result.returncode == 0, result.stderr
    assert pq.read_table(output).num_rows == 40_000


# == SIGTERM / SIGINT: graceful stop ==========================================================


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_gracefully_and_journals_in_flight_replies(
        tmp_path: Path, make_mock: Any, signum: signal.Signals) -> None:
    rows, concurrency = 24, 4
    server: MockServer = make_mock(api_key=TEST_KEY, latency_s=0.4)
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
    assert elapsed < 10 + 8, elapsed  # the grace period is 10 s; in-flight replies take 0.4 s
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


def test_a_second_ctrl_c_cancels_hung_requests_at_once(tmp_path: Path, make_mock: Any) -> None:
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
                                                                 make_mock: Any) -> None:
    server: MockServer = make_mock(faults=[FaultRule("stall", rate=1.0)], stall_s=60)
    job = write_job(tmp_path / "job.yaml", job_dict(
        server.base_url, prompts_csv(tmp_path, 10), tmp_path / "out.csv",
        endpoint={"timeout_s": 60}, limits={"concurrency": 3}))
    control = RunControl()

    def stop_when_in_flight() -> None:
        deadline = time.monotonic() + 30
        while server.stats.in_flight < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        control.request_stop(signal.SIGTERM)

    stopper = threading.Thread(target=stop_when_in_flight)
    stopper.start()
    started = time.monotonic()
    with pytest.raises(Interrupted) as caught:
        run_in_process(job, control=control, grace_s=0.5)
    stopper.join()
    assert caught.value.exit_code == 143
    assert time.monotonic() - started < 15
    header, records, tail = read_journal(tmp_path / "out.ckpt")
    assert header is not None and records == [] and tail == b""


# == overlapping runs =========================================================================


def test_a_second_run_is_refused_while_one_runs_and_a_killed_run_leaves_no_stuck_lock(
        tmp_path: Path, make_mock: Any) -> None:
    rows, concurrency = 60, 2
    server: MockServer = make_mock(api_key=TEST_KEY, latency_s=0.3)
    checkpoint = tmp_path / "out.ckpt"
    job_data = job_dict(server.base_url, prompts_csv(tmp_path, rows), tmp_path / "out.csv",
                        limits={"concurrency": concurrency})
    job = write_job(tmp_path / "job.yaml", job_data)
    first = start_run(job)
    wait_until(lambda: len(read_journal(checkpoint)[1]) >= 1, first, what="a row journaled")

    second, fresh = cli_many(("run", str(job), "-q"), ("run", str(job), "-q", "--fresh"))
    assert first.poll() is None, "the first run must still be running for this test"
    for result in (second, fresh):
        assert result.returncode == 2, result.stderr
        line = one_error_line(result.stderr)
        assert "another batcher run of this job is in progress" in line
        assert "out.ckpt" in line
    # --fresh did not wipe the journal the running run is writing.
    assert len(read_journal(checkpoint)[1]) >= 1

    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    assert (tmp_path / "out.ckpt.lock").exists()  # left behind, but no longer held
    # Resume against a fast server (the endpoint may change between runs).
    fast: MockServer = make_mock(api_key=TEST_KEY)
    job_data["endpoint"]["base_url"] = fast.base_url
    write_job(job, job_data)
    result = cli("run", str(job), "-q")
    assert result.returncode == 0, result.stderr
    prompts = server.stats.snapshot()["prompts"]
    for prompt, count in fast.stats.snapshot()["prompts"].items():
        prompts[prompt] = prompts.get(prompt, 0) + count
    assert set(prompts) == {prompt_text(i) for i in range(rows)}
    assert sum(count - 1 for count in prompts.values()) <= concurrency  # one kill


# == a full disk, an unwritable folder ======================================================


def test_disk_full_while_journaling_stops_cleanly_and_resumes(tmp_path: Path,
                                                              make_mock: Any) -> None:
    rows, concurrency = 200, 4
    server: MockServer = make_mock(api_key=TEST_KEY, latency_s=0.005)
    checkpoint = tmp_path / "out.ckpt"
    output = tmp_path / "out.csv"
    output.write_text("previous results\n")
    job = write_job(tmp_path / "job.yaml", job_dict(
        server.base_url, prompts_csv(tmp_path, rows), output,
        limits={"concurrency": concurrency}))
    full = cli("run", str(job), "-q", preexec_fn=file_size_limit(20_000))
    assert full.returncode == 2, full.stderr
    line = one_error_line(full.stderr)
    assert str(checkpoint) in line and "checkpoint" in line
    assert output.read_text() == "previous results\n"
    assert not [name for name in names(tmp_path) if name.endswith(".tmp")]
    _header, records, _tail = read_journal(checkpoint)
    saved = {prompt_text(row["i"]) for row in records if row["status"] == "ok"}
    assert 0 < len(saved) < rows
    sent_before = server.stats.snapshot()["requests_total"]
    assert sent_before <= len(saved) + concurrency + 1  # it stopped at once

    resumed = cli("run", str(job), "-q")
    assert resumed.returncode == 0, resumed.stderr
    header, records, tail = read_journal(checkpoint)
    assert header is not None and tail == b""
    prompts = server.stats.snapshot()["prompts"]
    assert all(prompts[text] == 1 for text in saved)  # no journaled row sent again
    assert sum(prompts.values()) - rows <= concurrency + 1
    assert output.read_text().count("\n") > rows


def test_disk_full_while_writing_results_keeps_the_old_file_and_the_checkpoint(
        tmp_path: Path, make_mock: Any) -> None:
    rows = 120
    server: MockServer = make_mock(api_key=TEST_KEY)
    # Wide input rows: the results outgrow the size limit, the checkpoint does not.
    source = write_csv(tmp_path / "in.csv", ["id", "text", "notes"],
                       [[f"row{i:04d}", prompt_text(i), "n" * 800] for i in range(rows)])
    output = tmp_path / "out.csv"
    output.write_text("previous results\n")
    job = write_job(tmp_path / "job.yaml", job_dict(server.base_url, source, output))
    full = cli("run", str(job), "-q", preexec_fn=file_size_limit(60_000))
    assert full.returncode == 2, full.stderr
    line = one_error_line(full.stderr)
    assert str(output) in line and "cannot write results" in line
    assert output.read_text() == "previous results\n"
    assert not [name for name in names(tmp_path) if name.endswith(".tmp")]
    assert len(ok_positions(tmp_path / "out.ckpt")) == rows
    sent = server.stats.snapshot()["requests_total"]

    resumed = cli("run", str(job), "-q")
    assert resumed.returncode == 0, resumed.stderr
    assert server.stats.snapshot()["requests_total"] == sent  # nothing sent again
    assert output.read_text().count("\n") == rows + 1


def test_disk_full_before_the_first_row_sends_nothing_and_leaves_a_usable_checkpoint(
        tmp_path: Path, make_mock: Any) -> None:
    server: MockServer = make_mock(api_key=TEST_KEY)
    job = write_job(tmp_path / "job.yaml", job_dict(
        server.base_url, prompts_csv(tmp_path, 10), tmp_path / "out.csv"))
    full = cli("run", str(job), "-q", preexec_fn=file_size_limit(1))
    assert full.returncode == 2, full.stderr
    one_error_line(full.stderr)
    assert server.stats.snapshot()["requests_total"] == 0
    resumed = cli("run", str(job), "-q")
    assert resumed.returncode == 0, resumed.stderr


def test_an_unwritable_output_folder_is_refused_before_any_request(
        tmp_path: Path, mock_server: MockServer) -> None:
    source = prompts_csv(tmp_path, 5)
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a folder")
    cases: dict[str, tuple[dict[str, Any], str]] = {
        "under a file": ({"path": str(a_file / "out.csv")}, str(a_file)),
        "checkpoint in /proc": ({"path": str(tmp_path / "ok.csv"),
                                 "checkpoint": "/proc/batcher-test.ckpt"}, "/proc"),
        "results in /proc": ({"path": "/proc/batcher-test/out.csv"}, "/proc"),
    }
    if os.geteuid() != 0:  # as root, chmod does not stop writes
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        cases["read-only folder"] = ({"path": str(locked / "out.csv")}, str(locked))
    jobs = []
    for number, (output, _named) in enumerate(cases.values()):
        job = job_dict(mock_server.base_url, source, tmp_path / "x.csv")
        job["output"] = output
        jobs.append(write_job(tmp_path / f"job{number}.yaml", job))
    results = cli_many(*[("run", str(job), "-q") for job in jobs])
    for (case, (_output, named)), result in zip(cases.items(), results, strict=True):
        assert result.returncode == 2, (case, result.stderr)
        line = one_error_line(result.stderr)
        assert named in line and "Traceback" not in line, (case, line)
    assert mock_server.stats.snapshot()["requests_total"] == 0
    assert not (tmp_path / "ok.csv").exists()


# == server faults ============================================================================

STORM = [FaultRule("500", rate=0.03), FaultRule("502_html", rate=0.03),
         FaultRule("503", rate=0.03), FaultRule("503_bare", rate=0.02),
         FaultRule("drop", rate=0.02), FaultRule("stall", rate=0.02),
         FaultRule("malformed", rate=0.02), FaultRule("error_200", rate=0.02),
         FaultRule("empty_choices", rate=0.02)]


def test_a_fault_storm_still_ends_with_every_row_ok(tmp_path: Path, make_mock: Any) -> None:
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
                                                               make_mock: Any) -> None:
    server: MockServer = make_mock(api_key=TEST_KEY, faults=[FaultRule("stall", rate=1.0)],
                                   stall_s=60)
    job = write_job(tmp_path / "job.yaml", job_dict(
        server.base_url, prompts_csv(tmp_path, 40), tmp_path / "out.csv",
        endpoint={"timeout_s": 0.3}, limits={"concurrency": 4},
        retry={"max_attempts": 2, "stop_after_identical_failures": 5}))
    started = time.monotonic()
    result = cli("run", str(job), "-q", timeout=90)
    assert time.monotonic() - started < 45
    assert result.returncode == 3, result.stderr
    line = one_error_line(result.stderr)
    assert "timed out" in line and "stop_after_identical_failures" in line
    assert server.stats.snapshot()["requests_total"] <= (5 + 4) * 2


def test_a_server_that_always_stalls_never_hangs_the_run(tmp_path: Path,
                                                         make_mock: Any) -> None:
    server: MockServer = make_mock(faults=[FaultRule("stall", rate=1.0)], stall_s=60)
    job = write_job(tmp_path / "job.yaml", job_dict(
        server.base_url, prompts_csv(tmp_path, 6), tmp_path / "out.jsonl",
        endpoint={"timeout_s": 0.3}, limits={"concurrency": 3},
        retry={"max_attempts": 2, "stop_after_identical_failures": 1000}))
    started = time.monotonic()
    report = run_in_process(job)
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
            endpoint={"timeout_s": 0.5}, limits={"concurrency": 2},
            retry={"max_attempts": 2}))
        started = time.monotonic()
        report = run_in_process(job)
        assert time.monotonic() - started < 30
    assert report.exit_code == 1 and report.failed_rows == 2
    results = [orjson.loads(line) for line in (tmp_path / "out.jsonl").read_bytes().splitlines()]
    assert all(row["attempts"] == 2 and "timed out" in row["error"] for row in results), results


# == a repeating terminal error ===============================================================


def test_a_repeating_terminal_error_stops_the_run_with_exit_3(tmp_path: Path,
                                                              make_mock: Any) -> None:
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
def test_the_breaker_default_stops_within_twenty_rows(tmp_path: Path, make_mock: Any,
                                                      fault: str, attempts: int,
                                                      signature: str) -> None:
    server: MockServer = make_mock(faults=[FaultRule(fault, rate=1.0)])
    job = write_job(tmp_path / "job.yaml", job_dict(
        server.base_url, prompts_csv(tmp_path, 80), tmp_path / "out.csv",
        limits={"concurrency": 4}, retry={"max_attempts": 2}))
    with pytest.raises(RunAborted) as caught:
        run_in_process(job)
    assert signature in str(caught.value) and "\n" not in str(caught.value)
    assert server.stats.snapshot()["requests_total"] <= (20 + 4) * attempts


# == bad input ================================================================================

PREVIOUS = "previous results, must survive\n"


def _deep_rows(count: int) -> bytes:
    return b"id,text\n" + b"".join(b"row%05d,Prompt %d\n" % (i, i) for i in range(count))


def _input(content: bytes, name: str = "in.csv") -> Callable[[Path, dict[str, Any]], None]:
    def apply(folder: Path, job: dict[str, Any]) -> None:
        (folder / name).write_bytes(content)
        job["input"]["path"] = str(folder / name)
    return apply


def _set(dotted: str, value: Any) -> Callable[[Path, dict[str, Any]], None]:
    def apply(_folder: Path, job: dict[str, Any]) -> None:
        *sections, leaf = dotted.split(".")
        node = job
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return apply


def _folder_as_input(folder: Path, job: dict[str, Any]) -> None:
    (folder / "folder.csv").mkdir()
    job["input"]["path"] = str(folder / "folder.csv")


def _output_is_input_via(kind: str) -> Callable[[Path, dict[str, Any]], None]:
    def apply(folder: Path, job: dict[str, Any]) -> None:
        (folder / "sub").mkdir()
        if kind == "dotdot":
            job["output"]["path"] = str(folder / "sub" / ".." / "prompts.csv")
        elif kind == "symlink":
            (folder / "link.csv").symlink_to(folder / "prompts.csv")
            job["output"]["path"] = str(folder / "link.csv")
        else:
            job["output"]["checkpoint"] = str(folder / "sub" / ".." / "prompts.csv")
    return apply


BAD_INPUTS: dict[str, tuple[Callable[[Path, dict[str, Any]], None], str]] = {
    "non-utf8 far down": (_input(_deep_rows(4000) + b"bad,caf\xe9\n"), "not valid UTF-8"),
    "non-utf8 in the header": (_input(b"id,t\xe9xt\na,b\n"), "not valid UTF-8"),
    "ragged far down": (_input(_deep_rows(4000) + b"bad,one,two\n"),
                        "line 4002: expected 2 fields, found 3"),
    "short row": (_input(b"id,text\na,one\nb\n"), "expected 2 fields, found 1"),
    "duplicate id across batches": (_input(_deep_rows(9000) + b"row00001,again\n"),
                                    "row 9001: duplicate id 'row00001' (first at row 2)"),
    "duplicate id as number and text": (
        _input(b'{"id": 1, "text": "a"}\n{"id": "1", "text": "b"}\n', "in.jsonl"),
        "inconsistent values"),
    "id missing from a jsonl row": (
        _input(b'{"id": "a", "text": "x"}\n{"text": "y"}\n', "in.jsonl"),
        "row 2: id column 'id' is empty"),
    "duplicate header column": (_input(b"id,text,text\na,b,c\n"),
                                "column 'text' appears twice"),
    "blank header": (_input(b"\n\n"), "in.csv"),
    "input is a folder": (_folder_as_input, "is a folder"),
    "unknown input suffix": (_set("input.path", "prompts.txt"), "input.path"),
    "parquet that is not": (_input(b"id,text\na,b\n", "in.parquet"),
                            "not a readable Parquet file"),
    "template half absent": (_set("prompt", {"template": "{text} and {missing}"}),
                             "prompt.template names column 'missing'"),
    "unknown nested key": (_set("endpoint.timeout", 5), "endpoint.timeout: unknown key"),
    "string for a number": (_set("retry.max_attempts", "3"),
                            "retry.max_attempts: must be a whole number"),
    "fraction for a count": (_set("limits.concurrency", 2.5),
                             "limits.concurrency: must be a whole number"),
    "bool for a number": (_set("endpoint.timeout_s", True), "endpoint.timeout_s"),
    "list for params": (_set("params", [1, 2]), "params: must be a mapping"),
    "negative concurrency": (_set("limits.concurrency", -1),
                             "limits.concurrency: must be a positive number"),
    "zero concurrency": (_set("limits.concurrency", 0), "limits.concurrency"),
    "zero attempts": (_set("retry.max_attempts", 0), "retry.max_attempts"),
    "negative timeout": (_set("endpoint.timeout_s", -5), "endpoint.timeout_s"),
    "negative tpm": (_set("limits.tokens_per_minute", -100), "limits.tokens_per_minute"),
    "negative delay": (_set("retry.base_delay_s", -1), "retry.base_delay_s"),
    "zero breaker": (_set("retry.stop_after_identical_failures", 0),
                     "retry.stop_after_identical_failures"),
    "output is input via ..": (_output_is_input_via("dotdot"),
                               "output.path: must not be the input file"),
    "output is input via a symlink": (_output_is_input_via("symlink"),
                                      "output.path: must not be the input file"),
    "checkpoint is input": (_output_is_input_via("checkpoint"), "output.checkpoint"),
    "reserved param": (_set("params.messages", []), "params.messages"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_before_sending_and_touches_nothing(
        tmp_path: Path, mock_server: MockServer, case: str) -> None:
    mutate, expected = BAD_INPUTS[case]
    source = prompts_csv(tmp_path, 5)
    source_bytes = source.read_bytes()
    output = tmp_path / "out.csv"
    output.write_text(PREVIOUS)
    job = job_dict(mock_server.base_url, source, output)
    mutate(tmp_path, job)
    job_path = write_job(tmp_path / "job.yaml", job)
    try:
        run_in_process(job_path)
    except BatcherError as error:
        message = str(error)
        assert error.exit_code == 2, (type(error), message)
    else:
        raise AssertionError(f"{case}: accepted")
    assert "\n" not in message, message
    assert expected in message, message
    assert message.startswith((str(job_path), str(tmp_path))), message  # names the file
    assert mock_server.stats.snapshot()["requests_total"] == 0
    assert output.read_text() == PREVIOUS
    assert source.read_bytes() == source_bytes
    assert not (tmp_path / "out.ckpt").exists()


def test_bad_input_through_the_command_line(tmp_path: Path, mock_server: MockServer) -> None:
    """A few of the above as a user meets them: one stderr line, exit 2."""
    cases = ["ragged far down", "duplicate id across batches", "negative concurrency",
             "output is input via a symlink"]
    jobs = []
    for case in cases:
        folder = tmp_path / re.sub(r"\W+", "-", case)
        folder.mkdir()
        source = prompts_csv(folder, 5)
        (folder / "out.csv").write_text(PREVIOUS)
        job = job_dict(mock_server.base_url, source, folder / "out.csv")
        BAD_INPUTS[case][0](folder, job)
        jobs.append(write_job(folder / "job.yaml", job))
    results = cli_many(*[("run", str(job)) for job in jobs])
    for case, job, result in zip(cases, jobs, results, strict=True):
        assert result.returncode == 2, (case, result.stderr)
        assert BAD_INPUTS[case][1] in one_error_line(result.stderr), case
        assert (job.parent / "out.csv").read_text() == PREVIOUS
    assert mock_server.stats.snapshot()["requests_total"] == 0


@pytest.mark.parametrize(("name", "content"), [
    ("in.csv", b"id,text\n"),
    ("in.jsonl", b"\n\n"),
])
def test_a_header_only_input_is_bad_input(tmp_path: Path, mock_server: MockServer, name: str,
                                          content: bytes) -> None:
    """Issue 4 (newer than the contract's "valid empty job") lists a header-only
    file among the bad inputs: exit 2, one line, nothing written."""
    source = tmp_path / name
    source.write_bytes(content)
    output = tmp_path / "out.csv"
    output.write_text("previous results\n")
    job = write_job(tmp_path / "job.yaml", job_dict(mock_server.base_url, source, output))
    result = cli("run", str(job), "-q")
    assert result.returncode == 2, result.stderr
    assert "no rows" in one_error_line(result.stderr)
    assert mock_server.stats.snapshot()["requests_total"] == 0
    assert output.read_text() == "previous results\n"


def test_an_empty_csv_id_is_refused(tmp_path: Path, mock_server: MockServer) -> None:
    source = tmp_path / "in.csv"
    source.write_text("id,text\na,one\n,two\nc,three\n")
    job = write_job(tmp_path / "job.yaml",
                    job_dict(mock_server.base_url, source, tmp_path / "out.csv"))
    result = cli("run", str(job), "-q")
    assert result.returncode == 2, result.stderr
    assert "row 2" in one_error_line(result.stderr)
    assert mock_server.stats.snapshot()["requests_total"] == 0


def test_a_ragged_non_utf8_row_gives_one_clean_line(tmp_path: Path,
                                                    mock_server: MockServer) -> None:
    source = tmp_path / "in.csv"
    source.write_bytes(_deep_rows(3000) + b"bad,t\xffo,three\n")
    job = write_job(tmp_path / "job.yaml",
                    job_dict(mock_server.base_url, source, tmp_path / "out.csv"))
    result = cli("run", str(job), "-q")
    assert result.returncode == 2
    one_error_line(result.stderr)


# == secrets ==================================================================================

SECRET = "Zq7Yt9wLmNpQ4242SECRETkey"  # not sk-shaped: only real redaction can hide it
SPECIAL_SECRET = "Zq7+Yt/9w=SECRET key&42"


def secret_forms(secret: str) -> set[str]:
    return {secret, quote(secret, safe=""), quote_plus(secret), secret[: len(secret) // 2 + 4]}


def assert_nowhere(secret: str, folder: Path, *texts: str) -> None:
    """The secret (or its URL-encoded forms) appears in no text and no file."""
    forms = secret_forms(secret)
    for text in texts:
        for form in forms:
            assert form not in text, f"{form!r} leaked in output: {text[:500]}"
    for path in folder.rglob("*"):
        if path.is_file():
            content = path.read_bytes().decode("utf-8", "replace")
            for form in forms:
                assert form not in content, f"{form!r} leaked into {path.name}"


@pytest.mark.parametrize("auth", [None, {"header": "api-key"}, {"query": "api_key"}])
def test_an_echoed_key_never_leaks(tmp_path: Path, make_mock: Any,
                                   auth: dict[str, str] | None) -> None:
    server: MockServer = make_mock(api_key=SECRET, echo_key_in_errors=True)
    endpoint: dict[str, Any] = {"auth": auth} if auth else {}
    source = write_csv(tmp_path / "in.csv", ["id", "text"], [
        ["a", "fine"], ["b", "[[fault:400]] echo"], ["c", "[[fault:422]] echo"],
        ["d", "[[fault:500*1]] echo once"], ["e", "[[fault:detail_500*1]] once"],
        ["f", "[[fault:context]] echo"], ["g", "[[fault:404]] echo"]])
    job = write_job(tmp_path / "job.yaml", job_dict(server.base_url, source,
                                                    tmp_path / "faults.csv", endpoint=endpoint))
    faults = cli("run", str(job), env=cli_env(key=SECRET))  # with progress output
    assert faults.returncode == 1, faults.stderr
    assert "***" in (tmp_path / "faults.csv").read_text()  # echoed, and masked

    # A 401 that echoes the key, and a key the server does not know (its 401 echoes
    # the key that was sent): both stop the run, and neither message shows the key.
    other: MockServer = make_mock(api_key="some-other-key-entirely", echo_key_in_errors=True)
    aborts = {
        "401 echo": job_dict(server.base_url, write_csv(
            tmp_path / "in401.csv", ["id", "text"], [["a", "[[fault:401]] echo"], ["b", "x"]]),
            tmp_path / "r401.csv", endpoint=endpoint, limits={"concurrency": 1}),
        "wrong key": job_dict(other.base_url, source, tmp_path / "wrong.csv",
                              endpoint=endpoint),
    }
    messages = []
    for name, job_data in aborts.items():
        path = write_job(tmp_path / f"{name.replace(' ', '-')}.yaml", job_data)
        with pytest.raises(RunAborted) as caught:
            run_in_process(path, environ={"BATCHER_TEST_KEY": SECRET})
        messages.append(str(caught.value))
        assert "***" in messages[-1] and "\n" not in messages[-1], messages[-1]
    assert_nowhere(SECRET, tmp_path, faults.stdout, faults.stderr, *messages)


def test_a_key_in_the_query_string_with_url_special_characters_never_leaks(
        tmp_path: Path, make_mock: Any) -> None:
    server: MockServer = make_mock(api_key=SPECIAL_SECRET, echo_key_in_errors=True)
    source = write_csv(tmp_path / "in.csv", ["id", "text"],
                       [["a", "fine"], ["b", "[[fault:400]] echo"]])
    endpoint = {"auth": {"query": "api_key"}, "timeout_s": 1}
    good = write_job(tmp_path / "good.yaml", job_dict(server.base_url, source,
                                                      tmp_path / "good.csv", endpoint=endpoint))
    dead = write_job(tmp_path / "dead.yaml", job_dict(
        "http://127.0.0.1:9/v1", source, tmp_path / "dead.csv", endpoint=endpoint,
        retry={"max_attempts": 1}))
    env = cli_env(key=SPECIAL_SECRET)
    first, second = cli_many(("run", str(good)), ("run", str(dead)), env=env)
    assert first.returncode == 1, first.stderr  # the key worked: one ok row, one 400
    assert "ok" in (tmp_path / "good.csv").read_text()
    assert second.returncode == 1, second.stderr
    assert_nowhere(SPECIAL_SECRET, tmp_path, first.stdout, first.stderr, second.stdout,
                   second.stderr)


def test_a_proxy_url_carrying_the_key_never_leaks(tmp_path: Path, make_mock: Any) -> None:
    server: MockServer = make_mock(api_key=SECRET)
    proxy = f"http://user:{SECRET}@127.0.0.1:9"  # nothing listens there: every request fails
    job = write_job(tmp_path / "job.yaml", job_dict(
        server.base_url, prompts_csv(tmp_path, 3), tmp_path / "out.csv",
        retry={"max_attempts": 2}))
    env = cli_env({"HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "ALL_PROXY": proxy}, key=SECRET)
    result = cli("run", str(job), env=env)
    assert result.returncode in (1, 3), result.stderr
    assert "Traceback" not in result.stderr
    assert_nowhere(SECRET, tmp_path, result.stdout, result.stderr)


def test_a_malformed_proxy_url_is_a_clean_error(tmp_path: Path, make_mock: Any) -> None:
    server: MockServer = make_mock(api_key=SPECIAL_SECRET)
    proxy = f"http://user:{SPECIAL_SECRET}@127.0.0.1:9"
    job = write_job(tmp_path / "job.yaml", job_dict(
        server.base_url, prompts_csv(tmp_path, 3), tmp_path / "out.csv"))
    env = cli_env({"HTTP_PROXY": proxy}, key=SPECIAL_SECRET)
    result = cli("run", str(job), env=env)
    assert "Traceback" not in result.stderr
    assert result.returncode == 2, result.stderr
    one_error_line(result.stderr)
    assert_nowhere(SPECIAL_SECRET, tmp_path, result.stdout, result.stderr)


LITERAL_KEYS: dict[str, tuple[str, Any]] = {
    "endpoint.api_key": ("endpoint.api_key", "sk-proj-" + "A1b2C3d4" * 4),
    "params.api_key": ("params.api_key", SECRET),
    "authorization header": ("endpoint.headers.Authorization", f"Bearer {SECRET}"),
    "api-key header": ("endpoint.headers.api-key", SECRET),
    "key in api_key_env": ("endpoint.api_key_env", "sk-" + "Zx9" * 8),
    "key in the system prompt": ("prompt.system", "use sk-live-" + "Q7w8E9r0" * 3),
}


@pytest.mark.parametrize("case", list(LITERAL_KEYS))
def test_a_literal_key_in_the_job_is_refused_without_printing_it(
        tmp_path: Path, mock_server: MockServer, case: str) -> None:
    dotted, value = LITERAL_KEYS[case]
    job = job_dict(mock_server.base_url, prompts_csv(tmp_path, 2), tmp_path / "out.csv")
    *sections, leaf = dotted.split(".")
    node = job
    for section in sections:
        node = node.setdefault(section, {})
    node[leaf] = value
    job_path = write_job(tmp_path / "job.yaml", job)
    with pytest.raises(BatcherError) as caught:
        load_job(job_path)
    message = str(caught.value)
    assert caught.value.exit_code == 2
    assert dotted in message and "environment variable" in message, message
    secret = value.split()[-1]
    assert secret not in message and secret[:12] not in message, message
    assert mock_server.stats.snapshot()["requests_total"] == 0


def test_a_literal_key_is_refused_on_the_command_line_too(tmp_path: Path) -> None:
    job = job_dict("https://api.openai.com/v1", prompts_csv(tmp_path, 2), tmp_path / "out.csv")
    job["endpoint"]["api_key"] = "sk-proj-" + "A1b2C3d4" * 4
    result = cli("run", str(write_job(tmp_path / "job.yaml", job)), "--dry-run")
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert "endpoint.api_key" in line and "A1b2C3d4" not in line


def test_a_key_pasted_as_the_variable_name_is_not_printed(tmp_path: Path) -> None:
    pasted = "d41d8cd98f00b204e9800998ecf8427e"
    job = job_dict("https://api.openai.com/v1", prompts_csv(tmp_path, 2), tmp_path / "out.csv",
                   endpoint={"api_key_env": pasted})
    with pytest.raises(BatcherError) as caught:
        dry_run(load_job(write_job(tmp_path / "job.yaml", job)), environ={})
    assert caught.value.exit_code == 2
    assert pasted not in str(caught.value)


@pytest.mark.parametrize("base_url", [
    f"https://bob:{SECRET}@api.example.com/v1",
    f"https://api.example.com/v1?api_key={SECRET}",
])
def test_a_literal_key_in_the_base_url_is_refused(tmp_path: Path, base_url: str) -> None:
    job = job_dict(base_url, prompts_csv(tmp_path, 2), tmp_path / "out.csv")
    with pytest.raises(BatcherError) as caught:
        load_job(write_job(tmp_path / "job.yaml", job))
    assert "environment variable" in str(caught.value)
    assert SECRET not in str(caught.value)


@pytest.fixture
def guard_proxy(make_mock: Any) -> MockServer:
    """A loopback 'proxy' for plain-http traffic: anything a run tries to send to
    another host lands here instead of leaving the machine."""
    return make_mock()


INSECURE_URLS = ["http://api.example.com/v1", "http://localhost.example.com/v1",
                 "http://127.0.0.1.nip.io/v1", "http://0.0.0.0:9/v1",
                 "http://bob:hunter2@api.example.com/v1"]


def test_the_key_never_goes_over_plain_http_to_another_host(
        tmp_path: Path, guard_proxy: MockServer, monkeypatch: pytest.MonkeyPatch) -> None:
    source = prompts_csv(tmp_path, 3)
    proxy = guard_proxy.root_url
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, proxy)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for i, url in enumerate(INSECURE_URLS):
        job = write_job(tmp_path / f"job{i}.yaml", job_dict(url, source, tmp_path / f"o{i}.csv"))
        with pytest.raises(BatcherError) as caught:
            run_in_process(job, environ={"BATCHER_TEST_KEY": SECRET})
        message = str(caught.value)
        assert caught.value.exit_code == 2, message
        if "@" in url:  # a password in the URL is refused as a literal secret first
            assert "looks like a literal API key" in message, message
        else:
            assert "plain http://" in message and "allow_insecure_http" in message, message
        assert "hunter2" not in message and "\n" not in message
    assert guard_proxy.stats.snapshot()["requests_total"] == 0  # refused before connecting
    assert_nowhere(SECRET, tmp_path)

    # The same through the command line (with the guard proxy in its environment too).
    env = cli_env({"HTTP_PROXY": proxy, "ALL_PROXY": proxy}, key=SECRET)
    result = cli("run", str(tmp_path / "job0.yaml"), "-q", env=env)
    assert result.returncode == 2
    assert "plain http://" in one_error_line(result.stderr)
    assert guard_proxy.stats.snapshot()["requests_total"] == 0
    assert_nowhere(SECRET, tmp_path, result.stdout, result.stderr)


def test_allow_insecure_http_and_loopback_lift_the_refusal(tmp_path: Path) -> None:
    """Checked with a dry run, which sends nothing anywhere."""
    source = prompts_csv(tmp_path, 3)
    urls = {"http://api.example.com/v1": {"allow_insecure_http": True},
            "http://127.0.0.2:9/v1": {}, "http://[::1]:9/v1": {}, "http://localhost:9/v1": {},
            "http://LOCALHOST:9/v1": {}, "https://api.example.com/v1": {}}
    for i, (url, extra) in enumerate(urls.items()):
        job = write_job(tmp_path / f"job{i}.yaml",
                        job_dict(url, source, tmp_path / f"out{i}.csv", endpoint=extra))
        estimate = dry_run(load_job(job), environ={"BATCHER_TEST_KEY": SECRET})
        assert estimate.rows == 3, url
    result = cli("run", str(tmp_path / "job0.yaml"), "--dry-run", env=cli_env(key=SECRET))
    assert result.returncode == 0 and "nothing sent" in result.stdout, result.stderr


class RedirectingServer:
    """A loopback endpoint that answers every chat request with a 307 to ``target``."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def _redirect(self, request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(self.target)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._redirect)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    def __enter__(self) -> RedirectingServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()




@pytest.mark.parametrize("auth", [
    None,
    {"query": "api_key"},
    {"header": "api-key"},
    {"header": "X-Api-Key"},
])
def test_a_redirect_to_another_origin_never_carries_the_key(
        tmp_path: Path, make_mock: Any, auth: dict[str, str] | None) -> None:
    elsewhere: MockServer = make_mock()  # "another host": a different origin
    with RedirectingServer(elsewhere.base_url + "/chat/completions") as endpoint:
        job = write_job(tmp_path / "job.yaml", job_dict(
            f"http://127.0.0.1:{endpoint.port}/v1", prompts_csv(tmp_path, 2),
            tmp_path / "out.csv", endpoint={"auth": auth} if auth else {},
            retry={"max_attempts": 1}))
        with contextlib.suppress(BatcherError):
            run_in_process(job, environ={"BATCHER_TEST_KEY": SECRET})
    stats = elsewhere.stats.snapshot()
    for headers in stats["headers_seen"]:
        assert not any(SECRET in value for value in headers.values()), headers
    assert not any(SECRET in path for path in stats["paths_seen"])


def test_an_unterminated_quote_is_refused_not_swallowed(tmp_path: Path,
                                                        mock_server: MockServer) -> None:
    source = tmp_path / "in.csv"
    source.write_bytes(b'id,text\na,"one\nb,two\nc,three\nd,four\n')
    job = write_job(tmp_path / "job.yaml",
                    job_dict(mock_server.base_url, source, tmp_path / "out.csv"))
    with pytest.raises(BatcherError) as caught:
        run_in_process(job)
    assert caught.value.exit_code == 2 and "in.csv" in str(caught.value)
    assert mock_server.stats.snapshot()["requests_total"] == 0
