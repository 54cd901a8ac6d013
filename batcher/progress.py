"""What a person (or a cron log) sees while a run goes on.

On a terminal: a tqdm bar with rows, ok/error, tokens and requests per
second. Elsewhere: one plain log line every few seconds, so a cron mail
or a CI log shows progress without carriage-return noise.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from tqdm.auto import tqdm

from batcher.records import RowResult


@dataclass
class RunStats:
    """Counters of one run (this invocation), and the rows it found already done."""

    total_rows: int = 0
    already_done: int = 0
    ok: int = 0
    errors: int = 0
    requests: int = 0
    rate_limited: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    batch_tokens: tuple[int, int] = (0, 0)
    """The part of the prompt and completion tokens answered by a Batch API (half price)."""
    started: float = field(default_factory=time.monotonic)

    def record(self, result: RowResult) -> None:
        if result.ok:
            self.ok += 1
        else:
            self.errors += 1
        self.prompt_tokens += result.prompt_tokens or 0
        self.completion_tokens += result.completion_tokens or 0

    @property
    def finished(self) -> int:
        return self.already_done + self.ok + self.errors

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started


class Progress:
    """A bar on a terminal, periodic log lines elsewhere, nothing when quiet."""

    def __init__(self, stats: RunStats, *, stream: TextIO | None = None, enabled: bool = True,
                 log_every_s: float = 5.0, bar: bool | None = None) -> None:
        self._stats = stats
        self._stream = stream or sys.stderr
        self._enabled = enabled
        self._log_every_s = log_every_s
        use_bar = self._stream.isatty() if bar is None else bar
        self._bar: tqdm[Any] | None = None
        if enabled and use_bar:
            self._bar = tqdm(total=stats.total_rows, initial=stats.already_done, unit="row",
                             file=self._stream, dynamic_ncols=True, smoothing=0.05)
        self._last_log = time.monotonic()
        self._last_postfix = 0.0

    def update(self, result: RowResult) -> None:
        self._stats.record(result)
        if not self._enabled:
            return
        now = time.monotonic()
        if self._bar is not None:
            self._bar.update(1)
            if now - self._last_postfix >= 0.5:  # formatting the postfix is not free
                self._last_postfix = now
                self._bar.set_postfix_str(self._postfix(), refresh=False)
        elif now - self._last_log >= self._log_every_s:
            self._last_log = now
            print(f"progress: {self._stats.finished}/{self._stats.total_rows} rows, "
                  f"{self._postfix()}", file=self._stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(), refresh=True)
            self._bar.close()
            self._bar = None

    def _postfix(self) -> str:
        stats = self._stats
        elapsed = stats.elapsed_s
        rate = stats.requests / elapsed if elapsed > 0 else 0.0
        return (f"ok={stats.ok} err={stats.errors} tok={stats.tokens:,} "
                f"{rate:.1f} req/s")
