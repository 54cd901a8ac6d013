"""Running a validated job end to end: the one core the CLI and the Python API share."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path

from batcher.checkpoint import Checkpoint
from batcher.client import ChatClient, Endpoint
from batcher.config import Job
from batcher.endpoints import resolve_endpoint
from batcher.errors import CheckpointError, OutputError
from batcher.mock_server import MockConfig, MockServer
from batcher.preflight import Estimate, Prepared, estimate, prepare
from batcher.redact import Redactor
from batcher.runner import Run, RunOptions, RunReport, Runtime

SIMULATED_NOTICE = ("using batcher's built-in mock server (endpoint.mock): replies are simulated, "
                    "no real model is called")


async def arun_job(job: Job, options: RunOptions | None = None, *,
                   runtime: Runtime | None = None,
                   environ: Mapping[str, str] | None = None) -> RunReport:
    """Run ``job`` to the end (or resume it). Raises a ``BatcherError`` on failure."""
    options = options or RunOptions()
    prepared = prepare(job, options.limit, allow_empty=options.allow_empty_input)
    assert job.output is not None
    check_writable(job.output.path.parent)
    with endpoint_for(job, environ) as (endpoint, redactor), Checkpoint(
        job.output.checkpoint_path, prepared.fingerprint, fresh=options.fresh
    ) as checkpoint:
        run = Run(prepared, lambda concurrency: ChatClient(endpoint, redactor, concurrency),
                  checkpoint, options, runtime or Runtime())
        return await run.execute()


def dry_run(job: Job, limit: int | None = None,
            environ: Mapping[str, str] | None = None) -> Estimate:
    """Check the job, its input and its endpoint settings; estimate without sending."""
    prepared: Prepared = prepare(job, limit)
    if job.endpoint.mock is None:
        resolve_endpoint(job.endpoint, environ=environ)  # a missing key is exit 2 here too
    checkpoint_path = job.output.checkpoint_path if job.output else None
    if checkpoint_path is not None and checkpoint_path.exists():
        try:
            with Checkpoint(checkpoint_path, prepared.fingerprint) as checkpoint:
                return estimate(prepared, checkpoint)
        except CheckpointError as error:
            return replace(estimate(prepared), note=f"a run would stop: {error}")
    return estimate(prepared)


@contextlib.contextmanager
def endpoint_for(job: Job, environ: Mapping[str, str] | None = None
                 ) -> Iterator[tuple[Endpoint, Redactor]]:
    """The job's endpoint; for ``endpoint.mock`` a mock server started for this run."""
    mock = job.endpoint.mock
    if mock is None:
        yield resolve_endpoint(job.endpoint, environ=environ)
        return
    with MockServer(MockConfig(latency_s=mock.latency_s, seed=mock.seed)) as server:
        yield resolve_endpoint(job.endpoint, base_url=server.base_url, environ=environ)


def check_writable(folder: Path) -> None:
    """Fail before sending anything when the results could not be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise OutputError(f"{folder}: cannot write results there ({exc.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise OutputError(f"{folder}: cannot write results there (permission denied)")
