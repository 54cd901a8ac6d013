"""Running one job shape on one engine, as a user would, and reading the results back.

- ``online``: ``batcher run JOB -q``;
- ``batch``: the same job with ``mode: batch``, ``batcher run JOB --wait -q``
  against the mock's Files and Batches API;
- ``ray``: ``batcher run JOB --ray -q`` on the local Ray the matrix started;
- ``notebook``: ``batcher.run_dataframe(frame, ...)`` over the input read with
  pandas, the job's keys passed as its keyword arguments.

Each gives the results as pandas reads them, in input order, or the one-line
reason the engine gave for refusing the job.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
from conftest import TEST_KEY, cli, job_dict, one_error_line, write_job

import batcher
from batcher.errors import BatcherError
from batcher.mock_server import MockServer

from .shapes import Shape

MODEL = "gpt-4o-mini"
PARAMS = {"temperature": 0, "max_tokens": 200}
CONCURRENCY = 8
MAX_ATTEMPTS = 4
RAY_WORKERS = 1
BATCH = {"poll_interval_s": 0.05}

# The notebook API's keyword for each job key; a job key without one is passed
# under its own last name, as a user would try it, and must be refused.
NOTEBOOK_KEYWORDS = {
    ("prompt", "column"): "prompt_column",
    ("prompt", "template"): "template",
    ("prompt", "system"): "system",
    ("params",): "params",
    ("output", "schema"): "schema",
    ("output", "schema_mode"): "schema_mode",
}


@dataclass(frozen=True)
class Outcome:
    """What an engine made of a job: its results, or its reason for refusing it, and the
    requests the server received for each user message (Batch API lines included)."""

    frame: pd.DataFrame | None
    refusal: str | None = None
    requests: Counter[str] = field(default_factory=Counter)


def job_for(shape: Shape, server: MockServer, source: Path, output: Path,
            **extra: Any) -> dict[str, Any]:
    """The shape's job file: the common keys, then the shape's (a ``prompt`` whole)."""
    job = job_dict(server.base_url, source, output, params=PARAMS)
    job["name"] = shape.name
    job["input"] = {"path": str(source)}
    for key, value in {**shape.job, **extra}.items():
        if isinstance(value, dict) and key != "prompt" and isinstance(job.get(key), dict):
            job[key] = {**job[key], **value}
        else:
            job[key] = value
    return job


def run_engine(engine: str, shape: Shape, server: MockServer, folder: Path) -> Outcome:
    """One run; the server serves no other run meanwhile, so its counts are this run's."""
    before = Counter(server.stats.snapshot()["prompts"])
    ran = _run(engine, shape, server, folder)
    return replace(ran, requests=Counter(server.stats.snapshot()["prompts"]) - before)


def _run(engine: str, shape: Shape, server: MockServer, folder: Path) -> Outcome:
    folder.mkdir(parents=True)
    source = shape.write_input(folder)
    output = folder / "out" / "results.parquet"
    if engine == "notebook":
        return _notebook(shape, server, source, folder)
    extra: dict[str, Any] = {"mode": "batch", "batch": BATCH} if engine == "batch" else {}
    job = write_job(folder / "job.yaml", job_for(shape, server, source, output, **extra))
    flags = {"online": [], "batch": ["--wait"], "ray": ["--ray", "--workers", str(RAY_WORKERS)]}
    ran = cli("run", str(job), "-q", *flags[engine])
    if ran.returncode == 2:
        return Outcome(None, one_error_line(ran.stderr))
    assert ran.returncode in (0, 1), (ran.returncode, ran.stderr)  # 1: some error rows
    frame = pd.read_parquet(output)  # Ray writes a folder of that name; pandas reads both
    return Outcome(in_input_order(frame, shape.read_input(source)))


def in_input_order(frame: pd.DataFrame, source: pd.DataFrame) -> pd.DataFrame:
    """Rows by their ``id`` in the input's order: Ray writes them in no set order."""
    position = {row_id: index for index, row_id in enumerate(source["id"])}
    ordered = frame.sort_values("id", key=lambda ids: ids.map(position), kind="stable")
    return ordered.reset_index(drop=True)


def _notebook(shape: Shape, server: MockServer, source: Path, folder: Path) -> Outcome:
    frame = shape.read_input(source)
    job = job_for(shape, server, source, folder / "unused.parquet")
    # The shape's keys and its prompt; the rest of the job is given as keywords below.
    keywords = dict(_notebook_keywords({**shape.job, "prompt": job["prompt"]}))
    try:
        out = batcher.run_dataframe(
            frame, model=MODEL, base_url=server.base_url, api_key=TEST_KEY,
            concurrency=CONCURRENCY, max_attempts=MAX_ATTEMPTS, progress=False,
            checkpoint=folder / "notebook.ckpt", **{"params": PARAMS, **keywords})
    except (TypeError, BatcherError) as refused:
        reason = str(refused)
        assert "\n" not in reason, reason
        return Outcome(None, reason)
    return Outcome(out)


def _notebook_keywords(job: dict[str, Any], path: tuple[str, ...] = ()
                       ) -> Iterator[tuple[str, Any]]:
    for key, value in job.items():
        here = (*path, key)
        if here in NOTEBOOK_KEYWORDS:
            if here == ("params",):
                value = {**PARAMS, **value}
            yield NOTEBOOK_KEYWORDS[here], value
        elif isinstance(value, dict):
            yield from _notebook_keywords(value, here)
        else:
            yield key, value
