"""The run report's figures, drawn with matplotlib: the only module that imports it.

matplotlib is an optional extra (``pip install 'batcher[report]'``): a cron
job or a server that never draws a chart does not need it, so it is imported
when the first figure is drawn. Figures are built with matplotlib's object API
and the Agg canvas, never ``pyplot``, so no global state or display backend is
touched.
"""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING, Any

import numpy as np

from batcher.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure


def _figure(height: float = 3.2) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("the report draws with matplotlib, which is not installed: "
                          "pip install 'batcher[report]'") from None
    return Figure(figsize=(8, height), dpi=100, layout="constrained")


def throughput(frame: pd.DataFrame, summary: dict[str, Any] | None) -> Figure:
    figure = _figure()
    axes = figure.add_subplot()
    moments = frame["finished_at"].dropna().to_numpy()
    limit = (summary or {}).get("run", {}).get("requests_per_minute_limit")
    if len(moments):
        elapsed = moments - moments.min()
        # About 40 bars, never under a quarter second; a last partial bar is
        # left out rather than drawn as a false drop.
        width = max(0.25, float(elapsed.max()) / 40)
        bars = max(1, int(elapsed.max() // width))
        counts, edges = np.histogram(elapsed, bins=bars, range=(0, bars * width))
        axes.stairs(counts * 60.0 / width, edges, baseline=None, linewidth=2, zorder=3,
                    label="rows finished per minute")
        axes.set_xlabel(f"seconds since the first row finished ({width:g} s bars)")
    else:
        axes.text(0.5, 0.5, "no finish times recorded", ha="center", va="center",
                  transform=axes.transAxes)
    if limit:
        axes.axhline(limit, color="tab:red", linestyle="--", zorder=2,
                     label=f"limit: {limit:,.0f}/min")
    axes.set_ylabel("per minute")
    axes.set_ylim(bottom=0)
    axes.legend(loc="lower right")
    return figure


def latency(ok: pd.DataFrame) -> Figure:
    figure = _figure()
    axes = figure.add_subplot()
    values = ok["latency_s"].dropna().to_numpy()
    if len(values):
        axes.hist(values, bins=min(50, max(5, len(values) // 5)), color="tab:blue")
        for percent, style in ((50, "-"), (90, "--"), (99, ":")):
            mark = float(np.percentile(values, percent))
            axes.axvline(mark, color="black", linestyle=style, label=f"p{percent} {mark:.3f} s")
        axes.legend()
    axes.set_xlabel("seconds")
    axes.set_ylabel("rows")
    return figure


def tokens(ok: pd.DataFrame) -> Figure:
    figure = _figure()
    axes = figure.add_subplot()
    for column, label in (("prompt_tokens", "prompt"), ("completion_tokens", "completion")):
        values = ok[column].dropna().to_numpy(dtype="float64")
        if len(values):
            axes.hist(values, bins=40, alpha=0.6, label=label)
    axes.set_xlabel("tokens")
    axes.set_ylabel("rows")
    if len(ok):
        axes.legend()
    return figure


def errors_by_class(errors: pd.DataFrame) -> Figure:
    counts = errors["error_class"].fillna("error").value_counts().iloc[::-1]
    figure = _figure(height=1.0 + 0.45 * len(counts))
    axes = figure.add_subplot()
    axes.barh([_literal(str(name)) for name in counts.index], counts.to_numpy(),
              color="tab:red")
    axes.set_xlabel("rows")
    return figure


def _literal(label: str) -> str:
    """``label`` drawn as it is: a class comes from a server's error code, and matplotlib
    reads text between two ``$`` as math, failing on what is not valid TeX."""
    return label.replace("$", r"\$")


def png_base64(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")  # PNG is drawn by the Agg renderer
    return base64.b64encode(buffer.getvalue()).decode("ascii")
