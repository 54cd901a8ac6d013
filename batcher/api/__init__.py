"""The Python API: run a job file, a job dict, or a DataFrame, from a script or a notebook.

Everything here is a thin facade over the one core the CLI uses
(:func:`batcher.jobs.arun_job`). Each call is defined once, as a coroutine
(``arun``, ``arun_dataframe``); its blocking twin (``run``,
``run_dataframe``) is derived from it by :func:`batcher.api.bridge.blocking`
and has the same signature and documentation.

- ``jobfiles``: job files, job dicts and ``Job`` objects;
- ``frames``: DataFrames, Series and lists of prompts;
- ``results``: the ``Result`` of a job call and reading results files back;
- ``bridge``: the sync face of the async calls (works inside Jupyter);
- ``calls``, ``workspace``: what the calls share, and where their files live.
"""

from __future__ import annotations

from batcher.api.calls import KEY_ENV
from batcher.api.frames import arun_dataframe, run_dataframe
from batcher.api.jobfiles import JobSource, arun, run
from batcher.api.results import Result
from batcher.reporting.page import Report, report
from batcher.reporting.summary import Summary

__all__ = ["KEY_ENV", "JobSource", "Report", "Result", "Summary", "arun", "arun_dataframe",
           "report", "run", "run_dataframe"]
