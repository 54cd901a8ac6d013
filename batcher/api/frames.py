"""DataFrames, Series and lists of prompts in, a DataFrame with the replies out.

The frame's prompt columns are written to a Parquet file, run like any job,
and the result columns are appended to a copy of the caller's frame, index
and dtypes untouched. Keyword arguments are turned into a plain dict in the
job file's shape and validated by :func:`batcher.jobload.job_from_dict`, so a
bad keyword reads exactly like a bad YAML key.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from batcher.api.bridge import blocking
from batcher.api.calls import check_limit, execute, options, summarize, with_key
from batcher.api.results import result_columns, typed
from batcher.api.workspace import (
    INPUT_NAME,
    RESULTS_NAME,
    SESSION,
    relocated,
    scratch_folder,
    session_key,
)
from batcher.config import Job
from batcher.errors import ConfigError, DataError
from batcher.jobload import job_from_dict
from batcher.plan.jobplan import JobPlan
from batcher.plan.keywords import job_data
from batcher.records import SOURCE_COLUMN, SOURCE_REUSED, SOURCE_SENT, STATUS_OK

if TYPE_CHECKING:
    from pydantic import BaseModel

LIST_COLUMN = "prompt"  # the column a plain list of prompts becomes


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
    schema: Mapping[str, Any] | type[BaseModel] | str | os.PathLike[str] | None = None,
    schema_mode: str | None = None,
    schema_prefix: str | None = None,
    invalid_reply_retries: int | None = None,
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

    Answers as data: ``schema`` (a JSON Schema dict, the path of a ``.json``
    file, or a pydantic model class) asks for replies in that shape, checks
    each one and adds one typed column per top-level property (``Int64``,
    ``boolean``, ``float64``, categories for enums, lists and dicts for
    nested values); ``schema_mode``, ``schema_prefix`` and
    ``invalid_reply_retries`` are the job file's ``output.schema_mode``,
    ``output.schema_prefix`` and ``retry.invalid_reply_retries``.

    Checkpointing: with ``checkpoint="path.ckpt"`` every finished row is
    journaled there, so a call repeated after an interrupt, a crash or a
    kernel restart sends only the rows still missing (and a repeated call
    after success sends nothing); ``fresh=True`` starts over. Without it,
    an interrupted call's rows are kept for this Python session only, and
    calling again with the same arguments resumes. ``limit=N`` runs the
    first N rows (the result has N rows).

    ``run_dataframe(...)`` blocks and works in scripts and in Jupyter (no
    ``nest_asyncio``); Ctrl-C or a kernel interrupt stops gracefully and
    raises ``KeyboardInterrupt``. ``await arun_dataframe(...)`` runs in the
    caller's event loop; to stop it, cancel the task. Either way the finished
    rows are kept and the same call resumes.

    >>> import batcher, pandas as pd                       # doctest: +SKIP
    >>> df = pd.DataFrame({"text": ["I love it", "Broke in a day"]})
    >>> out = batcher.run_dataframe(df, model="gpt-4o-mini", prompt_column="text",
    ...                             system="Answer positive or negative.",
    ...                             base_url="https://api.openai.com/v1",
    ...                             api_key_env="OPENAI_API_KEY")
    >>> out[["text", "reply", "total_tokens"]]
    >>> out.attrs["batcher"]["cost_usd"]
    """
    source = "batcher.run_dataframe(...)"
    started = time.monotonic()
    frame, job, environ = _frame_job(
        data, source, model=model, prompt_column=prompt_column,
        template=template, system=system, params=params, base_url=base_url,
        api_key_env=api_key_env, api_key=api_key, mock=mock, endpoint=endpoint,
        timeout_s=timeout_s, concurrency=concurrency, requests_per_minute=requests_per_minute,
        tokens_per_minute=tokens_per_minute, max_attempts=max_attempts, schema=schema,
        schema_mode=schema_mode, schema_prefix=schema_prefix,
        invalid_reply_retries=invalid_reply_retries, checkpoint=checkpoint, limit=limit)
    assert job.output is not None
    run_options = options(fresh, limit, progress, allow_empty_input=True)
    payload = _parquet_bytes(frame, job.prompt.columns())
    user_checkpoint = job.output.checkpoint
    if user_checkpoint is not None:
        workspace = scratch_folder()
        kept = f"in the checkpoint {user_checkpoint}"
    else:
        workspace = SESSION.folder(session_key(job))
        kept = ("for this Python session (pass checkpoint='....ckpt' to keep them across a "
                "restart)")
    with workspace as folder:
        (folder / INPUT_NAME).write_bytes(payload)
        job = relocated(job, folder)
        report = await execute(job, run_options, environ, kept=kept)
        assert report.results_path is not None
        names, dtypes = result_columns(job)
        results = typed(pd.read_parquet(report.results_path, columns=names), dtypes)
    if not report.results_rewritten:
        # The file is as an earlier call wrote it; this call sent nothing, so every
        # answer was reused (the rows left are input errors, decided now).
        results[SOURCE_COLUMN] = SOURCE_REUSED
        results.loc[results["status"] != STATUS_OK, SOURCE_COLUMN] = SOURCE_SENT
    summary = summarize(job, report, started, run_options)
    out = frame.iloc[:report.rows].copy(deep=False)
    for column in names:
        out[column] = results[column].array  # positional: the caller's index is kept as is
    out.attrs = {**frame.attrs, "batcher": summary.as_dict()}
    return out


run_dataframe = blocking(arun_dataframe, "run_dataframe")


def _frame_job(data: object, source: str, *, model: str, prompt_column: str | None,
               template: str | None, system: str | None, params: Mapping[str, Any] | None,
               base_url: str | None, api_key_env: str | None, api_key: str | None,
               mock: bool | Mapping[str, Any], endpoint: Mapping[str, Any] | None,
               timeout_s: float | None, concurrency: int | None,
               requests_per_minute: float | None,
               tokens_per_minute: float | None, max_attempts: int | None,
               schema: object, schema_mode: str | None, schema_prefix: str | None,
               invalid_reply_retries: int | None,
               checkpoint: str | os.PathLike[str] | None, limit: int | None
               ) -> tuple[pd.DataFrame, Job, Mapping[str, str] | None]:
    """Validate every argument before anything is written or sent."""
    frame = _as_frame(data, source)
    if prompt_column is None and template is None and not isinstance(data, pd.DataFrame):
        prompt_column = str(frame.columns[0])
    spec = job_data({
        "model": model, "prompt_column": prompt_column, "template": template, "system": system,
        "params": params, "base_url": base_url, "api_key_env": api_key_env,
        "timeout_s": timeout_s, "concurrency": concurrency,
        "requests_per_minute": requests_per_minute, "tokens_per_minute": tokens_per_minute,
        "max_attempts": max_attempts, "invalid_reply_retries": invalid_reply_retries,
        "schema": schema, "schema_mode": schema_mode, "schema_prefix": schema_prefix,
    }, source, name="dataframe")
    target = spec.get("endpoint", {})
    if mock is True:
        target["mock"] = {}
    elif mock is not False and mock is not None:
        target["mock"] = dict(mock) if isinstance(mock, Mapping) else mock
    spec["endpoint"] = _merged(endpoint, target, "endpoint", source)
    # Placeholders: the real folder is known once the frame is serialized.
    spec["input"] = {"path": INPUT_NAME}
    spec.setdefault("output", {}).update(
        _given(path=RESULTS_NAME, checkpoint=_checkpoint_path(checkpoint, source)))
    # A schema's path resolves against the current folder, like any path in Python.
    job = job_from_dict(spec, base_dir=Path(tempfile.gettempdir()) / "batcher-pending",
                        source=source, require_output=True, schema_dir=Path.cwd())
    check_limit(limit, source)
    JobPlan(job).check_columns([str(name) for name in frame.columns], source, "the DataFrame",
                               prefix_setting="schema_prefix=")
    job, environ = with_key(job, api_key, source)
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
