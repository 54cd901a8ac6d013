"""The ``batcher`` command: argument parsing and exit codes, nothing more.

All behaviour lives in the library (``batcher.jobs``); this module turns
options into calls and every ``BatcherError`` into one line on stderr and
the contract's exit code.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click
import orjson

from batcher import __version__, jobs
from batcher.config import Job
from batcher.errors import BatcherError, ConfigError
from batcher.io.inputs import return_freed_memory
from batcher.jobload import load_job
from batcher.jobs import SIMULATED_NOTICE
from batcher.mock_server import MockConfig, serve_forever
from batcher.online.runner import RunOptions, RunReport
from batcher.redact import printable
from batcher.reporting.summary import SCHEMA_VERSION, summarize_run

T = TypeVar("T")
JOB_ARGUMENT = click.argument("job_file", metavar="JOB.yaml",
                              type=click.Path(path_type=Path, dir_okay=False))


def _say(text: str, err: bool = False) -> None:
    """Every line the command prints, with terminal controls stripped (a server's
    error text must not retitle or clear the user's terminal)."""
    click.echo(printable(text), err=err)


def _report_errors(action: Callable[[], T], *, as_json: bool = False) -> T:
    try:
        return action()
    except BatcherError as error:
        _say(f"batcher: {error.label}: {error}", err=True)
        if as_json:  # a cron pipeline reads stdout: tell it what happened there too
            _echo_json({"schema_version": SCHEMA_VERSION, "exit_code": error.exit_code,
                        "error": str(error)})
        sys.exit(error.exit_code)


def _echo_json(data: object) -> None:
    click.echo(_json_text(data))


def _json_text(data: object) -> str:
    return orjson.dumps(data, option=orjson.OPT_INDENT_2).decode()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="batcher")
def main() -> None:
    """Run batches of prompts through OpenAI-compatible chat APIs: concurrent,
    rate-limited, resumable. See `batcher run --help`."""


@main.command()
@JOB_ARGUMENT
@click.option("--fresh", is_flag=True, help="Discard the checkpoint and start over.")
@click.option("--limit", type=click.IntRange(min=0), metavar="N",
              help="Run only the first N input rows.")
@click.option("--dry-run", "estimate_only", is_flag=True,
              help="Check the job and input, estimate tokens and cost; send nothing.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output, only the summary.")
@click.option("--wait", is_flag=True,
              help="mode: batch: poll until every batch is done instead of exiting once "
                   "they are submitted.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the run's summary as JSON on stdout (README: Run summary).")
@click.option("--ray", "on_ray", is_flag=True,
              help="Run on Ray (pip install 'batcher[ray]'): a local Ray, or the cluster at "
                   "RAY_ADDRESS / --ray-address. input.path may be a folder, a glob or a URI; "
                   "the results are a folder of Parquet files.")
@click.option("--ray-address", metavar="ADDRESS", help="With --ray: the cluster to join.")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="With --ray: how many workers send requests.")
def run(job_file: Path, fresh: bool, limit: int | None, estimate_only: bool,
        quiet: bool, wait: bool, as_json: bool, on_ray: bool, ray_address: str | None,
        workers: int) -> None:
    """Run JOB.yaml to the end; run it again to resume after a crash or Ctrl-C.

    With `mode: batch` the rows go to the provider's Batch API (half price,
    answered within 24 h): the first run submits and exits 0, later runs
    collect; `--wait` polls until done.

    Exit codes: 0 every row answered (or, in batch mode, submitted); 1 some
    rows failed (status `error` in the results); 2 bad job, input or
    arguments (nothing sent); 3 aborted by the server (bad key, no quota) or
    the budget (limits.max_cost_usd, limits.max_total_tokens); 130/143
    interrupted by SIGINT/SIGTERM.
    """
    if on_ray or ray_address:
        _run_on_ray(job_file, fresh, quiet, as_json, limit, estimate_only, ray_address, workers)
        return
    return_freed_memory()  # this process is the run's own: keep its peak down
    job = _report_errors(lambda: load_job(job_file), as_json=as_json)
    if estimate_only:
        figures = _report_errors(lambda: jobs.dry_run(job, limit, fresh=fresh),
                                 as_json=as_json)
        _say(f"{job_file}: dry run, nothing sent: {figures.describe()}")
        return
    if job.endpoint.mock is not None:
        _say(f"batcher: {SIMULATED_NOTICE}", err=True)
    options = RunOptions(fresh=fresh, limit=limit, progress=not quiet, wait=wait)
    started = time.monotonic()
    report = _report_errors(lambda: asyncio.run(jobs.arun_job(job, options)), as_json=as_json)
    if report.pending is not None:
        if as_json:
            _echo_json({"schema_version": SCHEMA_VERSION, "exit_code": 0,
                        "pending": report.pending})
        else:
            _say(f"submitted: {report.pending}")
        return
    summary = summarize_run(job, report, time.monotonic() - started)
    for line in summary.lines():
        _say(f"batcher: {line}", err=True)
    if as_json:
        _echo_json(summary.to_json())
        sys.exit(report.exit_code)
    state = "complete" if not report.failed_rows else (
        f"{report.failed_rows} row{'s' if report.failed_rows != 1 else ''} failed")
    if not report.results_rewritten:
        state += ", already up to date"
    elif job.output is not None and report.results_path != job.output.path:
        state += f", a sample of the first {limit} rows; {job.output.path} is left as it was"
    _say(f"results: {report.results_path} ({report.rows} rows, {state})")
    sys.exit(report.exit_code)


def _run_on_ray(job_file: Path, fresh: bool, quiet: bool, as_json: bool, limit: int | None,
                estimate_only: bool, address: str | None, workers: int) -> None:
    """``run --ray``: the job on a Ray cluster (``batcher.raydata``)."""

    def start() -> tuple[Job, RunReport]:
        if limit is not None or estimate_only:
            raise ConfigError(f"--ray: {'--limit' if limit is not None else '--dry-run'} is "
                              "not available on Ray; run without --ray to try a sample")
        try:
            from batcher import raydata  # Ray is an optional extra: imported only here
        except ImportError:
            raise ConfigError("--ray: Ray is not installed; pip install 'batcher[ray]'"
                              ) from None
        return raydata.run_job_on_ray(job_file, fresh=fresh, progress=not quiet,
                                      options=raydata.RayOptions(workers, address=address))

    started = time.monotonic()
    job, report = _report_errors(start, as_json=as_json)
    summary = summarize_run(job, report, time.monotonic() - started)
    for line in summary.lines():
        _say(f"batcher: {line}", err=True)
    if as_json:
        _echo_json(summary.to_json())
    else:
        state = "complete" if not report.failed_rows else (
            f"{report.failed_rows} row{'s' if report.failed_rows != 1 else ''} failed")
        _say(f"results: {report.results_path}/ ({report.rows} rows, {state})")
    sys.exit(report.exit_code)


@main.command()
@JOB_ARGUMENT
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(job_file: Path, as_json: bool) -> None:
    """How far JOB.yaml has got: rows done, errors, tokens, cost, rate and ETA.

    Reads the checkpoint without disturbing a run in progress (no lock is
    taken, nothing is written), so it works from another terminal while the
    job runs, and after it stopped.
    """
    from batcher.reporting.status import job_status

    figures = _report_errors(lambda: job_status(load_job(job_file)))
    if as_json:
        click.echo(_json_text(figures.as_dict()))  # JSON escapes every control character
    else:
        _say(figures.describe())


@main.command()
@click.argument("source", metavar="RESULTS|JOB.yaml",
                type=click.Path(path_type=Path, dir_okay=False))
@click.option("--output", "-o", "output", type=click.Path(path_type=Path, dir_okay=False),
              help="Where to write the HTML file (default: beside the results, NAME.report.html).")
def report(source: Path, output: Path | None) -> None:
    """Write a self-contained HTML report of a finished run: totals and cost,
    throughput against the limit, latency, tokens per row, errors, the
    slowest and most expensive rows (needs: pip install 'batcher[report]')."""
    from batcher.reporting.page import report_for

    def write() -> Path:
        built = report_for(source)
        return built.write(output or built.default_path)

    _say(f"report: {_report_errors(write)}")


@main.command()
@JOB_ARGUMENT
def validate(job_file: Path) -> None:
    """Check the job file and the input's columns and ids; send nothing."""

    def check() -> None:
        job = load_job(job_file)
        prepared = jobs.check_job(job)
        _say(f"{job_file}: ok ({prepared.rows} rows in {job.input.path.name})")
        schema = job.output.reply_schema if job.output is not None else None
        if schema is not None:
            assert job.output is not None
            names = ", ".join(job.output.schema_prefix + name for name in schema.properties)
            how = {"json_schema": "as response_format json_schema, strict" if schema.strict
                   else f"as response_format json_schema, not strict ({schema.strict_problem})",
                   "json_object": "as response_format json_object with its schema",
                   "prompt": "in the prompt"}[job.output.schema_mode]
            _say(f"output.schema: columns {names}; sent {how}")

    _report_errors(check)


@main.command("mock-server")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--latency", "latency_s", type=click.FloatRange(min=0), default=0.0,
              show_default=True, help="Seconds before each reply.")
@click.option("--api-key-env", metavar="VAR",
              help="Require the key held in this environment variable. Without it any key "
                   "is accepted, but the Files and Batches API still needs one: each file is "
                   "served only to the key that uploaded it.")
@click.option("--rpm", type=click.IntRange(min=1), help="Enforce a requests-per-minute limit.")
@click.option("--tpm", type=click.IntRange(min=1), help="Enforce a tokens-per-minute limit.")
@click.option("--window", "window_s", type=click.FloatRange(min=0.001), default=60.0,
              show_default=True, help="Seconds over which the limits are enforced.")
@click.option("--batch-phase", "batch_phase_s", type=click.FloatRange(min=0), default=0.0,
              show_default=True,
              help="Seconds each Batch API phase (validating, in_progress, finalizing) lasts.")
@click.option("--window-kind", type=click.Choice(["sliding", "calendar", "from_first"]),
              default="sliding", show_default=True,
              help="Sliding windows, fixed calendar windows, or fixed from the first request.")
@click.option("--off-by-one", is_flag=True,
              help="Report one request more remaining than will be admitted.")
@click.option("--ratelimit-scope", metavar="SCOPE",
              help="Report limits under LiteLLM's names for SCOPE (api_key, team, ...).")
@click.option("--rejection-style", type=click.Choice(["openai", "litellm_key", "litellm_router"]),
              default="openai", show_default=True, help="Headers and body of the 429.")
@click.option("--background-rpm", type=click.FloatRange(min=0.001),
              help="Another client on the same key sends this many requests a minute.")
@click.option("--no-limit-header", is_flag=True,
              help="Send only the remaining count and reset time, not the limit.")
def mock_server(port: int, latency_s: float, api_key_env: str | None, rpm: int | None,
                tpm: int | None, window_s: float, window_kind: str, off_by_one: bool,
                ratelimit_scope: str | None, rejection_style: str,
                background_rpm: float | None, no_limit_header: bool,
                batch_phase_s: float) -> None:
    """Serve the built-in OpenAI-compatible test server on 127.0.0.1 (replies are simulated)."""
    key = None
    if api_key_env:
        key = os.environ.get(api_key_env)
        if not key:
            _say(f"batcher: error: --api-key-env: environment variable {api_key_env} "
                       "is not set", err=True)
            sys.exit(2)
    try:
        serve_forever(MockConfig(port=port, latency_s=latency_s, api_key=key,
                                 requests_per_minute=rpm, tokens_per_minute=tpm,
                                 window_s=window_s,
                                 window_kind=window_kind,  # type: ignore[arg-type]
                                 remaining_off_by_one=off_by_one,
                                 ratelimit_scope=ratelimit_scope,
                                 rejection_style=rejection_style,  # type: ignore[arg-type]
                                 background_rpm=background_rpm,
                                 report_limit=not no_limit_header,
                                 batch_phase_s=batch_phase_s))
    except (ValueError, OSError) as error:  # a bad flag combination, or the port is taken
        _say(f"batcher: error: mock-server: {error}", err=True)
        sys.exit(2)
