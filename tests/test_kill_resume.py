"""SIGKILL a real `batcher run` half way, run it again: nothing lost, nothing doubled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
from conftest import TEST_KEY, job_dict, prompts_csv, run_cli, write_job

from batcher.mock_server import reply_for

CONCURRENCY = 4


def start_run(job: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "BATCHER_TEST_KEY": TEST_KEY}
    return subprocess.Popen([sys.executable, "-m", "batcher", "run", str(job), "-q"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def journal_rows(path: Path) -> int:
    try:
        return max(0, path.read_bytes().count(b"\n") - 1)
    except FileNotFoundError:
        return 0


def wait_for_rows(path: Path, rows: int, process: subprocess.Popen[str],
                  deadline_s: float = 60) -> None:
    deadline = time.monotonic() + deadline_s
    while journal_rows(path) < rows:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.02)


def test_sigkill_then_resume_loses_nothing_and_resends_only_in_flight(
        tmp_path: Path, make_mock: Any) -> None:
    server = make_mock(api_key=TEST_KEY, latency_s=0.03)
    source = prompts_csv(tmp_path, 240)
    output = tmp_path / "out.parquet"
    job = write_job(tmp_path / "job.yaml", job_dict(server.base_url, source, output,
                                                    limits={"concurrency": CONCURRENCY}))
    checkpoint = tmp_path / "out.ckpt"

    kills = 0
    for target in (40, 120):
        process = start_run(job)
        wait_for_rows(checkpoint, target, process)
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        assert not output.exists()  # results are only written at the very end

    result = run_cli("run", str(job), "-q")
    assert result.returncode == 0, result.stderr

    frame = pd.read_parquet(output)
    assert len(frame) == 240 and frame["id"].is_unique
    assert list(frame["id"]) == [f"row{i:04d}" for i in range(240)]
    assert (frame["status"] == "ok").all()
    assert all(frame["reply"] == [reply_for(text) for text in frame["text"]])

    # Only requests in flight at a kill may have been sent twice.
    prompts = server.stats.snapshot()["prompts"]
    resent = sum(count - 1 for count in prompts.values() if count > 1)
    assert resent <= kills * CONCURRENCY, resent
    assert sum(prompts.values()) == 240 + resent
