"""Writing the results file: streamed, in input order, atomically.

Rows go to a temporary file in the destination folder, which is renamed
over the destination only once complete, so a reader never sees a half
written file and a crash never leaves one behind. The file gets the mode
the user's umask gives a new file, or the mode of the file it replaces.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import os
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any, Protocol

import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batcher.errors import OutputError
from batcher.io import platform
from batcher.io.safefiles import check_path
from batcher.io.schema_columns import SchemaColumns
from batcher.records import (
    FLOAT_COLUMNS,
    INTEGER_COLUMNS,
    OPTIONAL_COLUMNS,
    RESULT_COLUMNS,
    STATUS_OK,
    RowResult,
)
from batcher.structured import ReplySchema

# OWASP's list for CSV injection: what a spreadsheet may take as the start of a formula.
_FORMULA_START = r"^([=+\-@\t\r])"


def result_fields() -> list[pa.Field]:
    def arrow_type(name: str) -> pa.DataType:
        if name in INTEGER_COLUMNS:
            return pa.int64()
        if name in FLOAT_COLUMNS:
            return pa.float64()
        return pa.string()

    return [pa.field(name, arrow_type(name)) for name in RESULT_COLUMNS]


def _pandas_metadata(metadata: dict[bytes, bytes] | None, fields: list[pa.Field]
                     ) -> dict[bytes, bytes]:
    blank = pd.DataFrame({field.name: pd.Series([], dtype="Int64") for field in fields
                          if pa.types.is_integer(field.type)})
    made = pa.Schema.from_pandas(blank, preserve_index=False).metadata
    kept = dict(metadata or {})
    if b"pandas" not in kept:
        kept[b"pandas"] = made[b"pandas"]
        return kept
    pandas_meta = orjson.loads(kept[b"pandas"])
    pandas_meta["columns"] += orjson.loads(made[b"pandas"])["columns"]
    kept[b"pandas"] = orjson.dumps(pandas_meta)
    return kept


NO_OUTCOME = RowResult.failed("no outcome recorded", 0, "no outcome").to_dict()


class ResultLayout:
    """The results file's columns, in order: every input column, the result columns,
    ``replies`` when the job asks for several choices, then one typed column per
    property of the reply schema (:class:`~batcher.io.schema_columns.SchemaColumns`,
    filled from the ``reply`` of each ``ok`` row).

    Pandas metadata (an input written from a DataFrame has it) is kept and
    extended, so ``pd.read_parquet`` gives back the input's dtypes and
    nullable ``Int64`` integer columns.
    """

    def __init__(self, input_schema: pa.Schema, *, choices: int = 1,
                 reply_schema: ReplySchema | None = None, prefix: str = "") -> None:
        self._many = choices > 1
        self.schema_columns = (None if reply_schema is None
                               else SchemaColumns(reply_schema, prefix))
        fields = result_fields()
        if self._many:
            fields.append(pa.field(OPTIONAL_COLUMNS[0], pa.list_(pa.string())))
        if self.schema_columns is not None:
            fields.extend(self.schema_columns.fields())
        self.schema = pa.schema(list(input_schema) + fields,
                                metadata=_pandas_metadata(input_schema.metadata, fields))

    def attach(self, batch: pa.RecordBatch, records: list[dict[str, Any] | None]
               ) -> pa.RecordBatch:
        """The input batch with the result columns appended, from checkpoint records
        (a row without one becomes an error row)."""
        rows = [record if record is not None else NO_OUTCOME for record in records]
        columns = list(batch.columns)
        for field in result_fields():
            name = field.name
            columns.append(pa.array([row.get(name) for row in rows], type=field.type))
        if self._many:
            columns.append(pa.array([row.get(OPTIONAL_COLUMNS[0]) for row in rows],
                                    type=pa.list_(pa.string())))
        if self.schema_columns is not None:
            values = [self.schema_columns.values_of(row.get("reply"))
                      if row.get("status") == STATUS_OK else None for row in rows]
            columns.extend(self.schema_columns.arrays(values))
        return pa.RecordBatch.from_arrays(columns, schema=self.schema)


class _BatchWriter(Protocol):
    def write(self, batch: pa.RecordBatch) -> None: ...
    def close(self) -> None: ...


class _CsvWriter:
    """CSV the way spreadsheets and ``pd.read_csv`` expect it: quotes only where a
    value needs them (pyarrow's writer quotes every text value), null as an empty
    field, and nested values (lists, structs, maps) as JSON text, which CSV can hold."""

    def __init__(self, handle: IO[bytes], schema: pa.Schema) -> None:
        self._text = io.TextIOWrapper(handle, encoding="utf-8", newline="", write_through=True)
        # RFC 4180's CRLF: the csv module quotes a field holding any character of the
        # line terminator, so a lone CR in a cell is quoted too.
        self._csv = csv.writer(self._text, lineterminator="\r\n")
        self._csv.writerow(schema.names)
        self._nested = [pa.types.is_nested(field.type) for field in schema]
        # Floats as Arrow writes them ("2", not Python's "2.0"): a typed CSV input column
        # comes back as the very text it was read from (see batcher.io.inputscan.CsvColumnTypes).
        self._floats = [pa.types.is_floating(field.type) for field in schema]

    def write(self, batch: pa.RecordBatch) -> None:
        columns = [_json_texts(column) if nested else
                   pc.cast(column, pa.string()).to_pylist() if floating else column.to_pylist()
                   for column, nested, floating in zip(batch.columns, self._nested,
                                                       self._floats, strict=True)]
        self._csv.writerows(zip(*columns, strict=True))

    def close(self) -> None:
        self._text.flush()
        self._text.detach()  # the caller owns the handle


def _json_texts(column: pa.Array) -> list[str | None]:
    return [None if value is None else
            orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS, default=str).decode()
            for value in column.to_pylist()]


class _JsonlWriter:
    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle

    def write(self, batch: pa.RecordBatch) -> None:
        lines = [orjson.dumps(row, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME,
                              default=str)
                 for row in batch.to_pylist()]
        if lines:
            self._handle.write(b"\n".join(lines) + b"\n")

    def close(self) -> None:
        self._handle.flush()


def escape_formulas(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Text cells that a spreadsheet would run as a formula, prefixed with ``'``."""
    columns = [
        pc.replace_substring_regex(column, pattern=_FORMULA_START, replacement="'\\1")
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type) else column
        for column in batch.columns
    ]
    return pa.RecordBatch.from_arrays(columns, schema=batch.schema)


def write_results(path: Path, schema: pa.Schema, batches: Iterable[pa.RecordBatch], *,
                  csv_escape_formulas: bool = False) -> int:
    """Stream ``batches`` into ``path`` atomically; returns the number of rows written.

    The caller holds the job's lock, so temporary files of this name are
    leftovers of a run killed mid-write and are removed first.
    """
    check_path(path, "results file", private=False)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            stale.unlink(missing_ok=True)
        temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        # 0o666 less the umask, as any new file; O_EXCL|O_NOFOLLOW: never a planted file.
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | platform.SAFE_OPEN, 0o666)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write results ({exc.strerror})") from None
    escape = csv_escape_formulas and path.suffix.lower() == ".csv"
    rows = 0
    try:
        with os.fdopen(fd, "wb") as handle:
            writer = _open_writer(path.suffix.lower(), handle, schema)
            for batch in batches:
                writer.write(escape_formulas(batch) if escape else batch)
                rows += batch.num_rows
            writer.close()
            handle.flush()
            with contextlib.suppress(FileNotFoundError):  # keep the replaced file's mode
                platform.set_mode(handle.fileno(), stat.S_IMODE(path.stat().st_mode))
            os.fsync(handle.fileno())
        temp.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise OutputError(f"{path}: cannot write results ({exc.strerror or exc})") from None
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    return rows


def _open_writer(suffix: str, handle: IO[bytes], schema: pa.Schema) -> _BatchWriter:
    writer: _BatchWriter
    if suffix == ".parquet":
        writer = pq.ParquetWriter(handle, schema)
    elif suffix == ".csv":
        writer = _CsvWriter(handle, schema)
    else:
        writer = _JsonlWriter(handle)
    return writer

