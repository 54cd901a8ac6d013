"""The last step of a run: the results file, in input order, from the checkpoint.

Only when every row has an outcome are the input's batches read again and
each joined with its rows' stored answers (found by their request keys),
one batch at a time, so a million-row results file never needs the whole
input or store in memory.

Rows that could not be sent because of their input (an empty prompt) are
not stored: the input is at fault, not the server, so each run renders
them again and the checkpoint does not grow night after night. Their
results row is rebuilt here from the same rendering.

A run that changed nothing leaves an up-to-date results file alone: a
stamp beside the checkpoint (``out.ckpt.written``) records what the file
was written from (the job, the input's bytes, the store's length) and the
file as written (size, time, inode), so a changed input, a new answer or a
results file replaced by hand is written again. (Its ``source`` column then
tells where the answers came from in the run that wrote it.) A ``--limit`` sample never
replaces a results file: when one is there, the sample goes beside it
(``out.limit-5.csv``).

:class:`RunReport` is what a finished run did, whichever driver ran it.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from batcher.errors import OutputError
from batcher.io.inputs import BATCH_ROWS
from batcher.io.inputscan import typed_columns
from batcher.io.outputs import NO_OUTCOME, write_results
from batcher.io.safefiles import write_private
from batcher.plan.paths import stamp_path
from batcher.plan.preflight import Prepared
from batcher.pricing import NoPrice, Price
from batcher.progress import INPUT_ERROR_CLASS, RunStats
from batcher.prompts import PromptRenderer
from batcher.records import (
    SOURCE_COLUMN,
    SOURCE_REUSED,
    SOURCE_SENT,
    SOURCES,
    STATUS_ERROR,
    STATUS_OK,
    RowResult,
)
from batcher.store.checkpoint import Checkpoint
from batcher.store.keys import request_identity
from batcher.tally import Tally

_INPUT_ERROR = {"status": STATUS_ERROR, "error_class": INPUT_ERROR_CLASS}

if TYPE_CHECKING:  # record batches come from batcher.io.inputs; pyarrow is its concern
    import pyarrow as pa


@dataclass(frozen=True)
class Written:
    path: Path
    rows: int
    failed_rows: int
    rewritten: bool = True  # False: the file on disk was already up to date
    tally: Tally = field(default_factory=Tally)  # every row of the results, for the summary


def write_results_file(prepared: Prepared, checkpoint: Checkpoint,
                       keys: np.ndarray | None = None, sources: np.ndarray | None = None
                       ) -> Written:
    """Write the job's results file atomically; count the rows that are not ``ok``
    and tally every row for the summary.

    ``keys`` holds each row's request key and ``sources`` each row's
    ``batcher.records.SOURCES`` code, in input order, when the caller kept
    them; otherwise the keys are made again from the input, and a row's
    answer is ``reused`` when it was stored before this run opened the
    checkpoint and ``sent`` when after.
    """
    path = results_destination(prepared)
    stamped = stamp_path(checkpoint.path)
    stamp = _stamp(prepared, checkpoint)
    renderer = prepared.renderer
    remade = prepared.input_keys()
    stamps = _read_stamps(stamped)
    if stamps.get(str(path)) == {**stamp, **_file_identity(path)}:
        # The store did not grow since the file was written: nothing was sent now.
        rows = prepared.row_count
        kept = None if keys is None else (keys[start:start + BATCH_ROWS]
                                          for start in range(0, len(keys), BATCH_ROWS))
        tally = _tally_store(checkpoint, remade if kept is None else kept)
        return Written(path, rows, rows - tally.ok, rewritten=False, tally=tally)
    output = prepared.job.output
    assert output is not None
    layout = prepared.result_layout()
    failed = 0
    tally = Tally()
    sent, reused = SOURCES.index(SOURCE_SENT), SOURCES.index(SOURCE_REUSED)

    def batches() -> Iterator[pa.RecordBatch]:
        nonlocal failed
        position = 0
        for batch in prepared.batches():
            end = position + batch.num_rows
            these = keys[position:end] if keys is not None else next(remade)
            records = checkpoint.read(these)
            if None in records:
                _fill_input_errors(records, batch, renderer)
            codes = (sources[position:end] if sources is not None
                     else np.where(checkpoint.stored_before_run(these), reused, sent))
            for offset, (record, code) in enumerate(zip(records, codes.tolist(), strict=True)):
                if record is None or record["status"] != STATUS_OK:
                    failed += 1
                tally.add(position + offset, NO_OUTCOME if record is None else record)
                if record is not None:
                    record[SOURCE_COLUMN] = SOURCES[code]
            typed = typed_columns(batch, prepared.output_schema)
            yield layout.attach(typed, records)
            position = end

    rows = write_results(path, layout.schema, batches(),
                         csv_escape_formulas=output.csv_escape_formulas)
    checkpoint.sync()
    # One stamp per results file: a --limit sample written beside the results does
    # not make the full results look stale.
    stamps[str(path)] = {**stamp, **_file_identity(path)}
    _write_stamps(stamped, stamps)
    return Written(path, rows, failed, tally=tally)


def _tally_store(checkpoint: Checkpoint, keys: Iterator[np.ndarray]) -> Tally:
    """The tally of an up-to-date results file, from the store alone: a row
    without an answer is one its input kept from being sent."""
    tally = Tally()
    position = 0
    for these in keys:
        for record in checkpoint.read(these):
            tally.add(position, _INPUT_ERROR if record is None else record)
            position += 1
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
                       renderer: PromptRenderer) -> None:
    for offset, problem in renderer.prompts(batch).problems.items():
        if records[offset] is None:
            records[offset] = {**RowResult.failed(problem, 0, INPUT_ERROR_CLASS).to_dict(),
                               SOURCE_COLUMN: SOURCE_SENT}


def _stamp(prepared: Prepared, checkpoint: Checkpoint) -> dict[str, Any]:
    """What a results file is written from: the job, the input, the limit, the store."""
    job = prepared.job
    shaping = {"requests": request_identity(job), "prompt": job.prompt.model_dump(),
               "id_column": job.input.id_column,
               "schema_prefix": job.output.schema_prefix if job.output else ""}
    digest = hashlib.blake2b(orjson.dumps(shaping, option=orjson.OPT_SORT_KEYS),
                             digest_size=16).hexdigest()
    journal = checkpoint.path.stat()
    # The journal as a file, not only its length: a --fresh run that journals the
    # same number of bytes again is still a new journal (new inode, new time).
    return {"job": digest, "input": prepared.input_digest, "limit": prepared.limit,
            "journal": [journal.st_size, journal.st_mtime_ns, journal.st_ino]}


def _file_identity(path: Path) -> dict[str, Any]:
    try:
        status = path.stat()
    except OSError:
        return {"results": None}
    return {"results": str(path), "size": status.st_size, "mtime_ns": status.st_mtime_ns,
            "inode": status.st_ino}


def _read_stamps(path: Path) -> dict[str, Any]:
    try:
        stamps = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return stamps if isinstance(stamps, dict) else {}


def _write_stamps(path: Path, stamps: dict[str, Any]) -> None:
    """Best effort, and small enough for one write: a stamp torn by a kill, or none,
    only means the next run writes the results again."""
    with contextlib.suppress(OSError, OutputError):
        write_private(path, orjson.dumps(stamps), "results stamp")


@dataclass
class RunReport:
    """What a finished run did; ``exit_code`` follows the contract.

    ``pending`` says what is still running at the service (``mode: batch``
    without waiting): no results were written yet, and the exit code is 0.
    """

    stats: RunStats
    rows: int
    failed_rows: int
    results_path: Path | None
    tally: Tally = field(default_factory=Tally)  # every row of the results
    price: Price | NoPrice | None = None  # what the rows cost at (None: not resolved)
    pending: str | None = None
    results_rewritten: bool = True  # False: nothing changed, the file was left alone

    @property
    def exit_code(self) -> int:
        return 1 if self.failed_rows else 0
