"""What a job means, whichever driver runs it and wherever its rows come from.

A :class:`JobPlan` computes once, for online runs, ``mode: batch`` and Ray
alike, everything a request and a result depend on:

- the **renderer**: rows to chat messages, the reply schema's instruction
  included (``renderer``);
- each row's **request key** (``batcher.store.keys``) and which rows a store
  already answers (``keyed``, ``batch_keys``);
- a pending row's **request body**, or its error when it cannot be sent
  (``request``);
- the **result layout**: every column the results add, in order, with its
  type: the result columns, ``replies`` when the job asks for several
  choices, the reply schema's typed columns (``result_names``, ``layout``);
- the **column check** of an input (a file, a DataFrame, a Dataset) against
  the prompt, the id column and the result layout (``check_columns``);
- the **prices** (the mode's and the online one) and the parts of sending
  that follow from the job: retry policy, reply checks, the identical
  failures that stop a run (``sending``, ``identical_failures``).

``batcher.plan.preflight.Prepared`` is a JobPlan with its input file; the Ray
driver makes one for a Dataset and hands it to its workers. A driver takes
these from here and builds none of them itself, so no driver can drift from
another (Ray once rebuilt its renderer and lost the schema instruction).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from batcher.config import Job
from batcher.errors import DataError
from batcher.io.inputs import id_strings
from batcher.io.outputs import ResultLayout
from batcher.io.schema_columns import SchemaColumns
from batcher.limits.pacing import Sleep
from batcher.limits.retry import RetryPolicy
from batcher.plan.pipeline import Limiter, Sender, Sending, schema_validator
from batcher.plan.rows import BatchPlan, IdenticalFailures, PendingRow, RowRequest
from batcher.pricing import NoPrice, Price, resolve_price
from batcher.progress import INPUT_ERROR_CLASS, RunStats
from batcher.prompts import PromptRenderer, Prompts
from batcher.records import OPTIONAL_COLUMNS, RESULT_COLUMNS, RowResult
from batcher.store.checkpoint import Checkpoint
from batcher.store.keys import RowKeys
from batcher.transport.wire import request_body

if TYPE_CHECKING:  # record batches come from batcher.io.inputs; pyarrow is its concern
    import pyarrow as pa


@dataclass
class JobPlan:
    """What ``job`` means for every driver (see the module's docstring).

    Pickled whole to Ray's workers, with what it has computed so far.
    """

    job: Job

    # -- rows to requests ---------------------------------------------------------------------

    @cached_property
    def renderer(self) -> PromptRenderer:
        output = self.job.output
        schema = output.reply_schema if output is not None else None
        return PromptRenderer(self.job.prompt, schema.instruction() if schema else None)

    @cached_property
    def _row_keys(self) -> RowKeys:
        return RowKeys(self.job)

    def keys(self, batch: pa.RecordBatch, start: int | None) -> tuple[np.ndarray, Prompts]:
        """A batch's row keys and user messages. ``start``: the position of the batch's
        first row; None where rows have no positions (a distributed read), so that
        without an id column a row is known by its request alone."""
        id_column = self.job.input.id_column
        if id_column is not None:
            ids = id_strings(batch.column(id_column))
        elif start is None:
            ids = [""] * batch.num_rows
        else:
            ids = [str(row) for row in range(start, start + batch.num_rows)]
        prompts = self.renderer.prompts(batch)
        return self._row_keys.keys(ids, prompts), prompts

    def keyed(self, batches: Iterable[pa.RecordBatch], store: Checkpoint | None
              ) -> Iterator[BatchPlan]:
        """Each batch's keys, and its rows the store does not answer with ``ok``."""
        share = self.job.duplicates == "share"
        start = 0
        for batch in batches:
            keys, prompts = self.keys(batch, start)
            answered = store.answered(keys) if store is not None else np.zeros(len(keys), bool)
            offsets = np.flatnonzero(~answered).tolist()
            hashes = self._row_keys.request_hashes(prompts) if share and offsets else None
            pending = [PendingRow(start + offset, keys[offset].tobytes(), prompts.texts[offset],
                                  prompts.problems.get(offset),
                                  b"" if hashes is None else hashes[offset].tobytes())
                       for offset in offsets]
            yield BatchPlan(start, keys, pending)
            start += batch.num_rows

    def batch_keys(self, batches: Iterable[pa.RecordBatch]) -> Iterator[np.ndarray]:
        """Each batch's row keys, and nothing else."""
        start = 0
        for batch in batches:
            yield self.keys(batch, start)[0]
            start += batch.num_rows

    def request(self, row: PendingRow) -> RowRequest | RowResult:
        """The row's request, or its error result when it cannot be sent at all."""
        rendered = self.renderer.rendered(row.position, row.text, row.problem)
        if rendered.messages is None:
            return RowResult.failed(rendered.problem or "", 0, INPUT_ERROR_CLASS)
        return RowRequest(row.position, row.key, row.request_hash,
                          request_body(self.job.model, rendered.messages,
                                       self.job.request_params),
                          rendered.prompt_tokens_estimate)

    # -- the results ----------------------------------------------------------------------------

    @cached_property
    def schema_columns(self) -> SchemaColumns | None:
        """The reply schema's typed columns (None: the job sets no schema)."""
        output = self.job.output
        if output is None or output.reply_schema is None:
            return None
        return SchemaColumns(output.reply_schema, output.schema_prefix)

    @cached_property
    def result_names(self) -> list[str]:
        """The columns the results add to the input's, in order."""
        names = list(RESULT_COLUMNS) + (list(OPTIONAL_COLUMNS) if self.job.choices > 1 else [])
        return names + (self.schema_columns.names if self.schema_columns is not None else [])

    def layout(self, input_schema: pa.Schema) -> ResultLayout:
        """The results' columns and types after the input's (``input_schema``)."""
        output = self.job.output
        return ResultLayout(input_schema, choices=self.job.choices,
                            reply_schema=output.reply_schema if output is not None else None,
                            prefix=output.schema_prefix if output is not None else "")

    def check_columns(self, names: list[str], where: str, what: str, *, hint: str = "",
                      prefix_setting: str = "output.schema_prefix") -> None:
        """Refuse (``DataError``, nothing sent) an input whose columns miss what the job
        reads or hold a name the results add. ``where`` starts the message, ``what``
        names the input in it ("the input", "the DataFrame"), ``hint`` ends a missing
        column's message, ``prefix_setting`` is how the caller sets the schema prefix."""
        job = self.job
        wanted = [("input.id_column", job.input.id_column)] if job.input.id_column else []
        key = "prompt.column" if job.prompt.column is not None else "prompt.template"
        wanted += [(key, name) for name in job.prompt.columns()]
        counts = Counter(names)
        for setting, column in wanted:
            if counts[column] == 0:
                listed = ", ".join(_printable(name) for name in names) or "none"
                raise DataError(f"{where}: {setting} names column '{_printable(column)}', which "
                                f"{what} does not have (columns: {listed}){hint}")
            if counts[column] > 1:
                raise DataError(f"{where}: {setting} names column '{_printable(column)}', which "
                                f"appears {counts[column]} times in {what}; make the names "
                                "unique")
        schema_columns = self.schema_columns.columns if self.schema_columns is not None else []
        fixed = self.result_names[:len(self.result_names) - len(schema_columns)]
        for taken in (name for name in fixed if name in counts):
            every = " (params.n > 1: every choice)" if taken in OPTIONAL_COLUMNS else ""
            raise DataError(f"{where}: {what} already has a column '{taken}', the name of a "
                            f"column the results add{every}; rename or drop it first")
        for clash in (column for column in schema_columns if column.name in counts):
            raise DataError(f"{where}: output.schema property '{clash.key}' would be the column "
                            f"'{_printable(clash.name)}', which {what} already has; set "
                            f"{prefix_setting} (e.g. 'reply_') or rename the column")

    # -- prices and sending ---------------------------------------------------------------------

    @cached_property
    def price(self) -> Price | NoPrice:
        """The model's price in the job's mode (``mode: batch``: the Batch API's)."""
        return self._price(batch=self.job.mode == "batch")

    @cached_property
    def online_price(self) -> Price | NoPrice:
        """The price of requests sent online (a batch job's online fallback too)."""
        return self._price(batch=False)

    @property
    def known_online_price(self) -> Price | None:
        """The online price when one is known: what a row's ``cost_usd`` is made at."""
        price = self.online_price
        return price if isinstance(price, Price) else None

    def _price(self, *, batch: bool) -> Price | NoPrice:
        job = self.job
        return resolve_price(job.model, pricing=job.pricing, base_url=job.endpoint.base_url,
                             batch=batch)

    def sending(self, sender: Sender, limiter: Limiter, stats: RunStats, sleep: Sleep,
                rng: random.Random, **extra: Any) -> Sending:
        """What every attempt of the run shares: the job's retry policy, params, reply
        checks and online price, with the driver's sender, limiter and clock."""
        job = self.job
        policy = RetryPolicy.from_spec(job.retry)
        schema = job.output.reply_schema if job.output is not None else None
        if schema is not None:
            extra.setdefault("validate", schema_validator(schema))
            extra.setdefault("invalid_reply_retries", job.retry.invalid_reply_retries)
        extra.setdefault("price", self.known_online_price)
        return Sending(sender, limiter, policy, stats, sleep, rng,
                       max_output_tokens=job.max_output_tokens, n_choices=job.choices, **extra)

    def identical_failures(self, kept: str) -> IdenticalFailures:
        """The run's stop after too many rows in a row failed the same way."""
        return IdenticalFailures(self.job.retry.stop_after_identical_failures, kept)


def _printable(name: str) -> str:
    """A column name fit for a one-line message (line breaks and the like escaped)."""
    return name if name.isprintable() else name.encode("unicode_escape").decode("ascii")
