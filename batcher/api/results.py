"""A finished run as the Python API returns it, and reading its results file back."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from batcher.config import Job
from batcher.plan.jobplan import JobPlan
from batcher.records import FLOAT_COLUMNS, INTEGER_COLUMNS, RESULT_COLUMNS
from batcher.reporting.summary import Summary


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
    # The pandas dtypes of the reply schema's columns (the file's own types are not
    # enough: CSV has none, and Parquet's integers with nulls read back as floats).
    column_types: Mapping[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return self.summary.exit_code

    @cached_property
    def frame(self) -> pd.DataFrame:
        frame = read_results_file(self.results_path, self.column_types)
        frame.attrs = {"batcher": self.summary.as_dict()}
        return frame


def result_columns(job: Job) -> tuple[list[str], dict[str, Any]]:
    """The columns a job's results add, in order, and the pandas dtypes of its schema's."""
    plan = JobPlan(job)
    columns = plan.schema_columns
    if columns is None:
        return plan.result_names, {}
    dtypes = {name: pd.CategoricalDtype(list(dtype)) if isinstance(dtype, tuple) else dtype
              for name, dtype in columns.pandas_dtypes().items()}
    return plan.result_names, dtypes


def read_results_file(path: Path, column_types: Mapping[str, Any]) -> pd.DataFrame:
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
                 else pd.DataFrame(columns=[*RESULT_COLUMNS, *column_types]))
    return typed(frame, column_types)


def typed(frame: pd.DataFrame, column_types: Mapping[str, Any]) -> pd.DataFrame:
    """Token columns as nullable integers whether or not a row failed; latency as float;
    the schema's columns as the schema says (``Int64``, ``boolean``, categories)."""
    for column in RESULT_COLUMNS:
        if column in INTEGER_COLUMNS:
            frame[column] = pd.to_numeric(frame[column]).astype("Int64")
        elif column in FLOAT_COLUMNS:
            frame[column] = pd.to_numeric(frame[column]).astype("float64")
    for column, dtype in column_types.items():
        values = frame[column]
        if dtype == "boolean" and not pd.api.types.is_bool_dtype(values):
            # CSV holds "true"/"false"; JSONL and Parquet with nulls, Python objects.
            values = values.map(_boolean, na_action="ignore")
        elif dtype in ("Int64", "float64"):
            values = pd.to_numeric(values)
        frame[column] = values.astype(dtype)
    return frame


def _boolean(value: object) -> object:
    return value if isinstance(value, bool) else str(value).strip().lower() == "true"
