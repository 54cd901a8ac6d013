"""Shared fixtures: job files written into a temp folder, and the mock server."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from batcher.mock_server import MockConfig, MockServer

REPO = Path(__file__).resolve().parent.parent
TEST_KEY = "sk-test-0123456789abcdefSECRET"


@pytest.fixture
def mock_server() -> Iterator[MockServer]:
    with MockServer(MockConfig(api_key=TEST_KEY)) as server:
        yield server


@pytest.fixture
def make_mock() -> Iterator[Callable[..., MockServer]]:
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


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    import csv

    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def prompts_csv(folder: Path, count: int, name: str = "prompts.csv") -> Path:
    return write_csv(folder / name, ["id", "text"],
                     [[f"row{i:04d}", f"Prompt number {i}: say something."] for i in range(count)])


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


def run_cli(*args: str, env_extra: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BATCHER_TEST_KEY": TEST_KEY, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "batcher", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=timeout, check=False)
