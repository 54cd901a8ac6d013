"""What a person (or a cron log) sees while a run goes on.

On a terminal: a tqdm bar with rows, ok/error, tokens and requests per
second. Elsewhere: a line at the first finished row, then one every few
seconds, each standing alone in a log file (time, job, rows done of total, ok/error,
rate, ETA), so a cron mail or a CI log shows progress without
carriage-return noise.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TextIO

from batcher.records import RowResult
from batcher.redact import printable

# A share of truncated replies worth a warning: below it, a few long answers.
TRUNCATION_WARNING_SHARE = 0.05
INPUT_ERROR_CLASS = "input"


@dataclass
class ErrorClass:
    """Rows that failed the same way in one run: how many, and the first of them."""

    count: int
    first_row: int
    first_error: str


@dataclass
class RunStats:
    """Counters of one run (this invocation).

    ``reused`` rows were answered by the checkpoint and not sent; ``ok`` and
    ``errors`` count the rows this run finished, ``shared`` of them with the
    answer of an identical row's request (so their tokens are not counted
    again).
    """

    total_rows: int = 0
    reused: int = 0
    shared: int = 0
    ok: int = 0
    errors: int = 0
    truncated: int = 0
    requests: int = 0
    rate_limited: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0  # of the rows with a known cost
    retries: int = 0  # requests beyond each row's first
    started: float = field(default_factory=time.monotonic)
    error_classes: dict[str, ErrorClass] = field(default_factory=dict)

    def record(self, position: int, result: RowResult, *, shared: bool = False) -> None:
        """Count one finished row; failures are grouped by the row's ``error_class``
        for the summary; a ``shared`` row's tokens were counted with its twin's."""
        if result.ok:
            self.ok += 1
            self.truncated += result.finish_reason == "length"
        else:
            self.errors += 1
            name = result.error_class or "an unclassified error"
            known = self.error_classes.get(name)
            if known is None:
                self.error_classes[name] = ErrorClass(1, position, result.error or "")
            else:
                known.count += 1
        if shared:
            self.shared += 1
            return
        self.prompt_tokens += result.prompt_tokens or 0
        self.completion_tokens += result.completion_tokens or 0
        self.cost_usd += result.cost_usd or 0.0
        self.retries += max(0, result.attempts - 1)

    @property
    def finished(self) -> int:
        return self.reused + self.ok + self.errors

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def requests_per_minute(self) -> float:
        elapsed = self.elapsed_s
        return self.requests * 60 / elapsed if elapsed > 0 else 0.0

    def rows_per_minute(self) -> float:
        elapsed = self.elapsed_s
        return (self.ok + self.errors) * 60 / elapsed if elapsed > 0 else 0.0

    def eta_s(self) -> float | None:
        """Seconds to the last row at this run's pace so far (None before a pace exists)."""
        rate = self.rows_per_minute() / 60
        remaining = self.total_rows - self.finished
        if remaining <= 0:
            return 0.0
        return remaining / rate if rate > 0 else None

    def error_lines(self) -> list[str]:
        """One line per way rows failed, most frequent first, with the first example."""
        ranked = sorted(self.error_classes.items(), key=lambda item: -item[1].count)
        return [f"{found.count} row{'' if found.count == 1 else 's'} failed with {name} "
                f"(first: row {found.first_row + 1}: {found.first_error})"
                for name, found in ranked]

    def warnings(self) -> list[str]:
        """What a run that "worked" may still have got wrong."""
        if not self.ok or self.truncated / self.ok < TRUNCATION_WARNING_SHARE:
            return []
        return [f"{self.truncated} of {self.ok} replies ({self.truncated / self.ok:.0%}) were cut "
                "off by the token limit (finish_reason 'length'); raise params.max_tokens if "
                "they should be whole"]


class Progress:
    """A bar on a terminal, standalone log lines elsewhere, nothing when quiet."""

    def __init__(self, stats: RunStats, *, stream: TextIO | None = None, enabled: bool = True,
                 log_every_s: float = 5.0, bar: bool | None = None, label: str = "") -> None:
        self._stats = stats
        self._stream = stream or sys.stderr
        self._enabled = enabled
        self._log_every_s = log_every_s
        self._label = label
        use_bar = self._stream.isatty() if bar is None else bar
        self._bar: Any = None
        if enabled and use_bar:
            self._bar = _bar_class()(total=stats.total_rows, initial=stats.reused,
                                     unit="row", file=self._stream, dynamic_ncols=True,
                                     smoothing=0.05)
        self._last_log = -math.inf  # the first finished row is logged at once
        self._last_postfix = 0.0

    def reuse(self, rows: int) -> None:
        """Count rows answered by the checkpoint (not sent)."""
        self._stats.reused += rows
        if self._bar is not None and rows:
            self._bar.update(rows)

    def update(self, position: int, result: RowResult, *, shared: bool = False) -> None:
        self._stats.record(position, result, shared=shared)
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
            self._log(self._log_line())

    def refresh(self) -> None:
        """Show the stats as they are now, when rows are counted elsewhere (by the
        workers of a cluster) rather than through :meth:`update`."""
        if not self._enabled:
            return
        now = time.monotonic()
        if self._bar is not None:
            self._bar.n = self._stats.finished
            self._bar.set_postfix_str(self._postfix(), refresh=True)
        elif self._stats.finished and now - self._last_log >= self._log_every_s:
            self._last_log = now
            self._log(self._log_line())

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

    def _log_line(self) -> str:
        stats = self._stats
        share = stats.finished / stats.total_rows if stats.total_rows else 1.0
        eta = stats.eta_s()
        return (f"{stats.finished}/{stats.total_rows} rows ({share:.0%}), {stats.ok} ok, "
                f"{stats.errors} error{'' if stats.errors == 1 else 's'}, "
                f"{stats.rows_per_minute():.0f} rows/min, "
                f"ETA {'unknown' if eta is None else duration(eta)}")

    def _log(self, text: str) -> None:
        stamp = datetime.now().astimezone().isoformat(timespec="seconds")
        job = f" {self._label}:" if self._label else ""
        print(printable(f"{stamp} batcher{job} {text}"), file=self._stream, flush=True)


def duration(seconds: float) -> str:
    """A span for a person: ``1h09m``, ``4m05s``, ``12s``."""
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _bar_class() -> Any:
    """tqdm's notebook widget inside Jupyter when ipywidgets is installed, its text
    bar otherwise: ``tqdm.auto`` would warn "IProgress not found" in a notebook
    without ipywidgets, where the text bar serves well enough."""
    shell = sys.modules.get("IPython")
    in_kernel = False
    if shell is not None:
        ipython = getattr(shell, "get_ipython", lambda: None)()
        in_kernel = ipython is not None and "IPKernelApp" in getattr(ipython, "config", {})
    if in_kernel:
        try:
            import ipywidgets  # type: ignore[import-untyped]  # noqa: F401 - the widget needs it
        except ImportError:
            pass
        else:
            from tqdm.notebook import tqdm as notebook_bar
            return notebook_bar
    from tqdm.std import tqdm as text_bar
    return text_bar
