"""The same job on a Ray cluster: a Ray Dataset in, the result columns added.

Install with ``pip install 'batcher[ray]'``; nothing else in batcher imports
this module, so ``import batcher`` never loads Ray.

- **Workers** are a callable class used with ``Dataset.map_batches``
  (``concurrency`` = the number of workers). Each keeps one event loop and
  one ``batcher.transport.client.ChatClient`` (one connection pool) for its life and
  sends each batch's rows through ``batcher.plan.pipeline.attempt_row`` -- the
  same retry policy, error classification and reply checks as on one
  machine -- with up to ``limits.concurrency`` requests in flight per worker.
- **One rate limit for the cluster**: a named actor holds a
  ``batcher.limits.leases.ClusterLimit``; each worker's limiter leases slices of it
  and reports what the server said with each lease (see ``batcher.limits.leases``
  for the design: the actor is asked about twice a second per worker,
  whatever the request rate).
- **Failures**: a row whose retries run out is a row with status ``error``.
  A bad key or exhausted quota seen by any worker is recorded by the actor,
  every other worker stops at its next lease, and the run stops (exit 3).
- **Resume**: with a checkpoint folder, each worker appends every finished
  row to a journal file of its own there, keyed by the row's request key
  (``batcher.store.keys``, as on one machine; ``batcher.store.answers``); a worker
  answers a row found ``ok`` there from the journal instead of sending it.
  Killing the driver loses only the requests in flight; running the same
  command again sends only the rest. On a cluster the folder must be on
  storage every node sees (NFS, a mounted bucket), or the rows answered on
  another node are sent again.
- **Progress** on the driver: workers' counters travel with their leases
  (and a report after each batch) to the limit's actor, which the driver polls.

Not on Ray (yet): ``limits.max_cost_usd``/``max_total_tokens``, ``mode: batch``,
``--limit`` and ``--dry-run``; the summary has no per-class failure lines.

Longer than most modules because everything that touches Ray (the workers,
the limit's actor, the driver) lives here, so nothing else in batcher imports
it; what Ray does not need is in ``batcher.limits.leases`` and ``batcher.store.answers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import random
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import ray
import ray.data
from ray.actor import ActorHandle

from batcher.config import Job
from batcher.errors import (
    BatcherError,
    ConfigError,
    DataError,
    Interrupted,
    OutputError,
    RunAborted,
    RunInProgress,
)
from batcher.io import platform
from batcher.io.inputs import id_strings
from batcher.io.outputs import result_fields
from batcher.io.safefiles import open_private, private_folder
from batcher.jobload import job_from_dict, read_job_file
from batcher.limits.leases import ClusterLimit, Feedback, Lease, LeasedLimiter
from batcher.limits.retry import FailureStreak
from batcher.mock_server import MockConfig, MockServer
from batcher.online.runner import RunReport, first_cause
from batcher.plan.paths import check_input_apart, journal_folder, results_folder
from batcher.plan.pipeline import PendingRow, RowRequest, Sending, attempt_row, row_request
from batcher.pricing import Price, resolve_price
from batcher.progress import Progress, RunStats
from batcher.prompts import PromptRenderer, Prompts
from batcher.records import (
    RESULT_COLUMNS,
    SOURCE_COLUMN,
    SOURCE_REUSED,
    SOURCE_SENT,
    RowResult,
)
from batcher.store.answers import Answers, AnswerWriter
from batcher.store.keys import RowKeys
from batcher.transport.client import ChatClient
from batcher.transport.endpoints import resolve_endpoint

__all__ = ["RayOptions", "journal_folder", "results_folder", "run_dataset", "run_job_on_ray"]

WORKER_CPUS = 0.5  # a worker waits on the network; half a CPU leaves room for reading
FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json", ".json": "json"}
PLACEHOLDER = "ray-input"  # the job's input.path when Ray reads the input itself
POLL_S = 0.5
Actor = ActorHandle[Any]
State = tuple[dict[str, int], str | None, tuple[str, int] | None]
"""The limit actor's state: progress counters, the server's verdict, another failure."""


@dataclass(frozen=True)
class RayOptions:
    """How a job is spread: ``workers`` actors, each taking ``batch_rows`` rows at a time."""

    workers: int = 2
    batch_rows: int = 200
    address: str | None = None  # None: RAY_ADDRESS, or a private local Ray for the run


# -- the limit's actor ---------------------------------------------------------------------------


@ray.remote(num_cpus=0)
class LimitActor:
    """The run's :class:`batcher.limits.leases.ClusterLimit`, shared by every worker."""

    def __init__(self, requests_per_minute: float | None,
                 tokens_per_minute: float | None) -> None:
        self._limit = ClusterLimit(requests_per_minute, tokens_per_minute, time.monotonic)
        self._failure: tuple[str, int] | None = None

    def lease(self, worker: str, feedback: Feedback, min_tokens: int) -> Lease:
        return self._limit.lease(worker, feedback, min_tokens)

    def report(self, feedback: Feedback) -> None:
        self._limit.report(feedback)

    def fail(self, message: str, exit_code: int) -> None:
        """A worker's error that ends the run (other than the server's verdict)."""
        if self._failure is None:
            self._failure = (message, exit_code)

    def state(self) -> State:
        return dict(self._limit.counts), self._limit.abort, self._failure


class _ActorLeases:
    """A :class:`batcher.limits.leases.LeaseSource` behind the limit's actor."""

    def __init__(self, actor: Actor) -> None:
        self._actor = actor

    async def lease(self, worker: str, feedback: Feedback, min_tokens: int) -> Lease:
        lease: Lease = await self._actor.lease.remote(worker, feedback, min_tokens)
        return lease


# -- workers ------------------------------------------------------------------------------------


class RowsWorker:
    """Answers the rows of one batch after another (a ``map_batches`` callable class)."""

    def __init__(self, job: Job, limit: Actor, base_url: str | None, journal: str | None,
                 price: Price | None) -> None:
        self._job = job
        self._limit = limit
        self._name = uuid.uuid4().hex[:12]
        self._renderer = PromptRenderer(job.prompt)
        self._keys = RowKeys(job)
        self._answers = Answers(Path(journal)) if journal else None
        self._writer = AnswerWriter(Path(journal), self._name) if journal else None
        self._streak = FailureStreak(job.retry.stop_after_identical_failures)
        self._loop = asyncio.new_event_loop()
        self._limiter = LeasedLimiter(_ActorLeases(limit), self._name, time.monotonic,
                                      asyncio.sleep)
        try:
            endpoint, redactor = resolve_endpoint(job.endpoint, base_url=base_url)
        except BatcherError as error:
            limit.fail.remote(str(error), error.exit_code)
            raise
        self._client = ChatClient(endpoint, redactor, job.limits.concurrency)
        self._loop.run_until_complete(self._client.__aenter__())
        self._stats = RunStats()
        self._sending = Sending.for_job(job, self._client, self._limiter, self._stats,
                                        asyncio.sleep, random.Random(), price=price)

    def __call__(self, table: pa.Table) -> pa.Table:
        try:
            return self._loop.run_until_complete(self._answer(table))
        except RunAborted as error:
            self._limiter.stop(str(error))
            self._loop.run_until_complete(self._report())
            raise
        except BatcherError as error:
            self._limit.fail.remote(str(error), error.exit_code)
            raise

    async def _answer(self, table: pa.Table) -> pa.Table:
        schema = pa.schema(list(table.schema) + result_fields())
        if not table.num_rows:
            return schema.empty_table()
        batch = table.combine_chunks().to_batches()[0]
        keys, prompts = self._keyed(batch)
        records: list[dict[str, Any] | None] = (
            [None] * batch.num_rows if self._answers is None else self._answers.find(keys))
        for record in records:
            if record is not None:
                record[SOURCE_COLUMN] = SOURCE_REUSED
        self._limiter.count({"reused": sum(record is not None for record in records)})
        pending = []
        for offset, request in enumerate(self._requests(keys, prompts, records)):
            if isinstance(request, RowResult):
                records[offset] = {**request.to_dict(), SOURCE_COLUMN: SOURCE_SENT}
                self._count(request)
            elif request is not None:
                pending.append(request)
        slots = asyncio.Semaphore(self._job.limits.concurrency)

        async def answer(request: RowRequest) -> None:
            async with slots:
                outcome = await attempt_row(request, self._sending)
            assert outcome is not None  # a worker never stops midway: it has no stop flag
            outcome.result.finished_at = round(time.time(), 3)
            if self._writer is not None:
                self._writer.append(request.key, outcome.result)
            records[request.position] = {**outcome.result.to_dict(), SOURCE_COLUMN: SOURCE_SENT}
            self._count(outcome.result)
            failure = outcome.failure
            if self._streak.record(failure.signature if failure else None):
                raise RunAborted(
                    f"stopped after {self._streak.count} rows in a row failed the same way "
                    f"({failure.message if failure else ''}); fix the job and run again, "
                    "the finished rows are kept (retry.stop_after_identical_failures)")

        try:
            async with asyncio.TaskGroup() as group:
                for request in pending:
                    group.create_task(answer(request))
        except BaseExceptionGroup as group:
            raise first_cause(group) from None
        await self._report()
        columns = list(batch.columns) + [
            pa.array([(record or {}).get(field.name) for record in records], type=field.type)
            for field in result_fields()]
        return pa.Table.from_arrays(columns, schema=schema)

    def _keyed(self, batch: pa.RecordBatch) -> tuple[np.ndarray, Prompts]:
        """The batch's row keys and user messages."""
        id_column = self._job.input.id_column
        # Without an id column a row is its request: a distributed read keeps no positions.
        ids = id_strings(batch.column(id_column)) if id_column else [""] * batch.num_rows
        prompts = self._renderer.prompts(batch)
        return self._keys.keys(ids, prompts), prompts

    def _requests(self, keys: np.ndarray, prompts: Prompts,
                  records: list[dict[str, Any] | None]) -> list[RowRequest | RowResult | None]:
        """Each row's request, its error when it cannot be sent, None when answered."""
        return [None if record is not None else row_request(
            PendingRow(offset, keys[offset].tobytes(), prompts.texts[offset],
                       prompts.problems.get(offset)), self._job, self._renderer)
            for offset, record in enumerate(records)]

    def _count(self, result: RowResult) -> None:
        self._limiter.count({"ok" if result.ok else "errors": 1,
                             "prompt_tokens": result.prompt_tokens or 0,
                             "completion_tokens": result.completion_tokens or 0,
                             "cost_nano_usd": round((result.cost_usd or 0.0) * 1e9)})

    async def _report(self) -> None:
        stats = self._stats
        self._limiter.count({"requests": stats.requests, "rate_limited": stats.rate_limited})
        stats.requests = stats.rate_limited = 0
        await self._limit.report.remote(self._limiter.take_feedback())


# -- a Dataset in, a Dataset out ----------------------------------------------------------------


def run_dataset(dataset: ray.data.Dataset, job: str | os.PathLike[str] | Job
                | Mapping[str, Any] | None = None, *, checkpoint: str | os.PathLike[str]
                | None = None, workers: int = 2, batch_rows: int = 200,
                **settings: Any) -> ray.data.Dataset:
    """``dataset`` with the result columns added, one row per input row (lazy, as
    any Dataset: rows are sent when it is consumed).

    The job is a job file's path, a dict in the job file's shape or a ``Job``
    (its ``input`` and ``output`` are not used), or keyword arguments by the
    names the notebook API takes: ``model``, ``prompt_column`` or
    ``template``, ``system``, ``params``, ``base_url``, ``api_key_env``,
    ``concurrency`` (per worker), ``requests_per_minute``,
    ``tokens_per_minute`` (for the whole cluster), ``max_attempts``. The key is
    read from ``api_key_env`` in each worker's environment. ``checkpoint``: a
    folder (on storage every node sees) where finished rows are journaled, so
    consuming the same Dataset again sends only the rows not yet answered.

    >>> out = run_dataset(ray.data.read_parquet("s3://bucket/prompts/"),  # doctest: +SKIP
    ...                   model="gpt-4o-mini", prompt_column="text",
    ...                   base_url="https://api.openai.com/v1", api_key_env="OPENAI_API_KEY",
    ...                   requests_per_minute=5000, checkpoint="/mnt/shared/prompts.ckpt")
    >>> out.write_parquet("s3://bucket/answers/")
    """
    loaded = _job_from(job, settings)
    if loaded.endpoint.mock is not None:
        raise ConfigError("run_dataset(...): endpoint.mock: not available on Ray; start "
                          "`batcher mock-server` and give its base_url instead")
    _check_ray_settings(loaded, "run_dataset(...)")
    resolve_endpoint(loaded.endpoint)  # a missing key is found here, before any worker starts
    _check_columns(loaded, dataset.schema().names, "the Dataset")
    limit = _limit_actor(loaded)
    return _mapped(dataset, loaded, limit, None,
                   None if checkpoint is None else str(Path(checkpoint).resolve()),
                   RayOptions(workers, batch_rows))


def _job_from(job: object, settings: dict[str, Any]) -> Job:
    source = "run_dataset(...)"
    if job is not None and settings:
        raise ConfigError(f"{source}: give a job or keyword settings, not both "
                          f"({', '.join(sorted(settings))})")
    if isinstance(job, Job):
        return job
    if isinstance(job, str | os.PathLike):
        path = Path(job)
        return _job_with_placeholder(read_job_file(path), path.parent, str(path))
    if isinstance(job, Mapping):
        return _job_with_placeholder(dict(job), Path.cwd(), source)
    if job is not None:
        raise ConfigError(f"{source}: job: must be a job file's path, a dict of job keys or a "
                          f"Job (got {type(job).__name__})")
    names = {"prompt_column": ("prompt", "column"), "template": ("prompt", "template"),
             "system": ("prompt", "system"), "base_url": ("endpoint", "base_url"),
             "api_key_env": ("endpoint", "api_key_env"), "timeout_s": ("endpoint", "timeout_s"),
             "concurrency": ("limits", "concurrency"),
             "requests_per_minute": ("limits", "requests_per_minute"),
             "tokens_per_minute": ("limits", "tokens_per_minute"),
             "max_attempts": ("retry", "max_attempts")}
    data: dict[str, Any] = {"name": "dataset"}
    for name, value in settings.items():
        if name in ("model", "params"):
            data[name] = value
        elif name in names:
            section, key = names[name]
            data.setdefault(section, {})[key] = value
        else:
            raise ConfigError(f"{source}: {name}: unknown setting (settings: model, params, "
                              f"{', '.join(names)})")
    return _job_with_placeholder(data, Path.cwd(), source)


def _job_with_placeholder(data: dict[str, Any], base_dir: Path, source: str) -> Job:
    """A job whose input Ray reads: its ``input.path`` becomes a placeholder."""
    data = dict(data)
    given = data.get("input")
    block = dict(given) if isinstance(given, dict) else {}
    block["path"] = f"{PLACEHOLDER}.parquet"
    data["input"] = block
    return job_from_dict(data, base_dir=base_dir, source=source, require_output=False)


def _limit_actor(job: Job) -> Actor:
    name = f"batcher-limit-{uuid.uuid4().hex[:12]}"
    actor: Actor = LimitActor.options(name=name).remote(  # type: ignore[attr-defined]
        job.limits.requests_per_minute, job.limits.tokens_per_minute)
    return actor


def _check_ray_settings(job: Job, source: str) -> None:
    if job.mode != "online":
        raise ConfigError(f"{source}: mode: batch: not available on Ray")
    for name in ("max_cost_usd", "max_total_tokens"):
        if getattr(job.limits, name) is not None:
            raise ConfigError(f"{source}: limits.{name}: not available on Ray yet; run on one "
                              "machine for a spending limit")


def _price(job: Job) -> Price | None:
    price = resolve_price(job.model, pricing=job.pricing, base_url=job.endpoint.base_url,
                          batch=False)
    return price if isinstance(price, Price) else None


def _mapped(dataset: ray.data.Dataset, job: Job, limit: Actor, base_url: str | None,
            journal: str | None, options: RayOptions) -> ray.data.Dataset:
    return dataset.map_batches(
        RowsWorker, batch_format="pyarrow", batch_size=options.batch_rows,
        # One batch queued per worker at a time, so every worker gets rows.
        compute=ray.data.ActorPoolStrategy(size=options.workers, max_tasks_in_flight_per_actor=1),
        num_cpus=WORKER_CPUS,
        fn_constructor_kwargs={"job": job, "limit": limit, "base_url": base_url,
                               "journal": journal, "price": _price(job)})


def _check_columns(job: Job, names: list[str], where: str) -> None:
    wanted = [("input.id_column", job.input.id_column)] if job.input.id_column else []
    key = "prompt.column" if job.prompt.column is not None else "prompt.template"
    wanted += [(key, name) for name in job.prompt.columns()]
    for setting, column in wanted:
        if column not in names:
            raise DataError(f"{where}: {setting} names column '{column}', which it does not "
                            f"have (columns: {', '.join(names) or 'none'})")
    clashes = [name for name in names if name in RESULT_COLUMNS]
    if clashes:
        raise DataError(f"{where}: column '{clashes[0]}' has the name of a results column; "
                        "rename it in the input")


# -- batcher run JOB.yaml --ray -----------------------------------------------------------------


@dataclass(frozen=True)
class RayJob:
    """A job file read for Ray: the job, and what Ray reads as its input."""

    job: Job
    location: str | list[str]
    kind: str  # parquet, csv or json


def load_ray_job(path: Path) -> RayJob:
    """The job file, its input a file, a folder, a glob or a URI (``s3://...``)."""
    data = read_job_file(path)
    given = data.get("input")
    raw = given.get("path") if isinstance(given, dict) else None
    if not isinstance(raw, str) or not raw:
        job_from_dict(data, base_dir=path.parent, source=str(path), require_output=True)
        raise ConfigError(f"{path}: input.path: is required")  # validation said it first
    location, kind = _input_location(raw, path.parent, str(path))
    job = _job_with_placeholder(data, path.parent, str(path))
    if job.output is None:
        raise ConfigError(f"{path}: output: is required (output.path: where results go)")
    return RayJob(job, location, kind)


def _input_location(raw: str, base_dir: Path, source: str) -> tuple[str | list[str], str]:
    if "://" in raw:
        return raw, _kind(Path(raw.rstrip("/")).name or raw, source, raw)
    local = base_dir / Path(raw).expanduser()
    if glob.has_magic(str(local)):
        files = sorted(glob.glob(str(local)))  # noqa: PTH207 - wildcards in folders too
        if not files:
            raise DataError(f"{source}: input.path: no file matches {raw}")
        return files, _kind(files[0], source, raw)
    if local.is_dir():
        files = sorted(str(item) for item in local.iterdir()
                       if item.is_file() and item.suffix.lower() in FORMATS)
        if not files:
            raise DataError(f"{source}: input.path: {local} holds no .parquet, .csv or .jsonl "
                            "file")
        return files, _kind(files[0], source, raw)
    if not local.is_file():
        raise DataError(f"{source}: input.path: {local}: no such file or folder")
    return str(local), _kind(str(local), source, raw)


def _local_files(location: str | list[str]) -> list[Path]:
    """The input's files on this machine (none for a URI)."""
    names = [location] if isinstance(location, str) else location
    return [Path(name).resolve() for name in names if "://" not in name]


def _kind(name: str, source: str, raw: str) -> str:
    kind = FORMATS.get(Path(name).suffix.lower())
    if kind is None:
        raise ConfigError(f"{source}: input.path: {raw}: must name .parquet, .csv or .jsonl "
                          "files (a file, a folder of them, a glob or a URI)")
    return kind


def _read(ray_job: RayJob, workers: int) -> ray.data.Dataset:
    if ray_job.kind == "parquet":
        dataset = ray.data.read_parquet(ray_job.location)
    elif ray_job.kind == "json":
        dataset = ray.data.read_json(ray_job.location, lines=True)
    else:
        dataset = ray.data.read_csv(ray_job.location)
    # A block goes to one worker whole: one file is often one block, so split it.
    return dataset.repartition(4 * workers) if isinstance(ray_job.location, str) else dataset


def run_job_on_ray(path: Path, *, fresh: bool = False, progress: bool = True,
                   options: RayOptions | None = None,
                   environ: Mapping[str, str] | None = None) -> tuple[Job, RunReport]:
    """``batcher run JOB.yaml --ray``: the job on Ray, results written as a folder of
    Parquet files at ``output.path``. Raises a ``BatcherError`` as a run on one machine."""
    options = options or RayOptions()
    ray_job = load_ray_job(path)
    job = ray_job.job
    assert job.output is not None
    _check_ray_settings(job, str(path))
    check_input_apart(job, _local_files(ray_job.location))
    if job.endpoint.mock is None:
        resolve_endpoint(job.endpoint, environ=environ)  # a missing key: exit 2, nothing started
    folder = journal_folder(job)
    with _run_lock(folder), _mock_for(job) as base_url:
        if fresh:
            for old in folder.glob("journal-*.jsonl"):
                old.unlink()
        with _ray_for(options.address):
            return job, _drive(ray_job, base_url, folder, options, progress)


@contextlib.contextmanager
def _run_lock(folder: Path) -> Iterator[None]:
    private_folder(folder, "journal folder")
    lock = folder / ".lock"
    fd = open_private(lock, "lock file")
    try:
        if not platform.try_lock(fd, lock):
            raise RunInProgress(f"{folder}: another batcher run of this job is in progress; "
                                "wait for it to finish")
        try:
            yield
        finally:
            platform.unlock(fd, lock)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _mock_for(job: Job) -> Iterator[str | None]:
    mock = job.endpoint.mock
    if mock is None:
        yield None
        return
    with MockServer(MockConfig(latency_s=mock.latency_s, seed=mock.seed)) as server:
        yield server.base_url


@contextlib.contextmanager
def _ray_for(address: str | None) -> Iterator[None]:
    """Ray for the run: this process's, if it already has one; the cluster the user
    names (``--ray-address``, then ``RAY_ADDRESS``); otherwise a private local Ray.

    Left to itself, ``ray.init()`` joins the cluster named by the address file in
    Ray's temp folder (``/tmp/ray``, which Ray makes writable by every user), so
    another user could point batcher at their cluster and see every prompt. A local
    Ray is started in a temp folder of its own (0700, removed afterwards), and asked
    for with ``address="local"``, which reads no address file.
    """
    if ray.is_initialized():
        _quiet_ray()
        yield
        return
    named = address or os.environ.get("RAY_ADDRESS") or None
    private = None if named else tempfile.mkdtemp(
        prefix="bray-", dir=os.environ.get("RAY_TMPDIR") or None)  # short: Ray's socket paths
    try:
        ray.init(address=named or "local", _temp_dir=private, include_dashboard=False,
                 logging_level=logging.ERROR, log_to_driver=False, configure_logging=False)
        _quiet_ray()
        try:
            yield
        finally:
            ray.shutdown()
    finally:
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)


def _quiet_ray() -> None:
    for name in ("ray", "ray.data"):  # Ray's own progress and errors: batcher reports its own
        logging.getLogger(name).setLevel(logging.CRITICAL)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def _drive(ray_job: RayJob, base_url: str | None, folder: Path, options: RayOptions,
           progress: bool) -> RunReport:
    job = ray_job.job
    assert job.output is not None
    dataset = _read(ray_job, options.workers)
    _check_columns(job, dataset.schema().names, str(ray_job.location if isinstance(
        ray_job.location, str) else Path(ray_job.location[0]).parent))
    total = dataset.count()
    limit = _limit_actor(job)
    out = _mapped(dataset, job, limit, base_url, str(folder), options)
    target = results_folder(job)
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
        with _sigterm_as_interrupt():
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
    if abort is not None:
        shutil.rmtree(staging, ignore_errors=True)
        raise RunAborted(abort)
    if failure is not None:
        shutil.rmtree(staging, ignore_errors=True)
        raise _error_with_code(*failure)
    if failures:
        shutil.rmtree(staging, ignore_errors=True)
        raise OutputError(f"the run on Ray failed: {_one_line(failures[0])}")
    _replace(staging, target)
    return RunReport(stats, total, stats.errors, target, price=_price(job))


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops the driver as Ctrl-C does (exit 143), where a handler can be set."""

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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

