"""`itwinai-sync plot`: metric curves drawn by matplotlib, to a PNG, SVG or PDF file or to a
self-contained HTML page (matplotlib's SVG of each chart inline, and a table of last, min and
max per series).

matplotlib draws every format, the page included (a hand-drawn SVG chart would be a second
plotting library to keep); it is imported only here, when a plot is asked for, and a missing
matplotlib is a one-line error naming the extra that installs it.
"""

from __future__ import annotations

import html
import io
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from itwinai_journal import Journal
from itwinai_journal.format.fsio import write_atomic

from . import ViewError
from .selection import metrics_table, select_runs
from .series import X_MODES, X_TITLES, Series, by_metric, ema, run_starts, series_of, x_values
from .summaries import summarize

#: Colours of successive series (matplotlib's tab10): one per run and rank, the same in every
#: chart and in the page's tables.
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf"]
ROW_HEIGHT = 360
DPI = 100
IMAGE_FORMATS = (".png", ".svg", ".pdf")
HTML_FORMATS = (".html", ".htm")
INSTALL_HINT = "pip install 'itwinai-sync[plot]'"


@dataclass
class PlotOptions:
    smooth: float = 0.0
    x: str = "step"
    width: int = 1200
    height: int | None = None  # default: ROW_HEIGHT per row of charts
    columns: int | None = None  # default: 1 for one metric, else 2


def grid(n: int, columns: int | None) -> tuple[int, int]:
    """(columns, rows) of the charts of `n` metrics."""
    cols = max(1, min(n, columns or (1 if n == 1 else 2)))
    return cols, max(1, math.ceil(n / cols))


def plot_size(n_metrics: int, opts: PlotOptions) -> tuple[int, int]:
    """Pixel size of the image for `n_metrics` charts."""
    _, rows = grid(n_metrics, opts.columns)
    return opts.width, opts.height or ROW_HEIGHT * rows


def plot(journal: Journal, out: Path, run_ids: Sequence[str] | None = None,
         metrics: Sequence[str] | None = None, opts: PlotOptions | None = None) -> dict[str, Any]:
    """Draw the metric curves of the selected runs to `out` (.png, .svg, .pdf, or .html as a
    self-contained page). Returns what was drawn: series and point counts."""
    opts = opts or PlotOptions()
    if not 0 <= opts.smooth < 1:
        raise ViewError(f"--smooth must be in [0, 1), got {opts.smooth}")
    if opts.x not in X_MODES:
        raise ViewError(f"--x must be one of {', '.join(X_MODES)}, got {opts.x!r}")
    suffix = out.suffix.lower()
    if suffix not in IMAGE_FORMATS + HTML_FORMATS:
        raise ViewError(f"cannot tell the format of {out}: use .png, .svg, .pdf or .html")
    _matplotlib()  # before reading the journal: a missing library is said at once
    runs = select_runs(journal, run_ids)
    t = metrics_table(journal, runs, metrics)
    if not t.num_rows:
        what = f" matching {', '.join(metrics)}" if metrics else ""
        raise ViewError(f"no metric records{what} in {journal.savedir}"
                        + (f" for {', '.join(run_ids)}" if run_ids else ""))
    series = series_of(t)
    charts = by_metric(series)
    if suffix in HTML_FORMATS:
        data = render_html(charts, opts, title=f"itwinai-sync: {journal.savedir}").encode()
    else:
        data = render_image(charts, opts, suffix[1:])
    write_atomic(out, data, fsync=False)
    return {"charts": len(charts), "series": len(series), "points": t.num_rows, "path": out}


def _matplotlib() -> Any:
    """matplotlib with the Agg backend (no display needed), or a ViewError naming the extra."""
    try:
        import matplotlib
    except ImportError:
        raise ViewError(f"matplotlib is needed to plot: {INSTALL_HINT}") from None
    matplotlib.use("Agg", force=True)
    return matplotlib


def render_image(charts: dict[str, list[Series]], opts: PlotOptions, fmt: str) -> bytes:
    """All charts in one image (a grid of `opts.columns`), as png, svg or pdf bytes."""
    w, h = plot_size(len(charts), opts)
    return _save(_figure(charts, opts, w, h, Style.of(charts)), fmt)


@dataclass
class Style:
    """What every chart of one plot shares: a colour per (experiment, run, rank), and each
    run's start (x = 0 of `--x relative`)."""

    colours: dict[tuple[str, str, int], str]
    starts: dict[tuple[str, str], float]

    @classmethod
    def of(cls, charts: dict[str, list[Series]]) -> Style:
        keys = sorted({(s.experiment, s.run_id, s.rank) for ss in charts.values() for s in ss})
        return cls({k: PALETTE[i % len(PALETTE)] for i, k in enumerate(keys)},
                   run_starts(s for ss in charts.values() for s in ss))


def _figure(charts: dict[str, list[Series]], opts: PlotOptions, width: int, height: int,
            style: Style) -> Any:
    """A matplotlib Figure of `width` x `height` pixels with one chart per metric, one line per
    run and rank (smoothed over the faint raw curve when `opts.smooth`)."""
    _matplotlib()
    from matplotlib.figure import Figure

    cols, rows = grid(len(charts), opts.columns)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    starts, colours = style.starts, style.colours
    for i, (name, series) in enumerate(charts.items()):
        ax = axes[i // cols][i % cols]
        for s in series:
            xs: list[Any] = x_values(s, opts.x, starts.get((s.experiment, s.run_id)))
            if opts.x == "time":
                xs = [datetime.fromtimestamp(x) for x in xs]
            ys = [v if math.isfinite(v) else math.nan for v in s.value]
            colour = colours[(s.experiment, s.run_id, s.rank)]
            label = f"{s.label} ({len(s)})"
            if opts.smooth:
                ax.plot(xs, ys, color=colour, alpha=0.25, linewidth=1)
                ax.plot(xs, ema(ys, opts.smooth), color=colour, linewidth=1.5, label=label)
            else:
                ax.plot(xs, ys, color=colour, linewidth=1.5, label=label,
                        marker="o" if len(s) == 1 else None)
        ax.set_title(name)
        ax.set_xlabel(X_TITLES[opts.x])
        ax.grid(True, alpha=0.3)
        if len(series) <= 12:
            ax.legend(fontsize="small")
        if opts.x == "time":
            import matplotlib.dates as mdates

            locator = mdates.AutoDateLocator()
            ax.xaxis.set_major_locator(locator)
            ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    for j in range(len(charts), rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    return fig


def _save(fig: Any, fmt: str, **rc: Any) -> bytes:
    """The figure as `fmt` bytes (with matplotlib settings `rc`). SVG text stays text:
    searchable in the page, and a fraction of the size of glyph outlines."""
    import matplotlib

    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.fonttype": "none", **rc}):
        fig.savefig(buf, format=fmt, dpi=DPI)
    return buf.getvalue()


HTML_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
section{margin-bottom:2em} h2{font-size:1.1em;margin:.2em 0}
svg{max-width:100%;height:auto}
table{border-collapse:collapse;font-size:.85em} td,th{padding:.15em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}
.sw{display:inline-block;width:.8em;height:.8em;margin-right:.4em;vertical-align:middle}
"""


def render_html(charts: dict[str, list[Series]], opts: PlotOptions, title: str) -> str:
    """A page with, per metric, matplotlib's SVG chart inline and a table of its series: no
    script, no external resource, so it opens anywhere (and can be mailed from an air-gapped
    site)."""
    e = html.escape
    style = Style.of(charts)
    height = opts.height or ROW_HEIGHT
    smooth = f", EMA smoothing {opts.smooth}" if opts.smooth else ""
    body = [f"<h1>{e(title)}</h1>",
            f"<p>{sum(len(v) for v in charts.values())} series in {len(charts)} metric(s); "
            f"x axis: {e(X_TITLES[opts.x])}{smooth}. Generated "
            f"{e(time.strftime('%Y-%m-%d %H:%M:%S'))}.</p>"]
    for name, series in charts.items():
        body.append(f'<section data-metric="{e(name)}"><h2>{e(name)}</h2>')
        chart = _figure({name: series}, opts, opts.width, height, style)
        # Random ids for clip paths and markers (a fixed `svg.hashsalt` of the user's
        # matplotlibrc would give two charts of one page the same ids, one clipping the other).
        svg = _save(chart, "svg", **{"svg.hashsalt": None}).decode()
        body.append(svg[svg.index("<svg"):])  # without the XML declaration and doctype
        body.append("<table><tr><th>series</th><th>points</th><th>last</th><th>step</th>"
                    "<th>min</th><th>max</th></tr>")
        for s in series:
            sm = summarize(s.value, s.step)
            colour = style.colours[(s.experiment, s.run_id, s.rank)]
            body.append(
                f'<tr data-series="{e(s.key)}"><td><span class="sw" style="background:'
                f'{colour}"></span>{e(s.experiment)}/{e(s.label)} · {e(name)}</td>'
                f"<td>{sm.count} points</td><td>{sm.last:.6g}</td>"
                f"<td>{'' if sm.last_step is None else sm.last_step}</td>"
                f"<td>{sm.min:.6g}</td><td>{sm.max:.6g}</td></tr>")
        body.append("</table></section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{e(title)}</title><style>{HTML_STYLE}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
