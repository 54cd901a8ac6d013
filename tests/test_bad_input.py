"""Every user mistake: one line naming the problem, exit 2, nothing sent or overwritten."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import job_dict, prompts_csv, run_cli, write_csv, write_job

from batcher.mock_server import MockServer

RESULTS_BEFORE = "previous results, must survive\n"


def _setup(tmp_path: Path, server: MockServer) -> tuple[Path, dict[str, Any]]:
    source = prompts_csv(tmp_path, 5)
    output = tmp_path / "out.csv"
    output.write_text(RESULTS_BEFORE)
    return source, job_dict(server.base_url, source, output)


def raw_file(content: bytes, name: str = "in.csv") -> Callable[[Path, dict[str, Any]], None]:
    def apply(tmp_path: Path, job: dict[str, Any]) -> None:
        (tmp_path / name).write_bytes(content)
        job["input"]["path"] = str(tmp_path / name)
    return apply


def set_key(section: str, key: str, value: Any) -> Callable[[Path, dict[str, Any]], None]:
    def apply(_tmp_path: Path, job: dict[str, Any]) -> None:
        job[section][key] = value
    return apply


CASES: dict[str, tuple[Callable[[Path, dict[str, Any]], None], str]] = {
    "missing file": (set_key("input", "path", "nowhere.csv"), "nowhere.csv: input file not found"),
    "empty file": (raw_file(b""), "in.csv: input file is empty"),
    "header only": (raw_file(b"id,text\n"), "in.csv: the input has no rows"),
    "non-utf8 csv": (raw_file("id,text\na,caf\xe9\n".encode("latin-1")), "not valid UTF-8"),
    "ragged row": (raw_file(b"id,text\na,one\nb,two,three\n"), "expected 2 fields, found 3"),
    "missing column": (set_key("prompt", "column", "body"),
                       "prompt.column names column 'body'"),
    "missing id column": (set_key("input", "id_column", "key"),
                          "input.id_column names column 'key'"),
    "duplicate ids": (raw_file(b"id,text\na,one\nb,two\na,three\n"),
                      "row 3: duplicate id 'a' (first at row 1)"),
    "null ids": (raw_file(b'{"id": "a", "text": "x"}\n{"id": null, "text": "y"}\n', "in.jsonl"),
                 "row 2: id column 'id' is empty"),
    "malformed jsonl": (raw_file(b'{"id": "a", "text": "x"}\n{"id": "b", "te\n', "in.jsonl"),
                        "line 2: not valid JSON"),
    "template column": (set_key("prompt", "column", None), "prompt.template names column 'nope'"),
    "negative limit": (set_key("limits", "requests_per_minute", -1),
                       "limits.requests_per_minute: must be a positive number"),
    "wrong type": (set_key("limits", "concurrency", "lots"),
                   "limits.concurrency: must be a whole number"),
    "unknown key": (set_key("retry", "max_retries", 3), "retry.max_retries: unknown key"),
    "output is input": (set_key("output", "path", "prompts.csv"),
                        "output.path: must not be the input file"),
    "key env unset": (set_key("endpoint", "api_key_env", "BATCHER_NOT_SET_ANYWHERE"),
                      "environment variable BATCHER_NOT_SET_ANYWHERE is not set"),
    "literal key": (set_key("endpoint", "api_key", "sk-proj-abcdefghijklmnopqrstuvwxyz"),
                    "endpoint.api_key: looks like a literal API key"),
    "plain http key": (set_key("endpoint", "base_url", "http://api.example.com/v1"),
                       "plain http:// to a host other than this machine"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_job_or_input_exits_2_with_one_line(tmp_path: Path, mock_server: MockServer,
                                                case: str) -> None:
    _source, job = _setup(tmp_path, mock_server)
    mutate, expected = CASES[case]
    if case == "template column":
        job["prompt"] = {"template": "Say {nope}"}
    else:
        mutate(tmp_path, job)
    job_path = write_job(tmp_path / "job.yaml", job)
    result = run_cli("run", str(job_path))
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("batcher: error: "), result.stderr
    assert expected in lines[0]
    assert mock_server.stats.snapshot()["requests_total"] == 0
    assert (tmp_path / "out.csv").read_text() == RESULTS_BEFORE


@pytest.mark.parametrize(("content", "expected"), [
    ("input: [unclosed\n", "malformed YAML"),
    ("- just\n- a list\n", "must be a mapping"),
    ("", "job file is empty"),
])
def test_broken_yaml(tmp_path: Path, content: str, expected: str) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(content)
    result = run_cli("run", str(job))
    assert result.returncode == 2
    assert expected in result.stderr and str(job) in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_job_file_and_bad_arguments(tmp_path: Path) -> None:
    result = run_cli("run", str(tmp_path / "none.yaml"))
    assert result.returncode == 2 and "job file not found" in result.stderr
    assert run_cli("run", str(tmp_path / "none.yaml"), "--limit", "-3").returncode == 2
    assert run_cli("frobnicate").returncode == 2


def test_changed_job_refuses_to_resume_until_fresh(tmp_path: Path,
                                                   mock_server: MockServer) -> None:
    source = write_csv(tmp_path / "in.csv", ["id", "text"], [["a", "one"], ["b", "two"]])
    job = job_dict(mock_server.base_url, source, tmp_path / "out.csv")
    write_job(tmp_path / "job.yaml", job)
    assert run_cli("run", str(tmp_path / "job.yaml"), "-q").returncode == 0
    job["params"]["temperature"] = 0.7
    write_job(tmp_path / "job.yaml", job)
    result = run_cli("run", str(tmp_path / "job.yaml"), "-q")
    assert result.returncode == 2 and "different job" in result.stderr
    assert "--fresh" in result.stderr
    assert run_cli("run", str(tmp_path / "job.yaml"), "-q", "--fresh").returncode == 0
