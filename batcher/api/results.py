"""A finished run as the Python API returns it, and reading its results file back."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pandas as pd

from batcher.records import FLOAT_COLUMNS, INTEGER_COLUMNS, RESULT_COLUMNS
from batcher.summary import Summary


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
        frame = read_results_file(self.results_path)
        frame.attrs = {"batcher": self.summary.as_dict()}
        return frame


def read_results_file(path: Path) -> pd.DataFrame:
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
    return typed(frame)


def typed(frame: pd.DataFrame) -> pd.DataFrame:
    """Token columns as nullable integers whether or not a row failed; latency as float."""
    for column in RESULT_COLUMNS:
        if column in INTEGER_COLUMNS:
            frame[column] = pd.to_numeric(frame[column]).astype("Int64")
        elif column in FLOAT_COLUMNS:
            frame[column] = pd.to_numeric(frame[column]).astype("float64")
    return frame
