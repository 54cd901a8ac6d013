"""Running a validated job end to end: the one core the CLI and the Python API share."""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path

from batcher.batch.cycle import BatchRun, describe_plan
from batcher.batch.shards import plan_shards
from batcher.batch.state import forget_state
from batcher.config import Job
from batcher.errors import CheckpointError, OutputError
from batcher.io.safefiles import check_path, private_folder
from batcher.mock_server import MockConfig, MockServer
from batcher.online.runner import Run, RunOptions, RunReport, Runtime
from batcher.plan.paths import check_input_apart, work_folder
from batcher.plan.preflight import Estimate, Prepared, estimate, prepare
from batcher.redact import Redactor, printable
from batcher.store.checkpoint import Checkpoint, lock_path_for, verify_checkpoint
from batcher.transport.client import ChatClient, Endpoint
from batcher.transport.endpoints import missing_key, resolve_endpoint

SIMULATED_NOTICE = ("using batcher's built-in mock server (endpoint.mock): replies are simulated, "
                    "no real model is called")


def _to_stderr(message: str) -> None:
    print(printable(f"batcher: {message}"), file=sys.stderr, flush=True)


async def arun_job(job: Job, options: RunOptions | None = None, *,
                   runtime: Runtime | None = None,
                   environ: Mapping[str, str] | None = None,
                   say: Callable[[str], None] = _to_stderr) -> RunReport:
    """Run ``job`` to the end (or resume it). Raises a ``BatcherError`` on failure.

    With ``mode: batch`` and ``options.wait`` false, the report may say the
    batches are still ``pending`` at the service; ``say`` gets one line per
    step of the batch cycle.
    """
    options = options or RunOptions()
    prepared = check_job(job, options.limit, environ, allow_empty=options.allow_empty_input,
                         fresh=options.fresh)
    assert job.output is not None
    with endpoint_for(job, environ) as (endpoint, redactor), Checkpoint(
        job.output.checkpoint_path, fresh=options.fresh
    ) as checkpoint:
        if options.fresh:  # under the checkpoint's lock, like the checkpoint itself
            still_open = forget_state(job.output.checkpoint_path)
            if still_open:
                say(f"--fresh forgot {still_open} batch(es) still open at the service; they "
                    "keep running and are billed unless you cancel them there")
        if job.mode == "batch":
            batch_run = BatchRun(prepared, endpoint, redactor, checkpoint, options,
                                 runtime or Runtime(), say=say)
            return await batch_run.execute()
        run = Run(prepared, lambda concurrency: ChatClient(endpoint, redactor, concurrency),
                  checkpoint, options, runtime or Runtime())
        return await run.execute()


def dry_run(job: Job, limit: int | None = None,
            environ: Mapping[str, str] | None = None, *, fresh: bool = False) -> Estimate:
    """Check the job, its input and its endpoint settings; estimate without sending
    (with ``fresh``, as if the checkpoint were discarded)."""
    # The key is not needed to send nothing: its absence is a note, like a locked checkpoint.
    unset = missing_key(job.endpoint, environ)
    try:
        prepared = check_job(job, limit, environ, fresh=fresh, require_key=unset is None)
    except CheckpointError as error:  # the estimate stands; the note says what would stop
        return replace(estimate(prepare(job, limit)), note=f"a run would stop: {error}")
    figures = _estimate_beside_checkpoint(prepared, fresh)
    if unset is None:
        return figures
    return replace(figures, note="; ".join(
        note for note in (f"a run would stop: {unset}", figures.note) if note))


def _estimate_beside_checkpoint(prepared: Prepared, fresh: bool) -> Estimate:
    job = prepared.job
    checkpoint_path = job.output.checkpoint_path if job.output else None
    if checkpoint_path is not None and checkpoint_path.exists() and not fresh:
        try:
            with Checkpoint(checkpoint_path) as checkpoint:
                return _with_batch_plan(estimate(prepared, checkpoint), prepared, checkpoint)
        except CheckpointError as error:
            return replace(estimate(prepared), note=f"a run would stop: {error}")
    return _with_batch_plan(estimate(prepared), prepared, None)


def _with_batch_plan(figures: Estimate, prepared: Prepared,
                     checkpoint: Checkpoint | None) -> Estimate:
    """In ``mode: batch``, add the batch files and the cost at the batch price."""
    job = prepared.job
    if job.mode != "batch":
        return figures
    plan = plan_shards(prepared, checkpoint)
    return replace(figures, batch=describe_plan(plan))


def check_job(job: Job, limit: int | None = None, environ: Mapping[str, str] | None = None,
              *, allow_empty: bool = False, fresh: bool = False,
              require_key: bool = True) -> Prepared:
    """Everything ``run`` checks before it sends a byte, in one place, so ``validate``
    and ``--dry-run`` pass exactly the jobs ``run`` would start: the input and its
    columns, the key's variable, where the key may travel (plain http, proxies), and
    the results, checkpoint and lock paths, and that an existing checkpoint is this
    job's (with ``fresh``: is a checkpoint at all). Raises a ``BatcherError`` (exit 2)."""
    check_input_apart(job, [job.input.path])
    prepared = prepare(job, limit, allow_empty=allow_empty)
    if job.endpoint.mock is None:
        resolve_endpoint(job.endpoint, environ=environ, require_key=require_key)
    if job.output is not None:
        check_writable(job.output.path.parent)
        checkpoint = job.output.checkpoint_path
        check_path(job.output.path, "results file", private=False)
        check_path(checkpoint, "checkpoint", private=True)
        check_path(lock_path_for(checkpoint), "lock file", private=True)
        private_folder(work_folder(checkpoint), "batch work folder", create=False)
        verify_checkpoint(checkpoint, fresh)
    return prepared


@contextlib.contextmanager
def endpoint_for(job: Job, environ: Mapping[str, str] | None = None
                 ) -> Iterator[tuple[Endpoint, Redactor]]:
    """The job's endpoint; for ``endpoint.mock`` a mock server started for this run."""
    mock = job.endpoint.mock
    if mock is None:
        yield resolve_endpoint(job.endpoint, environ=environ)
        return
    # A key made up for the run: the Files API serves uploaded prompts to their key only.
    key = f"sk-mock-{secrets.token_hex(16)}"
    with MockServer(MockConfig(latency_s=mock.latency_s, seed=mock.seed, api_key=key)) as server:
        yield resolve_endpoint(job.endpoint, base_url=server.base_url, environ=environ,
                               mock_key=key)


def check_output_folder(folder: Path) -> None:
    """Without creating anything (for ``validate``): the results' folder exists or
    can be made, and is writable."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{folder}: cannot write results there ({existing} is a file, "
                          "not a folder)")
    if not os.access(existing, os.W_OK):
        raise OutputError(f"{folder}: cannot write results there (permission denied)")


def check_writable(folder: Path) -> None:
    """Fail before sending anything when the results could not be written (nothing is
    created: a folder still to be made is checked at the nearest one that exists)."""
    check_output_folder(folder)
    if folder.is_dir():
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as exc:
            raise OutputError(f"{folder}: cannot write results there ({exc.strerror})"
                              ) from None
