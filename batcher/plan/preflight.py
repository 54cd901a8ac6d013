"""Everything decided before the first request: check the job against its
input, and estimate what a run would send.

A mistake found here costs nothing (exit 2): no request is sent and no file
is written. ``--dry-run`` and ``batcher validate`` stop here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from batcher.config import Job
from batcher.errors import DataError
from batcher.io.inputs import InputReader
from batcher.io.inputscan import scan_input
from batcher.io.outputs import ResultLayout
from batcher.plan.budgets import check_budget_price
from batcher.plan.jobplan import JobPlan
from batcher.plan.rows import BatchPlan
from batcher.pricing import NoPrice, Price
from batcher.store.checkpoint import Checkpoint
from batcher.tokens import counter_for

if TYPE_CHECKING:  # record batches come from batcher.io.inputs; pyarrow is its concern
    import pyarrow as pa


@dataclass(frozen=True)
class Estimate:
    rows: int
    to_send: int  # requests a run would send (rows not answered, duplicates shared)
    reused: int  # rows answered by the checkpoint
    prompt_tokens: int  # of what would be sent only
    completion_tokens: int | None  # None when the job sets no max_tokens
    cost_usd: float | None  # None: no price known, or no max_tokens to bound the output
    tokens_counted: str  # how prompt tokens were counted: a real tokenizer or an estimate
    price: Price | NoPrice
    shared: int = 0  # rows answered by an identical row's request (duplicates: share)
    unsendable: int = 0  # rows whose prompt cannot be built (error rows, nothing sent)
    note: str | None = None  # something the run would trip over
    batch: str | None = None  # mode: batch: the batch files and the cost at the batch price

    def describe(self) -> str:
        parts = [f"{self.to_send:,} to send", f"{self.reused:,} reused from the checkpoint"]
        if self.shared:
            parts.append(f"{self.shared:,} sharing an identical row's answer")
        if self.unsendable:
            parts.append(f"{self.unsendable:,} with no prompt to send (error rows)")
        text = (f"{self.rows:,} rows ({', '.join(parts)}); {self.prompt_tokens:,} prompt "
                f"tokens to send ({self.tokens_counted})")
        if self.completion_tokens is None:
            text += "; completion tokens unknown (params set no max_tokens)"
        else:
            text += f" and at most {self.completion_tokens:,} completion tokens"
        if isinstance(self.price, NoPrice):
            text += f"\ncost unknown: {self.price.reason}"
        elif self.cost_usd is not None:
            text += f"\ncost: at most ${self.cost_usd:,.4f} at {self.price.describe()}"
        if self.batch:
            text += f"\n{self.batch}"
        if self.note:
            text += f"\nnote: {self.note}"
        return text


@dataclass
class Prepared(JobPlan):
    """A job checked against its input file, ready to run or estimate: what the job
    means (:class:`~batcher.plan.jobplan.JobPlan`) and the rows it means it for."""

    reader: InputReader
    rows: int
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

    def plans(self, checkpoint: Checkpoint | None) -> Iterator[BatchPlan]:
        """Every batch within the limit, keyed and looked up in the checkpoint."""
        return self.keyed(self.batches(), checkpoint)

    def input_keys(self) -> Iterator[np.ndarray]:
        """Every batch's row keys within the limit, in input order."""
        return self.batch_keys(self.batches())

    def result_layout(self) -> ResultLayout:
        """The results file's columns: the input's as the results hold them, then the
        job's result columns."""
        return self.layout(self.output_schema)


def prepare(job: Job, limit: int | None = None, *, allow_empty: bool = False) -> Prepared:
    """Everything that can be checked without sending a request (exit 2 on failure).

    A file with a header (or a schema) and no rows is bad input: a nightly
    export that came out empty should fail loudly, not "succeed" with nothing.
    ``allow_empty`` is for callers where no rows is a normal case (an empty
    DataFrame from the Python API).
    """
    reader = InputReader(job.input.path, delimiter=job.input.delimiter)
    JobPlan(job).check_columns(reader.schema.names, str(job.input.path), "the input",
                               hint=reader.columns_hint())
    summary = scan_input(reader, job.input.id_column, limit)
    if summary.rows == 0 and not allow_empty and limit != 0:
        raise DataError(f"{job.input.path}: the input has no rows (only a header); "
                        "nothing to send")
    prepared = Prepared(job, reader, summary.rows, limit, summary.digest,
                        summary.output_schema, summary.beyond_limit)
    check_budget_price(prepared)
    return prepared


def estimate(prepared: Prepared, checkpoint: Checkpoint | None = None) -> Estimate:
    """Rows, tokens and cost a run would send (for ``--dry-run``): prompt tokens
    counted with the model's tokenizer where one works offline, else estimated;
    the cost is an upper bound (every row using its whole ``max_tokens``, no
    cache hits, every request's fee)."""
    job = prepared.job
    counter = counter_for(job.model)
    renderer = prepared.renderer
    share = job.duplicates == "share"
    seen: set[bytes] = set()
    prompt_tokens = to_send = reused = shared = unsendable = 0
    for plan in prepared.plans(checkpoint):
        reused += plan.reused
        for row in plan.pending:
            messages = renderer.rendered(row.position, row.text, row.problem).messages
            if messages is None:
                unsendable += 1
                continue
            if share:
                if row.request_hash in seen:
                    shared += 1
                    continue
                seen.add(row.request_hash)
            to_send += 1
            prompt_tokens += counter.count(messages)
    max_output = job.max_output_tokens
    completion = None if max_output is None else max_output * to_send * job.choices
    price = prepared.price
    cost = None
    if isinstance(price, Price) and completion is not None:
        cost = price.worst_case(prompt_tokens, completion, requests=to_send)
    return Estimate(prepared.row_count, to_send, reused, prompt_tokens, completion, cost,
                    counter.label, price, shared=shared, unsendable=unsendable)
