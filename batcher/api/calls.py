"""What every API call shares: the key kept in memory, options, and running
the job through the one core the CLI uses."""

from __future__ import annotations

import os
import sys
import time
from collections import ChainMap
from collections.abc import Mapping

from batcher import jobs
from batcher.api.bridge import current_control
from batcher.config import Job
from batcher.errors import FRESH_OPTION, ConfigError, Interrupted
from batcher.online.runner import RunOptions, RunReport
from batcher.redact import printable
from batcher.reporting.summary import Summary, summarize_run

KEY_ENV = "BATCHER_API_KEY"  # the name an ``api_key=`` is known by, in memory only


def with_key(job: Job, api_key: str | None, source: str
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


def check_limit(limit: int | None, source: str) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                              or limit < 0):
        raise ConfigError(f"{source}: limit: must be a whole number, zero or more")


def options(fresh: bool, limit: int | None, progress: bool, *,
            allow_empty_input: bool = False) -> RunOptions:
    """Run options for an API call; a blocking call's Ctrl-C reaches the run
    through its control."""
    return RunOptions(fresh=fresh, limit=limit, progress=progress, bar=_bar_default(),
                      handle_signals=False, allow_empty_input=allow_empty_input,
                      control=current_control())


def _bar_default() -> bool | None:
    """A bar (a widget, via ``tqdm.auto``) in a Jupyter kernel, whose stderr is no tty."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is not None and "IPKernelApp" in getattr(shell, "config", {}):
        return True
    return None


async def execute(job: Job, run_options: RunOptions, environ: Mapping[str, str] | None, *,
                  kept: str) -> RunReport:
    if job.endpoint.mock is not None and run_options.progress:
        print(f"batcher: {jobs.SIMULATED_NOTICE}", file=sys.stderr, flush=True)
    advice = FRESH_OPTION.set("fresh=True")  # errors advise the argument, not the flag
    try:
        return await jobs.arun_job(job, run_options, environ=environ)
    except Interrupted as exc:
        raise Interrupted(f"interrupted: the rows finished so far are kept {kept}; call "
                          "again with the same arguments to resume (only the rest is sent)",
                          exc.exit_code) from None
    finally:
        FRESH_OPTION.reset(advice)


def summarize(job: Job, report: RunReport, started: float, run_options: RunOptions) -> Summary:
    """The call's summary, shown on stderr unless progress is off."""
    summary = summarize_run(job, report, time.monotonic() - started)
    if run_options.progress:
        print(printable(f"batcher: {summary}"), file=sys.stderr, flush=True)
    return summary


