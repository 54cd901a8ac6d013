"""Structured replies (``output.schema``) against a real llama.cpp server.

llama-cpp-python's server speaks the ``json_object`` + ``schema`` dialect
(grammar-constrained) and answers OpenAI's ``json_schema`` with an HTTP 500.
The 270M model often runs past ``max_tokens`` inside a number, so the
truncated-JSON path is exercised by a real server, not a mock: these tests
check that path (asked again, then a row error with the raw reply kept),
not the model's wisdom. Run by ``scripts/llama-integration.sh``.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_llama import (  # the module-scoped server fixture and its helpers
    KEY_ENV,
    MODEL_ALIAS,
    LlamaServer,
    llama_server,
    prompts,
    run_batcher,
    write_inputs,
)

from batcher.structured import ParsedReply, ReplySchema

pytestmark = [
    pytest.mark.llama,
    pytest.mark.skipif(os.environ.get("BATCHER_LLAMA") != "1",
                       reason="real llama.cpp server tests; set BATCHER_LLAMA=1 "
                              "(scripts/llama-integration.sh does)"),
    pytest.mark.timeout(600),
]
__all__ = ["llama_server"]  # re-exported so pytest finds the fixture here

ROWS = 12
RETRIES = 1
CUT_AT = 5  # max_tokens no complete object fits in
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "enum": ["apple", "red", "cat", "other"]},
        "confidence": {"type": "number"},
    },
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}


def write_job(folder: Path, base_url: str, source: Path, output: Path, *, mode: str,
              max_tokens: int, rows: int = ROWS, max_attempts: int = 3) -> Path:
    job = {
        "name": "llama-structured",
        "input": {"path": str(source), "id_column": "id"},
        "prompt": {"column": "text"},
        "model": MODEL_ALIAS,
        "params": {"temperature": 0, "max_tokens": max_tokens},
        "endpoint": {"base_url": base_url, "api_key_env": KEY_ENV, "timeout_s": 60},
        "limits": {"concurrency": 2},
        "retry": {"max_attempts": max_attempts, "base_delay_s": 0.2, "max_delay_s": 1,
                  "invalid_reply_retries": RETRIES},
        "output": {"path": str(output), "schema": SCHEMA, "schema_mode": mode},
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False), encoding="utf-8")
    return path


def read(output: Path) -> Any:
    import pandas as pd

    frame = pd.read_parquet(output)
    assert list(frame["id"]) == [row_id for row_id, _ in prompts(len(frame))]
    return frame


def test_json_object_dialect_cut_off_by_max_tokens(llama_server: LlamaServer,
                                                   tmp_path: Path) -> None:
    """max_tokens too small for any complete object: every reply is cut off inside its
    JSON, asked again once, then a row error that keeps the raw reply."""
    output = tmp_path / "out.parquet"
    source = write_inputs(tmp_path, ROWS)
    job = write_job(tmp_path, llama_server.base_url, source, output, mode="json_object",
                    max_tokens=CUT_AT)
    result = run_batcher(job, llama_server.key, "-q")
    assert result.returncode == 1, result.stderr
    frame = read(output)
    assert (frame["status"] == "error").all()
    assert (frame["attempts"] == 1 + RETRIES).all()  # asked again once, never more
    assert (frame["finish_reason"] == "length").all()
    assert frame["error"].str.contains("cut off by max_tokens").all(), frame["error"]
    for reply in frame["reply"]:
        assert isinstance(reply, str) and reply.lstrip().startswith("{"), reply  # kept raw
    assert frame["answer"].isna().all() and frame["confidence"].isna().all()
    assert (frame["completion_tokens"] == CUT_AT * (1 + RETRIES)).all()  # both replies counted
    print(f"cut-off replies, e.g. {frame['reply'].iloc[0]!r}: {frame['error'].iloc[0]!r}")


@pytest.mark.parametrize("max_tokens", [28, 48])
def test_json_object_dialect_rows_are_data_or_say_why(llama_server: LlamaServer, tmp_path: Path,
                                                 max_tokens: int) -> None:
    """With room to answer, the grammar keeps replies in the schema's shape: every ok
    row has typed values equal to its reply; a row that still fails ran past
    max_tokens (the model likes 16-digit confidences: at 28 tokens it is cut inside
    the number) and says so."""
    output = tmp_path / "out.parquet"
    source = write_inputs(tmp_path, ROWS)
    job = write_job(tmp_path, llama_server.base_url, source, output, mode="json_object",
                    max_tokens=max_tokens)
    result = run_batcher(job, llama_server.key, "-q")
    assert result.returncode in (0, 1), result.stderr
    frame = read(output)
    schema = ReplySchema(SCHEMA)
    assert str(frame["answer"].dtype) == "category"
    for row in frame.itertuples():
        if row.status == "ok":
            verdict = schema.check(row.reply, row.finish_reason, None)
            assert isinstance(verdict, ParsedReply), (row.id, row.reply)
            assert verdict.values == {"answer": row.answer, "confidence": row.confidence}
            assert 1 <= row.attempts <= 1 + RETRIES
        else:
            assert row.attempts == 1 + RETRIES, (row.id, row.error)
            assert row.finish_reason == "length" and "cut off" in row.error, (row.id, row.error)
            assert isinstance(row.reply, str) and row.reply
    print(f"status {dict(Counter(frame['status']))}, attempts "
          f"{dict(Counter(frame['attempts'].tolist()))}, finish_reason "
          f"{dict(Counter(frame['finish_reason']))}; first reply {frame['reply'].iloc[0]!r}"
          f" ({frame['error'].fillna('ok').iloc[0]})")


def test_openai_dialect_is_refused_by_llama_cpp_python(llama_server: LlamaServer,
                                                       tmp_path: Path) -> None:
    """The quirk behind ``schema_mode: json_object``: llama-cpp-python 0.3.x answers a
    ``json_schema`` response_format with an HTTP 500 (retried, then a row error)."""
    output = tmp_path / "out.parquet"
    source = write_inputs(tmp_path, 1)
    job = write_job(tmp_path, llama_server.base_url, source, output, mode="json_schema",
                    max_tokens=32, rows=1, max_attempts=1)
    result = run_batcher(job, llama_server.key, "-q")
    frame = read(output)
    if result.returncode == 0:
        pytest.fail("llama-cpp-python now accepts json_schema: update the README's dialect "
                    f"table (reply {frame['reply'].iloc[0]!r})")
    assert result.returncode == 1, result.stderr
    assert frame["error"].iloc[0].startswith("HTTP 500"), frame["error"].iloc[0]
    print(f"json_schema against llama-cpp-python: {frame['error'].iloc[0]!r}")
