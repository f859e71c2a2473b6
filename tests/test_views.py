"""Looking at runs without a tracker: plot, show, export (`itwinai_sync.inspect`; tail is in
test_follow.py)."""

from __future__ import annotations

import math
import re
import sys

import pyarrow as pa
import pytest
from click.testing import CliRunner

from itwinai_journal import Journal
from itwinai_journal.loggers import MLFlowLogger, TensorBoardLogger
from itwinai_sync.cli import main
from itwinai_sync.inspect import export, selection, series, summaries

LOSS = [1.0, 0.5, math.nan, 0.25, math.inf, 0.125, 0.1, 0.05]


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def _run(savedir, run_id, ranks=(0,), cls=MLFlowLogger, n=8, **kwargs):
    for rank in ranks:
        lg = cls(savedir=savedir, run_id=run_id, log_freq="batch", log_on_workers=-1, **kwargs)
        lg.create_logger_context(rank=rank)
        lg.save_hyperparameters({"lr": 0.1})
        for i in range(n):
            lg.log(LOSS[i % len(LOSS)] + rank, "loss", step=i, batch_idx=i)
            if i % 2 == 0:
                lg.log(i / 10, "acc")  # no step
        lg.log("note", "text_record", kind="text")
        lg.destroy_logger_context()


@pytest.fixture
def savedir(tmp_path):
    d = tmp_path / "mllogs"
    _run(d, "a", ranks=(0, 1), experiment_name="exp")
    _run(d, "b", cls=TensorBoardLogger, n=5)
    return d


# -- plot ------------------------------------------------------------------------------------


def test_plot_png_decodes_at_the_expected_size(savedir, tmp_path):
    from PIL import Image

    out = tmp_path / "plots" / "all.png"
    r = invoke("plot", savedir, "-o", out, "--smooth", "0.6")
    assert r.exit_code == 0, r.output
    assert "2 metric(s), 6 series" in r.output  # 2 metrics x (2 ranks of a + 1 of b)
    with Image.open(out) as im:
        im.load()
        assert im.format == "PNG" and im.size == (1200, 360)  # 2 charts side by side: 1 row
    one = tmp_path / "one.png"
    r = invoke("plot", savedir, "a", "--metric", "loss", "-o", one, "--x", "time",
               "--width", "640", "--height", "480")
    assert r.exit_code == 0, r.output
    with Image.open(one) as im:
        im.load()
        assert im.size == (640, 480)
    grid = tmp_path / "grid.png"
    assert invoke("plot", savedir, "-o", grid, "--columns", "1", "--x", "relative").exit_code == 0
    with Image.open(grid) as im:
        assert im.size == (1200, 720)  # one chart per row, 360 px each


def _vertices(d: str) -> list[list[tuple[float, float]]]:
    """The pieces of an SVG path of moves and lines (as matplotlib writes a line): a new piece
    at each move."""
    pieces: list[list[tuple[float, float]]] = []
    for cmd, x, y in re.findall(r"([ML]) (-?[\d.]+) (-?[\d.]+)", d):
        if cmd == "M":
            pieces.append([])
        pieces[-1].append((float(x), float(y)))
    return pieces


def test_plot_html_is_self_contained_and_holds_every_series(savedir, tmp_path, monkeypatch):
    import matplotlib

    monkeypatch.setitem(matplotlib.rcParams, "svg.hashsalt", "fixed")  # as a matplotlibrc may
    out = tmp_path / "report.html"
    r = invoke("plot", savedir, "-o", out, "--smooth", "0.5")
    assert r.exit_code == 0, r.output
    page = out.read_text()
    low = page.lower()
    for needle in ("<script", "src=", "@import", "<?xml", "<!doctype svg"):
        assert needle not in low, needle
    # matplotlib's SVG refers to its own clip paths and markers; nothing outside the page.
    refs = re.findall(r'href="([^"]*)"', page) + re.findall(r"url\(([^)]*)\)", page)
    assert refs and all(ref.startswith("#") for ref in refs), refs
    # Each chart's clip paths and markers are its own: every id referred to is defined once in
    # the page, so one inline SVG never borrows another's.
    assert all(page.count(f'id="{ref[1:]}"') == 1 for ref in set(refs))
    m = Journal(savedir).metrics()
    expected = {}
    for exp, run, rank, name in zip(*(m[c].to_pylist()
                                      for c in ("experiment", "run_id", "rank", "name"))):
        key = f"{exp}/{run}/{rank}/{name}"
        expected[key] = expected.get(key, 0) + 1
    assert len(expected) == 6
    sections = dict(re.findall(r'<section data-metric="([^"]*)">(.*?)</section>', page, re.S))
    assert sorted(sections) == ["acc", "loss"]
    for key, count in expected.items():
        exp, run, rank, name = key.split("/")
        body = sections[name]
        assert f"{exp}/{run} rank {rank} · {name}</td><td>{count} points" in body, key
        (svg,) = re.findall(r"<svg.*?</svg>", body, re.S)  # matplotlib's chart, inline
        assert f">{name}</text>" in svg  # its title, as text
        assert f">{run} rank {rank} ({count})</text>" in svg, key  # its legend entry
    # The data drawn: exp/a rank 0's loss, in the colour of its row of the table. A NaN and an
    # inf break the line: [1, .5], [.25], [.125, .1, .05]; drawn twice, raw (faint) and
    # smoothed, and once more as the legend's sample.
    loss = sections["loss"]
    colour = re.search(r'<tr data-series="exp/a/0/loss"><td><span class="sw" '
                       r'style="background:(#[0-9a-f]{6})"', loss).group(1)
    lines = re.findall(rf'<path d="([^"]*)"[^>]*style="fill: none; stroke: {colour}([^"]*)"',
                       loss)
    (raw,) = [_vertices(d) for d, style in lines if "stroke-opacity: 0.25" in style]
    drawn = sorted((_vertices(d) for d, style in lines if "opacity" not in style), key=len)
    legend, smoothed = drawn
    assert [len(p) for p in raw] == [len(p) for p in smoothed] == [2, 1, 3]
    assert len(legend) == 1 and len({y for _, y in legend[0]}) == 1  # a flat sample
    steps, values = [0, 1, 3, 5, 6, 7], [1.0, 0.5, 0.25, 0.125, 0.1, 0.05]
    xs, ys = zip(*(pt for piece in raw for pt in piece))
    # Pixel coordinates are linear in step and value: each point where its record puts it.
    assert [(x - xs[0]) / (xs[1] - xs[0]) for x in xs] == pytest.approx(steps, abs=1e-4)
    assert [(y - ys[0]) / (ys[1] - ys[0]) for y in ys] == pytest.approx(
        [(v - values[0]) / (values[1] - values[0]) for v in values], abs=1e-4)
    ema = series.ema([1.0, 0.5, math.nan, 0.25, math.nan, 0.125, 0.1, 0.05], 0.5)
    ema = [v for v in ema if not math.isnan(v)]
    sy = [y for piece in smoothed for _, y in piece]
    assert [(y - ys[0]) / (ys[1] - ys[0]) for y in sy] == pytest.approx(
        [(v - values[0]) / (values[1] - values[0]) for v in ema], abs=1e-4)


def test_plot_errors_are_one_line(savedir, tmp_path):
    r = invoke("plot", savedir, "nope", "-o", tmp_path / "x.png")
    assert r.exit_code == 1 and "no run 'nope'" in r.output and "Traceback" not in r.output
    r = invoke("plot", savedir, "--metric", "zzz*", "-o", tmp_path / "x.png")
    assert r.exit_code == 1 and "no metric records matching zzz*" in r.output
    r = invoke("plot", savedir, "-o", tmp_path / "x.txt")
    assert r.exit_code == 1 and "use .png, .svg, .pdf or .html" in r.output
    assert invoke("plot", savedir, "--smooth", "1").exit_code == 2


def test_plot_without_matplotlib_names_the_extra_to_install(savedir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    for name in ("x.html", "x.png"):
        r = invoke("plot", savedir, "-o", tmp_path / name)
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert "matplotlib is needed to plot: pip install 'itwinai-sync[plot]'" in r.output
        assert not (tmp_path / name).exists()


def test_metric_patterns_and_series(savedir):
    j = Journal(savedir)
    t = selection.metrics_table(j, [j.run("a")], ["lo*"])
    found = series.series_of(t)
    assert [(s.rank, s.name, len(s)) for s in found] == [(0, "loss", 8), (1, "loss", 8)]
    assert found[1].value[:2] == [2.0, 1.5]
    acc = series.series_of(selection.metrics_table(j, [j.run("a")], ["acc"]))[0]
    assert series.x_values(acc, "step") == [0.0, 1.0, 2.0, 3.0]  # no step: position
    rel = series.x_values(acc, "relative", acc.time[0])
    assert rel[0] == 0.0 and rel == sorted(rel)


def test_ema_and_sparkline():
    assert series.ema([1.0, 1.0, 1.0], 0.9) == pytest.approx([1.0, 1.0, 1.0])  # debiased
    sm = series.ema([0.0, 10.0, math.nan, 10.0], 0.5)
    assert sm[0] == 0.0 and math.isnan(sm[2]) and 0 < sm[1] < sm[3] < 10
    assert series.ema([3.0, 1.0], 0.0) == [3.0, 1.0]
    assert summaries.sparkline([1, 2, 3, 4, 5, 6, 7, 8]) == "▁▂▃▄▅▆▇█"
    assert summaries.sparkline([5.0, 5.0]) == "▄▄"
    assert summaries.sparkline([1.0, math.nan, 3.0]) == "▁ █"
    assert len(summaries.sparkline(list(map(float, range(1000))), width=24)) == 24


# -- show ------------------------------------------------------------------------------------


def test_show_prints_last_min_max_and_a_sparkline(savedir):
    r = invoke("show", savedir, "a")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    (rank0,) = [ln for ln in lines if ln.strip().startswith("loss = 0.05")]
    # last 0.05 at step 7; NaN is left out of min/max, inf is kept (it was logged).
    assert "(step 7)" in rank0 and "min 0.05" in rank0 and "max inf" in rank0
    assert "8 pts" in rank0
    spark = rank0[-8:]
    assert set(spark) <= set(summaries.SPARK_CHARS + " ")
    assert spark[0] == "█" and spark[2] == spark[4] == " "  # NaN and inf: gaps
    assert spark[-1] == "▁"
    (rank1,) = [ln for ln in lines if ln.strip().startswith("loss = 1.05")]
    assert "min 1.05" in rank1
    (acc,) = [ln for ln in lines if ln.strip().startswith("acc = 0.6")][:1]
    assert "min 0  max 0.6  4 pts" in acc and "(step" not in acc


# -- export ----------------------------------------------------------------------------------


def _sorted_frame(t: pa.Table):
    df = t.to_pandas()
    return df.sort_values(["experiment", "run_id", "rank", "seq"]).reset_index(drop=True)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_export_round_trips_to_journal_metrics(savedir, tmp_path, fmt):
    import pandas as pd

    out = tmp_path / "export"
    r = invoke("export", savedir, "--format", fmt, "-o", out)
    assert r.exit_code == 0, r.output
    files = sorted(out.rglob(f"*.{fmt}"))
    assert [f.relative_to(out).as_posix() for f in files] == [
        f"exp/a.{fmt}", f"unnamed-experiment/b.{fmt}"]
    back = pa.concat_tables([export.read_export(f) for f in files])
    expected = Journal(savedir).metrics()
    assert back.schema == expected.schema
    pd.testing.assert_frame_equal(_sorted_frame(back), _sorted_frame(expected))
    assert back.num_rows == expected.num_rows == 2 * 12 + 8
    values = back["value"].to_pylist()
    assert any(math.isnan(v) for v in values) and math.inf in values
    assert None in back["step"].to_pylist()
    if fmt == "csv":  # plain pandas reads it too
        df = pd.read_csv(out / "exp" / "a.csv", dtype={"step": "Int64", "batch_idx": "Int64"})
        assert len(df) == 24 and df["value"].isna().sum() == 2
    one = tmp_path / "one"
    assert invoke("export", savedir, "--run", "b", "-o", one).exit_code == 0
    assert [f.name for f in one.rglob("*.parquet")] == ["b.parquet"]


# -- tail ------------------------------------------------------------------------------------


def test_tail_prints_the_last_n_records(savedir):
    r = invoke("tail", savedir, "a", "-n", "3")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert len(lines) == 3 and all("exp/a rank 1" in ln for ln in lines)
    assert lines[-1].endswith("loss = 1.05") and "step 7" in lines[-1]
    r = invoke("tail", savedir, "-n", "100", "--metric", "acc", "--json")
    import json

    rows = [json.loads(ln) for ln in r.output.splitlines()]
    assert len(rows) == 2 * 4 + 3 and {x["name"] for x in rows} == {"acc"}
    assert invoke("tail", savedir, "nope").exit_code == 1
