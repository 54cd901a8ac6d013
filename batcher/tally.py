"""Totals over row outcomes: what the run summary and ``batcher status`` count.

Fed one row's record (a dict of :class:`batcher.records.RowResult` fields)
and its position at a time, in journal order: an ``ok`` row
is final (it is never sent again), an ``error`` row counts until a later
record of the same row replaces it. Memory is one number per ``ok`` row (its
latency, for exact percentiles) and a small entry per row currently in error:
the pace is counted as rows come, over a window given up front, so a
million-row results write does not keep every row's finish time.
"""

from __future__ import annotations

import math
from array import array
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from batcher.records import STATUS_OK

PERCENTILES = (50, 90, 99)


@dataclass
class Tally:
    ok: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float = 0.0
    unpriced_rows: int = 0  # ok rows without a cost (no price known, or no usage sent)
    latencies: array[float] = field(default_factory=lambda: array("d"))
    # The pace's window, (start, end) in epoch seconds: rows finished in it are
    # counted (see rows_per_minute); None: the pace is not wanted.
    rate_window: tuple[float, float] | None = None
    _in_window: int = 0
    _first_finished: float = math.inf
    _errors: dict[int, str] = field(default_factory=dict)

    def add(self, position: int, record: Mapping[str, Any]) -> None:
        """Count row ``position``'s outcome (a later one of the same row replaces it)."""
        if record.get("status") != STATUS_OK:
            self._errors[position] = record.get("error_class") or "error"
            return
        self._errors.pop(position, None)
        self.ok += 1
        self.prompt_tokens += record.get("prompt_tokens") or 0
        self.cached_tokens += record.get("cached_tokens") or 0
        self.completion_tokens += record.get("completion_tokens") or 0
        self.reasoning_tokens += record.get("reasoning_tokens") or 0
        cost = record.get("cost_usd")
        if cost is None:
            self.unpriced_rows += 1
        else:
            self.cost_usd += cost
        if record.get("latency_s") is not None:
            self.latencies.append(record["latency_s"])
        finished = record.get("finished_at")
        if finished is not None and self.rate_window is not None:
            self._first_finished = min(self._first_finished, finished)
            self._in_window += self.rate_window[0] <= finished <= self.rate_window[1]

    @property
    def errors(self) -> int:
        return len(self._errors)

    @property
    def done(self) -> int:
        return self.ok + self.errors

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def errors_by_class(self) -> dict[str, int]:
        return dict(Counter(self._errors.values()).most_common())

    def tokens(self) -> dict[str, int]:
        return {"prompt": self.prompt_tokens, "cached": self.cached_tokens,
                "completion": self.completion_tokens, "reasoning": self.reasoning_tokens,
                "total": self.total_tokens}

    def latency_percentiles(self) -> dict[str, float | None]:
        """p50/p90/p99/max of the ``ok`` rows' latency in seconds (None: no rows)."""
        if not self.latencies:
            return {**{f"p{p}": None for p in PERCENTILES}, "max": None}
        values = np.frombuffer(self.latencies, dtype=np.float64)
        figures = np.percentile(values, PERCENTILES)
        return {**{f"p{p}": round(float(v), 4) for p, v in zip(PERCENTILES, figures, strict=True)},
                "max": round(float(values.max()), 4)}

    def rows_per_minute(self) -> float:
        """``ok`` rows finished per minute over :attr:`rate_window` (0 without one)."""
        if self.rate_window is None or not self._in_window:
            return 0.0
        start, end = self.rate_window
        # A run younger than the window is measured over its own age.
        span = end - max(start, self._first_finished)
        return self._in_window * 60.0 / max(span, 1.0)
