"""Reading the input file a batch of rows at a time.

CSV, Parquet and JSONL (CSV and JSONL also gzip-, zstd- or bz2-compressed)
all come out as a stream of ``pyarrow.RecordBatch`` with one fixed schema,
so the rest of batcher never holds the whole input. CSV columns are read as
text: a column that looks numeric in the first block and holds text further
down would otherwise fail half way through, and prompts render the cell as
written. The results get typed columns instead: the scan that checks the ids
(``batcher.io.inputscan``) also finds which columns are numbers throughout.
Every pyarrow/parse failure is translated here into a ``DataError`` that
names the file and, where it can, the line.

Longer than most modules because three formats, their compression and their
failures must come out as one stream with one schema, each read by a method of
:class:`InputReader`.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import orjson
import pyarrow as pa
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
