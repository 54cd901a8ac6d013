"""Shared fixtures and helpers: job files in a temp folder, the mock server, the
command line (in-process, or as a real process where the process is the point),
polling, and readers for checkpoints and results.

Test files import the helpers with ``from conftest import ...`` (pytest puts
tests/ on ``sys.path``); each helper exists here once.
"""

from __future__ import annotations

import asyncio
import csv
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from batcher.cli import main
from batcher.jobload import job_from_dict, load_job
from batcher.jobs import arun_job
from batcher.mock_server import MockConfig, MockServer, reply_for
from batcher.online.runner import RunOptions, RunReport, Runtime

REPO = Path(__file__).resolve().parent.parent
TEST_KEY = "sk-test-0123456789abcdefSECRET"
ENV = {"BATCHER_TEST_KEY": TEST_KEY}
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ws_proxy",
                   "wss_proxy")


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def mock_server() -> Iterator[MockServer]:
    with MockServer(MockConfig(api_key=TEST_KEY)) as server:
        yield server


MakeMock = Callable[..., MockServer]  # the make_mock fixture: MockConfig keywords in


@pytest.fixture
def make_mock() -> Iterator[MakeMock]:
    """Start a mock server with any config; stopped at the end of the test."""
    servers: list[MockServer] = []

    def start(**config: Any) -> MockServer:
        server = MockServer(MockConfig(**config))
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


# -- inputs and jobs -------------------------------------------------------------------------


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def prompt_text(i: int) -> str:
    """The prompt ``prompts_csv`` writes for row ``i``."""
    return f"Prompt number {i}: say something."


def prompts_csv(folder: Path, count: int, name: str = "prompts.csv") -> Path:
    return write_csv(folder / name, ["id", "text"],
                     [[f"row{i:04d}", prompt_text(i)] for i in range(count)])


def job_dict(base_url: str, input_path: Path, output_path: Path,
             **overrides: Any) -> dict[str, Any]:
    job: dict[str, Any] = {
        "name": "test-job",
        "input": {"path": str(input_path), "id_column": "id"},
        "prompt": {"column": "text"},
        "model": "gpt-4o-mini",
        "params": {"temperature": 0, "max_tokens": 64},
        "endpoint": {"base_url": base_url, "api_key_env": "BATCHER_TEST_KEY", "timeout_s": 5},
        "limits": {"concurrency": 8},
        "retry": {"max_attempts": 4, "base_delay_s": 0.01, "max_delay_s": 0.05},
        "output": {"path": str(output_path)},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(job.get(key), dict):
            job[key] = {**job[key], **value}
        else:
            job[key] = value
    return job


def write_job(path: Path, job: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(job, sort_keys=False), encoding="utf-8")
    return path


# -- running a job in-process ----------------------------------------------------------------


def run_job(job: Path | dict[str, Any], base: Path | None = None, *,
            runtime: Runtime | None = None, environ: dict[str, str] | None = None,
            **options: Any) -> RunReport:
    """Run a job file, or a job given as a dict (paths resolved against ``base``),
    in this process: no progress bar, no signal handlers, the test key."""
    options.setdefault("progress", False)
    options.setdefault("handle_signals", False)
    if isinstance(job, Path):
        parsed = load_job(job)
    else:
        parsed = job_from_dict(job, base_dir=base or REPO, source="test.yaml",
                               require_output=True)
    return asyncio.run(arun_job(parsed, RunOptions(**options), runtime=runtime,
                                environ=ENV if environ is None else environ))


# -- the command line ------------------------------------------------------------------------


@dataclass(frozen=True)
class Ran:
    """What a ``batcher`` command did: the shape of ``subprocess.CompletedProcess``,
    so an in-process run and a real process are checked the same way."""

    returncode: int
    stdout: str
    stderr: str


def cli_env(extra: dict[str, str] | None = None, key: str = TEST_KEY) -> dict[str, str]:
    """The environment of a ``batcher`` command: the key, no inherited proxy settings."""
    env = {name: value for name, value in os.environ.items()
           if name.lower() not in PROXY_VARIABLES}
    env["BATCHER_TEST_KEY"] = key
    env.update(extra or {})
    return env


def cli(*args: str, env: dict[str, str] | None = None) -> Ran:
    """``batcher ARGS`` in this process (click's runner): everything a command does
    except being a process of its own. ``env`` replaces the environment as
    :func:`cli_env` builds it. An exception that escapes the command fails the
    test (a user would have seen a traceback)."""
    env = env or cli_env()
    unset: dict[str, str | None] = {name: None for name in os.environ if name not in env}
    result = CliRunner().invoke(main, list(args), env={**unset, **env},
                                catch_exceptions=False)
    return Ran(result.exit_code, result.stdout, result.stderr)


def cli_process(*args: str, env: dict[str, str] | None = None,
                preexec_fn: Callable[[], None] | None = None,
                timeout: float = 120) -> Ran:
    """``batcher ARGS`` as a real process: for what only a process shows (a
    resource limit set before it starts, real stdio, exit by signal)."""
    done = subprocess.run([sys.executable, "-m", "batcher", *args], capture_output=True,
                          text=True, env=env or cli_env(), preexec_fn=preexec_fn,
                          timeout=timeout, check=False)
    return Ran(done.returncode, done.stdout, done.stderr)


def start_run(job: Path, *args: str, env: dict[str, str] | None = None
              ) -> subprocess.Popen[str]:
    """``batcher run JOB -q`` as a process left running: to be signalled or killed."""
    return subprocess.Popen(
        [sys.executable, "-m", "batcher", "run", str(job), "-q", *args],
        env=env or cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def one_error_line(stderr: str, label: str = "error") -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"batcher: {label}: "), stderr
    return lines[0]


def ray_processes(marker: str) -> list[int]:
    """The processes of a Ray started under ``marker`` (its RAY_TMPDIR): a test's own
    Ray, told from any other on the machine, to check what outlived it."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if f"RAY_TMPDIR={marker}".encode() in environ:
            found.append(int(entry.name))
    return found


# -- waiting ---------------------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], process: subprocess.Popen[str] | None = None,
               timeout: float = 60, what: str = "condition", interval: float = 0.005) -> None:
    """Poll ``condition``; fail if ``process`` ends first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"process ended (rc {process.returncode}) before {what}: "
                                 f"{out} {err}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


# -- reading what a run left -----------------------------------------------------------------


def names(folder: Path) -> list[str]:
    return [path.name for path in folder.iterdir()]


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
    assert header.get("batcher_checkpoint") == 2, header
    return header, rows, tail


def journal_lines(path: Path) -> int:
    """Whole lines in a checkpoint (the header included): cheap enough to poll."""
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


def read_rows(path: Path) -> list[dict[str, Any]]:
    """A results file as plain dicts of exact values (no pandas NA guessing)."""
    if path.suffix == ".parquet":
        rows: list[dict[str, Any]] = pq.read_table(path).to_pylist()
        return rows
    if path.suffix == ".jsonl":
        return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def cell(frame: pd.DataFrame, row: str, column: str) -> Any:
    """One value of a results frame: pandas-stubs types a scalar lookup as the union
    of every cell type there is, and tests compare cells with plain values."""
    return frame.loc[row, column]


def read_frame(path: Path) -> pd.DataFrame:
    """A results file as pandas reads it, ids kept as text."""
    if path.suffix == ".csv":
        return pd.read_csv(path, dtype={"id": str}, keep_default_na=False, na_values=[""])
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    return pd.read_json(path, lines=True, dtype={"id": str})
