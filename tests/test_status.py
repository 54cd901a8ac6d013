"""``batcher status``: progress read from the checkpoint, during a run and after it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from click.testing import CliRunner
from conftest import TEST_KEY, job_dict, prompts_csv, write_job

from batcher.cli import main
from batcher.mock_server import MockServer
from batcher.tally import Tally

ROWS = 24


def _status(job: Path, *extra: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["status", str(job), *extra],
                                env={"BATCHER_TEST_KEY": TEST_KEY})
    return result.exit_code, result.stdout, result.stderr


def _rows_journaled(checkpoint: Path) -> int:
    try:
        return checkpoint.read_bytes().count(b"\n") - 1
    except FileNotFoundError:
        return 0


def test_status_while_a_slow_run_goes_on_and_after_it_ends(
        tmp_path: Path, make_mock: Callable[..., MockServer]) -> None:
    server = make_mock(api_key=TEST_KEY, latency_s=0.25)
    job = write_job(tmp_path / "job.yaml", job_dict(
        server.base_url, prompts_csv(tmp_path, ROWS), tmp_path / "out.csv",
        limits={"concurrency": 2}))
    checkpoint = tmp_path / "out.ckpt"
    run = subprocess.Popen([sys.executable, "-m", "batcher", "run", str(job), "-q"],
                           env={**os.environ, "BATCHER_TEST_KEY": TEST_KEY},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while _rows_journaled(checkpoint) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        code, out, err = _status(job)
        assert code == 0, err
        done = int(re.search(r"running; (\d+)/24 rows done", out).group(1))  # type: ignore[union-attr]
        assert 4 <= done < ROWS
        assert "test-job: running" in out
        assert re.search(r"rate: [\d,]+ rows/min over the last minute; ETA \d+s", out), out
        assert "cost so far: $" in out and "tokens: " in out
        code, out, _ = _status(job, "--json")
        figures = json.loads(out)
        assert figures["running"] is True and figures["rows_total"] == ROWS
        assert 0 < figures["rows_ok"] < ROWS and figures["eta_s"] > 0
    finally:
        _, stderr = run.communicate(timeout=60)
    # Reading beside it disturbed nothing: the run finished every row.
    assert run.returncode == 0, stderr
    assert set(server.stats.snapshot()["ok_prompts"].values()) == {1}

    code, out, _ = _status(job)
    assert code == 0 and "test-job: not running; 24/24 rows done" in out
    assert "ETA" not in out
    with checkpoint.open("ab") as journal:  # a line cut short, as by a kill mid-write
        journal.write(b'{"i":3,"status":"ok","re')
    code, out, _ = _status(job)
    assert code == 0 and "24/24 rows done" in out


def test_status_counts_errors_by_class(tmp_path: Path,
                                       make_mock: Callable[..., MockServer]) -> None:
    server = make_mock(api_key=TEST_KEY)
    prompts = prompts_csv(tmp_path, 6)
    text = prompts.read_text().replace("Prompt number 2:", "[[fault:400]] Prompt number 2:")
    prompts.write_text(text)
    job = write_job(tmp_path / "job.yaml", job_dict(server.base_url, prompts,
                                                    tmp_path / "out.csv"))
    run = CliRunner().invoke(main, ["run", str(job), "-q"], env={"BATCHER_TEST_KEY": TEST_KEY})
    assert run.exit_code == 1
    code, out, _ = _status(job)
    assert code == 0 and "5/6 rows done, 1 in error" in out
    assert "errors: HTTP 400 invalid_request_error x1" in out


def test_status_without_a_checkpoint_is_a_one_line_error(
        tmp_path: Path, make_mock: Callable[..., MockServer]) -> None:
    server = make_mock(api_key=TEST_KEY)
    job = write_job(tmp_path / "job.yaml", job_dict(server.base_url, prompts_csv(tmp_path, 3),
                                                    tmp_path / "out.csv"))
    code, _, err = _status(job)
    assert code == 2
    assert "no checkpoint yet" in err and len(err.strip().splitlines()) == 1


def test_the_pace_counts_ok_rows_finished_in_the_window_over_the_runs_age() -> None:
    now = 1_000_000.0
    tally = Tally(rate_window=(now - 60, now))
    for position, finished in enumerate([now - 600, now - 30, now - 20, now - 10, now + 5]):
        tally.add(position, {"status": "ok", "finished_at": finished})
    tally.add(9, {"status": "error", "finished_at": now - 1})  # errors set no pace
    assert tally.rows_per_minute() == 3.0  # three ok rows in the last 60 s
    young = Tally(rate_window=(now - 60, now))
    for position, finished in enumerate([now - 15, now - 10, now - 5]):
        young.add(position, {"status": "ok", "finished_at": finished})
    assert young.rows_per_minute() == 12.0  # a run 15 s old: 3 rows per 15 s
    assert Tally().rows_per_minute() == 0.0
