"""The last step of a run: the results file, in input order, from the checkpoint.

Only when every row has an outcome are the input's batches read again and
each joined with its rows' journal records, one batch at a time, so a
million-row results file never needs the whole input or journal in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from batcher.checkpoint import Checkpoint
from batcher.outputs import attach_results, results_schema, write_results
from batcher.preflight import Prepared
from batcher.records import STATUS_OK


@dataclass(frozen=True)
class Written:
    path: Path
    rows: int
    failed_rows: int


def write_results_file(prepared: Prepared, checkpoint: Checkpoint) -> Written:
    """Write the job's results file atomically; count the rows that are not ``ok``."""
    output = prepared.job.output
    assert output is not None
    schema = results_schema(prepared.reader.schema)
    failed = 0

    def batches() -> Iterator[pa.RecordBatch]:
        nonlocal failed
        position = 0
        for batch in prepared.batches():
            records = checkpoint.read(position, position + batch.num_rows)
            failed += sum(1 for record in records
                          if record is None or record["status"] != STATUS_OK)
            yield attach_results(batch, records, schema)
            position += batch.num_rows

    rows = write_results(output.path, schema, batches())
    checkpoint.sync()
    return Written(output.path, rows, failed)
