"""Issue 12: the rough edges a data scientist and a cron job hit in their first week.

Each test runs batcher for real (in-process, over loopback HTTP to the mock
server) and checks what the user sees: the files, the columns' types, the
terminal's lines, and what reached the server.
"""

from __future__ import annotations

import asyncio
import bz2
import gzip
import io
import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import TEST_KEY, job_dict, prompts_csv, write_csv, write_job

from batcher import cli
from batcher.jobload import job_from_dict
from batcher.jobs import arun_job
from batcher.mock_server import MockServer, reply_for
from batcher.online.runner import RunOptions, RunReport
from batcher.progress import Progress, RunStats
from batcher.records import OPTIONAL_COLUMNS, RESULT_COLUMNS, RowResult

ENV = {"BATCHER_TEST_KEY": TEST_KEY}


def run_job(job: dict[str, Any], base: Path, **options: Any) -> RunReport:
    options.setdefault("progress", False)
    options.setdefault("handle_signals", False)
    loaded = job_from_dict(job, base_dir=base, source="test.yaml", require_output=True)
    return asyncio.run(arun_job(loaded, RunOptions(**options), environ=ENV))


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli.main, list(args), env=ENV, catch_exceptions=False)


def sent_prompts(server: MockServer) -> dict[str, int]:
    return dict(server.stats.snapshot()["prompts"])


# -- money spent before a certain failure ----------------------------------------------------

def test_a_list_column_is_written_to_csv_as_json(tmp_path: Path, mock_server: MockServer
                                                 ) -> None:
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["one", "two"],
                             "tags": [["x", "y"], None]}), source)
    output = tmp_path / "out.csv"
    report = run_job(job_dict(mock_server.base_url, source, output), tmp_path)
    assert report.exit_code == 0
    frame = pd.read_csv(output)
    assert json.loads(frame["tags"][0]) == ["x", "y"] and pd.isna(frame["tags"][1])


def test_validate_refuses_an_output_under_a_file(tmp_path: Path) -> None:
    source = prompts_csv(tmp_path, 3)
    (tmp_path / "afile").write_text("not a folder")
    job = write_job(tmp_path / "job.yaml",
                    job_dict("http://127.0.0.1:9/v1", source, tmp_path / "afile" / "out.csv"))
    result = invoke("validate", str(job))
    assert result.exit_code == 2, result.output
    assert "afile" in result.output


# -- the cron job's log ----------------------------------------------------------------------

def test_log_lines_stand_alone(tmp_path: Path) -> None:
    stats = RunStats(total_rows=4)
    stream = io.StringIO()
    progress = Progress(stats, stream=stream, bar=False, log_every_s=0, label="nightly")
    for position in range(2):
        progress.update(position, RowResult("hi", "stop", 1, 1, 2, "ok", None, 1, 0.1))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d"
    assert re.match(stamp + r" batcher nightly: 1/4 rows \(25%\), 1 ok, 0 errors, ", lines[0])
    assert re.match(stamp + r" batcher nightly: 2/4 rows \(50%\), 2 ok, 0 errors, \d+ rows/min, "
                    r"ETA \S+$", lines[1]), lines[1]


def test_the_summary_names_error_classes_with_a_first_example(tmp_path: Path,
                                                              mock_server: MockServer) -> None:
    source = write_csv(tmp_path / "in.csv", ["id", "text"],
                       [["a", "fine"], ["b", "[[fault:400]] bad one"], ["c", "[[fault:400]] again"],
                        ["d", ""]])
    job = write_job(tmp_path / "job.yaml", job_dict(mock_server.base_url, source,
                                                    tmp_path / "out.csv"))
    result = invoke("run", str(job), "--quiet")
    assert result.exit_code == 1
    err = result.stderr
    assert re.search(r"2 rows failed with HTTP 400\S* .*\(first: row 2: HTTP 400", err), err
    assert "1 row failed with input (first: row 4: prompt is empty" in err


def test_a_run_of_truncated_replies_warns(tmp_path: Path, mock_server: MockServer) -> None:
    source = write_csv(tmp_path / "in.csv", ["id", "text"],
                       [[str(i), f"[[fault:length]] long answer {i}"] for i in range(5)])
    job = write_job(tmp_path / "job.yaml", job_dict(mock_server.base_url, source,
                                                    tmp_path / "out.csv"))
    result = invoke("run", str(job), "--quiet")
    assert result.exit_code == 0
    assert "5 of 5 replies (100%) were cut off by the token limit" in result.stderr


def test_a_blank_prompt_does_not_grow_the_checkpoint(tmp_path: Path,
                                                     mock_server: MockServer) -> None:
    source = write_csv(tmp_path / "in.csv", ["id", "text"], [["a", "fine"], ["b", "  "]])
    job = job_dict(mock_server.base_url, source, tmp_path / "out.csv")
    first = run_job(job, tmp_path)
    checkpoint = tmp_path / "out.ckpt"
    size = checkpoint.stat().st_size
    second = run_job(job, tmp_path)
    assert first.failed_rows == second.failed_rows == 1
    assert checkpoint.stat().st_size == size
    frame = pd.read_csv(tmp_path / "out.csv")
    assert frame["error"][1].startswith("prompt is empty")
    assert sum(sent_prompts(mock_server).values()) == 1


def test_a_base_url_without_v1_names_the_url_and_the_fix(tmp_path: Path,
                                                         mock_server: MockServer) -> None:
    source = prompts_csv(tmp_path, 40)
    base = mock_server.base_url.removesuffix("/v1") + "/api"
    job = write_job(tmp_path / "job.yaml", job_dict(base, source, tmp_path / "out.csv"))
    result = invoke("run", str(job), "--quiet")
    assert result.exit_code == 3
    assert f"{base}/chat/completions answered 404" in result.stderr
    assert f"{base}/v1" in result.stderr
    assert mock_server.stats.snapshot()["requests_total"] <= 10


# -- types that survive a round trip ---------------------------------------------------------

def test_csv_columns_come_back_typed_as_read_csv_types_them(tmp_path: Path,
                                                            mock_server: MockServer) -> None:
    source = write_csv(tmp_path / "in.csv", ["id", "text", "price", "code"],
                       [[1, "one", "1.5", "007"], [2, "two", "", "010"], [3, "three", "2", "3"]])
    for suffix in (".parquet", ".jsonl", ".csv"):
        output = tmp_path / f"out{suffix}"
        run_job(job_dict(mock_server.base_url, source, output), tmp_path)
        results = (pd.read_parquet(output) if suffix == ".parquet" else
                   pd.read_json(output, lines=True, dtype=False) if suffix == ".jsonl" else
                   pd.read_csv(output, dtype={"code": str}))
        merged = results.merge(pd.read_csv(source, dtype={"code": str}), on="id")
        assert len(merged) == 3, suffix
        assert results["price"].dtype == "float64", suffix
        assert list(results["code"]) == ["007", "010", "3"], suffix


def test_csv_output_quotes_only_what_needs_quotes(tmp_path: Path,
                                                  mock_server: MockServer) -> None:
    source = write_csv(tmp_path / "in.csv", ["id", "text"], [["a", "plain"], ["b", "x, y"]])
    output = tmp_path / "out.csv"
    run_job(job_dict(mock_server.base_url, source, output), tmp_path)
    lines = output.read_text().splitlines()
    assert lines[0].startswith("id,text,reply,")
    assert lines[1].startswith("a,plain,")
    assert lines[2].startswith('b,"x, y",')


def test_parquet_output_keeps_pandas_dtypes(tmp_path: Path, mock_server: MockServer) -> None:
    frame = pd.DataFrame({"id": ["a", "b"], "text": ["one", "two"],
                          "count": pd.Series([1, None], dtype="Int64")})
    source = tmp_path / "in.parquet"
    frame.to_parquet(source)
    output = tmp_path / "out.parquet"
    run_job(job_dict(mock_server.base_url, source, output), tmp_path)
    results = pd.read_parquet(output)
    assert str(results["count"].dtype) == "Int64"
    assert str(results["prompt_tokens"].dtype) == "Int64"


@pytest.mark.parametrize("prompt", [{"column": "text"}, {"column": None, "template": "Say {text}"}])
def test_a_missing_cell_is_one_rule_for_column_and_template(tmp_path: Path,
                                                            mock_server: MockServer,
                                                            prompt: dict[str, Any]) -> None:
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["hello", None]}), source)
    output = tmp_path / "out.parquet"
    job = job_dict(mock_server.base_url, source, output, prompt=prompt)
    assert run_job(job, tmp_path).failed_rows == 1
    results = pd.read_parquet(output)
    assert results["error"][1].startswith("prompt is empty: column 'text' is null or blank")
    assert sum(sent_prompts(mock_server).values()) == 1


def test_missing_empty_renders_a_null_cell_as_empty_text(tmp_path: Path,
                                                         mock_server: MockServer) -> None:
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["hello", None]}), source)
    prompt = {"column": None, "template": "Say {text}!", "missing": "empty"}
    run_job(job_dict(mock_server.base_url, source, tmp_path / "out.csv", prompt=prompt), tmp_path)
    assert set(sent_prompts(mock_server)) == {"Say hello!", "Say !"}


def test_nested_jsonl_values_render_as_json(tmp_path: Path, mock_server: MockServer) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": 1, "meta": {"lang": "en", "tags": ["a"]}}\n')
    prompt = {"column": None, "template": "Meta: {meta}"}
    run_job(job_dict(mock_server.base_url, source, tmp_path / "out.csv", prompt=prompt), tmp_path)
    assert list(sent_prompts(mock_server)) == ['Meta: {"lang":"en","tags":["a"]}']


# -- files a user keeps ----------------------------------------------------------------------

def test_a_limited_run_never_replaces_a_fuller_results_file(tmp_path: Path,
                                                            mock_server: MockServer) -> None:
    source = prompts_csv(tmp_path, 6)
    output = tmp_path / "out.csv"
    job = write_job(tmp_path / "job.yaml", job_dict(mock_server.base_url, source, output))
    assert invoke("run", str(job), "--quiet").exit_code == 0
    full = output.read_bytes()
    result = invoke("run", str(job), "--quiet", "--limit", "2")
    assert result.exit_code == 0
    sample = tmp_path / "out.limit-2.csv"
    assert output.read_bytes() == full
    assert len(pd.read_csv(sample)) == 2
    assert str(sample) in result.stdout
    # The full results are still up to date afterwards: the next full run leaves them.
    assert "already up to date" in invoke("run", str(job), "--quiet").stdout


def test_a_rerun_with_nothing_to_send_leaves_the_results_alone(tmp_path: Path,
                                                               mock_server: MockServer) -> None:
    source = prompts_csv(tmp_path, 4)
    output = tmp_path / "out.csv"
    job = job_dict(mock_server.base_url, source, output)
    run_job(job, tmp_path)
    before = output.stat()
    run_job(job, tmp_path)
    after = output.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    # ... but one the user removed or replaced is written again.
    output.unlink()
    run_job(job, tmp_path)
    assert len(pd.read_csv(output)) == 4
    output.write_text("edited\n")
    run_job(job, tmp_path)
    assert len(pd.read_csv(output)) == 4


# -- inputs people actually have -------------------------------------------------------------

def test_a_semicolon_csv_is_sniffed(tmp_path: Path, mock_server: MockServer) -> None:
    source = tmp_path / "in.csv"
    source.write_text("id;text;price\n1;hello;1,5\n2;bye;2\n", encoding="utf-8")
    output = tmp_path / "out.csv"
    assert run_job(job_dict(mock_server.base_url, source, output), tmp_path).exit_code == 0
    assert set(sent_prompts(mock_server)) == {"hello", "bye"}
    assert list(pd.read_csv(output)["price"].astype(str)) == ["1,5", "2"]


def test_a_wrong_delimiter_gets_a_hint(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_text("id;text\n1;hello\n", encoding="utf-8")
    job_data = job_dict("http://127.0.0.1:9/v1", source, tmp_path / "out.csv")
    job_data["input"]["delimiter"] = ","
    result = invoke("validate", str(write_job(tmp_path / "job.yaml", job_data)))
    assert result.exit_code == 2
    assert "set input.delimiter: ';'" in result.stderr


@pytest.mark.parametrize("suffix", [".csv.gz", ".jsonl.gz", ".csv.zst", ".jsonl.bz2"])
def test_compressed_inputs_are_read(tmp_path: Path, mock_server: MockServer, suffix: str) -> None:
    if suffix.startswith(".csv"):
        raw = b"id,text\n1,hello\n2,bye\n"
    else:
        raw = b'{"id": 1, "text": "hello"}\n{"id": 2, "text": "bye"}\n'
    codec = {"gz": "gzip", "zst": "zstd", "bz2": "bz2"}[suffix.rsplit(".", 1)[1]]
    data = (gzip.compress(raw) if codec == "gzip" else bz2.compress(raw) if codec == "bz2"
            else pa.compress(raw, codec=codec, asbytes=True))
    source = tmp_path / f"in{suffix}"
    source.write_bytes(data)
    output = tmp_path / "out.csv"
    assert run_job(job_dict(mock_server.base_url, source, output), tmp_path).exit_code == 0
    assert list(pd.read_csv(output)["reply"]) == [reply_for("hello"), reply_for("bye")]


def test_a_corrupt_compressed_input_is_exit_2(tmp_path: Path) -> None:
    source = tmp_path / "in.csv.gz"
    source.write_bytes(b"not gzip at all")
    job = write_job(tmp_path / "job.yaml",
                    job_dict("http://127.0.0.1:9/v1", source, tmp_path / "out.csv"))
    result = invoke("validate", str(job))
    assert result.exit_code == 2
    assert "cannot decompress the input as gzip" in result.stderr


# -- the README tells the truth --------------------------------------------------------------

def test_the_readme_lists_the_result_columns_in_file_order() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Results", 1)[1].split("\n## ", 1)[0]
    listed = [name for row in re.findall(r"^\| (`[^|]+`) \|", section, flags=re.M)
              for name in re.findall(r"`([a-z_]+)`", row)]
    # ... then the columns only some jobs have (``replies`` when params.n > 1).
    assert tuple(listed) == (*RESULT_COLUMNS, *OPTIONAL_COLUMNS)


def test_dry_run_fresh_counts_every_row_and_gives_no_fresh_advice(tmp_path: Path,
                                                                 mock_server: MockServer) -> None:
    source = prompts_csv(tmp_path, 4)
    job = write_job(tmp_path / "job.yaml", job_dict(mock_server.base_url, source,
                                                    tmp_path / "out.csv"))
    # A checkpoint of another job (a file that is no checkpoint at all is never
    # replaced, not even with --fresh: issue 9).
    (tmp_path / "out.ckpt").write_text('{"batcher_checkpoint":1,"fingerprint":"other"}\n')
    plain = invoke("run", str(job), "--dry-run")
    assert "--fresh" in plain.stdout  # the run would stop on it: the way on is --fresh
    fresh = invoke("run", str(job), "--dry-run", "--fresh")
    assert fresh.exit_code == 0
    assert "4 rows (4 to send, 0 reused from the checkpoint)" in fresh.stdout
    assert "--fresh" not in fresh.stdout


def test_an_identical_dataframe_call_pays_once(mock_server: MockServer) -> None:
    import batcher

    frame = pd.DataFrame({"text": ["one", "two", "three"]})
    settings: dict[str, Any] = {"model": "gpt-4o-mini", "prompt_column": "text",
                "base_url": mock_server.base_url, "api_key": TEST_KEY, "progress": False}
    first = batcher.run_dataframe(frame, **settings)
    second = batcher.run_dataframe(frame, **settings)
    assert list(first["reply"]) == list(second["reply"])
    assert second.attrs["batcher"]["requests"] == 0
    assert mock_server.stats.snapshot()["requests_total"] == 3


def test_a_kernel_without_ipywidgets_gets_the_text_bar_and_no_warning(tmp_path: Path) -> None:
    """tqdm.auto warns "IProgress not found" there; batcher picks the text bar itself."""
    script = tmp_path / "kernel.py"
    script.write_text(
        "import sys, types, warnings\n"
        "warnings.simplefilter('error')\n"
        "fake = types.ModuleType('IPython')\n"
        "fake.get_ipython = lambda: types.SimpleNamespace(config={'IPKernelApp': {}})\n"
        "sys.modules['IPython'] = fake\n"
        "sys.modules['ipywidgets'] = None  # not installed\n"
        "import batcher\n"
        "from batcher.progress import _bar_class\n"
        "print(_bar_class().__module__)\n")
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "tqdm.std" and done.stderr == ""


def test_advice_to_start_over_names_fresh_true_in_python_and_the_flag_in_a_shell(
        tmp_path: Path, mock_server: MockServer) -> None:
    import batcher

    source = prompts_csv(tmp_path, 3)
    checkpoint = tmp_path / "out.ckpt"
    job = write_job(tmp_path / "job.yaml", job_dict(mock_server.base_url, source,
                                                    tmp_path / "out.csv"))
    assert invoke("run", str(job), "--quiet").exit_code == 0
    # A newer batcher's checkpoint: the way on is to start over.
    lines = checkpoint.read_bytes().split(b"\n", 1)
    header = json.loads(lines[0])
    header["batcher_checkpoint"] += 1
    checkpoint.write_bytes(json.dumps(header).encode() + b"\n" + lines[1])
    shell = invoke("run", str(job), "--quiet")
    assert shell.exit_code == 2 and "run with --fresh" in shell.stderr
    with pytest.raises(batcher.CheckpointError) as caught:
        batcher.run(job, progress=False, api_key=TEST_KEY)
    assert "run with fresh=True" in str(caught.value) and "--fresh" not in str(caught.value)


def test_a_fresh_rerun_writes_the_results_again(tmp_path: Path, mock_server: MockServer) -> None:
    """A --fresh run may journal as many bytes as the first (the mock's replies are
    deterministic): the results are still written from the new journal."""
    source = prompts_csv(tmp_path, 4)
    output = tmp_path / "out.csv"
    job = job_dict(mock_server.base_url, source, output)
    run_job(job, tmp_path)
    before = output.stat()
    run_job(job, tmp_path, fresh=True)
    after = output.stat()
    assert (after.st_ino, after.st_mtime_ns) != (before.st_ino, before.st_mtime_ns)
