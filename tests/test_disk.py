"""A full disk (a file-size limit on a real process: the limit is per process) while
journaling, while writing results and before the first row; an output folder
that cannot be written. The old results and a usable checkpoint always survive."""

from __future__ import annotations

import os
import resource
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import (
    TEST_KEY,
    MakeMock,
    cli,
    cli_process,
    job_dict,
    names,
    ok_positions,
    one_error_line,
    prompt_text,
    prompts_csv,
    read_journal,
    write_csv,
    write_job,
)

from batcher.mock_server import MockServer


def file_size_limit(limit: int) -> Callable[[], None]:
    """A ``preexec_fn``: writes past ``limit`` bytes fail with EFBIG, like a full disk."""
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


# == a full disk, an unwritable folder ======================================================


def test_disk_full_while_journaling_stops_cleanly_and_resumes(tmp_path: Path,
                                                              make_mock: MakeMock) -> None:
    rows, concurrency = 200, 4
    server: MockServer = make_mock(api_key=TEST_KEY, latency_s=0.005)
    checkpoint = tmp_path / "out.ckpt"
    output = tmp_path / "out.csv"
    output.write_text("previous results\n")
    job = write_job(tmp_path / "job.yaml", job_dict(
        server.base_url, prompts_csv(tmp_path, rows), output,
        limits={"concurrency": concurrency}))
    full = cli_process("run", str(job), "-q", preexec_fn=file_size_limit(20_000))
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
        tmp_path: Path, make_mock: MakeMock) -> None:
    rows = 120
    server: MockServer = make_mock(api_key=TEST_KEY)
    # Wide input rows: the results outgrow the size limit, the checkpoint does not.
    source = write_csv(tmp_path / "in.csv", ["id", "text", "notes"],
                       [[f"row{i:04d}", prompt_text(i), "n" * 800] for i in range(rows)])
    output = tmp_path / "out.csv"
    output.write_text("previous results\n")
    job = write_job(tmp_path / "job.yaml", job_dict(server.base_url, source, output))
    full = cli_process("run", str(job), "-q", preexec_fn=file_size_limit(60_000))
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
        tmp_path: Path, make_mock: MakeMock) -> None:
    server: MockServer = make_mock(api_key=TEST_KEY)
    job = write_job(tmp_path / "job.yaml", job_dict(
        server.base_url, prompts_csv(tmp_path, 10), tmp_path / "out.csv"))
    full = cli_process("run", str(job), "-q", preexec_fn=file_size_limit(1))
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
    results = [cli("run", str(job), "-q") for job in jobs]
    for (case, (_output, named)), result in zip(cases.items(), results, strict=True):
        assert result.returncode == 2, (case, result.stderr)
        line = one_error_line(result.stderr)
        assert named in line and "Traceback" not in line, (case, line)
    assert mock_server.stats.snapshot()["requests_total"] == 0
    assert not (tmp_path / "ok.csv").exists()

