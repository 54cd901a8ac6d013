"""End to end over real HTTP on loopback against the mock server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import (
    TEST_KEY,
    MakeMock,
    cell,
    cli,
    cli_env,
    job_dict,
    prompts_csv,
    read_frame,
    run_job,
    write_csv,
    write_job,
)

from batcher.errors import RunAborted
from batcher.mock_server import MockServer, reply_for
from batcher.online.runner import Runtime
from batcher.records import RESULT_COLUMNS


def write_input(folder: Path, fmt: str, count: int) -> Path:
    rows = [{"id": f"row{i:04d}", "text": f"Prompt number {i}: say something.", "n": i}
            for i in range(count)]
    frame = pd.DataFrame(rows)
    path = folder / f"input.{fmt}"
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "parquet":
        frame.to_parquet(path)
    else:
        frame.to_json(path, orient="records", lines=True)
    return path


@pytest.mark.parametrize("in_fmt", ["csv", "parquet", "jsonl"])
@pytest.mark.parametrize("out_fmt", ["csv", "parquet", "jsonl"])
def test_every_input_and_output_format(tmp_path: Path, mock_server: MockServer, in_fmt: str,
                                       out_fmt: str) -> None:
    source = write_input(tmp_path, in_fmt, 25)
    output = tmp_path / f"results.{out_fmt}"
    report = run_job(job_dict(mock_server.base_url, source, output), tmp_path)
    assert report.exit_code == 0 and report.rows == 25
    frame = read_frame(output)
    assert list(frame.columns) == ["id", "text", "n", *RESULT_COLUMNS]
    assert list(frame["id"]) == [f"row{i:04d}" for i in range(25)]  # input order
    assert all(frame["reply"] == [reply_for(text) for text in frame["text"]])
    assert set(frame["status"]) == {"ok"}
    assert frame["error"].isna().all()
    assert (frame["prompt_tokens"] > 0).all() and (frame["total_tokens"] > 0).all()
    assert (frame["attempts"] == 1).all()
    assert (frame["latency_s"] >= 0).all()


def test_template_and_system_prompt(tmp_path: Path, make_mock: MakeMock) -> None:
    server = make_mock()
    source = write_csv(tmp_path / "in.csv", ["id", "product", "body"],
                       [["a", "Kettle", "Boils fast."], ["b", "Lamp", "Too dim {sic}."]])
    job = job_dict(server.base_url, source, tmp_path / "out.jsonl",
                   prompt={"column": None, "template": "Review of {product}:\n{body}",
                           "system": "Be brief."},
                   endpoint={"api_key_env": None})
    job["prompt"] = {k: v for k, v in job["prompt"].items() if v is not None}
    job["endpoint"] = {k: v for k, v in job["endpoint"].items() if v is not None}
    run_job(job, tmp_path)
    frame = read_frame(tmp_path / "out.jsonl")
    assert list(frame["reply"]) == [reply_for("Review of Kettle:\nBoils fast."),
                                    reply_for("Review of Lamp:\nToo dim {sic}.")]


def test_transient_faults_are_retried_and_retry_after_is_honoured(tmp_path: Path,
                                                                  make_mock: MakeMock) -> None:
    server = make_mock(api_key=TEST_KEY, fault_retry_after_s=0.2)
    source = write_csv(tmp_path / "in.csv", ["id", "text"], [
        ["a", "plain"], ["b", "[[fault:429*2]] rate limited twice"],
        ["c", "[[fault:503*1]] overloaded once"], ["d", "[[fault:500*2]] broken twice"],
        ["e", "[[fault:malformed*1]] bad body once"], ["f", "[[fault:drop*1]] dropped once"]])
    slept: list[float] = []

    async def recording_sleep(seconds: float) -> None:
        slept.append(seconds)
        await asyncio.sleep(0)

    report = run_job(job_dict(server.base_url, source, tmp_path / "out.parquet",
                              limits={"concurrency": 1}),
                     tmp_path, runtime=Runtime(sleep=recording_sleep))
    assert report.exit_code == 0
    frame = read_frame(tmp_path / "out.parquet").set_index("id")
    assert list(frame["attempts"]) == [1, 3, 2, 3, 2, 2]
    assert set(frame["status"]) == {"ok"}
    # The 429s and the 503 carried retry-after 0.2 s: each of those waits honoured it.
    assert sum(1 for s in slept if s >= 0.2) >= 3
    assert server.stats.snapshot()["requests_total"] == 13


def test_permanent_400_is_a_row_error_and_the_run_goes_on(tmp_path: Path,
                                                          mock_server: MockServer) -> None:
    source = write_csv(tmp_path / "in.csv", ["id", "text"],
                       [["a", "fine"], ["b", "[[fault:400]] bad"], ["c", "fine too"], ["d", " "]])
    report = run_job(job_dict(mock_server.base_url, source, tmp_path / "out.csv"), tmp_path)
    assert report.exit_code == 1 and report.failed_rows == 2
    frame = read_frame(tmp_path / "out.csv").set_index("id")
    assert list(frame["status"]) == ["ok", "error", "ok", "error"]
    assert cell(frame, "b", "error").startswith("HTTP 400")
    assert cell(frame, "b", "attempts") == 1  # not retried
    assert cell(frame, "d", "error").startswith("prompt is empty")
    assert cell(frame, "d", "attempts") == 0
    assert pd.isna(cell(frame, "b", "reply"))


@pytest.mark.parametrize("fault", ["401", "quota", "credit"])
def test_bad_key_or_no_quota_aborts_after_a_handful(tmp_path: Path, make_mock: MakeMock,
                                                    fault: str) -> None:
    server = make_mock(faults=[], api_key=TEST_KEY)
    source = write_csv(tmp_path / "in.csv", ["id", "text"],
                       [[f"r{i}", f"[[fault:{fault}]] prompt {i}"] for i in range(300)])
    with pytest.raises(RunAborted) as caught:
        run_job(job_dict(server.base_url, source, tmp_path / "out.csv",
                         limits={"concurrency": 8}), tmp_path)
    assert caught.value.exit_code == 3
    assert server.stats.snapshot()["requests_total"] <= 8 + 4
    assert not (tmp_path / "out.csv").exists()
    assert (tmp_path / "out.ckpt").exists()


def test_cli_abort_exit_code_and_wrong_key(tmp_path: Path, mock_server: MockServer) -> None:
    source = prompts_csv(tmp_path, 50)
    job = write_job(tmp_path / "job.yaml", job_dict(mock_server.base_url, source,
                                                    tmp_path / "out.csv"))
    result = cli("run", str(job), "-q", env=cli_env({"BATCHER_TEST_KEY": "sk-wrong-key-123456"}))
    assert result.returncode == 3, result.stderr
    assert "HTTP 401" in result.stderr and "checkpoint is kept" in result.stderr
    assert "Traceback" not in result.stderr
    assert mock_server.stats.snapshot()["requests_total"] <= 8 + 4


def test_limit_runs_only_the_first_rows_and_resume_skips_done_rows(
        tmp_path: Path, mock_server: MockServer) -> None:
    source = prompts_csv(tmp_path, 30)
    job = job_dict(mock_server.base_url, source, tmp_path / "out.csv")
    report = run_job(job, tmp_path, limit=10)
    assert report.rows == 10 and len(read_frame(tmp_path / "out.csv")) == 10
    report = run_job(job, tmp_path)
    assert report.rows == 30 and report.stats.reused == 10
    assert mock_server.stats.snapshot()["requests_total"] == 30  # nothing sent twice
    report = run_job(job, tmp_path, fresh=True)
    assert mock_server.stats.snapshot()["requests_total"] == 60


def test_limit_zero_is_an_empty_run(tmp_path: Path, mock_server: MockServer) -> None:
    source = prompts_csv(tmp_path, 5)
    job = write_job(tmp_path / "job.yaml", job_dict(mock_server.base_url, source,
                                                    tmp_path / "out.csv"))
    result = cli("run", str(job), "-q", "--limit", "0")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.csv").read_text().splitlines()[0].startswith('id,text,')
    assert len((tmp_path / "out.csv").read_text().splitlines()) == 1
    assert mock_server.stats.snapshot()["requests_total"] == 0


def test_dry_run_and_validate_send_nothing(tmp_path: Path, mock_server: MockServer) -> None:
    source = prompts_csv(tmp_path, 40)
    job = write_job(tmp_path / "job.yaml", job_dict(mock_server.base_url, source,
                                                    tmp_path / "out.csv"))
    result = cli("run", str(job), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "40 rows" in result.stdout and "at most 2,560 completion tokens" in result.stdout
    assert "$" in result.stdout  # gpt-4o-mini's price is known
    result = cli("validate", str(job))
    assert result.returncode == 0 and "40 rows" in result.stdout
    assert mock_server.stats.snapshot()["requests_total"] == 0
    assert not (tmp_path / "out.csv").exists()


def test_key_never_reaches_output_logs_or_checkpoint(tmp_path: Path, make_mock: MakeMock) -> None:
    server = make_mock(api_key=TEST_KEY, echo_key_in_errors=True)
    source = write_csv(tmp_path / "in.csv", ["id", "text"],
                       [["a", "fine"], ["b", "[[fault:400]] echo"], ["c", "[[fault:500*1]] x"]])
    job = write_job(tmp_path / "job.yaml",
                    job_dict(server.base_url, source, tmp_path / "out.jsonl"))
    result = cli("run", str(job))
    assert result.returncode == 1, result.stderr
    wrong = cli("run", str(tmp_path / "job.yaml"), "--fresh",
                    env=cli_env({"BATCHER_TEST_KEY": "sk-wrong-but-secret-999999"}))
    assert wrong.returncode == 3
    for text in (result.stdout, result.stderr, wrong.stdout, wrong.stderr,
                 (tmp_path / "out.jsonl").read_text(), (tmp_path / "out.ckpt").read_text()):
        assert TEST_KEY not in text and "sk-wrong-but-secret-999999" not in text


def test_results_keep_input_columns_and_types(tmp_path: Path, mock_server: MockServer) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(json.dumps({"id": f"x{i}", "text": f"t {i}", "score": i / 2,
                                            "tags": ["a", "b"]}) for i in range(5)) + "\n")
    run_job(job_dict(mock_server.base_url, source, tmp_path / "out.parquet"), tmp_path)
    frame = pd.read_parquet(tmp_path / "out.parquet")
    assert frame["score"].tolist() == [0, 0.5, 1.0, 1.5, 2.0]
    # Nullable integers: an error row's null token counts do not turn them into floats.
    assert str(frame["prompt_tokens"].dtype) == "Int64"
