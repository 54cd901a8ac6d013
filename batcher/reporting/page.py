"""A run report: one self-contained HTML file, and the same figures for a notebook.

Read from a results file (and the ``.summary.json`` a run writes beside it,
for the rate limit and the price): totals and cost, throughput over time
against the limit, the latency distribution, tokens per row, errors by class
with examples, and the slowest and most expensive rows. Plots are PNGs
inside the page (base64 ``data:`` URLs); the page loads nothing from a
network and runs no script.

The figures are drawn by ``batcher.reporting.charts`` (matplotlib, an optional extra);
this module reads the results and assembles the page.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from batcher.errors import ConfigError, DataError
from batcher.io.safefiles import write_private
from batcher.jobload import load_job
from batcher.plan.paths import summary_path
from batcher.records import RESULT_COLUMNS, STATUS_OK
from batcher.reporting import charts

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from batcher.api.results import Result

REPORT_SUFFIX = ".report.html"
JOB_SUFFIXES = (".yaml", ".yml")
TOP_ROWS = 10
EXAMPLES_PER_CLASS = 3
_COLUMNS = ("status", "error", "error_class", "latency_s", "prompt_tokens", "completion_tokens",
            "cached_tokens", "cost_usd", "finished_at")


def report(source: str | Path | Result, output: str | Path | None = None) -> Report:
    """The report of a finished run, from its results file, its job file or the
    :class:`batcher.Result` a call returned; written to ``output`` when given.

    In a notebook the figures display as they are:

    >>> built = batcher.report("jobs/demo.yaml")               # doctest: +SKIP
    >>> built.figures["Latency of answered rows"]
    >>> built.write("demo-report.html")
    """
    built = report_for(source)
    if output is not None:
        built.write(output)
    return built


def report_for(source: str | Path | Result) -> Report:
    """Build the report of a results file, a job file's results, or a ``Result``."""
    if not isinstance(source, str | Path):
        return build_report(source.results_path)
    path = Path(source)
    if path.suffix.lower() in JOB_SUFFIXES:
        job = load_job(path)
        assert job.output is not None
        return build_report(job.output.path, title=f"batcher report: {job.name}")
    return build_report(path)


@dataclass
class Report:
    """A run's report; ``figures`` are matplotlib figures (they display in Jupyter)."""

    title: str
    totals: dict[str, str]
    figures: dict[str, Figure]
    tables: dict[str, pd.DataFrame]
    notes: list[str] = field(default_factory=list)
    results_path: Path | None = None

    @property
    def default_path(self) -> Path:
        """Beside the results: ``NAME.report.html``."""
        if self.results_path is None:
            return Path("batcher-report.html")
        return self.results_path.with_name(self.results_path.stem + REPORT_SUFFIX)

    def to_html(self) -> str:
        parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
                 f"<title>{_text(self.title)}</title><style>{_CSS}</style></head><body>",
                 f"<h1>{_text(self.title)}</h1>", "<table class='totals'>"]
        parts += [f"<tr><th>{_text(key)}</th><td>{_text(value)}</td></tr>"
                  for key, value in self.totals.items()]
        parts.append("</table>")
        parts += [f"<p class='note'>{_text(note)}</p>" for note in self.notes]
        for name, figure in self.figures.items():
            parts.append(f"<h2>{_text(name)}</h2><figure><img alt='{_text(name)}' "
                         f"src='data:image/png;base64,{charts.png_base64(figure)}'></figure>")
        for name, table in self.tables.items():
            parts.append(f"<h2>{_text(name)}</h2>")
            parts.append(table.to_html(index=False, border=0, na_rep="", escape=True)
                         if len(table) else "<p>None.</p>")
        parts.append("</body></html>")
        return "\n".join(parts)

    def write(self, path: str | Path) -> Path:
        target = Path(path)
        # It shows rows, errors and costs: private (0600), and never written through a link.
        write_private(target, self.to_html().encode(), "report")
        return target


def build_report(results: Path, *, summary: dict[str, Any] | None = None,
                 title: str | None = None) -> Report:
    """The report of the results file ``results`` (its summary read from beside it)."""
    frame = _read(results)
    if summary is None:
        summary = _read_summary(summary_path(results))
    ok = frame[frame["status"] == STATUS_OK]
    totals = _totals(frame, ok, summary)
    figures = {
        "Throughput over time": charts.throughput(frame, summary),
        "Latency of answered rows": charts.latency(ok),
        "Tokens per row": charts.tokens(ok),
    }
    errors = frame[frame["status"] != STATUS_OK]
    if len(errors):
        figures["Errors by class"] = charts.errors_by_class(errors)
    tables = {
        "Errors by class, with examples": _error_examples(errors),
        f"Slowest {TOP_ROWS} rows": _top(frame, ok, "latency_s"),
        f"Most expensive {TOP_ROWS} rows": _top(frame, ok, "cost_usd"),
    }
    notes = []
    if summary is None:
        notes.append(f"No {summary_path(results).name} beside the results: the rate limit is "
                     "not drawn.")
    cost = (summary or {}).get("cost", {})
    if cost.get("note"):
        notes.append(f"Cost: {cost['note']}")
    return Report(title or f"batcher report: {results.name}", totals, figures, tables, notes,
                  results)


# -- reading ---------------------------------------------------------------------------------


def _read(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            frame = pd.read_parquet(path)
        elif suffix == ".csv":
            frame = pd.read_csv(path, low_memory=False)
        elif suffix == ".jsonl":
            frame = pd.read_json(path, lines=True, dtype=False)
        else:
            raise ConfigError(f"{path}: a results file ends in .parquet, .csv or .jsonl "
                              "(or pass the job file)")
    except FileNotFoundError:
        raise DataError(f"{path}: results file not found (has the run finished?)") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the results ({exc.__class__.__name__})") from None
    missing = [name for name in ("status", "latency_s") if name not in frame.columns]
    if missing:
        raise DataError(f"{path}: not a batcher results file (no '{missing[0]}' column)")
    for name in _COLUMNS:
        if name not in frame.columns:
            frame[name] = None  # results from before the column existed
    for name in ("latency_s", "cost_usd", "finished_at"):
        frame[name] = pd.to_numeric(frame[name], errors="coerce").astype("float64")
    for name in ("prompt_tokens", "completion_tokens", "cached_tokens"):
        frame[name] = pd.to_numeric(frame[name], errors="coerce").astype("Int64")
    frame["row"] = np.arange(len(frame))
    return frame


def _read_summary(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# -- totals and tables -----------------------------------------------------------------------


def _totals(frame: pd.DataFrame, ok: pd.DataFrame, summary: dict[str, Any] | None
            ) -> dict[str, str]:
    summary = summary or {}
    cost = ok["cost_usd"]
    totals = {
        "Rows": f"{len(frame):,} ({len(ok):,} ok, {len(frame) - len(ok):,} error)",
        "Prompt tokens": f"{int(ok['prompt_tokens'].sum()):,} "
                         f"({int(ok['cached_tokens'].sum()):,} cached)",
        "Completion tokens": f"{int(ok['completion_tokens'].sum()):,}",
        "Cost": (f"${cost.sum():,.4f}" if cost.notna().any() else "unknown")
        + (f" ({int(cost.isna().sum()):,} answered rows without a price)"
           if cost.notna().any() and cost.isna().any() else ""),
    }
    if summary.get("model"):
        totals["Model"] = str(summary["model"])
    price = summary.get("cost", {}).get("price")
    if price:
        totals["Price"] = str(price)
    run = summary.get("run", {})
    if run.get("elapsed_s") is not None:
        totals["Elapsed (last run)"] = f"{run['elapsed_s']:,.1f} s"
    if run.get("requests_per_minute") is not None:
        limit = run.get("requests_per_minute_limit")
        totals["Requests/min (last run)"] = f"{run['requests_per_minute']:,.0f}" + (
            f" of a {limit:,.0f} limit" if limit else "")
    finished = frame["finished_at"].dropna()
    if len(finished):
        totals["Finished"] = datetime.fromtimestamp(finished.max(), UTC).strftime(
            "%Y-%m-%d %H:%M:%S UTC")
    return totals


def _error_examples(errors: pd.DataFrame) -> pd.DataFrame:
    if not len(errors):
        return pd.DataFrame(columns=["class", "rows", "examples"])
    classes = errors["error_class"].fillna("error")
    rows = []
    for name, group in errors.groupby(classes, sort=False):
        examples = group["error"].dropna().astype(str).unique()[:EXAMPLES_PER_CLASS]
        rows.append({"class": name, "rows": len(group), "examples": " | ".join(examples)})
    return pd.DataFrame(rows).sort_values("rows", ascending=False)


def _top(frame: pd.DataFrame, ok: pd.DataFrame, column: str) -> pd.DataFrame:
    shown = ["row", *_input_columns(frame)[:1], column, "prompt_tokens", "completion_tokens"]
    if column != "latency_s":
        shown.append("latency_s")
    top = ok.dropna(subset=[column]).nlargest(TOP_ROWS, column)
    return top[list(dict.fromkeys(shown))]


def _input_columns(frame: pd.DataFrame) -> list[str]:
    return [name for name in frame.columns if name not in RESULT_COLUMNS and name != "row"]


def _text(value: object) -> str:
    return html.escape(str(value), quote=True)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { text-align: left; padding: 0.25em 0.8em; border-bottom: 1px solid #ddd; }
table.totals th { font-weight: 600; }
figure { margin: 0.5em 0 1.5em; } img { max-width: 100%; } .note { color: #855; }
"""
