"""Looking at journals without a tracker: metric summaries and sparklines (`show`), plots
(`plot`: matplotlib PNG/SVG/PDF or a self-contained HTML page), a live tail (`tail`) and a tidy
metrics table (`export`).

Everything here reads the journal through `itwinai_journal` (sealed Parquet and active JSONL
segments alike); matplotlib is imported only to draw a PNG, SVG or PDF.
"""

from __future__ import annotations

import fnmatch
import html
import io
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from itwinai_journal import Journal
from itwinai_journal.errors import ItwinaiSyncError
from itwinai_journal.format import segments as seg
from itwinai_journal.format.fsio import write_atomic
from itwinai_journal.format.names import experiment_dirname
from itwinai_journal.read.journal import RunInfo, find_run_dirs, load_run, runs_named
from itwinai_sync.targets import system_metrics

#: Columns of the tidy metrics table (`Journal.metrics()` and `itwinai-sync export`).
METRIC_TABLE_COLUMNS = ["experiment", "run_id", "rank", "seq", "time", "name", "step",
                        "batch_idx", "value"]
SPARK_CHARS = "▁▂▃▄▅▆▇█"
SPARK_ASCII = "_.-:=+*#"
#: Colours of successive series (matplotlib's tab10, so PNG and HTML agree).
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf"]
X_MODES = ("step", "time", "relative")
#: Name prefix under which `show` and `plot` present sampled system metrics.
SYSTEM_PREFIX = "system/"


class ViewError(ItwinaiSyncError):
    """A user-facing problem (no such run, no metrics, unknown output format): one line."""


# -- selecting runs and metrics ------------------------------------------------------------


def select_runs(journal: Journal, run_ids: Sequence[str] | None) -> list[RunInfo]:
    """The runs named (id or experiment/id), in the order given; every run when none is."""
    if not run_ids:
        return journal.runs()
    try:
        return [journal.run(r) for r in dict.fromkeys(run_ids)]
    except KeyError as e:
        raise ViewError(str(e.args[0])) from None


def metrics_table(journal: Journal, runs: Sequence[RunInfo],
                  patterns: Sequence[str] | None = None) -> pa.Table:
    """Metric points of `runs` (names matching any of the fnmatch `patterns`), sorted by
    experiment, run, rank and seq. Sampled system metrics are points `system/<field>`,
    included when a pattern asks for them by that prefix (`'system/*'`, `'system/gpu*'`)."""
    tables = [journal.metrics(experiment=r.experiment, run_id=r.run_id) for r in runs]
    if any(p.startswith(SYSTEM_PREFIX) for p in patterns or ()):
        tables += [system_points(journal.records(experiment=r.experiment, run_id=r.run_id,
                                                 kinds=[system_metrics.KIND])) for r in runs]
    t = pa.concat_tables(tables) if tables else journal.metrics(run_id="\0")
    if patterns:
        names = set(t["name"].unique().to_pylist())
        keep = sorted(n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns))
        t = t.filter(pc.is_in(t["name"], pa.array(keep, pa.string())))
    if t.num_rows:
        t = t.take(pc.sort_indices(t, [("experiment", "ascending"), ("run_id", "ascending"),
                                       ("rank", "ascending"), ("seq", "ascending")]))
    return t


def system_points(records: pa.Table) -> pa.Table:
    """The `system_metric` records of a records table as metric points: one per field of each
    sample, named `system/<field>`, at the sample's time and step (its ordinal in the rank),
    with the columns of `Journal.metrics()`."""
    records = records.filter(pc.equal(records["kind"], system_metrics.KIND))
    rows: dict[str, list] = {c: [] for c in METRIC_TABLE_COLUMNS}
    cols = [records[c].to_pylist() for c in ("experiment", "run_id", "rank", "seq", "time",
                                             "step", "text")]
    for exp, run, rank, seq, tm, step, text in zip(*cols):
        for name, value in sorted(system_metrics.sample(text).items()):
            for c, v in zip(METRIC_TABLE_COLUMNS, (exp, run, rank, seq, tm, SYSTEM_PREFIX + name,
                                                   step, None, value)):
                rows[c].append(v)
    schema = records.select(["experiment", "run_id", "rank", "seq", "time", "name", "step",
                             "batch_idx", "value"]).schema
    return pa.Table.from_pydict(rows, schema=schema)


@dataclass
class Series:
    """The points of one metric of one rank of one run, in seq order."""

    experiment: str
    run_id: str
    rank: int
    name: str
    time: list[float] = field(default_factory=list)
    step: list[int | None] = field(default_factory=list)
    value: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.run_id} rank {self.rank}"

    @property
    def key(self) -> str:
        return f"{self.experiment}/{self.run_id}/{self.rank}/{self.name}"

    def __len__(self) -> int:
        return len(self.value)


def series_of(t: pa.Table) -> list[Series]:
    """Group a sorted metrics table into series: by (experiment, run, rank, name)."""
    out: dict[tuple, Series] = {}
    cols = [t[c].to_pylist() for c in ("experiment", "run_id", "rank", "name", "time", "step",
                                       "value")]
    for exp, run, rank, name, tm, step, value in zip(*cols):
        key = (exp, run, rank, name)
        s = out.get(key)
        if s is None:
            s = out[key] = Series(exp, run, rank, name)
        s.time.append(tm)
        s.step.append(step)
        s.value.append(float("nan") if value is None else value)
    return list(out.values())


def by_metric(series: Iterable[Series]) -> dict[str, list[Series]]:
    grouped: dict[str, list[Series]] = {}
    for s in series:
        grouped.setdefault(s.name, []).append(s)
    return dict(sorted(grouped.items()))


# -- numbers: summaries, sparklines, smoothing, x values -------------------------------------


@dataclass
class Summary:
    count: int
    last: float
    last_step: int | None
    min: float
    max: float


def summarize(values: Sequence[float], steps: Sequence[int | None]) -> Summary:
    """Last value (and its step), min and max. NaN is left out of min/max (nan when every
    value is NaN); +-inf counts, it is what was logged."""
    real = [v for v in values if not math.isnan(v)]
    return Summary(len(values), values[-1], steps[-1],
                   min(real) if real else math.nan, max(real) if real else math.nan)


def _spark_charset() -> str:
    enc = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        SPARK_CHARS.encode(enc)
        return SPARK_CHARS
    except (UnicodeEncodeError, LookupError):
        return SPARK_ASCII


def sparkline(values: Sequence[float], width: int = 24, chars: str | None = None) -> str:
    """The series in `width` characters: the mean of each of `width` equal slices of the
    points (every point when there are fewer), scaled from the finite min to max. A slice
    with no finite value is a space."""
    chars = chars or SPARK_CHARS
    n = len(values)
    if n == 0:
        return ""
    width = min(width, n)
    cells: list[float | None] = []
    for i in range(width):
        lo, hi = i * n // width, (i + 1) * n // width
        finite = [v for v in values[lo:hi] if math.isfinite(v)]
        cells.append(sum(finite) / len(finite) if finite else None)
    real = [c for c in cells if c is not None]
    if not real:
        return " " * width
    lo_v, hi_v = min(real), max(real)
    span = hi_v - lo_v
    top = len(chars) - 1
    out = []
    for c in cells:
        if c is None:
            out.append(" ")
        elif span <= 0 or not math.isfinite(span):
            out.append(chars[top // 2])
        else:
            out.append(chars[min(top, int((c - lo_v) / span * top + 0.5))])
    return "".join(out)


def metric_summary_lines(t: pa.Table, indent: str = "    ", width: int = 24) -> list[str]:
    """One line per metric of a (one-rank) metrics table: last value and step, min, max, point
    count and a sparkline."""
    chars = _spark_charset()
    rows = []
    for s in series_of(t):
        sm = summarize(s.value, s.step)
        head = f"{s.name} = {sm.last:.6g}" + ("" if sm.last_step is None
                                              else f"  (step {sm.last_step})")
        rows.append((head, f"min {sm.min:.6g}  max {sm.max:.6g}  {sm.count} pts",
                     sparkline(s.value, width, chars)))
    rows.sort()
    w1 = max((len(r[0]) for r in rows), default=0)
    w2 = max((len(r[1]) for r in rows), default=0)
    return [f"{indent}{a:<{w1}}  {b:<{w2}}  {c}".rstrip() for a, b, c in rows]


def ema(values: Sequence[float], alpha: float) -> list[float]:
    """Exponential moving average with weight `alpha` on the past (TensorBoard's smoothing
    slider: 0 = raw, 0.99 = heavy), debiased so that the first points are not pulled towards
    zero. Non-finite values do not enter the average; their points stay as they are."""
    if not alpha:
        return list(values)
    out = []
    acc = 0.0
    n = 0
    for v in values:
        if not math.isfinite(v):
            out.append(v)
            continue
        acc = acc * alpha + (1 - alpha) * v
        n += 1
        out.append(acc / (1 - alpha ** n))
    return out


def x_values(s: Series, mode: str, t0: float | None = None) -> list[float]:
    """x of each point: its step (its position in the series when it has none), its wall time
    (Unix seconds), or seconds since `t0` (the run's first record)."""
    if mode == "step":
        return [float(i if st is None else st) for i, st in enumerate(s.step)]
    if mode == "time":
        return list(s.time)
    base = t0 if t0 is not None else (s.time[0] if s.time else 0.0)
    return [tm - base for tm in s.time]


def run_starts(series: Iterable[Series]) -> dict[tuple[str, str], float]:
    starts: dict[tuple[str, str], float] = {}
    for s in series:
        if s.time:
            k = (s.experiment, s.run_id)
            starts[k] = min(starts.get(k, math.inf), s.time[0])
    return starts


X_TITLES = {"step": "step", "time": "wall time", "relative": "seconds since the run started"}


# -- plot ------------------------------------------------------------------------------------


@dataclass
class PlotOptions:
    smooth: float = 0.0
    x: str = "step"
    width: int = 1200
    height: int | None = None  # default: ROW_HEIGHT per row of charts
    columns: int | None = None  # default: 1 for one metric, else 2


ROW_HEIGHT = 360


def grid(n: int, columns: int | None) -> tuple[int, int]:
    cols = max(1, min(n, columns or (1 if n == 1 else 2)))
    return cols, max(1, math.ceil(n / cols))


def plot_size(n_metrics: int, opts: PlotOptions) -> tuple[int, int]:
    """Pixel size of the image for `n_metrics` charts."""
    _, rows = grid(n_metrics, opts.columns)
    return opts.width, opts.height or ROW_HEIGHT * rows


def plot(journal: Journal, out: Path, run_ids: Sequence[str] | None = None,
         metrics: Sequence[str] | None = None, opts: PlotOptions | None = None) -> dict[str, Any]:
    """Draw the metric curves of the selected runs to `out` (.png, .svg, .pdf with matplotlib;
    .html as a self-contained page). Returns what was drawn: series and point counts."""
    opts = opts or PlotOptions()
    if not 0 <= opts.smooth < 1:
        raise ViewError(f"--smooth must be in [0, 1), got {opts.smooth}")
    if opts.x not in X_MODES:
        raise ViewError(f"--x must be one of {', '.join(X_MODES)}, got {opts.x!r}")
    suffix = out.suffix.lower()
    if suffix not in (".png", ".svg", ".pdf", ".html", ".htm"):
        raise ViewError(f"cannot tell the format of {out}: use .png, .svg, .pdf or .html")
    runs = select_runs(journal, run_ids)
    t = metrics_table(journal, runs, metrics)
    if not t.num_rows:
        what = f" matching {', '.join(metrics)}" if metrics else ""
        raise ViewError(f"no metric records{what} in {journal.savedir}"
                        + (f" for {', '.join(run_ids)}" if run_ids else ""))
    series = series_of(t)
    charts = by_metric(series)
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix in (".html", ".htm"):
        text = render_html(charts, opts, title=f"itwinai-sync: {journal.savedir}")
        write_atomic(out, text.encode())
    else:
        render_matplotlib(charts, opts, out)
    return {"charts": len(charts), "series": len(series), "points": t.num_rows, "path": out}


def render_matplotlib(charts: dict[str, list[Series]], opts: PlotOptions, out: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise ViewError("matplotlib is needed for .png/.svg/.pdf plots (pip install "
                        "matplotlib), or write a self-contained page: -o plot.html") from None
    matplotlib.use("Agg", force=True)
    from datetime import datetime

    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    cols, rows = grid(len(charts), opts.columns)
    w, h = plot_size(len(charts), opts)
    dpi = 100
    fig = Figure(figsize=(w / dpi, h / dpi), dpi=dpi, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    starts = run_starts(s for ss in charts.values() for s in ss)
    colours = _colours(charts)
    for i, (name, series) in enumerate(charts.items()):
        ax = axes[i // cols][i % cols]
        for s in series:
            xs = x_values(s, opts.x, starts.get((s.experiment, s.run_id)))
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
    fmt = out.suffix.lower().lstrip(".")
    image = io.BytesIO()
    fig.savefig(image, format=fmt, dpi=dpi)
    write_atomic(out, image.getvalue())
    plt.close("all")


def _colours(charts: dict[str, list[Series]]) -> dict[tuple[str, str, int], str]:
    """One colour per (run, rank), the same in every chart."""
    keys = sorted({(s.experiment, s.run_id, s.rank) for ss in charts.values() for s in ss})
    return {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(keys)}


# -- HTML: inline SVG, no script, no network -----------------------------------------------

SVG_W, SVG_H = 720, 300
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 70, 20, 12, 40
#: Points drawn per polyline at most (min/max per bucket beyond that, so spikes stay visible).
MAX_DRAWN = 2000


def nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """Round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, count - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    ticks = []
    v = first
    while v <= hi + step * 1e-9:
        ticks.append(0.0 if abs(v) < step * 1e-9 else v)
        v += step
    return ticks


def _fmt_tick(v: float, mode: str, span: float) -> str:
    if mode == "time":
        text = time.strftime("%H:%M:%S", time.localtime(v))
        return text + f".{int(round((v % 1) * 1000)) % 1000:03d}" if span < 10 else text
    return f"{v:.6g}"


def decimate(xs: list[float], ys: list[float], limit: int = MAX_DRAWN
             ) -> tuple[list[float], list[float]]:
    """At most about `limit` points: each bucket of consecutive points keeps its min and max."""
    n = len(xs)
    if n <= limit:
        return xs, ys
    buckets = limit // 2
    ox, oy = [], []
    for b in range(buckets):
        lo, hi = b * n // buckets, (b + 1) * n // buckets
        idx = range(lo, hi)
        i_min = min(idx, key=lambda i: ys[i])
        i_max = max(idx, key=lambda i: ys[i])
        for i in sorted({i_min, i_max}):
            ox.append(xs[i])
            oy.append(ys[i])
    return ox, oy


def _runs_of_finite(xs: list[float], ys: list[float]) -> Iterator[list[tuple[float, float]]]:
    """Stretches of consecutive finite points (a NaN or inf breaks the line, as matplotlib)."""
    run: list[tuple[float, float]] = []
    for x, y in zip(xs, ys):
        if math.isfinite(y) and math.isfinite(x):
            run.append((x, y))
        elif run:
            yield run
            run = []
    if run:
        yield run


def _svg_chart(name: str, series: list[Series], opts: PlotOptions,
               starts: dict[tuple[str, str], float],
               colours: dict[tuple[str, str, int], str]) -> str:
    prepared = []
    for s in series:
        xs = x_values(s, opts.x, starts.get((s.experiment, s.run_id)))
        prepared.append((s, xs, list(s.value), ema(s.value, opts.smooth) if opts.smooth
                         else None))
    all_x = [x for _, xs, _, _ in prepared for x in xs if math.isfinite(x)]
    all_y = [y for _, _, ys, _ in prepared for y in ys if math.isfinite(y)]
    x_lo, x_hi = (min(all_x), max(all_x)) if all_x else (0.0, 1.0)
    y_lo, y_hi = (min(all_y), max(all_y)) if all_y else (0.0, 1.0)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 0.5, x_hi + 0.5
    if y_hi == y_lo:
        pad = abs(y_lo) * 0.05 or 0.5
        y_lo, y_hi = y_lo - pad, y_hi + pad
    pw, ph = SVG_W - MARGIN_L - MARGIN_R, SVG_H - MARGIN_T - MARGIN_B

    def px(x: float) -> float:
        return MARGIN_L + (x - x_lo) / (x_hi - x_lo) * pw

    def py(y: float) -> float:
        return MARGIN_T + (1 - (y - y_lo) / (y_hi - y_lo)) * ph

    e = html.escape
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {SVG_W} {SVG_H}" '
             f'width="{SVG_W}" height="{SVG_H}" role="img" aria-label="{e(name)}">',
             f'<rect x="{MARGIN_L}" y="{MARGIN_T}" width="{pw}" height="{ph}" fill="#fff" '
             'stroke="#999"/>']
    for v in nice_ticks(y_lo, y_hi):
        y = py(v)
        parts.append(f'<line x1="{MARGIN_L}" x2="{MARGIN_L + pw}" y1="{y:.1f}" y2="{y:.1f}" '
                     'stroke="#eee"/>')
        parts.append(f'<text x="{MARGIN_L - 6}" y="{y + 4:.1f}" text-anchor="end">'
                     f'{e(f"{v:.6g}")}</text>')
    for v in nice_ticks(x_lo, x_hi):
        x = px(v)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{MARGIN_T}" y2="{MARGIN_T + ph}" '
                     'stroke="#eee"/>')
        parts.append(f'<text x="{x:.1f}" y="{MARGIN_T + ph + 16}" text-anchor="middle">'
                     f'{e(_fmt_tick(v, opts.x, x_hi - x_lo))}</text>')
    parts.append(f'<text x="{MARGIN_L + pw / 2}" y="{SVG_H - 6}" text-anchor="middle">'
                 f'{e(X_TITLES[opts.x])}</text>')
    for s, xs, ys, smooth in prepared:
        colour = colours[(s.experiment, s.run_id, s.rank)]
        layers = [(ys, 0.3 if smooth else 1.0)] + ([(smooth, 1.0)] if smooth else [])
        tip = e(f"{s.label}: {s.name} ({len(s)} points)")
        parts.append(f'<g class="series" data-series="{e(s.key)}" data-points="{len(s)}">'
                     f'<title>{tip}</title>')
        for values, opacity in layers:
            for stretch in _runs_of_finite(*decimate(xs, values)):
                if len(stretch) == 1:
                    (x, y), = stretch
                    parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" '
                                 f'fill="{colour}" fill-opacity="{opacity}"/>')
                    continue
                pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in stretch)
                parts.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" '
                             f'stroke-opacity="{opacity}" stroke-width="1.5"/>')
        parts.append("</g>")
    parts.append("</svg>")
    return "".join(parts)


HTML_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
section{margin-bottom:2em} h2{font-size:1.1em;margin:.2em 0}
svg text{font-size:11px;fill:#444}
table{border-collapse:collapse;font-size:.85em} td,th{padding:.15em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}
.sw{display:inline-block;width:.8em;height:.8em;margin-right:.4em;vertical-align:middle}
"""


def render_html(charts: dict[str, list[Series]], opts: PlotOptions, title: str) -> str:
    """A page with one inline SVG chart and one legend table per metric: no script, no
    external resource, so it opens anywhere (and can be mailed from an air-gapped site)."""
    e = html.escape
    starts = run_starts(s for ss in charts.values() for s in ss)
    colours = _colours(charts)
    smooth = f", EMA smoothing {opts.smooth}" if opts.smooth else ""
    body = [f"<h1>{e(title)}</h1>",
            f"<p>{sum(len(v) for v in charts.values())} series in {len(charts)} metric(s); "
            f"x axis: {e(X_TITLES[opts.x])}{smooth}. Generated "
            f"{e(time.strftime('%Y-%m-%d %H:%M:%S'))}.</p>"]
    for name, series in charts.items():
        body.append(f'<section data-metric="{e(name)}"><h2>{e(name)}</h2>')
        body.append(_svg_chart(name, series, opts, starts, colours))
        body.append("<table><tr><th>series</th><th>points</th><th>last</th><th>step</th>"
                    "<th>min</th><th>max</th></tr>")
        for s in series:
            sm = summarize(s.value, s.step)
            colour = colours[(s.experiment, s.run_id, s.rank)]
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


# -- export ----------------------------------------------------------------------------------


def export_metrics(journal: Journal, out_dir: Path, fmt: str,
                   run_ids: Sequence[str] | None = None) -> list[tuple[RunInfo, Path, int]]:
    """Write each selected run's metrics as one tidy table,
    `out_dir/<experiment>/<run_id>.<fmt>` (the experiment directory named as in the journal),
    with the columns of `Journal.metrics()`. Files are replaced atomically. Returns (run, path,
    rows) per run written."""
    if fmt not in ("parquet", "csv"):
        raise ViewError(f"unknown format {fmt!r}: use parquet or csv")
    written = []
    for run in select_runs(journal, run_ids):
        t = metrics_table(journal, [run])
        path = out_dir / experiment_dirname(run.experiment) / f"{run.run_id}.{fmt}"
        data = pa.BufferOutputStream()
        if fmt == "parquet":
            import pyarrow.parquet as pq

            pq.write_table(t, data, compression="zstd")
        else:
            import pyarrow.csv as pacsv

            pacsv.write_csv(t, data)
        write_atomic(path, data.getvalue().to_pybytes())
        written.append((run, path, t.num_rows))
    return written


def read_export(path: Path) -> pa.Table:
    """An exported file back as a table with the exact column types of `Journal.metrics()`."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path)
    import pyarrow.csv as pacsv

    schema = metrics_schema()
    return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
        column_types={f.name: f.type for f in schema}, null_values=[""],
        strings_can_be_null=False, quoted_strings_can_be_null=False))


def metrics_schema() -> pa.Schema:
    """The schema of `Journal.metrics()` (and of the exported tables)."""
    return pa.schema(
        [("experiment", pa.string()), ("run_id", pa.string()), ("rank", pa.int32())]
        + [seg.ARROW_SCHEMA.field(c) for c in ("seq", "time", "name", "step", "batch_idx",
                                               "value")])


# -- tail ------------------------------------------------------------------------------------


@dataclass
class Point:
    """One metric record as `tail` prints it."""

    time: float
    experiment: str
    run_id: str
    rank: int
    seq: int
    name: str
    step: int | None
    batch_idx: int | None
    value: float

    def line(self) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.time))
        stamp += f".{int((self.time % 1) * 1000):03d}"
        where = f"{self.experiment}/{self.run_id} rank {self.rank}"
        step = "" if self.step is None else f"  step {self.step}"
        batch = "" if self.batch_idx is None else f"  batch {self.batch_idx}"
        return f"{stamp}  {where}  #{self.seq}{step}{batch}  {self.name} = {self.value:.6g}"

    def json(self) -> str:
        d = {k: getattr(self, k) for k in ("experiment", "run_id", "rank", "seq", "time",
                                             "name", "step", "batch_idx", "value")}
        return json.dumps(d)


@dataclass
class _RankCursor:
    seq: int = 0  # highest seq read (any kind): every record at or below it was handled
    sealed: set[int] = field(default_factory=set)  # sealed segments read to the end
    jsonl: tuple[int, int] | None = None  # (segment, byte offset of the next unread line)


_TAIL_COLUMNS = ["seq", "time", "kind", "name", "step", "batch_idx", "value"]


class Tail:
    """Reads new metric records of the runs under a savedir, each (run, rank, seq) once.

    Sealed segments are read once (they never change); the active JSONL segment is read from
    the byte offset reached last time, complete lines only. When a segment is sealed while
    being followed (its JSONL replaced by Parquet), the Parquet file is read and the records
    already printed are skipped by seq, so nothing is printed twice or missed."""

    def __init__(self, savedir: Path, run_id: str | None = None,
                 patterns: Sequence[str] | None = None):
        self.savedir = Path(savedir)
        self.run_id = run_id
        self.patterns = list(patterns or [])
        self._cursors: dict[tuple[str, str, int], _RankCursor] = {}

    def runs(self) -> list[RunInfo]:
        runs = []
        for d in find_run_dirs(self.savedir):
            run = load_run(d)
            if not run.error:  # damaged, or half-written while we looked: the next poll sees it
                runs.append(run)
        try:
            return runs_named(runs, None if self.run_id is None else [self.run_id], unique=True)
        except KeyError as e:
            raise ViewError(str(e.args[0])) from None

    def poll(self, last: int | None = None) -> list[Point]:
        """Metric records not returned before, ordered by time. `last`: return only the `last`
        newest ones (reading only the newest segments needed for them)."""
        points: list[Point] = []
        for run in self.runs():
            for r in run.ranks:
                key = (run.experiment, run.run_id, r.rank)
                cur = self._cursors.setdefault(key, _RankCursor())
                points.extend(self._poll_rank(run, r.rank, r.path / "segments", cur, last))
        points.sort(key=lambda p: (p.time, p.experiment, p.run_id, p.rank, p.seq))
        if last is not None:
            points = points[-last:] if last > 0 else []
        return points

    def _wanted(self, name: str) -> bool:
        return not self.patterns or any(fnmatch.fnmatchcase(name, p) for p in self.patterns)

    def _poll_rank(self, run: RunInfo, rank: int, seg_dir: Path, cur: _RankCursor,
                   last: int | None) -> list[Point]:
        files = seg.segment_files(seg_dir)
        numbers = [n for n in files if n not in cur.sealed]
        if last is not None:
            # Newest segments first until `last` metric points are found; older sealed
            # segments are then known to hold nothing newer.
            chunks: list[list[Point]] = []
            found = 0
            newest_seq = cur.seq
            for i, number in enumerate(reversed(numbers)):
                pts, top = self._read_segment(run, rank, seg_dir, number, files[number], cur)
                newest_seq = max(newest_seq, top)
                chunks.append(pts)
                found += len(pts)
                if found >= last:
                    for older in numbers[:len(numbers) - i - 1]:
                        if "parquet" in files[older]:
                            cur.sealed.add(older)
                    break
            cur.seq = newest_seq
            return [p for chunk in reversed(chunks) for p in chunk]
        out: list[Point] = []
        for number in numbers:
            pts, top = self._read_segment(run, rank, seg_dir, number, files[number], cur)
            cur.seq = max(cur.seq, top)
            out.extend(pts)
        return out

    def _read_segment(self, run: RunInfo, rank: int, seg_dir: Path, number: int,
                      present: dict[str, Path], cur: _RankCursor) -> tuple[list[Point], int]:
        """New points of one segment (seq > cur.seq) and the highest seq it holds."""
        rows: list[tuple] | None = None
        if "parquet" not in present:
            rows = self._read_jsonl(seg_dir / seg.segment_name(number, "jsonl"), number, cur)
        if rows is None:  # sealed, maybe just now
            path = seg_dir / seg.segment_name(number, "parquet")
            try:
                t = seg.read_parquet(path, columns=_TAIL_COLUMNS)
            except FileNotFoundError:
                return [], 0  # vanished in between: seen as whatever replaced it next poll
            t = t.filter(pc.greater(t["seq"], cur.seq))
            rows = list(zip(*(t[c].to_pylist() for c in _TAIL_COLUMNS)))
            cur.sealed.add(number)
            if cur.jsonl and cur.jsonl[0] == number:
                cur.jsonl = None
        top = 0
        points = []
        for s, tm, kind, name, step, batch_idx, value in rows:
            if s <= cur.seq:
                continue
            top = max(top, s)
            if kind == "metric" and self._wanted(name):
                points.append(Point(tm, run.experiment, run.run_id, rank, s, name, step,
                                    batch_idx, math.nan if value is None else value))
        return points, top

    @staticmethod
    def _read_jsonl(path: Path, number: int, cur: _RankCursor) -> list[tuple] | None:
        """Complete lines appended since the last read; None when the file is gone (sealed)."""
        offset = cur.jsonl[1] if cur.jsonl and cur.jsonl[0] == number else 0
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < offset:  # cut back after a failed append: read it again
                    offset = 0
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return None
        end = data.rfind(b"\n") + 1
        rows = []
        for line in data[:end].split(b"\n"):
            if not line:
                continue
            try:
                d = json.loads(line)
                rows.append((d["seq"], d["time"], d["kind"], d["name"], d.get("step"),
                             d.get("batch_idx"), d.get("value")))
            except (ValueError, KeyError, TypeError):
                continue  # a damaged line: `itwinai-sync verify` reports it
        cur.jsonl = (number, offset + end)
        return rows


def follow(tail: Tail, interval: float, emit: Any, stop: Any = None) -> None:
    """Poll `tail` every `interval` seconds and hand each new point to `emit`, until `stop()`
    is true (or forever)."""
    while stop is None or not stop():
        for p in tail.poll():
            emit(p)
        time.sleep(interval)
