"""The last step of a run: the results file, in input order, from the checkpoint.

Only when every row has an outcome are the input's batches read again and
each joined with its rows' journal records, one batch at a time, so a
million-row results file never needs the whole input or journal in memory.

Rows that could not be sent because of their input (an empty prompt) are
not journaled: the input is at fault, not the server, so each run renders
them again and the checkpoint does not grow night after night. Their
results row is rebuilt here from the same rendering.

A run that changed nothing leaves an up-to-date results file alone: a
stamp beside the checkpoint (``out.ckpt.written``) records what the file
was written from (the job, the input's bytes, the journal's length) and the
file as written (size, time, inode), so a changed input, a new answer or a
results file replaced by hand is written again. A ``--limit`` sample never
replaces a results file: when one is there, the sample goes beside it
(``out.limit-5.csv``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa

from batcher.checkpoint import Checkpoint
from batcher.inputs import typed_columns
from batcher.outputs import NO_OUTCOME, attach_results, results_schema, write_results
from batcher.preflight import Prepared
from batcher.progress import INPUT_ERROR_CLASS
from batcher.prompts import PromptRenderer
from batcher.records import STATUS_ERROR, STATUS_OK, RowResult
from batcher.tally import Tally

_TALLY_CHUNK = 65_536  # rows read back from the journal at a time
_INPUT_ERROR = {"status": STATUS_ERROR, "error_class": INPUT_ERROR_CLASS}


@dataclass(frozen=True)
class Written:
    path: Path
    rows: int
    failed_rows: int
    rewritten: bool = True  # False: the file on disk was already up to date
    tally: Tally = field(default_factory=Tally)  # every row of the results, for the summary


def write_results_file(prepared: Prepared, checkpoint: Checkpoint) -> Written:
    """Write the job's results file atomically; count the rows that are not ``ok``
    and tally every row for the summary."""
    path = results_destination(prepared)
    stamp_path = checkpoint.path.with_name(checkpoint.path.name + ".written")
    stamp = _stamp(prepared, checkpoint)
    if _read_stamp(stamp_path) == {**stamp, **_file_identity(path)}:
        rows = prepared.row_count
        return Written(path, rows, rows - checkpoint.count_done(0, rows), rewritten=False,
                       tally=_tally_journal(checkpoint, rows))
    schema = results_schema(prepared.output_schema)
    renderer = PromptRenderer(prepared.job.prompt)
    failed = 0
    tally = Tally()

    def batches() -> Iterator[pa.RecordBatch]:
        nonlocal failed
        position = 0
        for batch in prepared.batches():
            records = checkpoint.read(position, position + batch.num_rows)
            if None in records:
                _fill_input_errors(records, batch, position, renderer)
            failed += sum(1 for record in records
                          if record is None or record["status"] != STATUS_OK)
            for offset, record in enumerate(records):
                tally.add(position + offset, NO_OUTCOME if record is None else record)
            typed = typed_columns(batch, prepared.output_schema)
            yield attach_results(typed, records, schema)
            position += batch.num_rows

    output = prepared.job.output
    assert output is not None
    rows = write_results(path, schema, batches(),
                         csv_escape_formulas=output.csv_escape_formulas)
    checkpoint.sync()
    _write_stamp(stamp_path, {**stamp, **_file_identity(path)})
    return Written(path, rows, failed, tally=tally)


def _tally_journal(checkpoint: Checkpoint, rows: int) -> Tally:
    """The tally of an up-to-date results file, from the journal alone: a row
    without a record is one its input kept from being sent."""
    tally = Tally()
    for start in range(0, rows, _TALLY_CHUNK):
        records = checkpoint.read(start, min(rows, start + _TALLY_CHUNK))
        for offset, record in enumerate(records):
            tally.add(start + offset, _INPUT_ERROR if record is None else record)
    return tally


def results_destination(prepared: Prepared) -> Path:
    """The results file, or for a sample when one is already there, a file beside it."""
    output = prepared.job.output
    assert output is not None
    path = output.path
    if prepared.is_sample and path.exists():
        return path.with_name(f"{path.stem}.limit-{prepared.limit}{path.suffix}")
    return path


def _fill_input_errors(records: list[dict[str, Any] | None], batch: pa.RecordBatch,
                       start: int, renderer: PromptRenderer) -> None:
    for row in renderer.render(batch, start):
        offset = row.position - start
        if records[offset] is None and row.messages is None:
            records[offset] = RowResult.failed(row.problem or "", 0, INPUT_ERROR_CLASS).to_dict()


def _stamp(prepared: Prepared, checkpoint: Checkpoint) -> dict[str, Any]:
    """What a results file is written from: the job, the input, the limit, the journal."""
    return {"job": prepared.fingerprint, "input": prepared.input_digest,
            "limit": prepared.limit, "journal_bytes": checkpoint.path.stat().st_size}


def _file_identity(path: Path) -> dict[str, Any]:
    try:
        status = path.stat()
    except OSError:
        return {"results": None}
    return {"results": str(path), "size": status.st_size, "mtime_ns": status.st_mtime_ns,
            "inode": status.st_ino}


def _read_stamp(path: Path) -> Any:
    try:
        return orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None


def _write_stamp(path: Path, stamp: dict[str, Any]) -> None:
    """Best effort, and small enough for one write: a stamp torn by a kill, or none,
    only means the next run writes the results again."""
    with contextlib.suppress(OSError):
        path.write_bytes(orjson.dumps(stamp))
