"""The README's crontab lines, run as written.

Each ```cron block of the README is read back here, its folder laid out as the
README says (``.venv/bin/batcher``, ``jobs/``, ``secrets.env`` with ``export``),
``/srv/batcher`` replaced by a temp folder, and the command run the way cron
runs it: ``$SHELL -c LINE`` under ``env -i`` with cron's ``PATH``. The job talks to
the mock server over loopback with the key from ``secrets.env``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, TEST_KEY, wait_until, write_csv, write_job

from batcher.mock_server import MockConfig, MockServer

CRON_PATH = "/usr/bin:/bin"  # cron's PATH: no batcher on it
SRV = "/srv/batcher"


def cron_lines() -> list[str]:
    """Every crontab entry the README shows: the command after the five time fields."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    lines = []
    for block in re.findall(r"```cron\n(.*?)```", readme, re.S):
        for line in block.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                lines.append(line.split(None, 5)[5])
    return lines


def recipe(job_name: str) -> str:
    matching = [line for line in cron_lines() if f"jobs/{job_name}.yaml" in line]
    assert len(matching) == 1, cron_lines()
    return matching[0]


def lay_out(folder: Path, job_name: str, base_url: str, rows: list[list[str]],
            **job: object) -> None:
    """The folder as the README lays it out: batcher in .venv, the job, the key file."""
    venv_bin = folder / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    installed = Path(sys.executable).parent / "batcher"
    assert installed.exists(), "the batcher command is installed beside this Python"
    (venv_bin / "batcher").symlink_to(installed)
    data = write_csv(folder / "export.csv", ["id", "text"], rows)
    (folder / "jobs").mkdir()
    write_job(folder / "jobs" / f"{job_name}.yaml", {
        "name": job_name,
        "input": {"path": f"../{data.name}", "id_column": "id"},
        "prompt": {"column": "text"},
        "model": "gpt-4o-mini",
        "endpoint": {"base_url": base_url, "api_key_env": "OPENAI_API_KEY"},
        "output": {"path": f"../results/{job_name}.csv"},
        **job})
    secrets = folder / "secrets.env"
    secrets.write_text(f"export OPENAI_API_KEY={TEST_KEY}\n", encoding="utf-8")
    secrets.chmod(0o600)


def night(folder: Path, line: str, shell: str = "/bin/sh") -> subprocess.Popen[str]:
    command = line.replace(SRV, str(folder))
    env = {"PATH": CRON_PATH, "HOME": str(folder), "SHELL": shell, "LOGNAME": "cron"}
    return subprocess.Popen(["/usr/bin/env", "-i", *(f"{k}={v}" for k, v in env.items()),
                             shell, "-c", command], text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def ran(folder: Path, line: str, shell: str = "/bin/sh") -> str:
    process = night(folder, line, shell)
    output, _ = process.communicate(timeout=120)
    assert output == "", output  # cron would mail it: everything goes to the log
    return output


def log(folder: Path, name: str) -> list[str]:
    return (folder / "logs" / f"{name}.log").read_text(encoding="utf-8").splitlines()


def exits(lines: list[str]) -> list[int]:
    return [int(match.group(1)) for line in lines
            if (match := re.fullmatch(r"\d{4}-\d\d-\d\dT\S+ exit (\d+)", line))]


def rows(count: int) -> list[list[str]]:
    return [[f"r{index}", f"prompt {index}"] for index in range(count)]


@pytest.fixture
def mock() -> Iterator[MockServer]:
    with MockServer(MockConfig(api_key=TEST_KEY, latency_s=0.2)) as server:
        yield server


def test_the_readme_shows_a_cron_line_for_each_mode() -> None:
    assert {"nightly", "nightly-batch"} <= {
        match for line in cron_lines() for match in re.findall(r"jobs/([\w-]+)\.yaml", line)}
    for line in cron_lines():  # cron's PATH has no batcher: the venv's, by its path
        assert ".venv/bin/batcher run" in line and " batcher run" not in line
        assert "flock" not in line  # batcher's own lock: flock is absent on macOS


@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash"])
def test_the_nightly_line_first_night_and_a_night_with_failed_rows(
        tmp_path: Path, mock: MockServer, shell: str) -> None:
    """A fresh folder (no logs/, no results/): the first night answers every row and
    logs exit 0; a night whose export has a blank prompt logs exit 1, under bash too
    (bash sets $? from the date's command substitution)."""
    lay_out(tmp_path, "nightly", mock.base_url, rows(4), limits={"concurrency": 4})
    ran(tmp_path, recipe("nightly"), shell)
    assert exits(log(tmp_path, "nightly")) == [0], log(tmp_path, "nightly")
    assert (tmp_path / "results" / "nightly.csv").is_file()

    write_csv(tmp_path / "export.csv", ["id", "text"], [*rows(4), ["r4", ""]])
    ran(tmp_path, recipe("nightly"), shell)
    lines = log(tmp_path, "nightly")
    assert exits(lines) == [0, 1], lines
    assert any("prompt is empty" in line for line in lines), lines
    assert TEST_KEY not in "\n".join(lines)


def test_an_overlapping_night_is_skipped_with_its_own_exit_code(
        tmp_path: Path, mock: MockServer) -> None:
    lay_out(tmp_path, "nightly", mock.base_url, rows(30), limits={"concurrency": 1})
    first = night(tmp_path, recipe("nightly"))
    wait_until(lambda: mock.stats.snapshot()["requests_total"] >= 1, first,
               what="the first night's first request")
    ran(tmp_path, recipe("nightly"))
    assert first.poll() is None, "the first night must still be running for this test"
    first.communicate(timeout=120)
    lines = log(tmp_path, "nightly")
    assert exits(lines) == [75, 0], lines  # the overlapping night ends first
    skipped = [line for line in lines if line.startswith("batcher: skipped: ")]
    assert len(skipped) == 1 and "another batcher run of this job is in progress" in skipped[0]


def test_a_night_without_secrets_env_logs_why_and_exit_2(
        tmp_path: Path, mock: MockServer) -> None:
    lay_out(tmp_path, "nightly", mock.base_url, rows(2))
    (tmp_path / "secrets.env").unlink()
    for shell in ("/bin/sh", "/bin/bash"):
        ran(tmp_path, recipe("nightly"), shell)
    lines = log(tmp_path, "nightly")
    assert exits(lines) == [2, 2], lines
    assert sum("secrets.env" in line for line in lines) == 2, lines
    assert mock.stats.snapshot()["requests_total"] == 0


def test_the_batch_line_submits_then_collects(tmp_path: Path) -> None:
    with MockServer(MockConfig(api_key=TEST_KEY, batch_phase_s=0.5)) as server:
        lay_out(tmp_path, "nightly-batch", server.base_url, rows(6), mode="batch")
        line = recipe("nightly-batch")
        ran(tmp_path, line)
        lines = log(tmp_path, "nightly-batch")
        assert exits(lines) == [0] and any("submitted" in text for text in lines), lines
        assert not (tmp_path / "results" / "nightly-batch.csv").exists()
        for _ in range(20):  # later nights collect once the batch is done
            ran(tmp_path, line)
            if (tmp_path / "results" / "nightly-batch.csv").exists():
                break
        lines = log(tmp_path, "nightly-batch")
        assert set(exits(lines)) == {0}, lines
        assert any(text.startswith("results: ") for text in lines), lines
