"""Crash safety: SIGKILL a real ``batcher run`` at random moments (mid-send, at the
final results write), signal it during the write, kill a run that holds the lock.
One more run must then give exactly one correct row per input row, having sent
again only what was in flight.

The killed and signalled runs are real processes (that is the point); the runs
that resume after them go in-process.
"""

from __future__ import annotations

import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import (
    TEST_KEY,
    MakeMock,
    check_journal_replies,
    cli,
    job_dict,
    journal_lines,
    names,
    ok_positions,
    one_error_line,
    prompt_text,
    prompts_csv,
    read_journal,
    run_job,
    start_run,
    wait_until,
    write_csv,
    write_job,
)

from batcher.jobload import load_job
from batcher.mock_server import MockServer, reply_for
from batcher.online.runner import prepare
from batcher.records import RowResult
from batcher.store.checkpoint import Checkpoint

JOURNALED_ROWS = 40_000  # enough that a results write lasts long enough to be hit


@pytest.fixture(scope="module")
def journaled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An input and a checkpoint that holds every row as ok, built once (40,000 appends
    take seconds): a run of a job over a copy of them only writes results. The
    answers are keyed by request, not by the input's path, so copies resume."""
    folder = tmp_path_factory.mktemp("journaled")
    source = prompts_csv(folder, JOURNALED_ROWS)
    job = write_job(folder / "job.yaml", job_dict("http://127.0.0.1:9/v1", source,
                                                  folder / "out.parquet"))
    with Checkpoint(folder / "out.ckpt") as checkpoint:
        for plan in prepare(load_job(job)).plans(None):
            for row in plan.pending:
                checkpoint.append([(row.key, row.position)], RowResult(
                    reply=reply_for(prompt_text(row.position)), finish_reason="stop",
                    prompt_tokens=9, completion_tokens=9, total_tokens=18, status="ok",
                    error=None, attempts=1, latency_s=0.01))
    return folder


def copy_journaled_job(journaled: Path, folder: Path) -> Path:
    for name in ("prompts.csv", "out.ckpt"):
        shutil.copyfile(journaled / name, folder / name)
    return write_job(folder / "job.yaml", job_dict("http://127.0.0.1:9/v1",
                                                   folder / "prompts.csv", folder / "out.parquet"))


# == crash safety: SIGKILL at random moments =================================================

KILL_ROWS = 240
KILL_CONCURRENCY = 6
TEMP_NAME = re.compile(r"^\.out\.(parquet|summary\.json)\..+\.tmp$")


def test_random_sigkills_then_one_more_run_lose_nothing_and_resend_only_in_flight(
        tmp_path: Path, make_mock: MakeMock) -> None:
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
    expected_files = {"in.csv", "job.yaml", "out.parquet", "out.ckpt", "out.ckpt.lock",
                      "out.ckpt.written", "out.summary.json"}

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
            def journaled_more(before: int = lines) -> bool:
                return journal_lines(checkpoint) > max(before, 1)
            wait_until(journaled_more, process, what="a row journaled")
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
    assert run_job(job).exit_code == 0
    assert not stale.exists()


@pytest.mark.parametrize("signum", [
    signal.SIGTERM,
    signal.SIGINT,
])
def test_a_signal_during_the_results_write_keeps_everything(
        tmp_path: Path, journaled: Path, signum: signal.Signals) -> None:
    job = copy_journaled_job(journaled, tmp_path)
    output = tmp_path / "out.parquet"
    output.write_bytes(b"OLD RESULTS")
    process = start_run(job)
    wait_until(lambda: any(name.endswith(".tmp") for name in names(tmp_path)), process,
               what="the results write", interval=0.0005)
    process.send_signal(signum)
    _out, err = process.communicate(timeout=60)
    if process.returncode == 0:
        pytest.skip("the write finished before the signal arrived")
    assert "Traceback" not in err and "Aborted" not in err, err
    assert process.returncode in (128 + signum, -signum), (process.returncode, err)
    if process.returncode == 128 + signum:  # handled: the write was let finish
        assert "is complete" in one_error_line(err), err
        assert pq.read_table(output).num_rows == JOURNALED_ROWS
    else:  # killed by the signal itself: never a half-written file
        assert output.read_bytes() == b"OLD RESULTS"
    result = cli("run", str(job), "-q")
    assert result.returncode == 0, result.stderr
    assert pq.read_table(output).num_rows == JOURNALED_ROWS


# == overlapping runs =========================================================================


def test_a_second_run_is_refused_while_one_runs_and_a_killed_run_leaves_no_stuck_lock(
        tmp_path: Path, make_mock: MakeMock) -> None:
    rows, concurrency = 60, 2
    server: MockServer = make_mock(api_key=TEST_KEY, latency_s=0.3)
    checkpoint = tmp_path / "out.ckpt"
    job_data = job_dict(server.base_url, prompts_csv(tmp_path, rows), tmp_path / "out.csv",
                        limits={"concurrency": concurrency})
    job = write_job(tmp_path / "job.yaml", job_data)
    first = start_run(job)
    wait_until(lambda: len(read_journal(checkpoint)[1]) >= 1, first, what="a row journaled")

    second, fresh = cli("run", str(job), "-q"), cli("run", str(job), "-q", "--fresh")
    assert first.poll() is None, "the first run must still be running for this test"
    for result in (second, fresh):  # skipped, not failed: exit 75 (EX_TEMPFAIL), its own word
        assert result.returncode == 75, result.stderr
        line = one_error_line(result.stderr, label="skipped")
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


def test_sigkill_then_resume_loses_nothing_and_resends_only_in_flight(
        tmp_path: Path, make_mock: MakeMock) -> None:
    """Two SIGKILLs at known points, then one more run: nothing lost, nothing doubled."""
    rows, concurrency = 240, 4
    server: MockServer = make_mock(api_key=TEST_KEY, latency_s=0.01)
    source = prompts_csv(tmp_path, rows)
    output = tmp_path / "out.parquet"
    job = write_job(tmp_path / "job.yaml", job_dict(server.base_url, source, output,
                                                    limits={"concurrency": concurrency}))
    checkpoint = tmp_path / "out.ckpt"

    kills = 0
    for target in (40, 120):
        process = start_run(job)
        def reached(rows: int = target) -> bool:
            return journal_lines(checkpoint) - 1 >= rows  # the header is a line too
        wait_until(reached, process, what=f"{target} rows journaled", interval=0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        assert not output.exists()  # results are only written at the very end

    result = cli("run", str(job), "-q")
    assert result.returncode == 0, result.stderr

    frame = pd.read_parquet(output)
    assert len(frame) == rows and frame["id"].is_unique
    assert list(frame["id"]) == [f"row{i:04d}" for i in range(rows)]
    assert (frame["status"] == "ok").all()
    assert all(frame["reply"] == [reply_for(text) for text in frame["text"]])

    # Only requests in flight at a kill may have been sent twice.
    prompts = server.stats.snapshot()["prompts"]
    resent = sum(count - 1 for count in prompts.values() if count > 1)
    assert resent <= kills * concurrency, resent
    assert sum(prompts.values()) == rows + resent
