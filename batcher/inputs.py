"""Reading the input file a batch of rows at a time.

CSV, Parquet and JSONL (CSV and JSONL also gzip-, zstd- or bz2-compressed)
all come out as a stream of ``pyarrow.RecordBatch`` with one fixed schema,
so the rest of batcher never holds the whole input. CSV columns are read as
text: a column that looks numeric in the first block and holds text further
down would otherwise fail half way through, and prompts render the cell as
written. The results get typed columns instead (``CsvColumnTypes``): the
scan that checks the ids also finds which columns are numbers throughout.
Every pyarrow/parse failure is translated here into a ``DataError`` that
names the file and, where it can, the line.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from batcher.config import CSV_DELIMITERS, input_format
from batcher.errors import DataError

BATCH_ROWS = 8192
_HASH_CHUNK = 1 << 20
_HEADER_CHUNK = 1 << 16
_HEADER_LIMIT = 1 << 20


class InputReader:
    """A re-iterable stream of record batches over one input file."""

    def __init__(self, path: Path, batch_rows: int = BATCH_ROWS, *,
                 delimiter: str | None = None) -> None:
        self.path = path
        self.batch_rows = batch_rows
        try:
            self.format, self.compression = input_format(path)
        except ValueError as exc:
            raise DataError(f"{path}: {exc}") from None
        self.delimiter = delimiter or ","
        self._delimiter_given = delimiter is not None
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise DataError(f"{path}: input file not found") from None
        except OSError as exc:
            raise DataError(f"{path}: cannot read input ({exc.strerror})") from None
        if path.is_dir():
            raise DataError(f"{path}: is a folder, not an input file")
        if size == 0:
            raise DataError(f"{path}: input file is empty (0 bytes)")
        self.schema = self._read_schema()

    # -- public ---------------------------------------------------------------------------

    def batches(self) -> Iterator[pa.RecordBatch]:
        """Yield the input's rows in order, ``batch_rows`` at a time."""
        if self.format == "csv":
            yield from self._csv_batches()
        elif self.format == "parquet":
            yield from self._parquet_batches()
        else:
            yield from self._jsonl_batches()

    def open_bytes(self) -> IO[bytes]:
        """The file's (decompressed) bytes as a buffered binary stream."""
        if self.compression is None:
            return self.path.open("rb")
        return io.BufferedReader(pa.input_stream(str(self.path), compression=self.compression),
                                 buffer_size=_HASH_CHUNK)

    def content_digest(self) -> str:
        """A hash of the file's bytes, streamed, for the results' up-to-date stamp."""
        digest = hashlib.blake2b(digest_size=16)
        with self.path.open("rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    # -- schema -----------------------------------------------------------------------------

    def _read_schema(self) -> pa.Schema:
        if self.format == "csv":
            names = self._csv_header()
            return pa.schema([(name, pa.string()) for name in names])
        if self.format == "parquet":
            try:
                return pq.ParquetFile(self.path).schema_arrow
            except (pa.ArrowException, OSError) as exc:
                raise DataError(f"{self.path}: not a readable Parquet file ({_first_line(exc)})"
                                ) from None
        return self._jsonl_schema()

    def check_csv_text(self) -> None:
        """One streamed pass over a CSV's bytes before parsing: invalid UTF-8 is
        reported with its line, and a quote that is never closed (pyarrow would
        silently fold every later line into one field) is caught by parity."""
        decoder = codecs.getincrementaldecoder("utf-8")()
        line = 1
        quotes = 0
        with self._reading(), self.open_bytes() as handle:
            while chunk := handle.read(_HASH_CHUNK):
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as exc:
                    bad_line = line + chunk.count(b"\n", 0, max(0, exc.start))
                    raise DataError(f"{self.path}: line {bad_line}: not valid UTF-8 text "
                                    "(save the file as UTF-8)") from None
                line += chunk.count(b"\n")
                quotes += chunk.count(b'"')
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(f"{self.path}: line {line}: not valid UTF-8 text (the file ends "
                            "inside a character)") from None
        if quotes % 2:
            raise DataError(f"{self.path}: a quoted field is never closed (the file has an odd "
                            'number of " characters); look for a stray quote')

    def _csv_header(self) -> list[str]:
        try:
            with self._reading(), io.TextIOWrapper(self.open_bytes(), encoding="utf-8-sig",
                                                   newline="") as handle:
                first_line = _first_record_text(handle)
        except UnicodeDecodeError:
            # The text reader decodes a whole buffer, maybe past the header: find the line.
            self.check_csv_text()
            raise DataError(f"{self.path}: line 1: not valid UTF-8 text (save the file as UTF-8)"
                            ) from None
        if not self._delimiter_given:
            self.delimiter = _sniff_delimiter(first_line)
        try:
            header = next(csv.reader([first_line], delimiter=self.delimiter), None)
        except csv.Error as exc:
            raise DataError(f"{self.path}: line 1: malformed CSV header ({exc})") from None
        if not header or all(not name.strip() for name in header):
            raise DataError(f"{self.path}: line 1: CSV header is empty")
        _check_unique_columns(self.path, header)
        return header

    def columns_hint(self) -> str:
        """Why a wanted column may be missing, when the header suggests it: a CSV header
        read as one column that holds another delimiter."""
        names = self.schema.names
        if self.format != "csv" or len(names) != 1:
            return ""
        others = [d for d in CSV_DELIMITERS if d != self.delimiter and d in names[0]]
        if not others:
            return ""
        shown = "\\t" if others[0] == "\t" else others[0]
        return (f"; the header reads as one column joined by '{shown}': set "
                f"input.delimiter: '{shown}' in the job")

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """Decompression failures become a ``DataError`` naming the file."""
        try:
            yield
        except (pa.ArrowException, OSError, EOFError) as exc:
            if self.compression is None:
                raise
            raise DataError(f"{self.path}: cannot decompress the input as {self.compression} "
                            f"({_first_line(exc)})") from None

    def _jsonl_schema(self) -> pa.Schema:
        first = next(self._jsonl_row_chunks(), None)
        if first is None:
            raise DataError(f"{self.path}: the input has no rows (only blank lines)")
        rows, first_line = first
        try:
            table = pa.Table.from_pylist(rows)
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise DataError(f"{self.path}: lines {first_line}-{first_line + len(rows) - 1}: "
                            f"inconsistent values ({_first_line(exc)})") from None
        # An all-null column in the first rows carries no type; text is the safe guess.
        fields = [pa.field(f.name, pa.string()) if pa.types.is_null(f.type) else f
                  for f in table.schema]
        return pa.schema(fields)

    # -- per format -------------------------------------------------------------------------

    def _csv_batches(self) -> Iterator[pa.RecordBatch]:
        bad_rows: list[str] = []

        def on_invalid(row: pacsv.InvalidRow) -> str:
            where = f"line {row.number}" if row.number is not None else "a row"
            bad_rows.append(f"{where}: expected {row.expected_columns} fields, "
                            f"found {row.actual_columns}")
            return "error"

        try:
            reader = pacsv.open_csv(
                pa.input_stream(str(self.path), compression=self.compression),
                read_options=pacsv.ReadOptions(block_size=1 << 20, use_threads=False),
                parse_options=pacsv.ParseOptions(delimiter=self.delimiter,
                                                 newlines_in_values=True,
                                                 invalid_row_handler=on_invalid),
                convert_options=pacsv.ConvertOptions(
                    column_types={field.name: pa.string() for field in self.schema},
                    strings_can_be_null=False,
                ),
            )
            for batch in reader:
                yield from _rebatch(batch, self.batch_rows)
        except pa.ArrowInvalid as exc:
            if bad_rows:
                raise DataError(f"{self.path}: {bad_rows[0]} (ragged CSV row)") from None
            # pyarrow gives one exception type for every parse failure; our own pass
            # over the bytes tells invalid UTF-8 and an unclosed quote apart, by line.
            self.check_csv_text()
            raise DataError(f"{self.path}: malformed CSV ({_first_line(exc)})") from None

    def _parquet_batches(self) -> Iterator[pa.RecordBatch]:
        try:
            parquet = pq.ParquetFile(self.path)
            yield from parquet.iter_batches(batch_size=self.batch_rows)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{self.path}: not a readable Parquet file ({_first_line(exc)})"
                            ) from None

    def _jsonl_batches(self) -> Iterator[pa.RecordBatch]:
        names = set(self.schema.names)
        for rows, first_line in self._jsonl_row_chunks():
            for offset, row in enumerate(rows):
                extra = row.keys() - names
                if extra:
                    raise DataError(
                        f"{self.path}: line {first_line + offset}: key "
                        f"'{sorted(extra)[0]}' is not in the first rows' columns "
                        f"({', '.join(self.schema.names)})")
            try:
                yield pa.RecordBatch.from_pylist(rows, schema=self.schema)
            except (pa.ArrowException, TypeError, ValueError) as exc:
                raise DataError(f"{self.path}: lines {first_line}-{first_line + len(rows) - 1}: "
                                f"a value does not match its column's type ({_first_line(exc)})"
                                ) from None

    def _jsonl_row_chunks(self) -> Iterator[tuple[list[dict[str, object]], int]]:
        """Parsed JSONL objects in chunks, with the line number each chunk starts at."""
        rows: list[dict[str, object]] = []
        first_line = 1
        with self._reading(), self.open_bytes() as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    row = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    problem = "not valid JSON" if _is_utf8(raw) else "not valid UTF-8"
                    raise DataError(f"{self.path}: line {number}: {problem}") from None
                if not isinstance(row, dict):
                    raise DataError(f"{self.path}: line {number}: must be a JSON object")
                if not rows:
                    first_line = number
                rows.append(row)
                if len(rows) >= self.batch_rows:
                    yield rows, first_line
                    rows = []
        if rows:
            yield rows, first_line


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
        _check_unique_ids(reader, id_column or "", np.concatenate(hashes), limit)
    output_schema = types.schema() if types is not None else reader.schema
    return InputSummary(rows=rows, digest=reader.content_digest(), output_schema=output_schema,
                        beyond_limit=more)


def return_freed_memory() -> None:
    """For a command-line run, a process of its own: make Arrow allocate with the
    system allocator. Arrow's default (mimalloc) keeps the memory of freed
    batches in per-thread heaps, which a streamed million-row input turns into
    50-100 MB of peak RSS that is never used again. Library callers (a
    notebook) keep whatever pool they chose."""
    pa.set_memory_pool(pa.system_memory_pool())


def id_strings(column: pa.Array) -> list[str]:
    """Ids as text, the same way for every input format."""
    return [str(value) for value in column.to_pylist()]


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
    order = np.sort(hashes)
    repeated = order[1:][order[1:] == order[:-1]]
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


def _first_record_text(handle: IO[str]) -> str:
    """The text of the CSV's first record (its header), which may hold quoted line breaks."""
    text = ""
    while len(text) < _HEADER_LIMIT:
        chunk = handle.read(_HEADER_CHUNK)
        text += chunk
        if not chunk or _ends_a_record(text):
            break
    end = _record_end(text)
    return text[:end]


def _record_end(text: str) -> int:
    """Where the first record ends: the first line break outside quotes."""
    quoted = False
    for index, char in enumerate(text):
        if char == '"':
            quoted = not quoted
        elif char in "\r\n" and not quoted:
            return index
    return len(text)


def _ends_a_record(text: str) -> bool:
    return _record_end(text) < len(text)


def _sniff_delimiter(header: str) -> str:
    """The delimiter that splits the header into the most columns (a comma on a tie):
    European spreadsheets export ``;``, some tools tabs or pipes."""
    best, best_count = ",", 0
    for delimiter in CSV_DELIMITERS:
        try:
            count = len(next(csv.reader([header], delimiter=delimiter), []))
        except csv.Error:
            continue
        if count > best_count:
            best, best_count = delimiter, count
    return best


def _rebatch(batch: pa.RecordBatch, size: int) -> Iterator[pa.RecordBatch]:
    for start in range(0, batch.num_rows, size):
        yield batch.slice(start, size)


def _check_unique_columns(path: Path, names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataError(f"{path}: line 1: column '{name}' appears twice in the header")
        seen.add(name)


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__
