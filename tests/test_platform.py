"""batcher where the platform lacks ``fcntl``, ``os.pread`` or ``/proc`` (``batcher.io.platform``).

The fallbacks are forced on Linux: a real ``batcher`` process starts with
``fcntl`` hidden and the POSIX-only parts of ``os`` removed (as on Windows),
``/proc/locks`` pointed at a missing path by the module's public switch, and
runs a job against the mock server over loopback: results, a second run
refused by the lock, ``status`` telling a running job, resume after a kill.
Processes, because what a process imports is decided before batcher loads.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import (
    TEST_KEY,
    MakeMock,
    Ran,
    cli_env,
    job_dict,
    prompt_text,
    prompts_csv,
    read_journal,
    wait_until,
    write_job,
)

from batcher.io import platform
from batcher.mock_server import reply_for
from batcher.store.checkpoint import Checkpoint
from batcher.store.journal import run_in_progress

#: ``batcher ARGS`` on a platform without fcntl, pread/pwrite, O_NOFOLLOW,
#: O_DIRECTORY, file owners or fchmod, and without /proc.
WITHOUT_POSIX = """
import os, sys
from pathlib import Path
sys.modules["fcntl"] = None  # import fcntl now raises ImportError, as on Windows
for name in ("pread", "pwrite", "O_NOFOLLOW", "O_DIRECTORY", "geteuid", "fchmod"):
    delattr(os, name)
from batcher.io import platform
platform.PROC_LOCKS = Path(sys.argv.pop(1))
from batcher.cli import main
main(prog_name="batcher")
"""


def command(tmp_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-c", WITHOUT_POSIX, str(tmp_path / "no-proc-locks"), *args]


def batcher(tmp_path: Path, *args: str) -> Ran:
    done = subprocess.run(command(tmp_path, *args), capture_output=True, text=True,
                          env=cli_env(), timeout=120, check=False)
    return Ran(done.returncode, done.stdout, done.stderr)


def test_without_fcntl_pread_and_proc_a_run_locks_resumes_and_is_seen_running(
        tmp_path: Path, make_mock: MakeMock) -> None:
    rows, concurrency = 120, 2  # a minute's work: still running after two more commands
    slow = make_mock(api_key=TEST_KEY, latency_s=1.0)
    job_data = job_dict(slow.base_url, prompts_csv(tmp_path, rows), tmp_path / "out.csv",
                        limits={"concurrency": concurrency})
    job = write_job(tmp_path / "job.yaml", job_data)
    checkpoint = tmp_path / "out.ckpt"
    claim = tmp_path / "out.ckpt.lock.pid"

    first = subprocess.Popen(command(tmp_path, "run", str(job), "-q"), env=cli_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: len(read_journal(checkpoint)[1]) >= 1, first, what="a row journaled")
        # No flock: the lock is the claim file, naming the running process.
        assert claim.read_text(encoding="ascii") == str(first.pid)

        second = batcher(tmp_path, "run", str(job), "-q")
        status = batcher(tmp_path, "status", str(job))
        assert first.poll() is None, "the first run must still be running for this test"
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=30)
    assert second.returncode == 75, second.stderr
    assert "another batcher run of this job is in progress" in second.stderr
    assert status.returncode == 0, status.stderr
    assert "test-job: running" in status.stdout

    assert claim.exists()  # a killed run leaves its claim, naming a process that is gone
    fast = make_mock(api_key=TEST_KEY)
    job_data["endpoint"]["base_url"] = fast.base_url
    write_job(job, job_data)
    resumed = batcher(tmp_path, "run", str(job), "-q")
    assert resumed.returncode == 0, resumed.stderr
    assert not claim.exists()  # given up at the end of the run: status says "not running"

    frame = pd.read_csv(tmp_path / "out.csv")
    assert list(frame["id"]) == [f"row{i:04d}" for i in range(rows)]
    assert (frame["status"] == "ok").all()
    assert list(frame["reply"]) == [reply_for(prompt_text(i)) for i in range(rows)]
    # The rows journaled before the kill were read back (by seek and read), not resent.
    prompts = slow.stats.snapshot()["prompts"]
    for prompt, count in fast.stats.snapshot()["prompts"].items():
        prompts[prompt] = prompts.get(prompt, 0) + count
    assert set(prompts) == {prompt_text(i) for i in range(rows)}
    assert sum(count - 1 for count in prompts.values()) <= concurrency


def test_without_proc_a_held_flock_is_seen_by_trying_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As on macOS: flock, but no /proc/locks to read it from."""
    monkeypatch.setattr(platform, "PROC_LOCKS", tmp_path / "no-proc-locks")
    path = tmp_path / "out.ckpt"
    assert run_in_progress(path) is False  # no lock file yet: nothing ever ran
    with Checkpoint(path):
        assert run_in_progress(path) is True
        assert run_in_progress(path) is True  # the probe took nothing from the holder
    assert run_in_progress(path) is False
    with Checkpoint(path):  # and the probes left the lock free to take
        pass
