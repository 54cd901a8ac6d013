"""Every path a job writes, and the rule that none of them is, or holds, its input.

A job names its input, its results (``output.path``) and perhaps its
checkpoint; batcher derives the rest from those two:

========================  =============================================
``out.csv``               the results (one machine)
``out.summary.json``      the run summary, beside the results
``out.parquet/``          the results on Ray (``--ray``), a folder
``out.ckpt``              the checkpoint (``output.checkpoint``)
``out.ckpt.lock``         its lock
``out.ckpt.written``      the stamp of the last results write
``out.ckpt.batch/``       the batch work folder (``mode: batch``)
``out.ckpt.ray/``         the journals of a run on Ray
========================  =============================================

A run replaces those files and empties or replaces those folders, so one
that is the input, or a folder holding it, would destroy the user's data.
``validate`` and every run refuse such a job before anything is written
(exit 2), in every mode: the same job file may run on one machine today and
with ``--ray`` tomorrow.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from batcher.config import Job
from batcher.errors import ConfigError
from batcher.store.checkpoint import lock_path_for

SUMMARY_SUFFIX = ".summary.json"


def summary_path(results: Path) -> Path:
    """Where a run's JSON summary goes: beside its results, ``NAME.summary.json``."""
    return results.with_name(results.stem + SUMMARY_SUFFIX)


def stamp_path(checkpoint: Path) -> Path:
    """What the last results write was made from (``batcher.plan.finish``)."""
    return checkpoint.with_name(checkpoint.name + ".written")


def work_folder(checkpoint_path: Path) -> Path:
    """Where a job's batch state and shard files live: beside its checkpoint."""
    return checkpoint_path.with_name(checkpoint_path.name + ".batch")


def journal_folder(job: Job) -> Path:
    """Where a job run on Ray journals its rows: beside the one-machine checkpoint."""
    assert job.output is not None
    checkpoint = job.output.checkpoint_path
    return checkpoint.with_name(checkpoint.name + ".ray")


def results_folder(job: Job) -> Path:
    """Where a job run on Ray writes its results: a folder of Parquet files named
    after ``output.path`` (``results.csv`` becomes ``results.parquet/``)."""
    assert job.output is not None
    return job.output.path.with_suffix(".parquet")


@dataclass(frozen=True)
class Written:
    """One path a job writes: the job key that names it, what it is, and whether a
    run empties or replaces it as a folder."""

    key: str
    what: str
    path: Path
    folder: bool = False


def written_paths(job: Job) -> list[Written]:
    """Every file and folder a run of ``job`` may write, in any mode."""
    output = job.output
    assert output is not None
    results = output.path
    checkpoint = output.checkpoint_path
    key = "output.checkpoint" if output.checkpoint is not None else "output.path"
    return [
        Written("output.path", "the results file", results),
        Written("output.path", "the run summary", summary_path(results)),
        Written("output.path", "the results folder of a run with --ray", results_folder(job),
                folder=True),
        Written(key, "the checkpoint", checkpoint),
        Written(key, "the checkpoint's lock", lock_path_for(checkpoint)),
        Written(key, "the results stamp", stamp_path(checkpoint)),
        Written(key, "the batch work folder", work_folder(checkpoint), folder=True),
        Written(key, "the journal folder of a run with --ray", journal_folder(job), folder=True),
    ]


def check_input_apart(job: Job, inputs: Iterable[Path]) -> None:
    """Refuse (exit 2, one line naming both paths) a job that would write over its
    input or empty a folder holding it. ``inputs``: the input's files (on Ray, every
    file a folder or glob names)."""
    if job.output is None:
        return
    written = written_paths(job)
    for source in inputs:
        for item in written:
            names = {item.path, item.path.resolve()}
            if source in names or _same_file(source, item.path):
                raise ConfigError(f"{item.key}: {item.what} {item.path} would be the input "
                                  f"{source}; choose another {item.key}")
            if item.folder and any(source.is_relative_to(name) for name in names):
                raise ConfigError(f"{item.key}: {item.what} {item.path}/ would hold the input "
                                  f"{source}, and a run replaces or empties it; choose another "
                                  f"{item.key}")


def _same_file(one: Path, other: Path) -> bool:
    try:
        return one.samefile(other)
    except OSError:  # either is missing: not the same file
        return False
