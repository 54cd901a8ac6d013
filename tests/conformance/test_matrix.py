"""The conformance matrix: each job shape (``shapes.SHAPES``) on each engine gives the
same result frame as on the online engine, or is refused with a one-line reason.

A cell is (shape, engine, aspect), the aspects being the columns (names and
order), their dtypes and their values, so a cell that drifts in one way
still holds the others to account. The columns that may legitimately differ
between engines are listed in ``LEGITIMATE``, each with its reason; the
cells known to drift are in ``KNOWN_DRIFT``, marked strict xfail so that
fixing the drift fails the cell until its mark is removed.

A new feature joins the matrix as a shape (or an engine) instead of growing
a test of its own per mode.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pytest

from batcher.mock_server import reply_for

from .conftest import Runs
from .engines import Outcome
from .shapes import ENGINES, REFERENCE, SHAPES, Shape

ALL_ENGINES = frozenset(ENGINES)

# A cell may start the matrix's Ray and run a whole job through it: on a busy
# machine that takes longer than the suite's default per-test bound.
pytestmark = pytest.mark.timeout(600)


@dataclass(frozen=True)
class Legitimate:
    """A column whose values may differ on ``engines``, and why. With ``normalize``,
    the engine's values are mapped onto the reference's before comparing;
    without it they are not compared (their dtype still is)."""

    engines: frozenset[str]
    reason: str
    normalize: Callable[[pd.Series[Any]], pd.Series[Any]] | None = None


# Every difference between engines the matrix accepts, in one place.
LEGITIMATE: dict[str, Legitimate] = {
    "finished_at": Legitimate(
        ALL_ENGINES, "the wall-clock moment each row's outcome was recorded"),
    "latency_s": Legitimate(
        ALL_ENGINES, "each request's own round trip; a Batch API answer has none (null)"),
    "cost_usd": Legitimate(
        frozenset({"batch"}), "batch answers are billed at the Batch API's price, half the "
        "online one for this model: doubled before comparing",
        normalize=lambda cost: cost * 2),
}

RAY_CSV = ("Ray reads the CSV with its own type inference: code 007 becomes 7, delta +5 "
           "becomes 5.0, so the prompts sent differ")
NOT_SHARED = "duplicates: share is ignored: every duplicate row is sent and its source is 'sent'"
FILE_BOOL = ("a boolean schema column reads back from the results file as numpy bool, the "
             "DataFrame API gives pandas boolean (as the README's table says)")

# Fixed by one plan for every driver (issue 21): on Ray, the schema instruction in the
# prompt, the typed schema columns, replies, and the result columns' dtypes. What is left
# is issue 22's (Ray's reading of inputs, sharing in batch mode and on Ray).
KNOWN_DRIFT: dict[tuple[str, str, str], str] = {
    ("duplicates_shared", "ray", "values"): NOT_SHARED,
    ("duplicates_shared", "ray", "requests"): NOT_SHARED,
    ("duplicates_shared", "batch", "values"): NOT_SHARED,
    ("duplicates_shared", "batch", "requests"): NOT_SHARED,
    ("csv_numbers", "ray", "dtypes"): RAY_CSV,
    ("csv_numbers", "ray", "values"): RAY_CSV,
    ("csv_numbers", "ray", "requests"): RAY_CSV,
    ("parquet_typed", "ray", "dtypes"): "the Int64 input column stars reads back float64",
    ("schema", "notebook", "dtypes"): FILE_BOOL,
    ("schema_in_prompt", "notebook", "dtypes"): FILE_BOOL,
}

ASPECTS = ("columns", "dtypes", "values", "requests")


def cells() -> list[Any]:
    found = []
    for shape in SHAPES:
        for engine in ENGINES:
            if engine == REFERENCE or engine in shape.refused_by:
                continue
            for aspect in ASPECTS:
                reason = KNOWN_DRIFT.get((shape.name, engine, aspect))
                marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
                found.append(pytest.param(shape, engine, aspect, marks=marks,
                                          id=f"{shape.name}-{engine}-{aspect}"))
    return found


def refusals() -> list[Any]:
    return [pytest.param(shape, engine, id=f"{shape.name}-{engine}")
            for shape in SHAPES for engine in shape.refused_by]


def outcome(request: pytest.FixtureRequest, runs: Runs, shape: Shape, engine: str) -> Outcome:
    if engine == "ray":
        request.getfixturevalue("ray_session")
    return runs.get(shape, engine)


def frame_of(request: pytest.FixtureRequest, runs: Runs, shape: Shape,
             engine: str) -> pd.DataFrame:
    ran = outcome(request, runs, shape, engine)
    assert ran.frame is not None, f"{engine} refused {shape.name}: {ran.refusal}"
    return ran.frame


@pytest.mark.parametrize(("shape", "engine", "aspect"), cells())
def test_same_results_as_online(request: pytest.FixtureRequest, runs: Runs, shape: Shape,
                                engine: str, aspect: str) -> None:
    expected = frame_of(request, runs, shape, REFERENCE)
    got = frame_of(request, runs, shape, engine)
    if aspect == "requests":
        assert outcome(request, runs, shape, engine).requests == (
            outcome(request, runs, shape, REFERENCE).requests)
    elif aspect == "columns":
        assert list(got.columns) == list(expected.columns)
    elif aspect == "dtypes":
        assert _dtypes(got) == {name: dtype for name, dtype in _dtypes(expected).items()
                                if name in got.columns}
    else:
        assert len(got) == len(expected)
        differ = {name: (values(expected[name]), values(_normalized(got[name], engine)))
                  for name in expected.columns if name in got.columns
                  and _compared(name, engine)
                  and values(expected[name]) != values(_normalized(got[name], engine))}
        assert not differ, differ


@pytest.mark.parametrize(("shape", "engine"), refusals())
def test_refused_with_one_line_reason(request: pytest.FixtureRequest, runs: Runs,
                                      shape: Shape, engine: str) -> None:
    ran = outcome(request, runs, shape, engine)
    assert ran.frame is None, f"{engine} ran {shape.name} instead of refusing it"
    assert ran.refusal is not None and "\n" not in ran.refusal
    assert shape.refused_by[engine] in ran.refusal, ran.refusal
    assert not ran.requests, "sent before refusing"


@pytest.mark.parametrize("shape", [pytest.param(shape, id=shape.name) for shape in SHAPES])
def test_online_answers_each_row_from_its_own_prompt(request: pytest.FixtureRequest,
                                                     runs: Runs, shape: Shape) -> None:
    """The reference is right, not only the others equal to it: the mock's reply to
    each row's own user message (the same text on every engine), an input error
    for a row with none, and with a schema the typed columns hold the reply's JSON."""
    frame = frame_of(request, runs, shape, REFERENCE)
    schema = shape.job.get("output", {}).get("schema")
    assert len(frame) == len(shape.prompts)
    for row, prompt in zip(frame.to_dict("records"), shape.prompts, strict=True):
        if prompt is None:
            assert _plain([row["status"], row["error_class"], row["reply"]]) == [
                "error", "input", None]
            continue
        assert row["status"] == "ok", row
        if schema is not None:
            typed = {name: _plain(row[name]) for name in schema["properties"]}
            assert typed == _plain(json.loads(row["reply"]))
        else:
            assert row["reply"] == reply_for(prompt)
        if "replies" in frame.columns:
            assert _plain(row["replies"]) == [row["reply"]] * shape.job["params"]["n"]


def _dtypes(frame: pd.DataFrame) -> dict[str, str]:
    return {str(name): str(dtype) for name, dtype in frame.dtypes.items()}


def _compared(column: str, engine: str) -> bool:
    legitimate = LEGITIMATE.get(column)
    return legitimate is None or engine not in legitimate.engines or (
        legitimate.normalize is not None)


def _normalized(column: pd.Series[Any], engine: str) -> pd.Series[Any]:
    legitimate = LEGITIMATE.get(str(column.name))
    if legitimate is None or engine not in legitimate.engines or legitimate.normalize is None:
        return column
    return legitimate.normalize(column)


def values(column: pd.Series[Any]) -> list[Any]:
    """A column's cells as plain Python values: None for every kind of null, lists for
    arrays, floats rounded to 9 places (cost arithmetic in another order)."""
    return [_plain(value) for value in column.astype(object)]


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray | list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return None if np.isnan(value) else round(value, 9)
    return value
