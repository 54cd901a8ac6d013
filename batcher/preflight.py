"""Everything decided before the first request: check the job against its
input, fingerprint it, and estimate what a run would send.

A mistake found here costs nothing (exit 2): no request is sent and no file
is written. ``--dry-run`` and ``batcher validate`` stop here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import orjson
import pyarrow as pa

from batcher.checkpoint import Checkpoint
from batcher.config import Job
from batcher.errors import DataError
from batcher.inputs import InputReader, scan_input
from batcher.pipeline import unfinished_rows
from batcher.pricing import price_for
from batcher.prompts import PromptRenderer, RenderedRow
from batcher.records import RESULT_COLUMNS

FINGERPRINT_VERSION = 1


@dataclass(frozen=True)
class Estimate:
    rows: int
    pending_rows: int
    prompt_tokens: int
    completion_tokens: int | None  # None when the job sets no max_tokens
    cost_usd: float | None
    note: str | None = None  # something the run would trip over
    batch: str | None = None  # mode: batch: the batch files and the cost at the batch price

    def describe(self, model: str) -> str:
        text = (f"{self.rows} rows ({self.pending_rows} to send, "
                f"{self.rows - self.pending_rows} already done); about "
                f"{self.prompt_tokens:,} prompt tokens to send")
        if self.completion_tokens is None:
            text += "; completion tokens unknown (params set no max_tokens)"
        else:
            text += f" and at most {self.completion_tokens:,} completion tokens"
        if self.cost_usd is not None:
            text += f"; at most ${self.cost_usd:,.2f} at {model}'s list price"
        if self.batch:
            text += f"\n{self.batch}"
        if self.note:
            text += f"\nnote: {self.note}"
        return text


@dataclass
class Prepared:
    """A job checked against its input, ready to run or estimate."""

    job: Job
    reader: InputReader
    rows: int
    fingerprint: str
    limit: int | None
    input_digest: str  # the input's bytes, for the results' up-to-date stamp
    output_schema: pa.Schema  # the input's columns as the results hold them
    is_sample: bool = False  # a --limit run over fewer rows than the input has

    @property
    def row_count(self) -> int:
        return self.rows if self.limit is None else min(self.rows, self.limit)

    def batches(self) -> Iterator[pa.RecordBatch]:
        """The input's rows within the limit, streamed in record batches."""
        seen = 0
        for batch in self.reader.batches():
            if self.limit is not None and seen + batch.num_rows > self.limit:
                batch = batch.slice(0, max(0, self.limit - seen))
            if batch.num_rows:
                yield batch
            seen += batch.num_rows
            if self.limit is not None and seen >= self.limit:
                return

    def unfinished_rows(self, checkpoint: Checkpoint | None) -> Iterator[RenderedRow]:
        """Every row within the limit the checkpoint does not hold as ``ok``, rendered."""
        return unfinished_rows(self.batches(), PromptRenderer(self.job.prompt), checkpoint)


def prepare(job: Job, limit: int | None = None, *, allow_empty: bool = False) -> Prepared:
    """Everything that can be checked without sending a request (exit 2 on failure).

    A file with a header (or a schema) and no rows is bad input: a nightly
    export that came out empty should fail loudly, not "succeed" with nothing.
    ``allow_empty`` is for callers where no rows is a normal case (an empty
    DataFrame from the Python API).
    """
    reader = InputReader(job.input.path, delimiter=job.input.delimiter)
    _check_columns(job, reader)
    summary = scan_input(reader, job.input.id_column, limit)
    if summary.rows == 0 and not allow_empty and limit != 0:
        raise DataError(f"{job.input.path}: the input has no rows (only a header); "
                        "nothing to send")
    return Prepared(job, reader, summary.rows, fingerprint(job, summary.digest), limit,
                    summary.digest, summary.output_schema, summary.beyond_limit)


def fingerprint(job: Job, input_digest: str) -> str:
    """What makes two runs the same job: the input's bytes and everything that
    shapes a request. Limits, retries and the endpoint's URL are left out, so
    a resume may change them."""
    identity = {
        "v": FINGERPRINT_VERSION,
        "input": input_digest,
        "id_column": job.input.id_column,
        "prompt": job.prompt.model_dump(),
        "model": job.model,
        "params": job.params,
    }
    return hashlib.blake2b(orjson.dumps(identity, option=orjson.OPT_SORT_KEYS),
                           digest_size=16).hexdigest()


def estimate(prepared: Prepared, checkpoint: Checkpoint | None = None) -> Estimate:
    """Rows and tokens a run would send (for ``--dry-run``)."""
    job = prepared.job
    prompt_tokens = 0
    pending = 0
    for row in prepared.unfinished_rows(checkpoint):
        if row.messages is not None:
            pending += 1
            prompt_tokens += row.prompt_tokens_estimate
    max_output = job.max_output_tokens
    completion = None if max_output is None else max_output * pending * int(
        job.params.get("n", 1) or 1)
    price = price_for(job.model)
    cost = None
    if price is not None and completion is not None:
        cost = price.cost(prompt_tokens, completion)
    return Estimate(prepared.row_count, pending, prompt_tokens, completion, cost)


def _check_columns(job: Job, reader: InputReader) -> None:
    names = reader.schema.names
    path = job.input.path
    wanted = [("input.id_column", job.input.id_column)] if job.input.id_column else []
    key = "prompt.column" if job.prompt.column is not None else "prompt.template"
    wanted += [(key, name) for name in job.prompt.columns()]
    for setting, column in wanted:
        if column not in names:
            listed = ", ".join(_printable(name) for name in names) or "none"
            raise DataError(f"{path}: {setting} names column '{_printable(column)}', which the "
                            f"input does not have (columns: {listed}){reader.columns_hint()}")
    clashes = [name for name in names if name in RESULT_COLUMNS]
    if clashes:
        raise DataError(f"{path}: input column '{clashes[0]}' has the name of a results column; "
                        "rename it in the input")


def _printable(name: str) -> str:
    """A column name fit for a one-line message (line breaks and the like escaped)."""
    return name if name.isprintable() else name.encode("unicode_escape").decode("ascii")
