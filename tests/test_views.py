"""Looking at runs without a tracker: plot, show, tail, export."""

from __future__ import annotations

import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pytest
from click.testing import CliRunner
from conftest import child_env

from itwinai_journal import Journal
from itwinai_journal.loggers import MLFlowLogger, TensorBoardLogger
from itwinai_sync import views
from itwinai_sync.cli import main

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


def test_plot_html_is_self_contained_and_holds_every_series(savedir, tmp_path):
    out = tmp_path / "report.html"
    r = invoke("plot", savedir, "-o", out, "--smooth", "0.5")
    assert r.exit_code == 0, r.output
    page = out.read_text()
    low = page.lower()
    for needle in ("<script", "src=", "href=", "@import", "url("):
        assert needle not in low, needle
    m = Journal(savedir).metrics()
    expected = {}
    for exp, run, rank, name in zip(*(m[c].to_pylist()
                                      for c in ("experiment", "run_id", "rank", "name"))):
        key = f"{exp}/{run}/{rank}/{name}"
        expected[key] = expected.get(key, 0) + 1
    assert len(expected) == 6
    for key, count in expected.items():
        exp, run, rank, name = key.split("/")
        assert f'data-series="{key}" data-points="{count}"' in page, key
        assert f"{exp}/{run} rank {rank} · {name}</td><td>{count} points" in page, key
    assert page.count('data-metric="') == 2
    # A NaN and an inf break the line: [1, .5], [.25] (a dot), [.125, .1, .05]; drawn twice,
    # raw (faint) and smoothed.
    group = re.search(r'data-series="exp/a/0/loss".*?</g>', page).group(0)
    assert group.count("<polyline") == 4 and group.count("<circle") == 2


def test_plot_errors_are_one_line(savedir, tmp_path):
    r = invoke("plot", savedir, "nope", "-o", tmp_path / "x.png")
    assert r.exit_code == 1 and "no run 'nope'" in r.output and "Traceback" not in r.output
    r = invoke("plot", savedir, "--metric", "zzz*", "-o", tmp_path / "x.png")
    assert r.exit_code == 1 and "no metric records matching zzz*" in r.output
    r = invoke("plot", savedir, "-o", tmp_path / "x.txt")
    assert r.exit_code == 1 and "use .png, .svg, .pdf or .html" in r.output
    assert invoke("plot", savedir, "--smooth", "1").exit_code == 2


def test_metric_patterns_and_series(savedir):
    j = Journal(savedir)
    t = views.metrics_table(j, [j.run("a")], ["lo*"])
    series = views.series_of(t)
    assert [(s.rank, s.name, len(s)) for s in series] == [(0, "loss", 8), (1, "loss", 8)]
    assert series[1].value[:2] == [2.0, 1.5]
    acc = views.series_of(views.metrics_table(j, [j.run("a")], ["acc"]))[0]
    assert views.x_values(acc, "step") == [0.0, 1.0, 2.0, 3.0]  # no step: position
    rel = views.x_values(acc, "relative", acc.time[0])
    assert rel[0] == 0.0 and rel == sorted(rel)


def test_ema_sparkline_ticks():
    assert views.ema([1.0, 1.0, 1.0], 0.9) == pytest.approx([1.0, 1.0, 1.0])  # debiased
    sm = views.ema([0.0, 10.0, math.nan, 10.0], 0.5)
    assert sm[0] == 0.0 and math.isnan(sm[2]) and 0 < sm[1] < sm[3] < 10
    assert views.ema([3.0, 1.0], 0.0) == [3.0, 1.0]
    assert views.sparkline([1, 2, 3, 4, 5, 6, 7, 8]) == "▁▂▃▄▅▆▇█"
    assert views.sparkline([5.0, 5.0]) == "▄▄"
    assert views.sparkline([1.0, math.nan, 3.0]) == "▁ █"
    assert len(views.sparkline(list(map(float, range(1000))), width=24)) == 24
    assert views.nice_ticks(0, 1) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    xs, ys = views.decimate(list(range(10_000)), [float(i % 7) for i in range(10_000)], 100)
    assert len(xs) <= 100 and max(ys) == 6 and min(ys) == 0


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
    assert set(spark) <= set(views.SPARK_CHARS + " ")
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
    back = pa.concat_tables([views.read_export(f) for f in files])
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


def test_tail_reads_each_record_once_while_segments_are_sealed(tmp_path):
    savedir = tmp_path / "mllogs"
    lg = TensorBoardLogger(savedir=savedir, log_freq="batch", run_id="live", flush_interval=0.1)
    lg.create_logger_context()
    lg._writer.seal_records = 7
    tail = views.Tail(savedir)
    seen = []
    for i in range(60):
        lg.log(float(i), "x", step=i)
        if i % 5 == 0:
            lg._writer.flush()
            seen += tail.poll(last=3) if not seen else tail.poll()
    lg.destroy_logger_context()
    seen += tail.poll()
    assert [p.step for p in seen] == list(range(60))
    assert len({p.seq for p in seen}) == 60
    assert len(list(savedir.rglob("*.parquet"))) >= 5  # it really followed sealing


def _reader(stream, q):
    for line in stream:
        q.put(line)


def test_tail_follow_prints_records_appended_after_it_started(tmp_path):
    savedir = tmp_path / "mllogs"
    lg = MLFlowLogger(savedir=savedir, experiment_name="exp", run_id="live",
                      log_freq="batch", flush_interval=0.1)
    lg.create_logger_context()
    lg._writer.seal_records = 25  # segments seal while tail follows
    for i in range(5):
        lg.log(float(i), "before", step=i)
    lg._writer.flush()
    proc = subprocess.Popen(
        [sys.executable, "-m", "itwinai_sync.cli", "tail", str(savedir), "-f", "--interval",
         "0.2", "-n", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
        start_new_session=True)
    q: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, q), daemon=True).start()
    lines: list[str] = []

    def read_until(pred, timeout=30.0):
        deadline = time.monotonic() + timeout
        while not pred():
            try:
                lines.append(q.get(timeout=max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                err = proc.stderr.read() if proc.poll() is not None else ""
                raise AssertionError(f"timed out; got {lines}; stderr: {err}") from None

    try:
        read_until(lambda: len(lines) >= 3)
        assert all("before" in ln for ln in lines[:3])
        assert "before = 4" in lines[2]
        n = 100
        for i in range(n):
            lg.log(i * 0.5, "after", step=i)
            if i % 10 == 0:
                time.sleep(0.05)
        read_until(lambda: sum("after" in ln for ln in lines) >= n)
        time.sleep(0.6)  # a few more polls: nothing may come twice
        while not q.empty():
            lines.append(q.get())
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        lg.destroy_logger_context()
    after = [ln for ln in lines if " after = " in ln]
    seqs = [int(re.search(r"#(\d+)", ln).group(1)) for ln in after]
    assert seqs == list(range(6, 6 + n))  # each once, in order
    assert [int(re.search(r"step (\d+)", ln).group(1)) for ln in after] == list(range(n))
    assert all("exp/live rank 0" in ln for ln in after)
    assert len(lines) == 3 + n
    assert len(list(savedir.rglob("*.parquet"))) >= 3


def test_tail_against_a_live_writer_process_sees_every_record_once(tmp_path):
    """Polling as fast as it can while another process appends and seals: no record missed,
    none twice, whatever the moment each read lands on (JSONL growing, torn last line, JSONL
    replaced by Parquet)."""
    from conftest import spawn

    savedir = tmp_path / "mllogs"
    n = 20_000
    writer = spawn(f"""
        import time
        from itwinai_journal.loggers import TensorBoardLogger
        lg = TensorBoardLogger(savedir={str(savedir)!r}, log_freq="batch", run_id="live",
                               flush_interval=0.05)
        lg.create_logger_context()
        lg._writer.seal_records = 900
        for i in range({n}):
            lg.log(float(i), "x", step=i)
            if i % 500 == 0:
                time.sleep(0.01)
        lg.destroy_logger_context()
    """)
    tail = views.Tail(savedir)
    seen = []
    polls = 0
    while writer.poll() is None:
        seen += tail.poll()
        polls += 1
    assert writer.returncode == 0, writer.stderr.read()
    seen += tail.poll()
    assert polls > 5
    assert [p.step for p in seen] == list(range(n))
    assert [p.seq for p in seen] == list(range(1, n + 1))
