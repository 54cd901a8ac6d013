"""Turning input rows into chat messages.

One rule for a missing cell, whether the prompt is a column or a template: a
null, NaN or blank value in a column the prompt reads makes the row an input
error that is not sent (``prompt.missing: error``, the default), or renders
as empty text (``prompt.missing: empty``). Nested values (a JSONL object, a
Parquet list) render as JSON, not as Python reprs.
"""

from __future__ import annotations

import math
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from batcher.config import PromptSpec

if TYPE_CHECKING:  # record batches come from batcher.io.inputs; pyarrow is its concern
    import pyarrow as pa

# OpenAI counts TPM from "the character count of your request"; ~4 characters
# per token is its own rule of thumb, plus a few tokens of framing per message.
CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4
TOKENS_PER_REQUEST = 3


@dataclass(slots=True)
class Prompts:
    """One batch's user messages; ``None`` where a row has none, and why."""

    texts: list[str | None]
    problems: dict[int, str]  # offset in the batch -> the row's results error


@dataclass(slots=True)
class RenderedRow:
    position: int
    messages: list[dict[str, str]] | None  # None when the row cannot be sent
    prompt_tokens_estimate: int
    problem: str | None = None  # why the row is not sent, as its results error


class PromptRenderer:
    """Builds each row's messages from a column or a ``{column}`` template.

    ``prompts`` is the cheap step, run on every row (the user message's text
    is all a row's request key needs); ``rendered`` makes the messages sent,
    for the rows that are sent. ``instruction`` (the reply schema's, in
    prompt mode) ends every user message sent.
    """

    def __init__(self, spec: PromptSpec, instruction: str | None = None) -> None:
        self._spec = spec
        self._columns = spec.columns()
        self._missing_is_error = spec.missing == "error"
        self._instruction = instruction or ""

    def prompts(self, batch: pa.RecordBatch) -> Prompts:
        problems: dict[int, str] = {}
        texts: list[str | None]
        column = self._spec.column
        if column is not None:  # the common case, one pass with no call per plain string
            texts = [value if type(value) is str else str(_cell(value))
                     for value in batch.column(column).to_pylist()]
            for offset, text in enumerate(texts):
                if not text or text.isspace():
                    texts[offset] = None
                    problems[offset] = (_missing_problem(column) if self._missing_is_error
                                        else "prompt is empty")
            return Prompts(texts, problems)
        columns = {name: [_cell(value) for value in batch.column(name).to_pylist()]
                   for name in self._columns}
        texts = []
        for offset in range(batch.num_rows):
            values = {name: columns[name][offset] for name in self._columns}
            if self._missing_is_error:
                missing = next((name for name, value in values.items()
                                if isinstance(value, str) and not value.strip()), None)
                if missing is not None:
                    texts.append(None)
                    problems[offset] = _missing_problem(missing)
                    continue
            try:
                text = self._prompt(values)
            except (ValueError, TypeError, KeyError, IndexError) as exc:
                texts.append(None)
                problems[offset] = f"prompt template failed: {exc}"
                continue
            if not text.strip():
                texts.append(None)
                problems[offset] = "prompt is empty"
                continue
            texts.append(text)
        return Prompts(texts, problems)

    def rendered(self, position: int, text: str | None, problem: str | None = None
                 ) -> RenderedRow:
        if text is None:
            return RenderedRow(position, None, 0, problem)
        messages = []
        if self._spec.system:
            messages.append({"role": "system", "content": self._spec.system})
        messages.append({"role": "user", "content": text + self._instruction})
        return RenderedRow(position, messages, estimate_prompt_tokens(messages))

    def _prompt(self, values: dict[str, Any]) -> str:
        if self._spec.column is not None:
            return str(values[self._spec.column])
        assert self._spec.template is not None
        return _COLUMNS_FORMATTER.vformat(self._spec.template, (), values)


def _cell(value: Any) -> Any:
    """A cell as the prompt sees it: null and NaN as empty text, nested values as
    JSON text; numbers stay numbers, so a template's ``{price:.2f}`` still works."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, dict | list | tuple):
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS, default=str).decode()
    return value


def _missing_problem(column: str) -> str:
    shown = column if column.isprintable() else column.encode("unicode_escape").decode("ascii")
    return (f"prompt is empty: column '{shown}' is null or blank in this row, so it is not "
            "sent (prompt.missing: empty sends it with empty text)")


class _ColumnFormatter(string.Formatter):
    """``str.format`` where every field is a column name, even ``{0}`` (pandas
    exports often have columns named by number)."""

    def get_value(self, key: int | str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        return kwargs[str(key)]


_COLUMNS_FORMATTER = _ColumnFormatter()


def estimate_prompt_tokens(messages: list[dict[str, str]]) -> int:
    """The server-side TPM estimate of a request's input, from its characters."""
    chars = sum(len(message["content"]) for message in messages)
    return (math.ceil(chars / CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE * len(messages)
            + TOKENS_PER_REQUEST)
