"""The Ray driver: a Dataset in, the Dataset with the result columns out
(``run_dataset``), and ``batcher run JOB.yaml --ray`` (``run_job_on_ray``),
which writes it as a folder of Parquet files and shows progress meanwhile.

The driver makes the run's ``batcher.plan.jobplan.JobPlan`` once, checks the
input's columns against it and hands it to every worker
(``batcher.raydata.worker``), with the limit's actor (``batcher.raydata.limit``)
they share.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import ray
import ray.data

from batcher.config import Job
from batcher.errors import BatcherError, Interrupted, OutputError, RunAborted
from batcher.plan.finish import RunReport
from batcher.plan.jobplan import JobPlan
from batcher.plan.paths import check_input_apart, journal_folder, results_folder
from batcher.progress import Progress, RunStats
from batcher.raydata.jobfile import DATASET_SOURCE, RayJob, dataset_job, load_ray_job
from batcher.raydata.limit import Actor, State, limit_actor
from batcher.raydata.session import mock_for, ray_for, run_lock, sigterm_as_interrupt
from batcher.raydata.worker import RowsWorker
from batcher.transport.endpoints import resolve_endpoint

WORKER_CPUS = 0.5  # a worker waits on the network; half a CPU leaves room for reading
POLL_S = 0.5


@dataclass(frozen=True)
class RayOptions:
    """How a job is spread: ``workers`` actors, each taking ``batch_rows`` rows at a time."""

    workers: int = 2
    batch_rows: int = 200
    address: str | None = None  # None: RAY_ADDRESS, or a private local Ray for the run


def run_dataset(dataset: ray.data.Dataset, job: str | os.PathLike[str] | Job
                | Mapping[str, Any] | None = None, *, checkpoint: str | os.PathLike[str]
                | None = None, workers: int = 2, batch_rows: int = 200,
                **settings: Any) -> ray.data.Dataset:
    """``dataset`` with the result columns added, one row per input row (lazy, as
    any Dataset: rows are sent when it is consumed).

    The job is a job file's path, a dict in the job file's shape or a ``Job``
    (its ``input`` and ``output.path`` are not used), or keyword arguments by
    the names the notebook API takes: ``model``, ``prompt_column`` or
    ``template``, ``system``, ``params``, ``base_url``, ``api_key_env``,
    ``timeout_s``, ``concurrency`` (per worker), ``requests_per_minute``,
    ``tokens_per_minute`` (for the whole cluster), ``max_attempts``,
    ``schema``, ``schema_mode``, ``schema_prefix``, ``invalid_reply_retries``.
    The key is read from ``api_key_env`` in each worker's environment.
    ``checkpoint``: a folder (on storage every node sees) where finished rows
    are journaled, so consuming the same Dataset again sends only the rows not
    yet answered. The columns added are those of a results file written on one
    machine: the result columns, ``replies`` when ``params.n`` asks for
    several choices, one typed column per property of the reply schema.

    >>> out = run_dataset(ray.data.read_parquet("s3://bucket/prompts/"),  # doctest: +SKIP
    ...                   model="gpt-4o-mini", prompt_column="text",
    ...                   base_url="https://api.openai.com/v1", api_key_env="OPENAI_API_KEY",
    ...                   requests_per_minute=5000, checkpoint="/mnt/shared/prompts.ckpt")
    >>> out.write_parquet("s3://bucket/answers/")
    """
    plan = JobPlan(dataset_job(job, settings))
    resolve_endpoint(plan.job.endpoint)  # a missing key is found here, before any worker
    plan.check_columns(dataset.schema().names, DATASET_SOURCE, "the Dataset")
    return _mapped(dataset, plan, limit_actor(plan.job), None,
                   None if checkpoint is None else str(Path(checkpoint).resolve()),
                   RayOptions(workers, batch_rows))


def _mapped(dataset: ray.data.Dataset, plan: JobPlan, limit: Actor, base_url: str | None,
            journal: str | None, options: RayOptions) -> ray.data.Dataset:
    return dataset.map_batches(
        RowsWorker, batch_format="pyarrow", batch_size=options.batch_rows,
        # One batch queued per worker at a time, so every worker gets rows.
        compute=ray.data.ActorPoolStrategy(size=options.workers, max_tasks_in_flight_per_actor=1),
        num_cpus=WORKER_CPUS,
        fn_constructor_kwargs={"plan": plan, "limit": limit, "base_url": base_url,
                               "journal": journal})


def run_job_on_ray(path: Path, *, fresh: bool = False, progress: bool = True,
                   options: RayOptions | None = None,
                   environ: Mapping[str, str] | None = None) -> tuple[Job, RunReport]:
    """``batcher run JOB.yaml --ray``: the job on Ray, results written as a folder of
    Parquet files at ``output.path``. Raises a ``BatcherError`` as a run on one machine."""
    options = options or RayOptions()
    ray_job = load_ray_job(path)
    job = ray_job.job
    check_input_apart(job, ray_job.local_files())
    if job.endpoint.mock is None:
        resolve_endpoint(job.endpoint, environ=environ)  # a missing key: exit 2, nothing started
    folder = journal_folder(job)
    with run_lock(folder), mock_for(job) as base_url:
        if fresh:
            for old in folder.glob("journal-*.jsonl"):
                old.unlink()
        with ray_for(options.address):
            return job, _drive(ray_job, base_url, folder, options, progress)


def _drive(ray_job: RayJob, base_url: str | None, folder: Path, options: RayOptions,
           progress: bool) -> RunReport:
    plan = JobPlan(ray_job.job)
    dataset = ray_job.read(options.workers)
    plan.check_columns(dataset.schema().names, ray_job.where(), "the input")
    total = dataset.count()
    limit = limit_actor(plan.job)
    out = _mapped(dataset, plan, limit, base_url, str(folder), options)
    target = results_folder(plan.job)
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    stats = RunStats(total_rows=total)
    display = Progress(stats, enabled=progress)
    failures: list[BaseException] = []

    def write() -> None:
        try:
            out.write_parquet(str(staging))
        except BaseException as error:  # handed to the driver's thread below
            failures.append(error)

    writer = threading.Thread(target=write, name="batcher-ray-write", daemon=True)
    writer.start()
    try:
        with sigterm_as_interrupt():
            while writer.is_alive():
                writer.join(POLL_S)
                _show(ray.get(limit.state.remote())[0], stats, display)
    except KeyboardInterrupt as stop:
        display.close()
        signum = stop.args[0] if stop.args else signal.SIGINT
        raise Interrupted(f"stopped by {signal.Signals(signum).name}; the finished rows are "
                          f"journaled in {folder}; run the same command again to resume",
                          exit_code=128 + int(signum)) from None
    counts, abort, failure = cast(State, ray.get(limit.state.remote()))
    _show(counts, stats, display)
    display.close()
    if abort is not None or failure is not None or failures:
        shutil.rmtree(staging, ignore_errors=True)
    if abort is not None:
        raise RunAborted(abort)
    if failure is not None:
        raise _error_with_code(*failure)
    if failures:
        raise OutputError(f"the run on Ray failed: {_one_line(failures[0])}")
    _replace(staging, target)
    return RunReport(stats, total, stats.errors, target, price=plan.known_online_price)


def _show(counts: Mapping[str, int], stats: RunStats, display: Progress) -> None:
    counted = Counter(counts)
    stats.reused = counted["reused"]
    stats.cost_usd = counted["cost_nano_usd"] / 1e9
    stats.ok, stats.errors = counted["ok"], counted["errors"]
    stats.requests, stats.rate_limited = counted["requests"], counted["rate_limited"]
    stats.prompt_tokens = counted["prompt_tokens"]
    stats.completion_tokens = counted["completion_tokens"]
    display.refresh()


def _replace(staging: Path, target: Path) -> None:
    """Put the new results folder in place of the old one (a file, or a folder)."""
    if not staging.exists():
        staging.mkdir(parents=True)  # no rows at all: an empty folder
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.is_dir():
        target.rename(old)
    elif target.exists():
        target.unlink()
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _error_with_code(message: str, exit_code: int) -> BatcherError:
    error = BatcherError(message)
    error.exit_code = exit_code
    return error


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__
