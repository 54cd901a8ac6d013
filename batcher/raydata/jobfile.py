"""A job for Ray: from a job file whose input is a file, a folder, a glob or a
URI (``s3://...``) that Ray reads itself, or from what ``run_dataset`` is
given (a job file, a dict, a ``Job`` or keyword arguments); and the settings
Ray does not run.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.data

from batcher.config import Job
from batcher.errors import ConfigError, DataError
from batcher.jobload import job_from_dict, read_job_file
from batcher.plan.keywords import job_data

FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json", ".json": "json"}
PLACEHOLDER = "ray-input"  # the job's input.path when Ray reads the input itself
RESULTS_PLACEHOLDER = "ray-results.parquet"  # run_dataset's: the Dataset is the results
DATASET_SOURCE = "run_dataset(...)"


@dataclass(frozen=True)
class RayJob:
    """A job file read for Ray: the job, and what Ray reads as its input."""

    job: Job
    location: str | list[str]
    kind: str  # parquet, csv or json

    def local_files(self) -> list[Path]:
        """The input's files on this machine (none for a URI)."""
        names = [self.location] if isinstance(self.location, str) else self.location
        return [Path(name).resolve() for name in names if "://" not in name]

    def where(self) -> str:
        """The input, as a message names it: the file or URI, or the folder of files."""
        if isinstance(self.location, str):
            return self.location
        return str(Path(self.location[0]).parent)

    def read(self, workers: int) -> ray.data.Dataset:
        if self.kind == "parquet":
            dataset = ray.data.read_parquet(self.location)
        elif self.kind == "json":
            dataset = ray.data.read_json(self.location, lines=True)
        else:
            dataset = ray.data.read_csv(self.location)
        # A block goes to one worker whole: one file is often one block, so split it.
        return dataset.repartition(4 * workers) if isinstance(self.location, str) else dataset


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
    check_ray_settings(job, str(path))
    return RayJob(job, location, kind)


def dataset_job(job: object, settings: dict[str, Any]) -> Job:
    """The job ``run_dataset`` is given: a job file's path, a dict in the job file's
    shape, a ``Job``, or keyword settings (``batcher.plan.keywords``)."""
    source = DATASET_SOURCE
    if job is not None and settings:
        raise ConfigError(f"{source}: give a job or keyword settings, not both "
                          f"({', '.join(sorted(settings))})")
    if isinstance(job, Job):
        loaded = job
    elif isinstance(job, str | os.PathLike):
        path = Path(job)
        loaded = _job_with_placeholder(read_job_file(path), path.parent, str(path))
    elif isinstance(job, Mapping):
        loaded = _job_with_placeholder(_results_placeholder(dict(job)), Path.cwd(), source)
    elif job is not None:
        raise ConfigError(f"{source}: job: must be a job file's path, a dict of job keys or a "
                          f"Job (got {type(job).__name__})")
    else:
        data = _results_placeholder(job_data(settings, source, name="dataset"))
        loaded = _job_with_placeholder(data, Path.cwd(), source)
    if loaded.endpoint.mock is not None:
        raise ConfigError(f"{source}: endpoint.mock: not available on Ray; start "
                          "`batcher mock-server` and give its base_url instead")
    check_ray_settings(loaded, source)
    return loaded


def _results_placeholder(data: dict[str, Any]) -> dict[str, Any]:
    """An ``output`` block given without a path (a reply schema, say) gets one: the
    Dataset returned is the results, whatever ``output.path`` says."""
    given = data.get("output")
    if isinstance(given, dict) and "path" not in given:
        data["output"] = {**given, "path": RESULTS_PLACEHOLDER}
    return data


def _job_with_placeholder(data: dict[str, Any], base_dir: Path, source: str) -> Job:
    """A job whose input Ray reads: its ``input.path`` becomes a placeholder."""
    data = dict(data)
    given = data.get("input")
    block = dict(given) if isinstance(given, dict) else {}
    block["path"] = f"{PLACEHOLDER}.parquet"
    data["input"] = block
    return job_from_dict(data, base_dir=base_dir, source=source, require_output=False)


def check_ray_settings(job: Job, source: str) -> None:
    if job.mode != "online":
        raise ConfigError(f"{source}: mode: batch: not available on Ray")
    for name in ("max_cost_usd", "max_total_tokens"):
        if getattr(job.limits, name) is not None:
            raise ConfigError(f"{source}: limits.{name}: not available on Ray yet; run on one "
                              "machine for a spending limit")


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


def _kind(name: str, source: str, raw: str) -> str:
    kind = FORMATS.get(Path(name).suffix.lower())
    if kind is None:
        raise ConfigError(f"{source}: input.path: {raw}: must name .parquet, .csv or .jsonl "
                          "files (a file, a folder of them, a glob or a URI)")
    return kind
