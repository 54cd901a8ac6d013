"""The matrix's rows: job shapes a user would pick in any mode, each with its input.

A shape is the job file's keys (beyond the common ones ``job_dict`` writes),
the input it reads, how a user reads that input into pandas for the notebook
API, and the engines that must refuse it. Every input has a unique ``id``
column, whether or not the job names it ``input.id_column``, so results
that come back out of input order (Ray's) can be put back in it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
from conftest import write_csv

ENGINES = ("online", "batch", "ray", "notebook")
REFERENCE = "online"  # the engine every other one is compared with

TEXTS = [
    "Summarise the plot of Hamlet in one line.",
    "Name three primes.",
    "Is a tomato a fruit?",
    "Translate 'good morning' into French.",
    "What colour is the sky at noon?",
    "Write a haiku about rain.",
]


@dataclass(frozen=True)
class Shape:
    """One job shape: its keys, its input and who refuses it.

    ``prompts`` anchors the reference: the mock answers each row from its own
    user message (or, with a schema, with JSON whose values fill the typed
    columns). ``refused_by`` maps an engine to a fragment of the one-line reason it
    gives instead of running the job.
    """

    name: str
    write_input: Callable[[Path], Path]
    prompts: tuple[str | None, ...]  # each row's user message; None: the row cannot be sent
    job: dict[str, Any] = field(default_factory=dict)
    read_input: Callable[[Path], pd.DataFrame] = pd.read_csv
    refused_by: dict[str, str] = field(default_factory=dict)


def ids(count: int) -> list[str]:
    return [f"r{i:02d}" for i in range(count)]


def plain_csv(folder: Path) -> Path:
    return write_csv(folder / "in.csv", ["id", "text"],
                     [[row_id, text] for row_id, text in zip(ids(len(TEXTS)), TEXTS,
                                                             strict=True)])


def products_csv(folder: Path) -> Path:
    return write_csv(folder / "in.csv", ["id", "product", "text"],
                     [[row_id, product, text] for row_id, product, text
                      in zip(ids(len(TEXTS)), PRODUCTS, TEXTS, strict=True)])


BLANKS = [TEXTS[0], "", TEXTS[2], "   ", TEXTS[4]]
DUPLICATES = [TEXTS[0], TEXTS[1], TEXTS[0], TEXTS[2], TEXTS[1], TEXTS[0]]


def blanks_csv(folder: Path) -> Path:
    """Rows 1 and 3 have no prompt (an empty cell, a cell of spaces): error rows."""
    texts = BLANKS
    return write_csv(folder / "in.csv", ["id", "text"],
                     [[row_id, text] for row_id, text in zip(ids(len(texts)), texts,
                                                             strict=True)])


def read_blanks_csv(path: Path) -> pd.DataFrame:
    """Empty cells as empty text, as batcher reads a text column (pandas' default: NaN)."""
    return pd.read_csv(path, keep_default_na=False)


def duplicates_csv(folder: Path) -> Path:
    texts = DUPLICATES
    return write_csv(folder / "in.csv", ["id", "text"],
                     [[row_id, text] for row_id, text in zip(ids(len(texts)), texts,
                                                             strict=True)])


def numbers_csv(folder: Path) -> Path:
    """Number columns batcher types (``qty``, ``price``, ``rating`` with a blank) beside
    ones that must stay text because a number would not write back the same
    (``code`` with its zeros, ``delta`` with its plus sign)."""
    return write_csv(folder / "in.csv", ["id", "qty", "price", "code", "delta", "rating"], [
        ["r00", "3", "2.5", "007", "+5", "4"],
        ["r01", "10", "0.25", "010", "-1", ""],
        ["r02", "-2", "3.125", "123", "+0", "3.5"],
        ["r03", "0", "7.75", "042", "2", "5"],
    ])


def read_numbers_csv(path: Path) -> pd.DataFrame:
    """As a user who knows their data reads it: codes and deltas are text."""
    return pd.read_csv(path, dtype={"code": str, "delta": str})


NESTED_ROWS: list[dict[str, Any]] = [
    {"id": "r00", "text": TEXTS[0], "meta": {"lang": "en", "score": 3}, "tags": ["a", "b"]},
    {"id": "r01", "text": TEXTS[1], "meta": {"lang": "fr", "score": 1}, "tags": []},
    {"id": "r02", "text": TEXTS[2], "meta": {"lang": "de", "score": None}, "tags": ["c"]},
    {"id": "r03", "text": TEXTS[3], "meta": {"lang": "en", "score": 5}, "tags": ["d", "e", "f"]},
]


def nested_jsonl(folder: Path) -> Path:
    path = folder / "in.jsonl"
    path.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in NESTED_ROWS))
    return path


def read_jsonl(path: Path) -> pd.DataFrame:
    return pd.read_json(path, lines=True, dtype={"id": str})


TYPED_VERIFIED = [True, False, True, True]
TYPED_WEIGHT = [1.5, 0.25, 3.0, 12.125]


def typed_parquet(folder: Path) -> Path:
    """Parquet's own types: a nullable integer, a boolean, a float, text."""
    path = folder / "in.parquet"
    pd.DataFrame({
        "id": ids(4),
        "text": TEXTS[:4],
        "stars": pd.array([5, None, 2, 4], dtype="Int64"),
        "verified": TYPED_VERIFIED,
        "weight": TYPED_WEIGHT,
    }).to_parquet(path, index=False)
    return path


SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["positive", "neutral", "negative"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "count": {"type": "integer"},
        "flag": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["label", "confidence", "count", "flag", "tags"],
    "additionalProperties": False,
}

PLAIN = tuple(TEXTS)
PRODUCTS = ("kettle", "lamp", "desk", "chair", "mug", "pen")

SHAPES: tuple[Shape, ...] = (
    Shape("plain_column", plain_csv, PLAIN),
    Shape("template_with_system", products_csv,
          tuple(f"Product: {product}\n\n{text}" for product, text in zip(PRODUCTS, TEXTS,
                                                                          strict=True)),
          {"prompt": {"template": "Product: {product}\n\n{text}",
                      "system": "Answer in one short sentence."}}),
    Shape("schema", plain_csv, PLAIN, {"output": {"schema": SCHEMA}}),
    Shape("schema_in_prompt", plain_csv, PLAIN,
          {"output": {"schema": SCHEMA, "schema_mode": "prompt"}}),
    Shape("n_choices", plain_csv, PLAIN, {"params": {"n": 3}}),
    Shape("blank_cells", blanks_csv, tuple(text.strip() or None for text in BLANKS),
          read_input=read_blanks_csv),
    Shape("duplicates_shared", duplicates_csv, tuple(DUPLICATES), {"duplicates": "share"},
          refused_by={"notebook": "duplicates"}),
    Shape("csv_numbers", numbers_csv,
          ("3 x item 007 at 2.5 (+5)", "10 x item 010 at 0.25 (-1)",
           "-2 x item 123 at 3.125 (+0)", "0 x item 042 at 7.75 (2)"),
          {"prompt": {"template": "{qty} x item {code} at {price} ({delta})"}},
          read_input=read_numbers_csv),
    Shape("jsonl_nested", nested_jsonl,
          tuple(f"{row['text']} meta={orjson.dumps(row['meta']).decode()} "
                f"tags={orjson.dumps(row['tags']).decode()}" for row in NESTED_ROWS),
          {"prompt": {"template": "{text} meta={meta} tags={tags}"}}, read_input=read_jsonl),
    Shape("parquet_typed", typed_parquet,
          tuple(f"{text} [{verified}, {weight} kg]" for text, verified, weight
                in zip(TEXTS[:4], TYPED_VERIFIED, TYPED_WEIGHT, strict=True)),
          {"prompt": {"template": "{text} [{verified}, {weight} kg]"}},
          read_input=pd.read_parquet),
    Shape("id_column", plain_csv, PLAIN, {"input": {"id_column": "id"}},
          refused_by={"notebook": "id_column"}),
    Shape("budget", plain_csv, PLAIN, {"limits": {"max_cost_usd": 1.0}},
          refused_by={"batch": "holds for online requests only",
                      "ray": "limits.max_cost_usd: not available on Ray",
                      "notebook": "max_cost_usd"}),
)
