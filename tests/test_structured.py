"""Answers as data (issue 15): a JSON Schema in the job, typed result columns out.

The pure reply check is tested on its own; everything else runs over HTTP
against the mock server, which answers in the schema's shape and breaks
its answers on request (``[[fault:bad_json]]``, ``truncated_json``,
``schema_violation``, ``null_content_refusal``).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import TEST_KEY, job_dict, write_csv, write_job
from pydantic import BaseModel, ConfigDict

import batcher
from batcher.cli import main
from batcher.errors import ConfigError, DataError, RunAborted
from batcher.jobload import job_from_dict
from batcher.jobs import arun_job
from batcher.mock_server import MockConfig, MockServer
from batcher.mock_server.instances import instance_for, rng_for
from batcher.online.runner import RunOptions, RunReport
from batcher.records import RESULT_COLUMNS
from batcher.structured import ParsedReply, ProblemKind, ReplyProblem, ReplySchema, SchemaMode

ENV = {"BATCHER_TEST_KEY": TEST_KEY}

LABEL_SCHEMA: dict[str, Any] = {
    "title": "review label",
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["positive", "neutral", "negative"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["label", "confidence"],
    "additionalProperties": False,
}

WIDE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "$defs": {"Address": {"type": "object",
                          "properties": {"city": {"type": "string"},
                                         "zip": {"type": ["integer", "null"]}},
                          "required": ["city", "zip"], "additionalProperties": False}},
    "properties": {
        "label": {"type": "string", "enum": ["a", "b", "c"]},
        "score": {"type": "number"},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "flag": {"type": "boolean"},
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "address": {"$ref": "#/$defs/Address"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "extra": {"type": "object"},  # open: kept as JSON text
    },
    "required": ["label", "score", "count", "flag", "note", "address", "tags", "extra"],
    "additionalProperties": False,
}


def label_schema(mode: SchemaMode = SchemaMode.JSON_SCHEMA) -> ReplySchema:
    return ReplySchema(LABEL_SCHEMA, mode)


# -- the pure check (shared with the Batch API mode) ----------------------------------------


def test_a_valid_reply_gives_its_values() -> None:
    verdict = label_schema().check('{"label": "neutral", "confidence": 0.5}', "stop", None)
    assert verdict == ParsedReply({"label": "neutral", "confidence": 0.5})


def test_a_fenced_reply_is_read_inside_its_fence() -> None:
    reply = '```json\n{"label": "negative", "confidence": 1}\n```'
    assert label_schema().check(reply, "stop", None) == ParsedReply(
        {"label": "negative", "confidence": 1})


def test_broken_json_names_the_position() -> None:
    verdict = label_schema().check("{'label': 'neutral'}", "stop", None)
    assert isinstance(verdict, ReplyProblem) and verdict.kind is ProblemKind.NOT_JSON
    assert "line 1 column 2 (char 1)" in verdict.message and verdict.retryable


def test_prose_and_empty_replies_are_not_json() -> None:
    for reply in ("The label is positive.", "", None):
        verdict = label_schema().check(reply, "stop", None)
        assert isinstance(verdict, ReplyProblem) and verdict.kind is ProblemKind.NOT_JSON


def test_a_schema_violation_names_the_path_and_the_rule() -> None:
    verdict = label_schema().check('{"label": "great", "confidence": 0.5}', "stop", None)
    assert isinstance(verdict, ReplyProblem) and verdict.kind is ProblemKind.SCHEMA
    assert "at $.label" in verdict.message and "properties.label.enum" in verdict.message
    missing = label_schema().check('{"label": "neutral"}', "stop", None)
    assert isinstance(missing, ReplyProblem) and "'confidence' is a required property" in (
        missing.message)
    bounds = label_schema().check('{"label": "neutral", "confidence": 7}', "stop", None)
    assert isinstance(bounds, ReplyProblem) and "properties.confidence.maximum" in bounds.message


def test_a_cut_off_reply_is_truncated_not_just_broken() -> None:
    verdict = label_schema().check('{"label": "neutral", "confidence": 0.', "length", None)
    assert isinstance(verdict, ReplyProblem) and verdict.kind is ProblemKind.TRUNCATED
    assert "finish_reason length" in verdict.message and "(char 37)" in verdict.message  # the end
    assert verdict.retryable


def test_complete_json_at_the_token_cap_is_accepted() -> None:
    # A closed object cannot have been cut: the cap was reached exactly at its end.
    verdict = label_schema().check('{"label": "neutral", "confidence": 0.5}', "length", None)
    assert isinstance(verdict, ParsedReply)


def test_a_refusal_is_its_own_kind_and_not_retried() -> None:
    verdict = label_schema().check(None, "stop", "I can't help with that.")
    assert isinstance(verdict, ReplyProblem) and verdict.kind is ProblemKind.REFUSAL
    assert not verdict.retryable and "I can't help with that." in verdict.message
    filtered = label_schema().check(None, "content_filter", None)
    assert isinstance(filtered, ReplyProblem) and filtered.kind is ProblemKind.REFUSAL


def test_the_first_valid_choice_wins() -> None:
    schema = label_schema()
    verdict = schema.check_choices([("nope", "stop", None),
                                    ('{"label": "positive", "confidence": 0.9}', "stop", None)])
    assert verdict == (1, ParsedReply({"label": "positive", "confidence": 0.9}))
    none = schema.check_choices([("nope", "stop", None), ("{", "length", None)])
    assert isinstance(none, ReplyProblem) and none.kind is ProblemKind.NOT_JSON
    assert none.message.startswith("none of the 2 choices is valid")


# -- what is sent ------------------------------------------------------------------------------


def test_response_format_per_dialect() -> None:
    assert label_schema().response_format() == {
        "type": "json_schema",
        "json_schema": {"name": "review_label", "schema": LABEL_SCHEMA, "strict": True}}
    assert label_schema(SchemaMode.JSON_OBJECT).response_format() == {
        "type": "json_object", "schema": LABEL_SCHEMA}
    prompt = label_schema(SchemaMode.PROMPT)
    assert prompt.response_format() is None
    instruction = prompt.instruction()
    assert instruction is not None and '"confidence"' in instruction
    assert label_schema().instruction() is None


def test_strict_only_when_the_schema_qualifies() -> None:
    loose = {**LABEL_SCHEMA, "required": ["label"]}
    schema = ReplySchema(loose)
    assert not schema.strict
    assert schema.strict_problem == "$.confidence is not listed in required"
    assert schema.response_format()["json_schema"]["strict"] is False  # type: ignore[index]
    assert schema.response_format()["json_schema"]["schema"] == loose  # type: ignore[index]
    open_object = ReplySchema({**LABEL_SCHEMA, "additionalProperties": True})
    assert open_object.strict_problem == "$ does not set additionalProperties: false"


def test_a_job_s_own_response_format_wins() -> None:
    own = {"temperature": 0, "response_format": {"type": "json_object"}}
    assert label_schema().request_params(own) == own
    added = label_schema().request_params({"temperature": 0})
    assert added["response_format"]["type"] == "json_schema"


# -- the job file ------------------------------------------------------------------------------


def load(job: dict[str, Any], base: Path) -> Any:
    return job_from_dict(job, base_dir=base, source="job.yaml", require_output=True)


def labelled_job(base_url: str, folder: Path, output: str = "out.parquet",
                 rows: list[list[Any]] | None = None, **output_keys: Any) -> dict[str, Any]:
    source = write_csv(folder / "in.csv", ["id", "text"], rows or [
        [f"r{i}", f"Review number {i}."] for i in range(6)])
    job = job_dict(base_url, source, folder / output)
    job["output"] = {"path": str(folder / output), "schema": LABEL_SCHEMA, **output_keys}
    return job


def test_schema_from_a_json_file_beside_the_job(tmp_path: Path) -> None:
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "label.json").write_text(json.dumps(LABEL_SCHEMA))
    job = labelled_job("http://127.0.0.1:9/v1", tmp_path)
    job["output"]["schema"] = "schemas/label.json"
    loaded = load(job, tmp_path)
    assert loaded.output.reply_schema.schema == LABEL_SCHEMA


@pytest.mark.parametrize(("schema", "message"), [
    ("missing.json", "missing.json: file not found"),
    ({"type": "object", "properties": {"a": {"type": "strin"}}},
     "output.schema: not a valid JSON Schema at properties.a.type"),
    ({"type": "array", "items": {"type": "string"}},
     'output.schema: the top level must be {"type": "object"'),
    ({"type": "object", "properties": {"status": {"type": "string"}}},
     "output.schema: property 'status' would be the column 'status'"),
    (["not", "a", "schema"], "output.schema: must be a mapping of keys"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/Nowhere"}}},
     "output.schema: properties.a.$ref: '#/$defs/Nowhere' points at nothing in the schema"),
    ({"type": "object", "properties": {"a": {"$ref": "https://example.org/s.json"}}},
     "output.schema: properties.a.$ref: 'https://example.org/s.json' is outside the schema"),
])
def test_a_bad_schema_is_a_config_error(tmp_path: Path, schema: Any, message: str) -> None:
    job = labelled_job("http://127.0.0.1:9/v1", tmp_path)
    job["output"]["schema"] = schema
    with pytest.raises(ConfigError) as caught:
        load(job, tmp_path)
    assert message in str(caught.value)


def test_a_schema_file_that_is_not_json(tmp_path: Path) -> None:
    (tmp_path / "label.json").write_text("{type: object")
    job = labelled_job("http://127.0.0.1:9/v1", tmp_path)
    job["output"]["schema"] = "label.json"
    with pytest.raises(ConfigError, match=r"output\.schema: .*label\.json: not valid JSON"):
        load(job, tmp_path)


def test_a_prefix_avoids_a_result_column_clash(tmp_path: Path) -> None:
    job = labelled_job("http://127.0.0.1:9/v1", tmp_path)
    job["output"]["schema"] = {"type": "object", "properties": {"error": {"type": "string"}}}
    job["output"]["schema_prefix"] = "ans_"
    assert load(job, tmp_path).output.schema_prefix == "ans_"


def test_schema_mode_without_a_schema_is_refused(tmp_path: Path) -> None:
    job = labelled_job("http://127.0.0.1:9/v1", tmp_path)
    del job["output"]["schema"]
    job["output"]["schema_mode"] = "prompt"
    with pytest.raises(ConfigError, match=r"output\.schema_mode: only means something"):
        load(job, tmp_path)


def test_a_property_named_like_an_input_column_is_exit_2(tmp_path: Path,
                                                          mock_server: MockServer) -> None:
    job = labelled_job(mock_server.base_url, tmp_path)
    write_csv(tmp_path / "in.csv", ["id", "text", "label"], [["r1", "Great kettle.", "x"]])
    path = write_job(tmp_path / "job.yaml", job)
    result = CliRunner().invoke(main, ["run", str(path)], env=ENV)
    assert result.exit_code == 2
    assert "output.schema property 'label' would be the column 'label'" in result.output
    assert "output.schema_prefix" in result.output
    assert mock_server.stats.snapshot()["requests_total"] == 0


# -- runs against the mock -------------------------------------------------------------------


def run_job(job: dict[str, Any], base: Path, **options: Any) -> RunReport:
    options.setdefault("progress", False)
    options.setdefault("handle_signals", False)
    return asyncio.run(arun_job(load(job, base), RunOptions(**options), environ=ENV))


def test_cli_run_fills_typed_columns(tmp_path: Path, mock_server: MockServer) -> None:
    path = write_job(tmp_path / "job.yaml", labelled_job(mock_server.base_url, tmp_path))
    result = CliRunner().invoke(main, ["run", str(path), "-q"], env=ENV)
    assert result.exit_code == 0, result.output
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column_names == ["id", "text", *RESULT_COLUMNS, "label", "confidence"]
    assert table.schema.field("label").type == pa.dictionary(pa.int32(), pa.string())
    assert table.schema.field("confidence").type == pa.float64()
    frame = table.to_pandas()
    assert list(frame["label"].cat.categories) == ["positive", "neutral", "negative"]
    assert frame["label"].notna().all() and frame["confidence"].between(0, 1).all()
    for row in frame.itertuples():  # the columns are the reply's values
        assert json.loads(row.reply) == {"label": row.label, "confidence": row.confidence}
    assert mock_server.stats.snapshot()["answer_formats"] == {"json_schema+strict": 6}


def test_every_type_in_parquet_and_csv_and_jsonl(tmp_path: Path,
                                                 mock_server: MockServer) -> None:
    frames = {}
    for fmt in ("parquet", "csv", "jsonl"):
        job = labelled_job(mock_server.base_url, tmp_path, output=f"out.{fmt}")
        job["output"]["schema"] = WIDE_SCHEMA
        job["input"]["path"] = str(write_csv(
            tmp_path / "in.csv", ["id", "text"],
            [["r1", "fine"], ["r2", "broken [[fault:schema_violation]]"], ["r3", "ok too"]]))
        report = run_job(job, tmp_path)
        assert report.exit_code == 1 and report.failed_rows == 1
        frames[fmt] = tmp_path / f"out.{fmt}"

    schema = pq.read_schema(frames["parquet"])
    assert schema.field("label").type == pa.dictionary(pa.int32(), pa.string())
    assert schema.field("score").type == pa.float64()
    assert schema.field("count").type == pa.int64()
    assert schema.field("flag").type == pa.bool_()
    assert schema.field("note").type == pa.string()
    assert schema.field("address").type == pa.struct([("city", pa.string()),
                                                      ("zip", pa.int64())])
    assert schema.field("tags").type == pa.list_(pa.string())
    assert schema.field("extra").type == pa.string()  # an open object: JSON text
    rows = pq.read_table(frames["parquet"]).to_pylist()
    assert rows[1]["status"] == "error" and all(
        rows[1][name] is None for name in WIDE_SCHEMA["properties"])
    reply = json.loads(rows[0]["reply"])
    assert rows[0]["address"] == reply["address"] and rows[0]["tags"] == reply["tags"]
    assert json.loads(rows[0]["extra"]) == reply["extra"]

    text = pd.read_csv(frames["csv"], dtype=str, keep_default_na=False)
    assert json.loads(text["address"][0]) == reply["address"]  # nested: JSON text in CSV
    assert json.loads(text["tags"][0]) == reply["tags"]
    assert text["flag"][0] == str(reply["flag"]) and text["label"][1] == ""

    lines = [json.loads(line) for line in frames["jsonl"].read_text().splitlines()]
    assert lines[0]["address"] == reply["address"] and lines[0]["count"] == reply["count"]
    assert lines[1]["address"] is None


def test_invalid_replies_are_asked_again_then_fail_with_the_reason(
        tmp_path: Path, mock_server: MockServer) -> None:
    rows = [["ok", "plain review"],
            ["json1", "review [[fault:bad_json*1]]"],
            ["cut2", "review [[fault:truncated_json*2]]"],
            ["cut", "review [[fault:truncated_json]]"],
            ["shape", "review [[fault:schema_violation]]"],
            ["refused", "review [[fault:null_content_refusal]]"]]
    job = labelled_job(mock_server.base_url, tmp_path, rows=rows)
    job["retry"]["invalid_reply_retries"] = 2
    report = run_job(job, tmp_path)
    assert report.exit_code == 1 and report.failed_rows == 3
    frame = pd.read_parquet(tmp_path / "out.parquet").set_index("id")
    prompts = mock_server.stats.snapshot()["prompts"]

    assert frame.loc["ok", "attempts"] == 1 and frame.loc["ok", "status"] == "ok"
    # Asked again after an invalid reply, within the budget: the row ends ok.
    assert frame.loc["json1", "status"] == "ok" and frame.loc["json1", "attempts"] == 2
    assert frame.loc["cut2", "status"] == "ok" and frame.loc["cut2", "attempts"] == 3
    assert frame.loc["cut2", "label"] in ("positive", "neutral", "negative")
    # Out of budget: a row error that says what was wrong, the raw reply kept.
    cut = frame.loc["cut"]
    assert cut["status"] == "error" and cut["attempts"] == 3
    assert prompts["review [[fault:truncated_json]]"] == 3
    assert "cut off by max_tokens (finish_reason length)" in cut["error"]
    assert cut["finish_reason"] == "length" and cut["reply"].startswith("{")
    assert pd.isna(cut["label"]) and pd.isna(cut["confidence"])
    shape = frame.loc["shape"]
    assert shape["status"] == "error" and "at $.label" in shape["error"]
    assert json.loads(shape["reply"])["label"] == ["wrong", "type"]
    # A refusal is not asked again.
    refused = frame.loc["refused"]
    assert refused["status"] == "error" and refused["attempts"] == 1
    assert refused["error"].startswith("the model refused:")
    assert refused["refusal"].startswith("I'm sorry")
    # The token columns add up every reply the row got.
    single = frame.loc["ok", "completion_tokens"]
    assert frame.loc["cut", "completion_tokens"] > single


def test_no_retries_when_the_budget_is_zero(tmp_path: Path, mock_server: MockServer) -> None:
    job = labelled_job(mock_server.base_url, tmp_path,
                       rows=[["a", "x [[fault:bad_json*1]]"]])
    job["retry"]["invalid_reply_retries"] = 0
    assert run_job(job, tmp_path).failed_rows == 1
    frame = pd.read_parquet(tmp_path / "out.parquet")
    assert frame["attempts"][0] == 1 and "not valid JSON" in frame["error"][0]


def test_rows_failing_the_same_way_stop_the_run(tmp_path: Path,
                                               mock_server: MockServer) -> None:
    job = labelled_job(mock_server.base_url, tmp_path, rows=[
        [f"r{i}", f"review {i} [[fault:null_content_refusal]]"] for i in range(12)])
    job["retry"]["stop_after_identical_failures"] = 3
    job["limits"]["concurrency"] = 1
    with pytest.raises(RunAborted, match="3 rows in a row failed the same way"):
        run_job(job, tmp_path)


@pytest.mark.parametrize(("mode", "seen"), [("json_object", "json_object+schema"),
                                            ("prompt", "prompt+schema")])
def test_other_dialects(tmp_path: Path, mock_server: MockServer, mode: str, seen: str) -> None:
    job = labelled_job(mock_server.base_url, tmp_path, schema_mode=mode)
    assert run_job(job, tmp_path).exit_code == 0
    frame = pd.read_parquet(tmp_path / "out.parquet")
    assert frame["label"].notna().all() and frame["confidence"].notna().all()
    assert mock_server.stats.snapshot()["answer_formats"] == {seen: 6}


def test_the_job_s_own_response_format_is_sent_and_checked(tmp_path: Path,
                                                           mock_server: MockServer) -> None:
    job = labelled_job(mock_server.base_url, tmp_path)
    job["params"]["response_format"] = {"type": "json_object"}
    job["retry"]["invalid_reply_retries"] = 0
    report = run_job(job, tmp_path)
    # The mock answers plain json_object with {"reply": ...}: valid JSON, not the schema.
    assert report.failed_rows == 6
    assert mock_server.stats.snapshot()["answer_formats"] == {"json_object": 6}
    frame = pd.read_parquet(tmp_path / "out.parquet")
    assert frame["error"].str.contains("'label' is a required property").all()


def test_several_choices_are_all_kept(tmp_path: Path, mock_server: MockServer) -> None:
    job = labelled_job(mock_server.base_url, tmp_path)
    job["params"]["n"] = 3
    assert run_job(job, tmp_path).exit_code == 0
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.schema.field("replies").type == pa.list_(pa.string())
    for row in table.to_pylist():
        assert len(row["replies"]) == 3 and row["reply"] == row["replies"][0]
        assert json.loads(row["reply"])["label"] == row["label"]
    distinct = {tuple(row["replies"]) for row in table.to_pylist()}
    assert len({reply for replies in distinct for reply in replies}) > 6  # choices differ


def test_several_choices_without_a_schema(tmp_path: Path, mock_server: MockServer) -> None:
    job = labelled_job(mock_server.base_url, tmp_path, output="out.csv")
    del job["output"]["schema"]
    job["params"]["n"] = 2
    assert run_job(job, tmp_path).exit_code == 0
    frame = pd.read_csv(tmp_path / "out.csv", dtype=str)
    assert list(frame.columns) == ["id", "text", *RESULT_COLUMNS, "replies"]
    assert json.loads(frame["replies"][0]) == [frame["reply"][0]] * 2


def test_answers_are_reused_only_for_the_same_schema(tmp_path: Path,
                                                     mock_server: MockServer) -> None:
    job = labelled_job(mock_server.base_url, tmp_path)
    assert run_job(job, tmp_path).exit_code == 0
    assert mock_server.stats.snapshot()["requests_total"] == 6
    assert run_job(job, tmp_path).exit_code == 0  # the same requests: answered already
    assert mock_server.stats.snapshot()["requests_total"] == 6
    job["output"]["schema"] = {**LABEL_SCHEMA, "title": "other"}  # another request
    assert run_job(job, tmp_path).exit_code == 0
    assert mock_server.stats.snapshot()["requests_total"] == 12
    job["output"]["schema_mode"] = "prompt"  # the same schema, asked another way
    assert run_job(job, tmp_path).exit_code == 0
    assert mock_server.stats.snapshot()["requests_total"] == 18


# -- notebooks -------------------------------------------------------------------------------


class Review(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: Literal["positive", "neutral", "negative"]
    confidence: float
    stars: int | None
    recommend: bool


def test_run_dataframe_with_a_pydantic_model(mock_server: MockServer) -> None:
    frame = pd.DataFrame({"text": ["Loved it.", "Broke [[fault:schema_violation]]", "Fine."]},
                         index=[7, 8, 9])
    out = batcher.run_dataframe(frame, model="gpt-4o-mini", prompt_column="text",
                                base_url=mock_server.base_url, api_key=TEST_KEY,
                                schema=Review, progress=False)
    assert list(out.index) == [7, 8, 9]
    assert list(out.columns) == ["text", *RESULT_COLUMNS, "label", "confidence", "stars",
                                 "recommend"]
    assert isinstance(out["label"].dtype, pd.CategoricalDtype)
    assert list(out["label"].cat.categories) == ["positive", "neutral", "negative"]
    assert str(out["stars"].dtype) == "Int64" and str(out["recommend"].dtype) == "boolean"
    assert out["confidence"].dtype == "float64"
    assert list(out["status"]) == ["ok", "error", "ok"]
    assert out["label"].isna().tolist() == [False, True, False]
    assert mock_server.stats.snapshot()["answer_formats"] == {"json_schema+strict": 5}


def test_result_frame_of_a_csv_job_is_typed(tmp_path: Path, mock_server: MockServer) -> None:
    job = labelled_job(mock_server.base_url, tmp_path, output="out.csv")
    job["output"]["schema"] = WIDE_SCHEMA
    result = batcher.run(job, progress=False, api_key=TEST_KEY)
    frame = result.frame
    assert str(frame["count"].dtype) == "Int64" and str(frame["flag"].dtype) == "boolean"
    assert isinstance(frame["label"].dtype, pd.CategoricalDtype)


def test_a_dataframe_column_named_like_a_property_is_refused(mock_server: MockServer) -> None:
    frame = pd.DataFrame({"text": ["a"], "label": ["mine"]})
    with pytest.raises(DataError, match=r"'label'.*schema_prefix="):
        batcher.run_dataframe(frame, model="m", prompt_column="text",
                              base_url=mock_server.base_url, api_key=TEST_KEY,
                              schema=LABEL_SCHEMA, progress=False)
    out = batcher.run_dataframe(frame, model="m", prompt_column="text",
                                base_url=mock_server.base_url, api_key=TEST_KEY,
                                schema=LABEL_SCHEMA, schema_prefix="ans_", progress=False)
    assert list(out["label"]) == ["mine"] and out["ans_label"].notna().all()


# -- the mock's structured answers ------------------------------------------------------------


def test_mock_instances_are_deterministic_and_valid() -> None:
    schema = ReplySchema(WIDE_SCHEMA)
    first = instance_for(WIDE_SCHEMA, rng_for(1, "prompt", 0))
    assert first == instance_for(WIDE_SCHEMA, rng_for(1, "prompt", 0))
    others = [instance_for(WIDE_SCHEMA, rng_for(seed, "prompt", 0)) for seed in range(2, 8)]
    assert any(other != first for other in others)
    for value in [first, *others]:
        assert isinstance(schema.check(json.dumps(value), "stop", None), ParsedReply)


def test_mock_seed_changes_the_answers(tmp_path: Path) -> None:
    replies = []
    for seed in (0, 1):
        folder = tmp_path / f"seed{seed}"
        folder.mkdir()
        with MockServer(MockConfig(api_key=TEST_KEY, seed=seed)) as server:
            run_job(labelled_job(server.base_url, folder), folder)
            replies.append(list(pd.read_parquet(folder / "out.parquet")["reply"]))
    assert replies[0] != replies[1]


def test_validate_says_how_the_schema_is_sent(tmp_path: Path) -> None:
    job = labelled_job("http://127.0.0.1:9/v1", tmp_path)
    path = write_job(tmp_path / "job.yaml", job)
    result = CliRunner().invoke(main, ["validate", str(path)], env=ENV)
    assert result.exit_code == 0, result.output
    assert "columns label, confidence; sent as response_format json_schema, strict" in (
        result.output)
    job["output"]["schema"] = {**LABEL_SCHEMA, "required": ["label"]}
    write_job(path, job)
    result = CliRunner().invoke(main, ["validate", str(path)], env=ENV)
    assert "not strict ($.confidence is not listed in required)" in result.output


# -- batch mode --------------------------------------------------------------------------------


@pytest.mark.parametrize("fallback", ["none", "online"])
def test_batch_mode_checks_replies_the_same_way(tmp_path: Path, mock_server: MockServer,
                                                fallback: str) -> None:
    job = labelled_job(mock_server.base_url, tmp_path, rows=[
        ["a", "fine"], ["b", "broken once [[fault:schema_violation*1]]"], ["c", "fine too"]])
    job["mode"] = "batch"
    job["batch"] = {"poll_interval_s": 0.05, "fallback": fallback}
    path = write_job(tmp_path / "job.yaml", job)
    result = CliRunner().invoke(main, ["run", str(path), "--wait", "-q"], env=ENV)
    rows = {row["id"]: row for row in pq.read_table(tmp_path / "out.parquet").to_pylist()}
    formats = mock_server.stats.snapshot()["answer_formats"]
    bad = rows["b"]
    if fallback == "none":
        assert result.exit_code == 1, result.output
        assert formats == {"json_schema+strict": 3}
        assert bad["status"] == "error" and bad["error"].startswith("batch: reply does not match")
        assert json.loads(bad["reply"])["label"] == ["wrong", "type"]  # the reply is kept
        assert bad["label"] is None
    else:  # sent again online (the mock's online side counts the marker apart: one more
        # broken reply, asked again at once)
        assert result.exit_code == 0, result.output
        assert formats == {"json_schema+strict": 5}
        assert bad["status"] == "ok" and bad["attempts"] == 2 and bad["latency_s"] >= 0
    for row_id in ("a", "c"):
        row = rows[row_id]
        assert row["status"] == "ok"
        assert json.loads(row["reply"]) == {"label": row["label"], "confidence": row["confidence"]}
