"""Running a job file, a job dict or a loaded ``Job`` from Python."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeAlias

from batcher.api.bridge import blocking
from batcher.api.calls import check_limit, execute, options, summarize, with_key
from batcher.api.results import Result, result_columns
from batcher.config import Job
from batcher.errors import ConfigError
from batcher.jobload import job_from_dict, load_job

JobSource: TypeAlias = str | os.PathLike[str] | Job | Mapping[str, Any]
"""A job file's path, a mapping in the job file's shape, or a loaded ``Job``."""


async def arun(job: JobSource, *, fresh: bool = False, limit: int | None = None,
               progress: bool = True, api_key: str | None = None) -> Result:
    """Run a job to the end, or resume it, exactly as ``batcher run JOB.yaml`` does.

    ``run(...)`` blocks until done and works in a plain script and inside
    Jupyter alike; Ctrl-C stops gracefully and raises ``KeyboardInterrupt``.
    ``await arun(...)`` runs in the caller's event loop; to stop it, cancel
    the task. Either way the checkpoint keeps the finished rows and the same
    call resumes.

    ``job`` is a job file's path, a dict in the job file's shape (relative
    paths resolve against the current folder) or a loaded ``Job``.
    ``api_key`` is held in memory only, under the job's
    ``endpoint.api_key_env`` name; it is never written anywhere.

    Raises a :class:`batcher.BatcherError` (``ConfigError``, ``DataError``,
    ``RunAborted``, ...) for anything the user must fix.

    >>> result = batcher.run("jobs/demo.yaml", limit=20)   # doctest: +SKIP
    >>> print(result.summary)
    20 rows: 20 ok, 0 errors (0 from the checkpoint); this run: 20 requests ...
    >>> result.frame[["review_id", "reply"]].head()
    >>> result = await batcher.arun("jobs/demo.yaml")     # doctest: +SKIP
    """
    source = "batcher.run(...)"
    started = time.monotonic()
    loaded = _load_job(job, source)
    check_limit(limit, source)
    loaded, environ = with_key(loaded, api_key, source)
    assert loaded.output is not None
    checkpoint = loaded.output.checkpoint_path
    run_options = options(fresh, limit, progress)
    report = await execute(loaded, run_options, environ, kept=f"in the checkpoint {checkpoint}")
    summary = summarize(loaded, report, started, run_options)
    assert report.results_path is not None
    return Result(summary, report.results_path, checkpoint, result_columns(loaded)[1])


run = blocking(arun, "run")


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
