"""Benchmark inputs, job files and synthesized checkpoints."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from harness import BenchError

MAX_TOKENS = 64
"""``max_tokens`` every benchmark job sets: the mock reserves it against TPM."""


def row_id(position: int) -> str:
    return f"row{position:07d}"


def prompt_text(position: int) -> str:
    """A short prompt (about 15 tokens by both batcher's and the mock's estimate)."""
    return f"Prompt number {position}: say something."


def make_parquet_input(path: Path, rows: int, row_group_rows: int | None = None) -> Path:
    """``rows`` rows of ``id``, ``text``; pyarrow's default row groups (as pandas
    writes: up to 1,048,576 rows each) unless ``row_group_rows`` is given."""
    schema = pa.schema([("id", pa.string()), ("text", pa.string())])
    table = pa.table({
        "id": pa.array([row_id(i) for i in range(rows)], pa.string()),
        "text": pa.array([prompt_text(i) for i in range(rows)], pa.string()),
    }, schema=schema)
    pq.write_table(table, path, row_group_size=row_group_rows)
    return path


def job_dict(base_url: str, input_path: Path, output_path: Path, *, concurrency: int = 32,
             requests_per_minute: float | None = None, tokens_per_minute: float | None = None,
             retry: dict[str, Any] | None = None, name: str = "bench") -> dict[str, Any]:
    """A job like the tests' ``job_dict``: prompt column ``text``, ids in ``id``."""
    limits: dict[str, Any] = {"concurrency": concurrency}
    if requests_per_minute is not None:
        limits["requests_per_minute"] = requests_per_minute
    if tokens_per_minute is not None:
        limits["tokens_per_minute"] = tokens_per_minute
    job: dict[str, Any] = {
        "name": name,
        "input": {"path": str(input_path), "id_column": "id"},
        "prompt": {"column": "text"},
        "model": "gpt-4o-mini",
        "params": {"temperature": 0, "max_tokens": MAX_TOKENS},
        "endpoint": {"base_url": base_url, "timeout_s": 30},
        "limits": limits,
        "output": {"path": str(output_path)},
    }
    if retry is not None:
        job["retry"] = retry
    return job


def write_job(path: Path, job: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(job, sort_keys=False), encoding="utf-8")
    return path


def checkpoint_path(output_path: Path) -> Path:
    """Where batcher journals a job's rows by default: beside the results."""
    return output_path.with_suffix(".ckpt")


def synthesize_checkpoint(job_path: Path, done_rows: int) -> Path:
    """Write the checkpoint a run that finished rows ``0 .. done_rows-1`` would have left.

    Each row is stored under the request key batcher computes for it
    (``batcher.plan.preflight.prepare(job).plans(None)``), so ``batcher run``
    reuses those answers and sends only the remaining rows. The lines are
    written by batcher's own ``Checkpoint.append``, so they stay in whatever
    journal format batcher uses; each holds a ``RowResult`` like the mock's.
    """
    from batcher.jobload import load_job
    from batcher.mock_server import reply_for
    from batcher.plan.preflight import prepare
    from batcher.records import RESULT_FIELDS, RowResult
    from batcher.store.checkpoint import Checkpoint

    job = load_job(job_path)
    assert job.output is not None
    prepared = prepare(job)
    if done_rows > prepared.rows:
        raise BenchError(f"cannot mark {done_rows} rows done in a {prepared.rows}-row input")
    path: Path = job.output.checkpoint_path
    with Checkpoint(path, fresh=True) as checkpoint:
        for plan in prepared.plans(None):
            for row in plan.pending:
                if row.position >= done_rows:
                    break
                checkpoint.append([(row.key, row.position)], RowResult(
                    **_done_fields(row.position, reply_for, RESULT_FIELDS)))
            if plan.start + len(plan.keys) >= done_rows:
                break
        checkpoint.sync()
    return path


def _done_fields(position: int, reply_for: Callable[[str], str],
                 columns: Sequence[str]) -> dict[str, Any]:
    """The ``RowResult`` fields of one ``ok`` row, as the mock's reply would give them.

    Only fields ``RowResult`` has are passed, so a field added to batcher
    later takes its default instead of breaking the benchmark.
    """
    prompt = prompt_text(position)
    prompt_tokens = -(-len(prompt) // 4) + 6
    reply = reply_for(prompt)
    completion_tokens = -(-len(reply) // 4)
    known: dict[str, Any] = {
        "reply": reply,
        "finish_reason": "stop",
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "cached_tokens": 0,
        "reasoning_tokens": 0,
        "status": "ok",
        "error": None,
        "attempts": 1,
        "latency_s": 0.0012,
    }
    return {name: value for name, value in known.items() if name in columns}
