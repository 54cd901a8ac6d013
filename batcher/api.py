"""The Python API: run a job file, a job dict, or a DataFrame, from a script or a notebook.

Everything here is a thin facade over the one core the CLI uses
(:func:`batcher.jobs.arun_job`): keyword arguments are turned into a plain
dict in the job file's shape and validated by
:func:`batcher.config.job_from_dict`, so a bad keyword reads exactly like a
bad YAML key (``limits.requests_per_minute: must be a positive number``).

A DataFrame is written to a Parquet file (only the columns the prompt
reads), run like any job, and the result columns are appended to a copy of
the caller's frame, index and dtypes untouched. Parquet is byte-identical
for an identical frame, so the checkpoint's fingerprint matches and a call
repeated after an interrupt resumes instead of starting over.

The sync functions work inside a running event loop (Jupyter, IPython)
without patching it: the run gets its own loop on a worker thread while the
calling thread waits. Ctrl-C (a kernel interrupt) while waiting asks the run
to stop as the CLI's Ctrl-C does: requests in flight get a grace period, a
second Ctrl-C cancels them, and ``KeyboardInterrupt`` is raised once the
finished rows are safely journaled. Calling again resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import ChainMap
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

import pandas as pd

from batcher import jobs
from batcher.config import InputSpec, Job, OutputSpec, job_from_dict, load_job
from batcher.errors import ConfigError, DataError, Interrupted
from batcher.pricing import price_for
from batcher.records import FLOAT_COLUMNS, INTEGER_COLUMNS, RESULT_COLUMNS
from batcher.runner import RunControl, RunOptions, RunReport, fingerprint

__all__ = ["JobSource", "Result", "Summary", "arun", "arun_dataframe", "run", "run_dataframe"]

JobSource: TypeAlias = str | os.PathLike[str] | Job | Mapping[str, Any]
"""A job file's path, a mapping in the job file's shape, or a loaded ``Job``."""

T = TypeVar("T")

LIST_COLUMN = "prompt"  # the column a plain list of prompts becomes
KEY_ENV = "BATCHER_API_KEY"  # the name an ``api_key=`` is known by, in memory only
_INPUT_NAME = "input.parquet"
_RESULTS_NAME = "results.parquet"


# -- the summary ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    """What one call did.

    ``rows``, ``ok`` and ``errors`` count every row of the results, those
    taken from the checkpoint included. ``requests``, the token counts and
    ``cost_usd`` cover what *this call* sent: rows already in the checkpoint
    cost nothing again. ``cost_usd`` is None when the model's list price is
    unknown; with ``simulated`` (the built-in mock server) it is what the
    same tokens would cost.

    >>> print(frame.attrs["batcher"]["ok"])         # doctest: +SKIP
    20
    """

    model: str
    rows: int
    ok: int
    errors: int
    from_checkpoint: int
    requests: int
    rate_limited: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None
    elapsed_s: float
    simulated: bool

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def exit_code(self) -> int:
        """The CLI's exit code for the same outcome: 0 all rows ok, 1 some failed."""
        return 1 if self.errors else 0

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly values (what ``frame.attrs["batcher"]`` holds)."""
        return {**asdict(self), "total_tokens": self.total_tokens}

    def __str__(self) -> str:
        cost = "" if self.cost_usd is None else (
            f", ${self.cost_usd:,.4f} at {self.model}'s list price")
        return (f"{_count(self.rows, 'row')}: {self.ok} ok, {_count(self.errors, 'error')} "
                f"({self.from_checkpoint} from the checkpoint); this call: "
                f"{_count(self.requests, 'request')} ({self.rate_limited} rate-limited), "
                f"{self.total_tokens:,} tokens{cost}, {self.elapsed_s:.1f} s"
                f"{' [simulated replies]' if self.simulated else ''}")


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


@dataclass(frozen=True)
class Result:
    """A finished job run: its summary and where its results are.

    ``frame`` reads the results file on first use (one row per input row,
    every input column, then the result columns).

    >>> result = batcher.run("jobs/demo.yaml")      # doctest: +SKIP
    >>> result.summary.ok, result.frame["reply"][0]
    """

    summary: Summary
    results_path: Path
    checkpoint_path: Path

    @property
    def exit_code(self) -> int:
        return self.summary.exit_code

    @cached_property
    def frame(self) -> pd.DataFrame:
        frame = _read_results_file(self.results_path)
        frame.attrs = {"batcher": self.summary.as_dict()}
        return frame


# -- job files and job dicts -----------------------------------------------------------------


def run(job: JobSource, *, fresh: bool = False, limit: int | None = None,
        progress: bool = True, api_key: str | None = None) -> Result:
    """Run a job to the end, or resume it, exactly as ``batcher run JOB.yaml`` does.

    ``job`` is a job file's path, a dict in the job file's shape (relative
    paths resolve against the current folder) or a loaded ``Job``. Works in
    a plain script and inside Jupyter alike. Ctrl-C stops gracefully and
    raises ``KeyboardInterrupt``; the checkpoint is kept and the same call
    resumes. ``api_key`` is held in memory only, under the job's
    ``endpoint.api_key_env`` name; it is never written anywhere.

    Raises a :class:`batcher.BatcherError` (``ConfigError``, ``DataError``,
    ``RunAborted``, ...) for anything the user must fix.

    >>> result = batcher.run("jobs/demo.yaml", limit=20)   # doctest: +SKIP
    >>> print(result.summary)
    20 rows: 20 ok, 0 errors (0 from the checkpoint); this call: 20 requests ...
    >>> result.frame[["review_id", "reply"]].head()
    """
    loaded, environ = _job_and_environ(job, limit, api_key, "batcher.run(...)")
    return _run_blocking(lambda control: _arun_loaded(
        loaded, environ, _options(fresh, limit, progress, control)))


async def arun(job: JobSource, *, fresh: bool = False, limit: int | None = None,
               progress: bool = True, api_key: str | None = None) -> Result:
    """The async twin of :func:`run`, for code that already runs in an event loop.

    It runs in the caller's loop. To stop it, cancel the task: finished rows
    stay in the checkpoint and the same call resumes.

    >>> result = await batcher.arun("jobs/demo.yaml")     # doctest: +SKIP
    """
    loaded, environ = _job_and_environ(job, limit, api_key, "batcher.arun(...)")
    return await _arun_loaded(loaded, environ, _options(fresh, limit, progress, None))


def _job_and_environ(job: JobSource, limit: int | None, api_key: str | None,
                     source: str) -> tuple[Job, Mapping[str, str] | None]:
    loaded = _load_job(job, source)
    _check_limit(limit, source)
    return _with_key(loaded, api_key, source)


async def _arun_loaded(job: Job, environ: Mapping[str, str] | None,
                       options: RunOptions) -> Result:
    started = time.monotonic()
    assert job.output is not None
    checkpoint = job.output.checkpoint_path
    report = await _execute(job, options, environ, kept=f"in the checkpoint {checkpoint}")
    summary = _summarize(job, report, started)
    if options.progress:
        print(f"batcher: {summary}", file=sys.stderr, flush=True)
    assert report.results_path is not None
    return Result(summary, report.results_path, checkpoint)


def _load_job(job: JobSource, source: str) -> Job:
    if isinstance(job, Job):
        if job.output is None:
            raise ConfigError(f"{source}: output: is required (output.path: where results go)")
        return job
    if isinstance(job, Mapping):
        data = dict(job)
        data.setdefault("name", "job")
        return job_from_dict(data, base_dir=Path.cwd(), source=source, require_output=True)
    if isinstance(job, str | os.PathLike):
        return load_job(Path(job), require_output=True)
    raise ConfigError(f"{source}: job: must be a job file's path, a dict of job keys or a Job "
                      f"(got {type(job).__name__})")


def _with_key(job: Job, api_key: str | None, source: str
              ) -> tuple[Job, Mapping[str, str] | None]:
    """The job and the environment it reads its key from: ``api_key`` lives only there."""
    if api_key is None:
        return job, None
    if not isinstance(api_key, str) or not api_key.strip():
        raise ConfigError(f"{source}: api_key: must be a non-empty string (or leave it out and "
                          "name an environment variable with api_key_env)")
    name = job.endpoint.api_key_env
    if name is None:
        name = KEY_ENV
        job = job.model_copy(update={
            "endpoint": job.endpoint.model_copy(update={"api_key_env": name})})
    return job, ChainMap({name: api_key.strip()}, os.environ)


# -- DataFrames and lists of prompts ---------------------------------------------------------


def run_dataframe(
    data: pd.DataFrame | pd.Series[Any] | Sequence[str],
    *,
    model: str,
    prompt_column: str | None = None,
    template: str | None = None,
    system: str | None = None,
    params: Mapping[str, Any] | None = None,
    base_url: str | None = None,
    api_key_env: str | None = None,
    api_key: str | None = None,
    mock: bool | Mapping[str, Any] = False,
    endpoint: Mapping[str, Any] | None = None,
    timeout_s: float | None = None,
    concurrency: int | None = None,
    requests_per_minute: float | None = None,
    tokens_per_minute: float | None = None,
    max_attempts: int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    fresh: bool = False,
    limit: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Send one prompt per row and return a copy of the frame with the replies added.

    The result columns (``reply``, ``finish_reason``, ``prompt_tokens``,
    ``completion_tokens``, ``total_tokens``, ``cached_tokens``,
    ``reasoning_tokens``, ``status``, ``error``, ``attempts``, ``latency_s``)
    are appended; the index and the input columns are kept as they were.
    Token columns are nullable integers (``Int64``). A row that fails after
    its retries has ``status == "error"`` and a one-line ``error``; it is
    data, not an exception. ``frame.attrs["batcher"]`` holds the run's
    :class:`Summary` as a dict (rows ok/error, tokens, cost, elapsed).

    ``data``: a DataFrame, a Series, or a list of prompt strings (they
    become a column named ``prompt``). The user message is the column
    ``prompt_column`` or the ``{column}`` ``template``; ``system`` is an
    optional system message. ``params`` go into every request body
    (``temperature``, ``max_tokens``, ...). The endpoint is ``base_url`` with
    the key read from the environment variable ``api_key_env`` (or given as
    ``api_key``, kept in memory only), or ``mock=True`` (or a dict such as
    ``{"latency_s": 0.01}``) for the built-in mock server: simulated replies,
    no network. ``endpoint`` takes any further ``endpoint`` keys of a job
    file (``auth``, ``headers``, ``azure``, ``allow_insecure_http``).
    ``concurrency``, ``requests_per_minute``,
    ``tokens_per_minute``, ``timeout_s`` and ``max_attempts`` are the job
    file's limits; every value is validated as in a job file.

    Checkpointing: with ``checkpoint="path.ckpt"`` every finished row is
    journaled there, so a call repeated after an interrupt, a crash or a
    kernel restart sends only the rows still missing (and a repeated call
    after success sends nothing); ``fresh=True`` starts over. Without it,
    an interrupted call's rows are kept for this Python session only, and
    calling again with the same arguments resumes. ``limit=N`` runs the
    first N rows (the result has N rows).

    Works in scripts and in Jupyter (no ``nest_asyncio``); Ctrl-C or a
    kernel interrupt stops gracefully and raises ``KeyboardInterrupt``.

    >>> import batcher, pandas as pd                       # doctest: +SKIP
    >>> df = pd.DataFrame({"text": ["I love it", "Broke in a day"]})
    >>> out = batcher.run_dataframe(df, model="gpt-4o-mini", prompt_column="text",
    ...                             system="Answer positive or negative.",
    ...                             base_url="https://api.openai.com/v1",
    ...                             api_key_env="OPENAI_API_KEY")
    >>> out[["text", "reply", "total_tokens"]]
    >>> out.attrs["batcher"]["cost_usd"]
    """
    frame, job, environ = _frame_job(
        data, "batcher.run_dataframe(...)", model=model, prompt_column=prompt_column,
        template=template, system=system, params=params, base_url=base_url,
        api_key_env=api_key_env, api_key=api_key, mock=mock, endpoint=endpoint,
        timeout_s=timeout_s, concurrency=concurrency, requests_per_minute=requests_per_minute,
        tokens_per_minute=tokens_per_minute, max_attempts=max_attempts, checkpoint=checkpoint,
        limit=limit)
    return _run_blocking(lambda control: _arun_frame(
        frame, job, environ, _options(fresh, limit, progress, control)))


async def arun_dataframe(
    data: pd.DataFrame | pd.Series[Any] | Sequence[str],
    *,
    model: str,
    prompt_column: str | None = None,
    template: str | None = None,
    system: str | None = None,
    params: Mapping[str, Any] | None = None,
    base_url: str | None = None,
    api_key_env: str | None = None,
    api_key: str | None = None,
    mock: bool | Mapping[str, Any] = False,
    endpoint: Mapping[str, Any] | None = None,
    timeout_s: float | None = None,
    concurrency: int | None = None,
    requests_per_minute: float | None = None,
    tokens_per_minute: float | None = None,
    max_attempts: int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    fresh: bool = False,
    limit: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """The async twin of :func:`run_dataframe`: same arguments, same result.

    It runs in the caller's event loop. To stop it, cancel the task: the
    finished rows are kept (in ``checkpoint``, or for this session) and the
    same call resumes.

    >>> out = await batcher.arun_dataframe(["Say hi", "Say bye"],   # doctest: +SKIP
    ...                                    model="gpt-4o-mini", mock=True)
    >>> list(out["status"])
    ['ok', 'ok']
    """
    frame, job, environ = _frame_job(
        data, "batcher.arun_dataframe(...)", model=model, prompt_column=prompt_column,
        template=template, system=system, params=params, base_url=base_url,
        api_key_env=api_key_env, api_key=api_key, mock=mock, endpoint=endpoint,
        timeout_s=timeout_s, concurrency=concurrency, requests_per_minute=requests_per_minute,
        tokens_per_minute=tokens_per_minute, max_attempts=max_attempts, checkpoint=checkpoint,
        limit=limit)
    return await _arun_frame(frame, job, environ, _options(fresh, limit, progress, None))


def _frame_job(data: object, source: str, *, model: str, prompt_column: str | None,
               template: str | None, system: str | None, params: Mapping[str, Any] | None,
               base_url: str | None, api_key_env: str | None, api_key: str | None,
               mock: bool | Mapping[str, Any], endpoint: Mapping[str, Any] | None,
               timeout_s: float | None, concurrency: int | None,
               requests_per_minute: float | None,
               tokens_per_minute: float | None, max_attempts: int | None,
               checkpoint: str | os.PathLike[str] | None, limit: int | None
               ) -> tuple[pd.DataFrame, Job, Mapping[str, str] | None]:
    """Validate every argument before anything is written or sent."""
    frame = _as_frame(data, source)
    if prompt_column is None and template is None and not isinstance(data, pd.DataFrame):
        prompt_column = str(frame.columns[0])
    target = _given(base_url=base_url, api_key_env=api_key_env, timeout_s=timeout_s)
    if mock is True:
        target["mock"] = {}
    elif mock is not False and mock is not None:
        target["mock"] = dict(mock) if isinstance(mock, Mapping) else mock
    endpoint_keys = _merged(endpoint, target, "endpoint", source)
    # The job file's shape, with only what the caller set: defaults stay the model's.
    spec: dict[str, Any] = {
        "name": "dataframe",
        # Placeholders: the real folder is known once the frame is serialized.
        "input": {"path": _INPUT_NAME},
        "prompt": _given(column=prompt_column, template=template, system=system),
        "model": model,
        "params": dict(params) if isinstance(params, Mapping) else ({} if params is None
                                                                     else params),
        "endpoint": endpoint_keys,
        "limits": _given(concurrency=concurrency, requests_per_minute=requests_per_minute,
                         tokens_per_minute=tokens_per_minute),
        "retry": _given(max_attempts=max_attempts),
        "output": _given(path=_RESULTS_NAME, checkpoint=_checkpoint_path(checkpoint, source)),
    }
    job = job_from_dict(spec, base_dir=Path(tempfile.gettempdir()) / "batcher-pending",
                        source=source, require_output=True)
    _check_limit(limit, source)
    _check_frame(frame, job, source)
    job, environ = _with_key(job, api_key, source)
    return frame, job, environ


def _given(**values: Any) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def _merged(extra: Mapping[str, Any] | None, named: dict[str, Any], section: str,
            source: str) -> Any:
    """A section from its own keyword arguments plus a mapping of further keys."""
    if extra is None:
        return named
    if not isinstance(extra, Mapping):
        return extra  # for validation to reject: "endpoint: must be a mapping of keys"
    twice = sorted(set(extra) & set(named))
    if twice:
        raise ConfigError(f"{source}: {section}.{twice[0]}: given twice, as {twice[0]}= and "
                          f"inside {section}=; keep one")
    return {**extra, **named}


def _checkpoint_path(checkpoint: object, source: str) -> object:
    """``checkpoint=`` resolves against the current folder, like any path in Python."""
    if not isinstance(checkpoint, str | os.PathLike):
        return checkpoint  # None, or a wrong type for validation to name
    path = (Path.cwd() / Path(checkpoint).expanduser()).resolve()
    if path.suffix.lower() in (".parquet", ".csv", ".jsonl", ".json") or path.is_dir():
        # A journal written over someone's data file would destroy it.
        raise ConfigError(f"{source}: output.checkpoint: {path} is a data file or a folder; "
                          f"name a checkpoint file such as "
                          f"'{path.with_suffix('.ckpt').name}'")
    return str(path)


def _as_frame(data: object, source: str) -> pd.DataFrame:
    if isinstance(data, pd.DataFrame):
        return data
    if isinstance(data, pd.Series):
        name = data.name if isinstance(data.name, str) and data.name else LIST_COLUMN
        return data.to_frame(name=name)
    if isinstance(data, str | bytes | Mapping) or not isinstance(data, Iterable):
        raise DataError(f"{source}: data: must be a DataFrame, a Series or a list of prompt "
                        f"strings (got {type(data).__name__})")
    return pd.DataFrame({LIST_COLUMN: list(data)})


def _check_frame(frame: pd.DataFrame, job: Job, source: str) -> None:
    names = [str(name) for name in frame.columns]
    clashes = [name for name in names if name in RESULT_COLUMNS]
    if clashes:
        raise DataError(
            f"{source}: the DataFrame already has a column '{clashes[0]}', the name of a "
            f"result column; rename or drop it first (result columns: "
            f"{', '.join(RESULT_COLUMNS)})")
    key = "prompt.column" if job.prompt.column is not None else "prompt.template"
    for column in job.prompt.columns():
        found = sum(1 for name in frame.columns if name == column)
        if found == 0:
            raise DataError(f"{source}: {key} names column '{column}', which the DataFrame "
                            f"does not have (columns: {', '.join(names) or 'none'})")
        if found > 1:
            raise DataError(f"{source}: {key} names column '{column}', which appears "
                            f"{found} times in the DataFrame; make the names unique")


def _check_limit(limit: int | None, source: str) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                              or limit < 0):
        raise ConfigError(f"{source}: limit: must be a whole number, zero or more")


async def _arun_frame(frame: pd.DataFrame, job: Job, environ: Mapping[str, str] | None,
                      options: RunOptions) -> pd.DataFrame:
    started = time.monotonic()
    assert job.output is not None
    payload = _parquet_bytes(frame, job.prompt.columns())
    user_checkpoint = job.output.checkpoint
    if user_checkpoint is not None:
        workspace = _scratch_folder()
        kept = f"in the checkpoint {user_checkpoint}"
    else:
        workspace = _SESSION.folder(_session_key(payload, job))
        kept = ("for this Python session (pass checkpoint='....ckpt' to keep them across a "
                "restart)")
    with workspace as folder:
        (folder / _INPUT_NAME).write_bytes(payload)
        job = _relocated(job, folder)
        report = await _execute(job, replace(options, allow_empty_input=True), environ,
                                kept=kept)
        assert report.results_path is not None
        results = _typed(pd.read_parquet(report.results_path, columns=list(RESULT_COLUMNS)))
    summary = _summarize(job, report, started)
    if options.progress:
        print(f"batcher: {summary}", file=sys.stderr, flush=True)
    out = frame.iloc[:report.rows].copy(deep=False)
    for column in RESULT_COLUMNS:
        out[column] = results[column].array  # positional: the caller's index is kept as is
    out.attrs = {**frame.attrs, "batcher": summary.as_dict()}
    return out


def _parquet_bytes(frame: pd.DataFrame, columns: list[str]) -> bytes:
    """The prompt's columns as Parquet: the same frame always gives the same bytes."""
    subset = pd.DataFrame({name: frame[name].reset_index(drop=True) for name in columns},
                          index=pd.RangeIndex(len(frame)))
    buffer = io.BytesIO()
    try:
        subset.to_parquet(buffer, index=False)
    except (ValueError, TypeError) as exc:  # pyarrow's ArrowInvalid / ArrowTypeError
        column = _unconvertible_column(subset)
        where = f"column '{column}'" if column else "the prompt's columns"
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{where}: values cannot be stored for sending ({detail}); give the "
                        "column one type, e.g. df[col].astype(str)") from None
    return buffer.getvalue()


def _unconvertible_column(subset: pd.DataFrame) -> str | None:
    for name in subset.columns:
        try:
            subset[[name]].to_parquet(io.BytesIO(), index=False)
        except (ValueError, TypeError):
            return str(name)
    return None


def _relocated(job: Job, folder: Path) -> Job:
    """The validated job pointed at its working folder (all three paths distinct)."""
    assert job.output is not None
    return job.model_copy(update={
        "input": InputSpec(path=folder / _INPUT_NAME),
        "output": OutputSpec(path=folder / _RESULTS_NAME, checkpoint=job.output.checkpoint),
    })


def _session_key(payload: bytes, job: Job) -> str:
    """What makes two calls the same: the checkpoint's own fingerprint of them."""
    return fingerprint(job, hashlib.blake2b(payload, digest_size=16).hexdigest())


@contextlib.contextmanager
def _scratch_folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="batcher-") as folder:
        yield Path(folder)


class _SessionFolders:
    """Working folders of calls made without ``checkpoint=``.

    A call's folder is named after what it sends, so an interrupted call
    leaves its journal where the same call, made again, finds it. A folder
    is removed when its call succeeds, and all of them at interpreter exit.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._root: tempfile.TemporaryDirectory[str] | None = None
        self._busy: set[str] = set()

    @contextlib.contextmanager
    def folder(self, key: str) -> Iterator[Path]:
        with self._lock:
            if self._root is None:
                self._root = tempfile.TemporaryDirectory(prefix="batcher-session-")
            root = Path(self._root.name)
            busy = key in self._busy
            self._busy.add(key)
        if busy:  # the same call is running right now (asyncio.gather?): run it apart
            with _scratch_folder() as folder:
                yield folder
            return
        path = root / key
        succeeded = False
        try:
            path.mkdir(parents=True, exist_ok=True)
            yield path
            succeeded = True
        finally:
            with self._lock:
                self._busy.discard(key)
            if succeeded:
                shutil.rmtree(path, ignore_errors=True)


_SESSION = _SessionFolders()


# -- running ---------------------------------------------------------------------------------


def _options(fresh: bool, limit: int | None, progress: bool,
             control: RunControl | None) -> RunOptions:
    return RunOptions(fresh=fresh, limit=limit, progress=progress, bar=_bar_default(),
                      handle_signals=False, control=control)


def _bar_default() -> bool | None:
    """A bar (a widget, via ``tqdm.auto``) in a Jupyter kernel, whose stderr is no tty."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is not None and "IPKernelApp" in getattr(shell, "config", {}):
        return True
    return None


async def _execute(job: Job, options: RunOptions, environ: Mapping[str, str] | None, *,
                   kept: str) -> RunReport:
    if job.endpoint.mock is not None and options.progress:
        print(f"batcher: {jobs.SIMULATED_NOTICE}", file=sys.stderr, flush=True)
    try:
        return await jobs.arun_job(job, options, environ=environ)
    except Interrupted as exc:
        raise Interrupted(f"interrupted: the rows finished so far are kept {kept}; call "
                          "again with the same arguments to resume (only the rest is sent)",
                          exc.exit_code) from None


def _summarize(job: Job, report: RunReport, started: float) -> Summary:
    stats = report.stats
    price = price_for(job.model)
    cost = None if price is None else round(
        price.cost(stats.prompt_tokens, stats.completion_tokens), 6)
    return Summary(
        model=job.model, rows=report.rows, ok=report.rows - report.failed_rows,
        errors=report.failed_rows, from_checkpoint=stats.already_done,
        requests=stats.requests, rate_limited=stats.rate_limited,
        prompt_tokens=stats.prompt_tokens, completion_tokens=stats.completion_tokens,
        cost_usd=cost, elapsed_s=round(time.monotonic() - started, 3),
        simulated=job.endpoint.mock is not None)


def _run_blocking(start: Callable[[RunControl], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to the end from sync code, even inside a running event loop.

    The coroutine gets a fresh loop on a worker thread; this thread waits.
    ``KeyboardInterrupt`` while waiting asks the run to stop (graceful the
    first time, immediate the second), waits for the checkpoint to be
    consistent, then is raised again with the resume hint.
    """
    control = RunControl()
    results: list[T] = []
    failures: list[BaseException] = []
    done = threading.Event()
    context = contextvars.copy_context()

    def work() -> None:
        try:
            results.append(context.run(asyncio.run, start(control)))
        except BaseException as exc:  # handed to the waiting thread below
            failures.append(exc)
        finally:
            done.set()

    worker = threading.Thread(target=work, name="batcher-run", daemon=True)
    worker.start()
    interrupted = False
    while not done.is_set():
        try:
            done.wait()
        except KeyboardInterrupt:
            interrupted = True
            control.request_stop()
    worker.join()
    if failures:
        error = failures[0]
        if interrupted and isinstance(error, Interrupted):
            raise KeyboardInterrupt(str(error)) from None
        raise error
    return results[0]  # finished before the stop took effect: nothing is lost


# -- reading results files -------------------------------------------------------------------


def _read_results_file(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        frame = pd.read_parquet(path)
    elif suffix == ".csv":
        # CSV input columns were read as text; keep them text (ids like "007").
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    else:
        # Values as written: no date or number guessing (pandas' read_json guesses).
        with path.open(encoding="utf-8") as lines:
            rows = [json.loads(line) for line in lines if line.strip()]
        # An empty JSONL file cannot name the input's columns; the result columns it has.
        frame = (pd.DataFrame.from_records(rows) if rows
                 else pd.DataFrame(columns=list(RESULT_COLUMNS)))
    return _typed(frame)


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    """Token columns as nullable integers whether or not a row failed; latency as float."""
    for column in RESULT_COLUMNS:
        if column in INTEGER_COLUMNS:
            frame[column] = pd.to_numeric(frame[column]).astype("Int64")
        elif column in FLOAT_COLUMNS:
            frame[column] = pd.to_numeric(frame[column]).astype("float64")
    return frame

