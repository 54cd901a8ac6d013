"""The scan before a run: one streamed pass over the input that proves its ids
usable (none empty, none repeated) and finds which CSV columns hold numbers
throughout, so the results can type them (``CsvColumnTypes``); nothing is sent
before it passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from batcher.errors import DataError
from batcher.io.inputs import InputReader, id_strings


class CsvColumnTypes:
    """Which CSV columns hold numbers throughout, found batch by batch.

    The results get such a column as ``int64`` or ``float64`` (a blank cell is
    null), as ``pandas.read_csv`` would type it, so results and input merge on
    an integer id. A column is typed only where every number writes back as
    the very same text, so a CSV results file repeats the input's cells to the
    letter: ``007`` or ``+5`` keep a column text (an id must not lose its
    zeros), and so do ``1.50``, ``1e3`` and ``nan``. Booleans stay text.
    """

    def __init__(self, schema: pa.Schema) -> None:
        self._schema = schema
        self._candidates = {field.name: [pa.int64(), pa.float64()] for field in schema
                            if pa.types.is_string(field.type)}
        self._has_values: set[str] = set()

    def observe(self, batch: pa.RecordBatch) -> None:
        for name, candidates in self._candidates.items():
            if not candidates:
                continue
            column = batch.column(name)
            values = pc.filter(column, pc.not_equal(column, ""))
            if not len(values):
                continue
            self._has_values.add(name)
            candidates[:] = [kind for kind in candidates if _holds_only(values, kind)]

    def schema(self) -> pa.Schema:
        fields = []
        for field in self._schema:
            kinds = self._candidates.get(field.name)
            if kinds and field.name in self._has_values:
                field = field.with_type(kinds[0])
            fields.append(field)
        return pa.schema(fields, metadata=self._schema.metadata)


def _holds_only(values: pa.Array, kind: pa.DataType) -> bool:
    try:
        numbers = pc.cast(values, kind)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False
    if pa.types.is_floating(kind) and not pc.all(pc.is_finite(numbers)).as_py():
        return False  # nan and inf: JSON has no such numbers, so they stay text
    return bool(pc.all(pc.equal(pc.cast(numbers, pa.string()), values)).as_py())


def typed_columns(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """``batch`` with its text columns cast to ``schema``'s types (a blank cell is null)."""
    if batch.schema.equals(schema):
        return batch
    columns = []
    for column, field in zip(batch.columns, schema, strict=True):
        if column.type != field.type:
            blank = pc.equal(column, "")
            column = pc.cast(pc.if_else(blank, pa.scalar(None, column.type), column), field.type)
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, schema=schema)


@dataclass(frozen=True)
class InputSummary:
    rows: int
    digest: str
    # The input columns as the results hold them (CSV numbers typed).
    output_schema: pa.Schema
    beyond_limit: bool = False  # the input has more rows than the limit let through


def scan_input(reader: InputReader, id_column: str | None, limit: int | None) -> InputSummary:
    """One streamed pass that proves the ids usable before anything is sent.

    Ids are hashed to 64-bit integers so a million ids cost 8 MB, not a set of
    strings; a hash collision is confirmed against the real values.
    """
    types = None
    if reader.format == "csv":
        reader.check_csv_text()
        types = CsvColumnTypes(reader.schema)
    rows = 0
    more = False  # rows beyond the limit
    hashes: list[np.ndarray] = []
    for batch in reader.batches():
        if limit is not None and rows >= limit:
            more = True
            break
        if limit is not None and rows + batch.num_rows > limit:
            more = True
            batch = batch.slice(0, limit - rows)
        if types is not None:
            types.observe(batch)
        if id_column is not None:
            ids = batch.column(id_column)
            empty = _first_empty(ids)
            if empty is not None:
                raise DataError(f"{reader.path}: row {rows + empty + 1}: id column "
                                f"'{id_column}' is empty (every row needs an id)")
            hashes.append(_hash_ids(id_strings(ids)))
        rows += batch.num_rows
    if hashes:
        every_hash = np.concatenate(hashes)
        del hashes  # 8 bytes an id in each copy: keep one while sorting
        _check_unique_ids(reader, id_column or "", every_hash, limit)
    output_schema = types.schema() if types is not None else reader.schema
    return InputSummary(rows=rows, digest=reader.content_digest(), output_schema=output_schema,
                        beyond_limit=more)


def _hash_ids(ids: list[str]) -> np.ndarray:
    return hash_strings(ids, "0123456789123456")


def hash_strings(values: list[str], key: str) -> np.ndarray:
    """A 64-bit keyed hash (SipHash, ``key``: 16 ASCII characters) of each string,
    in one vectorized pass; the same strings and key give the same hashes on
    every run and machine."""
    array = np.asarray(values, dtype=object)
    try:
        hashes: np.ndarray = pd.util.hash_array(array, hash_key=key, categorize=False)
    except UnicodeEncodeError:  # a lone surrogate (JSONL "\ud800"): hash its raw code units
        array = np.asarray([value.encode("utf-8", "surrogatepass").decode("latin-1")
                            for value in values], dtype=object)
        hashes = pd.util.hash_array(array, hash_key=key, categorize=False)
    return hashes


def _check_unique_ids(reader: InputReader, id_column: str, hashes: np.ndarray,
                      limit: int | None) -> None:
    hashes.sort()  # in place: the caller's array is this scan's own
    repeated = hashes[1:][hashes[1:] == hashes[:-1]]
    if not repeated.size:
        return
    suspects = set(repeated.tolist())
    seen: dict[str, int] = {}
    position = 0
    for batch in reader.batches():
        batch_ids = id_strings(batch.column(id_column))
        batch_hashes = _hash_ids(batch_ids).tolist()
        for offset, (value_hash, value) in enumerate(zip(batch_hashes, batch_ids, strict=True)):
            row = position + offset
            if limit is not None and row >= limit:
                return
            if value_hash not in suspects:
                continue
            if value in seen:
                raise DataError(f"{reader.path}: row {row + 1}: duplicate id '{value}' "
                                f"(first at row {seen[value] + 1}) in column '{id_column}'")
            seen[value] = row
        position += batch.num_rows


def _first_empty(column: pa.Array) -> int | None:
    """The offset of the first null or blank id (CSV reads a missing id as ''), if any."""
    missing = column.is_null()
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        blank = pc.equal(pc.utf8_trim_whitespace(column), "")
        missing = pc.or_(missing, pc.fill_null(blank, True))
    found = np.flatnonzero(missing.to_numpy(zero_copy_only=False))
    return int(found[0]) if found.size else None
