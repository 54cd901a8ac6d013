"""Every user mistake: one line naming the problem, exit 2, nothing sent or overwritten."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    cli,
    job_dict,
    one_error_line,
    prompts_csv,
    run_job,
    write_job,
)

from batcher.errors import BatcherError
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


def set_key(dotted: str, value: Any) -> Callable[[Path, dict[str, Any]], None]:
    def apply(_folder: Path, job: dict[str, Any]) -> None:
        *sections, leaf = dotted.split(".")
        node = job
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return apply


def rename_key(old: str, new: str) -> Callable[[Path, dict[str, Any]], None]:
    def apply(_folder: Path, job: dict[str, Any]) -> None:
        job[new] = job.pop(old)
    return apply


CASES: dict[str, tuple[Callable[[Path, dict[str, Any]], None], str]] = {
    "missing file": (set_key("input.path", "nowhere.csv"), "nowhere.csv: input file not found"),
    "empty file": (raw_file(b""), "in.csv: input file is empty"),
    "header only": (raw_file(b"id,text\n"), "in.csv: the input has no rows"),
    "non-utf8 csv": (raw_file("id,text\na,caf\xe9\n".encode("latin-1")), "not valid UTF-8"),
    "ragged row": (raw_file(b"id,text\na,one\nb,two,three\n"), "expected 2 fields, found 3"),
    "missing column": (set_key("prompt.column", "body"),
                       "prompt.column names column 'body'"),
    "missing id column": (set_key("input.id_column", "key"),
                          "input.id_column names column 'key'"),
    "duplicate ids": (raw_file(b"id,text\na,one\nb,two\na,three\n"),
                      "row 3: duplicate id 'a' (first at row 1)"),
    "null ids": (raw_file(b'{"id": "a", "text": "x"}\n{"id": null, "text": "y"}\n', "in.jsonl"),
                 "row 2: id column 'id' is empty"),
    "malformed jsonl": (raw_file(b'{"id": "a", "text": "x"}\n{"id": "b", "te\n', "in.jsonl"),
                        "line 2: not valid JSON"),
    "template column": (set_key("prompt.column", None), "prompt.template names column 'nope'"),
    "negative limit": (set_key("limits.requests_per_minute", -1),
                       "limits.requests_per_minute: must be a positive number"),
    "wrong type": (set_key("limits.concurrency", "lots"),
                   "limits.concurrency: must be a whole number"),
    "unknown key": (set_key("retry.max_retries", 3), "retry.max_retries: unknown key"),
    # The typo first, not the "model: is required" it causes; the missing key is preferred
    # over a closer allowed one (mode), and the problem it explains is not counted again.
    "misspelt key": (rename_key("model", "modle"),
                     "modle: unknown key; did you mean model? (allowed here: name, input,"),
    "output is input": (set_key("output.path", "prompts.csv"),
                        "output.path: must not be the input file"),
    "key env unset": (set_key("endpoint.api_key_env", "BATCHER_NOT_SET_ANYWHERE"),
                      "environment variable BATCHER_NOT_SET_ANYWHERE is not set"),
    "literal key": (set_key("endpoint.api_key", "sk-proj-abcdefghijklmnopqrstuvwxyz"),
                    "endpoint.api_key: looks like a literal API key"),
    "plain http key": (set_key("endpoint.base_url", "http://api.example.com/v1"),
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
    result = cli("run", str(job_path))
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("batcher: error: "), result.stderr
    assert expected in lines[0]
    assert mock_server.stats.snapshot()["requests_total"] == 0
    assert (tmp_path / "out.csv").read_text() == RESULTS_BEFORE


def test_a_dry_run_needs_no_key_and_says_a_run_would_stop(tmp_path: Path,
                                                           mock_server: MockServer) -> None:
    """A dry run sends nothing, so an unset key is a note, not an error; validate and run
    still refuse the job (a job that validates starts)."""
    _source, job = _setup(tmp_path, mock_server)
    job["endpoint"]["api_key_env"] = "BATCHER_NOT_SET_ANYWHERE"
    job_path = write_job(tmp_path / "job.yaml", job)
    dry = cli("run", str(job_path), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "5 rows (5 to send" in dry.stdout
    assert ("note: a run would stop: endpoint.api_key_env: environment variable "
            "BATCHER_NOT_SET_ANYWHERE is not set") in dry.stdout
    for command in ("validate", "run"):
        assert cli(command, str(job_path)).returncode == 2
    assert mock_server.stats.snapshot()["requests_total"] == 0


@pytest.mark.parametrize(("content", "expected"), [
    ("input: [unclosed\n", "malformed YAML"),
    ("- just\n- a list\n", "must be a mapping"),
    ("", "job file is empty"),
])
def test_broken_yaml(tmp_path: Path, content: str, expected: str) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(content)
    result = cli("run", str(job))
    assert result.returncode == 2
    assert expected in result.stderr and str(job) in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_job_file_and_bad_arguments(tmp_path: Path) -> None:
    result = cli("run", str(tmp_path / "none.yaml"))
    assert result.returncode == 2 and "job file not found" in result.stderr
    assert cli("run", str(tmp_path / "none.yaml"), "--limit", "-3").returncode == 2
    assert cli("frobnicate").returncode == 2


# -- the edges: far down a big file, every type mistake, paths that alias --------------


def _deep_rows(count: int) -> bytes:
    return b"id,text\n" + b"".join(b"row%05d,Prompt %d\n" % (i, i) for i in range(count))


def _folder_as_input(folder: Path, job: dict[str, Any]) -> None:
    (folder / "folder.csv").mkdir()
    job["input"]["path"] = str(folder / "folder.csv")


def _output_is_input_via(kind: str) -> Callable[[Path, dict[str, Any]], None]:
    def apply(folder: Path, job: dict[str, Any]) -> None:
        (folder / "sub").mkdir()
        if kind == "dotdot":
            job["output"]["path"] = str(folder / "sub" / ".." / "prompts.csv")
        elif kind == "symlink":
            (folder / "link.csv").symlink_to(folder / "prompts.csv")
            job["output"]["path"] = str(folder / "link.csv")
        else:
            job["output"]["checkpoint"] = str(folder / "sub" / ".." / "prompts.csv")
    return apply


BAD_INPUTS: dict[str, tuple[Callable[[Path, dict[str, Any]], None], str]] = {
    "non-utf8 far down": (raw_file(_deep_rows(4000) + b"bad,caf\xe9\n"), "not valid UTF-8"),
    "non-utf8 in the header": (raw_file(b"id,t\xe9xt\na,b\n"), "not valid UTF-8"),
    "ragged far down": (raw_file(_deep_rows(4000) + b"bad,one,two\n"),
                        "line 4002: expected 2 fields, found 3"),
    "short row": (raw_file(b"id,text\na,one\nb\n"), "expected 2 fields, found 1"),
    "duplicate id across batches": (raw_file(_deep_rows(9000) + b"row00001,again\n"),
                                    "row 9001: duplicate id 'row00001' (first at row 2)"),
    "duplicate id as number and text": (
        raw_file(b'{"id": 1, "text": "a"}\n{"id": "1", "text": "b"}\n', "in.jsonl"),
        "inconsistent values"),
    "id missing from a jsonl row": (
        raw_file(b'{"id": "a", "text": "x"}\n{"text": "y"}\n', "in.jsonl"),
        "row 2: id column 'id' is empty"),
    "duplicate header column": (raw_file(b"id,text,text\na,b,c\n"),
                                "column 'text' appears twice"),
    "blank header": (raw_file(b"\n\n"), "in.csv"),
    "input is a folder": (_folder_as_input, "is a folder"),
    "unknown input suffix": (set_key("input.path", "prompts.txt"), "input.path"),
    "parquet that is not": (raw_file(b"id,text\na,b\n", "in.parquet"),
                            "not a readable Parquet file"),
    "template half absent": (set_key("prompt", {"template": "{text} and {missing}"}),
                             "prompt.template names column 'missing'"),
    "unknown nested key": (set_key("endpoint.timeout", 5), "endpoint.timeout: unknown key"),
    "string for a number": (set_key("retry.max_attempts", "3"),
                            "retry.max_attempts: must be a whole number"),
    "fraction for a count": (set_key("limits.concurrency", 2.5),
                             "limits.concurrency: must be a whole number"),
    "bool for a number": (set_key("endpoint.timeout_s", True), "endpoint.timeout_s"),
    "list for params": (set_key("params", [1, 2]), "params: must be a mapping"),
    "negative concurrency": (set_key("limits.concurrency", -1),
                             "limits.concurrency: must be a positive number"),
    "zero concurrency": (set_key("limits.concurrency", 0), "limits.concurrency"),
    "zero attempts": (set_key("retry.max_attempts", 0), "retry.max_attempts"),
    "negative timeout": (set_key("endpoint.timeout_s", -5), "endpoint.timeout_s"),
    "negative tpm": (set_key("limits.tokens_per_minute", -100), "limits.tokens_per_minute"),
    "negative delay": (set_key("retry.base_delay_s", -1), "retry.base_delay_s"),
    "zero breaker": (set_key("retry.stop_after_identical_failures", 0),
                     "retry.stop_after_identical_failures"),
    "output is input via ..": (_output_is_input_via("dotdot"),
                               "output.path: must not be the input file"),
    "output is input via a symlink": (_output_is_input_via("symlink"),
                                      "output.path: must not be the input file"),
    "checkpoint is input": (_output_is_input_via("checkpoint"), "output.checkpoint"),
    "reserved param": (set_key("params.messages", []), "params.messages"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_before_sending_and_touches_nothing(
        tmp_path: Path, mock_server: MockServer, case: str) -> None:
    mutate, expected = BAD_INPUTS[case]
    source = prompts_csv(tmp_path, 5)
    source_bytes = source.read_bytes()
    output = tmp_path / "out.csv"
    output.write_text(RESULTS_BEFORE)
    job = job_dict(mock_server.base_url, source, output)
    mutate(tmp_path, job)
    job_path = write_job(tmp_path / "job.yaml", job)
    try:
        run_job(job_path)
    except BatcherError as error:
        message = str(error)
        assert error.exit_code == 2, (type(error), message)
    else:
        raise AssertionError(f"{case}: accepted")
    assert "\n" not in message, message
    assert expected in message, message
    assert message.startswith((str(job_path), str(tmp_path))), message  # names the file
    assert mock_server.stats.snapshot()["requests_total"] == 0
    assert output.read_text() == RESULTS_BEFORE
    assert source.read_bytes() == source_bytes
    assert not (tmp_path / "out.ckpt").exists()


def test_bad_input_through_the_command_line(tmp_path: Path, mock_server: MockServer) -> None:
    """A few of the above as a user meets them: one stderr line, exit 2."""
    cases = ["ragged far down", "duplicate id across batches", "negative concurrency",
             "output is input via a symlink"]
    jobs = []
    for case in cases:
        folder = tmp_path / re.sub(r"\W+", "-", case)
        folder.mkdir()
        source = prompts_csv(folder, 5)
        (folder / "out.csv").write_text(RESULTS_BEFORE)
        job = job_dict(mock_server.base_url, source, folder / "out.csv")
        BAD_INPUTS[case][0](folder, job)
        jobs.append(write_job(folder / "job.yaml", job))
    results = [cli("run", str(path)) for path in jobs]
    for case, path, result in zip(cases, jobs, results, strict=True):
        assert result.returncode == 2, (case, result.stderr)
        assert BAD_INPUTS[case][1] in one_error_line(result.stderr), case
        assert (path.parent / "out.csv").read_text() == RESULTS_BEFORE
    assert mock_server.stats.snapshot()["requests_total"] == 0


@pytest.mark.parametrize(("name", "content"), [
    ("in.csv", b"id,text\n"),
    ("in.jsonl", b"\n\n"),
])
def test_a_header_only_input_is_bad_input(tmp_path: Path, mock_server: MockServer, name: str,
                                          content: bytes) -> None:
    """Issue 4 (newer than the contract's "valid empty job") lists a header-only
    file among the bad inputs: exit 2, one line, nothing written."""
    source = tmp_path / name
    source.write_bytes(content)
    output = tmp_path / "out.csv"
    output.write_text("previous results\n")
    job = write_job(tmp_path / "job.yaml", job_dict(mock_server.base_url, source, output))
    result = cli("run", str(job), "-q")
    assert result.returncode == 2, result.stderr
    assert "no rows" in one_error_line(result.stderr)
    assert mock_server.stats.snapshot()["requests_total"] == 0
    assert output.read_text() == "previous results\n"


def test_an_empty_csv_id_is_refused(tmp_path: Path, mock_server: MockServer) -> None:
    source = tmp_path / "in.csv"
    source.write_text("id,text\na,one\n,two\nc,three\n")
    job = write_job(tmp_path / "job.yaml",
                    job_dict(mock_server.base_url, source, tmp_path / "out.csv"))
    result = cli("run", str(job), "-q")
    assert result.returncode == 2, result.stderr
    assert "row 2" in one_error_line(result.stderr)
    assert mock_server.stats.snapshot()["requests_total"] == 0


def test_a_ragged_non_utf8_row_gives_one_clean_line(tmp_path: Path,
                                                    mock_server: MockServer) -> None:
    source = tmp_path / "in.csv"
    source.write_bytes(_deep_rows(3000) + b"bad,t\xffo,three\n")
    job = write_job(tmp_path / "job.yaml",
                    job_dict(mock_server.base_url, source, tmp_path / "out.csv"))
    result = cli("run", str(job), "-q")
    assert result.returncode == 2
    one_error_line(result.stderr)


def test_an_unterminated_quote_is_refused_not_swallowed(tmp_path: Path,
                                                        mock_server: MockServer) -> None:
    source = tmp_path / "in.csv"
    source.write_bytes(b'id,text\na,"one\nb,two\nc,three\nd,four\n')
    job = write_job(tmp_path / "job.yaml",
                    job_dict(mock_server.base_url, source, tmp_path / "out.csv"))
    with pytest.raises(BatcherError) as caught:
        run_job(job)
    assert caught.value.exit_code == 2 and "in.csv" in str(caught.value)
    assert mock_server.stats.snapshot()["requests_total"] == 0
