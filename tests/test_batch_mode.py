"""`mode: batch` end to end against the mock's Files and Batches API.

CLI runs are in-process (click's CliRunner); the kill tests SIGKILL a real
`batcher run` subprocess at the moment the mock says it is inside the step
under test, then run again and count batches at the mock: never two for
the same rows.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pandas as pd
import pytest
from conftest import (
    TEST_KEY,
    MakeMock,
    Ran,
    cli,
    job_dict,
    start_run,
    wait_until,
    write_csv,
    write_job,
)

from batcher.mock_server import MockServer, reply_for


def run(*args: str) -> Ran:
    return cli("run", *args)


def make_input(folder: Path, prompts: list[str]) -> Path:
    return write_csv(folder / "in.csv", ["id", "text"],
                     [[f"r{i:03d}", text] for i, text in enumerate(prompts)])


def batch_job(folder: Path, server: MockServer, prompts: list[str], **batch: Any) -> Path:
    source = make_input(folder, prompts)
    settings = {"poll_interval_s": 0.05, **batch}
    job = job_dict(server.base_url, source, folder / "out.csv", mode="batch", batch=settings)
    return write_job(folder / "job.yaml", job)


def counters(server: MockServer) -> dict[str, int]:
    counted: dict[str, int] = server.stats.snapshot()["counters"]
    return counted


def online_requests(server: MockServer) -> int:
    return sum(1 for path in server.stats.snapshot()["paths_seen"]
               if path.endswith("/chat/completions"))


def results(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "out.csv", keep_default_na=False, na_values=[""])


def assert_complete(folder: Path, prompts: list[str]) -> pd.DataFrame:
    frame = results(folder)
    assert list(frame["id"]) == [f"r{i:03d}" for i in range(len(prompts))]
    assert (frame["status"] == "ok").all(), frame[frame["status"] != "ok"]
    assert list(frame["reply"]) == [reply_for(text) for text in prompts]
    assert not (folder / "out.ckpt.batch").exists(), "the finished cycle leaves no state"
    return frame


PROMPTS = [f"Prompt number {i}" for i in range(12)]


def test_submit_exit_rerun_collect(tmp_path: Path, make_mock: MakeMock) -> None:
    server = make_mock(api_key=TEST_KEY, batch_phase_s=0.3)
    job = batch_job(tmp_path, server, PROMPTS, max_requests_per_file=5)

    first = run(str(job))
    assert first.returncode == 0, first.stderr
    assert "3 batches (12 requests) running at the service" in first.stdout
    assert "run the same command again" in first.stdout
    assert not (tmp_path / "out.csv").exists()
    assert counters(server)["batches_created"] == 3
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert any(path.name == "state.json" for path in written)
    assert not any(TEST_KEY.encode() in path.read_bytes() for path in written)

    time.sleep(1.2)  # three phases of 0.3 s
    second = run(str(job))
    assert second.returncode == 0, second.stderr
    assert "completed: 5 ok" in second.stderr
    frame = assert_complete(tmp_path, PROMPTS)
    assert frame["prompt_tokens"].notna().all() and frame["attempts"].eq(1).all()

    assert "$0.0000 at gpt-4o-mini's price" not in second.stderr  # tokens were counted

    third = run(str(job))
    assert third.returncode == 0, third.stderr
    assert counters(server)["batches_created"] == 3, "answered rows are never submitted again"
    assert online_requests(server) == 0
    assert not any(TEST_KEY.encode() in path.read_bytes()
                   for path in tmp_path.rglob("*") if path.is_file())


def test_a_limited_run_collects_batches_of_a_full_one(tmp_path: Path, make_mock: MakeMock
                                                      ) -> None:
    server = make_mock(api_key=TEST_KEY, batch_phase_s=0.2)
    job = batch_job(tmp_path, server, PROMPTS, max_requests_per_file=5)
    assert run(str(job)).returncode == 0
    time.sleep(0.8)
    limited = run(str(job), "--limit", "3")
    assert limited.returncode == 0, limited.stderr
    frame = results(tmp_path)
    assert list(frame["id"]) == ["r000", "r001", "r002"]
    assert (frame["status"] == "ok").all()
    assert counters(server)["batches_created"] == 3


def test_dry_run_says_files_requests_and_batch_price(
        tmp_path: Path, make_mock: MakeMock) -> None:
    server = make_mock(api_key=TEST_KEY)
    job = batch_job(tmp_path, server, PROMPTS, max_requests_per_file=5)
    result = run(str(job), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "12 requests in 3 batch files" in result.stdout
    assert "Batch API price)" in result.stdout
    assert server.stats.snapshot()["requests_total"] == 0


def test_completed_batch_with_failed_lines_is_reconciled(
        tmp_path: Path, make_mock: MakeMock) -> None:
    server = make_mock(api_key=TEST_KEY)
    prompts = ["fine one", "[[fault:400]] rejected", "[[batch:status0]] zero",
               "[[batch:missing]] lost", "[[batch:line_error]] broken", "fine two"]
    job = batch_job(tmp_path, server, prompts)
    result = run(str(job), "--wait")
    assert result.returncode == 1, result.stderr
    assert "completed: 2 ok, 2 http error, 1 line error, 1 missing" in result.stderr
    frame = results(tmp_path)
    assert list(frame["status"]) == ["ok", "error", "error", "error", "error", "ok"]
    errors = frame["error"].tolist()
    assert "HTTP 400" in errors[1]
    assert "status_code 0" in errors[2]
    assert "neither the output nor the error file" in errors[3]
    assert "server_error" in errors[4]
    assert frame["reply"][0] == reply_for("fine one")


def test_a_completed_batch_whose_lines_all_failed_is_not_a_success(
        tmp_path: Path, make_mock: MakeMock) -> None:
    server = make_mock(api_key=TEST_KEY)
    job = batch_job(tmp_path, server, [f"[[fault:400]] {i}" for i in range(4)])
    result = run(str(job), "--wait")
    assert result.returncode == 1
    assert "reported completed, but no request in it succeeded" in result.stderr
    assert (results(tmp_path)["status"] == "error").all()


def test_failed_validation_shows_the_errors_and_loses_nothing(
        tmp_path: Path, make_mock: MakeMock) -> None:
    server = make_mock(api_key=TEST_KEY)
    prompts = ["good", "[[batch:invalid]] bad", "also good"]
    job = batch_job(tmp_path, server, prompts)
    result = run(str(job), "--wait")
    assert result.returncode == 1
    assert "failed: 3 invalid" in result.stderr
    assert "validation error: line 2: invalid_request" in result.stderr
    frame = results(tmp_path)
    assert (frame["status"] == "error").all()
    assert "failed validation" in frame["error"][1]

    # The same rows go again next time; with the online fallback they are answered.
    fallback = job_dict(server.base_url, tmp_path / "in.csv", tmp_path / "out.csv",
                        mode="batch", batch={"poll_interval_s": 0.05, "fallback": "online"})
    write_job(job, fallback)
    again = run(str(job), "--wait")
    assert again.returncode == 0, again.stderr
    assert online_requests(server) == 3
    assert_complete(tmp_path, prompts)


def test_expired_lines_are_resubmitted_alone_without_fallback(
        tmp_path: Path, make_mock: MakeMock) -> None:
    server = make_mock(api_key=TEST_KEY)
    prompts = [*PROMPTS[:4], "[[batch:slow*1]] late one", "[[batch:slow*1]] late two"]
    job = batch_job(tmp_path, server, prompts)
    result = run(str(job), "--wait")
    assert result.returncode == 0, result.stderr
    assert "expired: 4 ok, 2 unfinished" in result.stderr
    assert "planned 1 batch file with 2 requests" in result.stderr
    assert counters(server)["batches_created"] == 2
    answered = server.stats.snapshot()["ok_prompts"]
    assert all(count == 1 for count in answered.values()), "a finished line was sent again"
    assert online_requests(server) == 0
    assert_complete(tmp_path, prompts)


def test_expired_lines_go_online_with_fallback(
        tmp_path: Path, make_mock: MakeMock) -> None:
    server = make_mock(api_key=TEST_KEY)
    prompts = [*PROMPTS[:4], "[[batch:slow]] never in a batch"]
    job = batch_job(tmp_path, server, prompts, fallback="online")
    result = run(str(job), "--wait")
    assert result.returncode == 0, result.stderr
    assert "sending 1 row online" in result.stderr
    assert counters(server)["batches_created"] == 1
    assert online_requests(server) == 1
    frame = assert_complete(tmp_path, prompts)
    assert frame["latency_s"].isna().sum() == 4, "batch rows have no latency, the online one has"


def test_a_batch_past_the_deadline_is_cancelled_and_the_rest_sent_online(
        tmp_path: Path, make_mock: MakeMock) -> None:
    server = make_mock(api_key=TEST_KEY, batch_phase_s=0.5)
    job = batch_job(tmp_path, server, PROMPTS[:6], fallback="online", deadline_h=0.00001)
    result = run(str(job), "--wait")
    assert result.returncode == 0, result.stderr
    assert "cancelling it: its finished requests are kept" in result.stderr
    assert "cancelled: 3 ok, 3 cancelled" in result.stderr
    assert counters(server)["batches_cancelled"] == 1
    assert online_requests(server) == 3
    answered = server.stats.snapshot()["ok_prompts"]
    assert sorted(answered.values()) == [1] * 6, "no row was paid for twice"
    assert_complete(tmp_path, PROMPTS[:6])


@pytest.mark.parametrize(("batch", "message"), [
    ({"deadline_h": 1}, "batch.deadline_h: rows of a batch not done by the deadline"),
    ({"max_requests_per_file": 0}, "batch.max_requests_per_file: must be a positive number"),
    ({"fallback": "maybe"}, "batch.fallback: input should be 'online' or 'none'"),
])
def test_bad_batch_settings_are_exit_2(tmp_path: Path, make_mock: MakeMock,
                                       batch: dict[str, Any], message: str) -> None:
    server = make_mock(api_key=TEST_KEY)
    job = batch_job(tmp_path, server, PROMPTS, **batch)
    result = run(str(job))
    assert result.returncode == 2
    assert message in result.stderr
    assert server.stats.snapshot()["requests_total"] == 0


def test_a_file_refused_as_too_large_stops_with_the_setting_to_change(
        tmp_path: Path, make_mock: MakeMock) -> None:
    server = make_mock(api_key=TEST_KEY, batch_file_max_bytes=500)
    job = batch_job(tmp_path, server, PROMPTS)
    result = run(str(job))
    assert result.returncode == 3
    assert "HTTP 413" in result.stderr and "batch.max_bytes_per_file" in result.stderr
    assert counters(server).get("batches_created", 0) == 0


# -- kills ------------------------------------------------------------------------------------


def kill_when(process: subprocess.Popen[str], ready: Callable[[], bool], step: str) -> None:
    wait_until(ready, process, what=step)
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.mark.parametrize("step", ["upload", "create"])
def test_a_kill_during_submission_never_creates_a_second_batch(
        tmp_path: Path, make_mock: MakeMock, step: str) -> None:
    server = make_mock(api_key=TEST_KEY, **{f"{step}_latency_s": 30.0})
    job = batch_job(tmp_path, server, PROMPTS)
    process = start_run(job)
    counter = "files_uploaded" if step == "upload" else "batches_created"
    kill_when(process, lambda: counters(server).get(counter, 0) >= 1, step)
    setattr(server.config, f"{step}_latency_s", 0.0)

    result = run(str(job), "--wait")
    assert result.returncode == 0, result.stderr
    assert counters(server)["batches_created"] == 1
    if step == "create":
        assert "already created" in result.stderr
    assert_complete(tmp_path, PROMPTS)


def test_a_kill_during_download_resumes_without_a_new_batch(
        tmp_path: Path, make_mock: MakeMock) -> None:
    server = make_mock(api_key=TEST_KEY, download_latency_s=30.0)
    job = batch_job(tmp_path, server, PROMPTS)
    process = start_run(job, "--wait")
    kill_when(process, lambda: counters(server).get("file_downloads", 0) >= 1, "download")
    server.config.download_latency_s = 0.0

    result = run(str(job))
    assert result.returncode == 0, result.stderr
    assert counters(server)["batches_created"] == 1
    assert counters(server)["file_downloads"] == 2
    assert_complete(tmp_path, PROMPTS)


# -- flex ---------------------------------------------------------------------------------------


def test_flex_resource_unavailable_429_is_retried_not_taken_for_quota(
        tmp_path: Path, make_mock: MakeMock) -> None:
    server = make_mock(api_key=TEST_KEY)
    prompts = [f"[[fault:flex_429*2]] flex {i}" for i in range(3)]
    source = make_input(tmp_path, prompts)
    job = write_job(tmp_path / "job.yaml", job_dict(
        server.base_url, source, tmp_path / "out.csv",
        params={"service_tier": "flex", "max_tokens": 64}))
    result = run(str(job), "-q")
    assert result.returncode == 0, result.stderr
    frame = results(tmp_path)
    assert (frame["status"] == "ok").all()
    assert frame["attempts"].eq(3).all()
    assert server.stats.snapshot()["by_status"][429] == 6
    headers = server.stats.snapshot()["headers_seen"]
    assert headers, "the requests were seen"


def test_ctrl_c_while_waiting_keeps_the_batches_for_the_next_run(
        tmp_path: Path, make_mock: MakeMock) -> None:
    server = make_mock(api_key=TEST_KEY, batch_phase_s=60)
    job = batch_job(tmp_path, server, PROMPTS)
    process = start_run(job, "--wait")
    state = tmp_path / "out.ckpt.batch" / "state.json"
    wait_until(lambda: state.exists() and b'"batch_id": "batch_' in state.read_bytes(),
               process, what="the batch id recorded")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    assert "submitted batches keep running at the service" in stderr
    server.config.batch_phase_s = 0.0

    result = run(str(job))
    assert result.returncode == 0, result.stderr
    assert counters(server)["batches_created"] == 1
    assert_complete(tmp_path, PROMPTS)


def test_rows_appended_while_batches_run_go_in_a_new_batch_not_online(
        tmp_path: Path, make_mock: MakeMock) -> None:
    server = make_mock(api_key=TEST_KEY, batch_phase_s=0.2)
    job = batch_job(tmp_path, server, PROMPTS[:6], fallback="online")
    assert run(str(job)).returncode == 0
    make_input(tmp_path, PROMPTS[:8])  # the nightly export grew meanwhile
    time.sleep(0.8)

    collect = run(str(job), "--wait")
    assert collect.returncode == 0, collect.stderr
    assert "planned 1 batch file with 2 requests" in collect.stderr
    assert counters(server)["batches_created"] == 2
    assert online_requests(server) == 0, "new rows are not sent at the online price"
    assert_complete(tmp_path, PROMPTS[:8])


def test_a_batch_cancelled_at_the_service_keeps_its_finished_lines(
        tmp_path: Path, make_mock: MakeMock) -> None:
    server = make_mock(api_key=TEST_KEY, batch_phase_s=0.3)
    job = batch_job(tmp_path, server, PROMPTS[:6])
    assert run(str(job)).returncode == 0
    state = (tmp_path / "out.ckpt.batch" / "state.json").read_bytes()
    batch_id = json.loads(state)["shards"][0]["batch_id"]
    openai.OpenAI(base_url=server.base_url, api_key=TEST_KEY).batches.cancel(batch_id)
    time.sleep(0.5)

    result = run(str(job), "--wait")
    assert result.returncode == 1, result.stderr
    assert "cancelled: 3 ok, 3 cancelled" in result.stderr
    frame = results(tmp_path)
    assert list(frame["status"]) == ["ok"] * 3 + ["error"] * 3
    assert frame["error"].str.contains("cancelled before this request ran").sum() == 3
    assert counters(server)["batches_created"] == 1

    again = run(str(job), "--wait")  # error rows are sent again by the next run
    assert again.returncode == 0, again.stderr
    assert "planned 1 batch file with 3 requests" in again.stderr
    assert counters(server)["batches_created"] == 2
    assert sorted(server.stats.snapshot()["ok_prompts"].values()) == [1] * 6
    assert_complete(tmp_path, PROMPTS[:6])
