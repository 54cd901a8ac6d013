"""Property-based attacks on the edges of the input CSV and the job YAML.

* Any CSV that Python's own ``csv`` module writes (unicode, commas, quotes,
  CR/LF inside values, a BOM, null-looking strings) is read back exactly:
  every row gets one result row, its input columns unchanged, and the reply
  the mock gives for exactly that row's prompt.
* Garbled CSV bytes are either a usable input or a ``DataError``: never a
  traceback, never a run that loses or invents rows.
* Any mutation of a valid job (wrong types, unknown keys, negative or
  non-finite numbers, missing keys) is either a valid job or a
  ``ConfigError`` whose one-line message names the key.

Runs go in-process (``arun_job``) against one mock server per module.
"""

from __future__ import annotations

import csv
import io
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import TEST_KEY, job_dict, read_rows, run_job, write_job
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from batcher.errors import ConfigError, DataError
from batcher.jobload import load_job
from batcher.mock_server import MockConfig, MockServer, reply_for
from batcher.online.runner import prepare
from batcher.records import RESULT_COLUMNS

PROPERTY_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def server() -> Iterator[MockServer]:
    with MockServer(MockConfig(api_key=TEST_KEY)) as mock:
        yield mock


# -- CSV round trip ------------------------------------------------------------------------

def as_cell_text(value: Any) -> str:
    """A results value as the CSV cell it was read from (a blank cell is null)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    kind = pa.float64() if isinstance(value, float) else pa.int64()
    return str(pc.cast(pa.array([value], kind), pa.string())[0])


NASTY = ["", " ", "  \t ", "NA", "N/A", "null", "NULL", "None", "nan", "NaN", "#N/A", "true",
         "0", "-1.5e10", ",", '"', '""', "'", "a,b", 'say "hi"', "\n", "\r\n", "\r", "x\ny",
         "line1\r\nline2", "{text}", "{{", "}", "\\", "\\n", "\ufeff", "é", "日本語", "🙂",
         "\u200b", "\u2028", " leading", "trailing ", "\t"]

cell_text = st.one_of(
    st.sampled_from(NASTY),
    st.text(alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
            max_size=30),
    st.lists(st.sampled_from(NASTY), min_size=1, max_size=4).map("".join),
)
# Column names: unique, non-empty, and not the name of a results column.
column_name = st.one_of(
    st.sampled_from(["text", "body", "Text", " spaced ", "a,b", 'q"uote', "日本", "col\nnl",
                     "🙂", "x y"]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=12),
).filter(lambda name: name.strip() != "" and name not in RESULT_COLUMNS and name != "id"
         and "{" not in name and "}" not in name and "[" not in name and "]" not in name
         and "." not in name)


@st.composite
def csv_inputs(draw: st.DrawFn) -> tuple[list[str], list[list[str]], str]:
    """A header (id, the prompt column, an extra column), rows, and the prompt column."""
    prompt_col = draw(column_name)
    extra_col = draw(column_name.filter(lambda name: name != prompt_col))
    count = draw(st.integers(min_value=1, max_value=12))
    rows = [[f"id-{i}", draw(cell_text), draw(cell_text)] for i in range(count)]
    return ["id", prompt_col, extra_col], rows, prompt_col


@PROPERTY_SETTINGS
@given(data=csv_inputs(), out_suffix=st.sampled_from([".csv", ".parquet", ".jsonl"]),
       terminator=st.sampled_from(["\r\n", "\n"]), bom=st.booleans(),
       use_template=st.booleans())
@example(data=(["id", "text", "note"], [["id-0", "a,\"b\"\r\nc", "NA"], ["id-1", "", "x"]],
               "text"), out_suffix=".csv", terminator="\r\n", bom=True, use_template=False)
def test_any_csv_round_trips_row_for_row(server: MockServer,
                                         data: tuple[list[str], list[list[str]], str],
                                         out_suffix: str, terminator: str, bom: bool,
                                         use_template: bool) -> None:
    header, rows, prompt_col = data
    assume(not any("[[fault:" in cell for row in rows for cell in row))
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        buffer = io.StringIO(newline="")
        # Python's writer quotes CR/LF only when they are in its line terminator.
        writer = csv.writer(buffer, lineterminator=terminator,
                            quoting=csv.QUOTE_MINIMAL if terminator == "\r\n" else csv.QUOTE_ALL)
        writer.writerow(header)
        writer.writerows(rows)
        source = base / "in.csv"
        source.write_bytes((("\ufeff" if bom else "") + buffer.getvalue()).encode("utf-8"))
        output = base / f"out{out_suffix}"
        # A template field is a format field: "!"/":" start a conversion or a spec, and
        # an all-digit name is positional (see test_a_digit_column_name_in_a_template).
        use_template = use_template and not (set(prompt_col) & set("!:")
                                             or prompt_col.isdigit())
        prompt = ({"template": "{" + prompt_col + "}"} if use_template
                  else {"column": prompt_col})
        job_data = job_dict(server.base_url, source, output)
        job_data["prompt"] = prompt
        job = write_job(base / "job.yaml", job_data)
        report = run_job(job)

        results = read_rows(output)
        assert report.rows == len(rows) == len(results)
        for row, result in zip(rows, results, strict=True):
            # Input columns come back unchanged, in input order: as the same text, or as
            # the number that text is (a CSV column of numbers only is typed, issue 12).
            assert [as_cell_text(result[name]) for name in header] == row
            text = row[1]
            if text.strip():
                assert result["status"] == "ok", result
                assert result["reply"] == reply_for(text)
            else:
                assert result["status"] == "error"
                assert result["attempts"] in (0, "0")
        assert report.exit_code == (1 if any(not row[1].strip() for row in rows) else 0)


# -- garbled CSV bytes ---------------------------------------------------------------------

VALID_CSV = (b'id,text\r\nr0,"hello, world"\r\nr1,"say ""hi"""\r\nr2,plain\r\n'
             b'r3,"multi\nline"\r\nr4,caf\xc3\xa9\r\n')
GARBAGE = [b'"', b",", b"\n", b"\r", b"\r\n", b"\xff", b"\xc3", b"\x00", b'""', b"\xef\xbb\xbf",
           b"r0", b" ", b";", b"\t"]


@st.composite
def garbled_csv(draw: st.DrawFn) -> bytes:
    data = bytearray(VALID_CSV)
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        position = draw(st.integers(min_value=0, max_value=len(data)))
        if draw(st.booleans()) and len(data) > 1:
            end = min(len(data), position + draw(st.integers(min_value=1, max_value=4)))
            del data[position:end]
        else:
            data[position:position] = draw(st.one_of(st.sampled_from(GARBAGE),
                                                      st.binary(min_size=1, max_size=3)))
    return bytes(data)


@PROPERTY_SETTINGS
@given(content=st.one_of(garbled_csv(), st.binary(max_size=60),
                         st.binary(max_size=60).map(lambda tail: b"id,text\n" + tail)))
@example(content=b"id,text\na,one\nb,two,three\n")
@example(content=b"id,text\na,caf\xe9\n")
@example(content=b'id,text\na,"unterminated\n')
@example(content=b"id,text\n")
@example(content=b"\n\n\n")
def test_garbled_csv_is_usable_or_a_data_error(server: MockServer, content: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        source = base / "in.csv"
        source.write_bytes(content)
        output = base / "out.parquet"
        job_path = write_job(base / "job.yaml", job_dict(server.base_url, source, output))
        before = server.stats.snapshot()["requests_total"]
        try:
            prepared = prepare(load_job(job_path))
        except DataError as error:
            message = str(error)
            # One line, except for a column name that itself holds a line break
            # (see test_a_column_name_with_a_line_break_gives_a_one_line_error).
            header_names = next(csv.reader(io.StringIO(content.decode("utf-8", "replace"),
                                                       newline="")), [])
            if not any("\n" in name or "\r" in name for name in header_names):
                assert "\n" not in message, message
            assert message.startswith(f"{source}: "), message
            assert not output.exists()
            return
        # Accepted: the whole job must then run, one result row per input row.
        try:
            report = run_job(job_path)
        except DataError as error:  # found only while sending: then nothing may be lost
            raise AssertionError(f"input accepted by prepare() failed mid-run: {error}"
                                 ) from None
        assert report.rows == prepared.rows
        table = pq.read_table(output)
        assert table.num_rows == prepared.rows
        assert len(set(table.column("id").to_pylist())) == prepared.rows
        sent = server.stats.snapshot()["requests_total"] - before
        assert sent <= prepared.rows * 4  # max_attempts is 4 in job_dict


# -- job YAML mutations --------------------------------------------------------------------

# Every key of a valid job, by dotted path; sections first.
SECTIONS = ["input", "prompt", "endpoint", "limits", "retry", "output"]
LEAVES = ["name", "model", "params", "input.path", "input.id_column", "prompt.column",
          "prompt.system", "endpoint.base_url", "endpoint.api_key_env", "endpoint.timeout_s",
          "endpoint.allow_insecure_http", "limits.concurrency", "limits.requests_per_minute",
          "limits.tokens_per_minute", "retry.max_attempts", "retry.base_delay_s",
          "retry.max_delay_s", "retry.stop_after_identical_failures", "output.path",
          "output.checkpoint"]
NUMERIC = ["endpoint.timeout_s", "limits.concurrency", "limits.requests_per_minute",
           "limits.tokens_per_minute", "retry.max_attempts", "retry.base_delay_s",
           "retry.max_delay_s", "retry.stop_after_identical_failures"]

wrong_values = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**12, max_value=0),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.lists(st.integers(), max_size=2),
    st.dictionaries(st.sampled_from(["a", "path", "x"]), st.integers(), max_size=2),
)
identifier = st.from_regex(r"[a-z][a-z_]{0,10}", fullmatch=True)


def base_job(folder: Path) -> dict[str, Any]:
    source = folder / "in.csv"
    source.write_text("id,text\na,hello\n", encoding="utf-8")
    job = job_dict("http://127.0.0.1:9/v1", source, folder / "out.csv")
    job["limits"].update({"requests_per_minute": 100, "tokens_per_minute": 10000})
    job["output"]["checkpoint"] = str(folder / "out.ckpt")
    return job


def _parent(job: dict[str, Any], dotted: str) -> tuple[dict[str, Any], str]:
    *sections, leaf = dotted.split(".")
    node = job
    for section in sections:
        node = node[section]
    return node, leaf


@st.composite
def mutations(draw: st.DrawFn) -> tuple[str, str, Any]:
    kind = draw(st.sampled_from(["set", "set", "negative", "delete", "unknown"]))
    if kind == "negative":
        dotted = draw(st.sampled_from(NUMERIC))
        value: Any = draw(st.one_of(st.integers(max_value=0), st.floats(max_value=0),
                                    st.sampled_from([-1, 0, -0.0, -1e-9, float("-inf")])))
        return "set", dotted, value
    if kind == "unknown":
        section = draw(st.sampled_from(["", *SECTIONS]))
        name = draw(identifier)
        return kind, f"{section}.{name}" if section else name, draw(wrong_values)
    dotted = draw(st.sampled_from(LEAVES + SECTIONS))
    return kind, dotted, draw(wrong_values)


def _applies(job: dict[str, Any], kind: str, dotted: str) -> bool:
    if kind != "unknown":
        return True
    parent, leaf = _parent(job, dotted)
    return leaf not in parent  # an "unknown" key that happens to exist is no mutation


@PROPERTY_SETTINGS
@given(mutation=mutations())
@example(mutation=("set", "limits.concurrency", -3))
@example(mutation=("set", "retry.max_attempts", "3"))
@example(mutation=("set", "endpoint.timeout_s", True))
@example(mutation=("unknown", "retry.max_retries", 3))
@example(mutation=("unknown", "endpoint.timeout", 3))
@example(mutation=("delete", "model", None))
@example(mutation=("set", "limits", [1, 2]))
def test_job_mutations_are_valid_or_one_line_config_errors(mutation: tuple[str, str, Any]
                                                          ) -> None:
    kind, dotted, value = mutation
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        job = base_job(base)
        assume(_applies(job, kind, dotted))
        parent, leaf = _parent(job, dotted)
        if kind == "delete":
            parent.pop(leaf, None)
        else:
            parent[leaf] = value
        job_path = write_job(base / "job.yaml", job)
        try:
            loaded = load_job(job_path)
        except ConfigError as error:
            message = str(error)
            assert "\n" not in message, message
            assert message.startswith(f"{job_path}: "), message
            # The message names the key at fault (or, for "one of" rules, the section
            # that holds it, spelling out the key).
            assert dotted in message, message
            return
        except Exception as error:  # any other exception is a bug
            raise AssertionError(f"{type(error).__name__} instead of ConfigError: {error}"
                                 ) from None
        # Accepted: every number it carries must make sense for a run.
        for key in NUMERIC:
            section, leaf_name = key.split(".")
            number = getattr(getattr(loaded, section), leaf_name)
            if number is not None:
                assert number > 0, (key, number)


@pytest.mark.parametrize("dotted", ["endpoint.timeout_s", "retry.max_delay_s",
                                    "limits.requests_per_minute"])
def test_infinite_numbers_are_refused(tmp_path: Path, dotted: str) -> None:
    job = base_job(tmp_path)
    parent, leaf = _parent(job, dotted)
    parent[leaf] = math.inf
    job_path = write_job(tmp_path / "job.yaml", job)
    with pytest.raises(ConfigError, match=dotted.replace(".", r"\.")):
        load_job(job_path)


yaml_text = st.one_of(
    st.text(max_size=80),
    st.lists(st.sampled_from(["name: x\n", "input:\n", "  path: in.csv\n", "- a\n", "{", "}",
                              "[", "]", ": ", "&a ", "*a ", "!!binary ", "!!python/object ",
                              "'", '"', "\t", "? ", "--- ", "...\n", "%YAML 1.1\n", "#", "|\n",
                              ">\n", "  ", "\n", "model: 1\n", "2024-01-01", "0x1F", ".inf",
                              "~", "yes", "<<: *a\n"]),
             max_size=20).map("".join),
)


@PROPERTY_SETTINGS
@given(text=yaml_text)
@example(text="input: [unclosed\n")
@example(text="a: &a {b: 1}\nc: *a\n")
@example(text="!!python/object/apply:os.system ['true']\n")
@example(text="%YAML 9.9\n---\nname: x\n")
@example(text="\ufeffname: x\n")
@example(text="{1: 2}")
@example(text="name: !!binary aGVsbG8=\n")
def test_arbitrary_job_text_never_raises_anything_but_config_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        job_path = Path(folder) / "job.yaml"
        job_path.write_text(text, encoding="utf-8")
        try:
            load_job(job_path)
        except ConfigError as error:
            assert "\n" not in str(error), str(error)
        except Exception as error:
            raise AssertionError(f"{type(error).__name__}: {error}") from None


def test_deeply_nested_yaml_is_a_config_error(tmp_path: Path) -> None:
    job_path = tmp_path / "job.yaml"
    job_path.write_text("name: " + "[" * 5000 + "]" * 5000 + "\n", encoding="utf-8")
    with pytest.raises(ConfigError):
        load_job(job_path)


def test_yaml_mapping_keys_that_are_not_strings(tmp_path: Path) -> None:
    job = base_job(tmp_path)
    text = yaml.safe_dump(job, sort_keys=False) + "1: x\nnull: y\ntrue: z\n"
    job_path = tmp_path / "job.yaml"
    job_path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"job\.yaml: 1: ") as caught:
        load_job(job_path)
    assert "\n" not in str(caught.value)


def test_a_record_batch_is_what_the_runner_reads(tmp_path: Path) -> None:
    """Guard for the round-trip property: the CSV reader really yields text columns."""
    source = tmp_path / "in.csv"
    source.write_text('id,text\n1,"007"\n2,NA\n', encoding="utf-8")
    job = write_job(tmp_path / "job.yaml",
                    job_dict("http://127.0.0.1:9/v1", source, tmp_path / "out.csv"))
    prepared = prepare(load_job(job))
    batch = next(prepared.reader.batches())
    assert batch.schema.field("text").type == pa.string()
    assert batch.column("text").to_pylist() == ["007", "NA"]


def test_a_digit_column_name_in_a_template(tmp_path: Path, server: MockServer) -> None:
    source = tmp_path / "in.csv"
    source.write_text("id,0,1\na,hello,x\nb,world,y\n", encoding="utf-8")
    job_data = job_dict(server.base_url, source, tmp_path / "out.jsonl")
    job_data["prompt"] = {"template": "Say {0}"}
    job_path = write_job(tmp_path / "job.yaml", job_data)
    try:
        report = run_job(job_path)
    except (ConfigError, DataError):
        return  # refused up front, before anything was sent: acceptable
    assert report.exit_code == 0
    replies = [row["reply"] for row in read_rows(tmp_path / "out.jsonl")]
    assert replies == [reply_for("Say hello"), reply_for("Say world")]


def test_a_column_name_with_a_line_break_gives_a_one_line_error(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_bytes(b'"id\nx",text\na,hello\n')
    job_path = write_job(tmp_path / "job.yaml",
                         job_dict("http://127.0.0.1:9/v1", source, tmp_path / "out.csv"))
    with pytest.raises(DataError) as caught:
        prepare(load_job(job_path))
    assert "\n" not in str(caught.value), str(caught.value)
