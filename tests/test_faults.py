"""Faults while logging, on a real small filesystem: disk full, read-only, strict mode, and
hostile input. Training must go on (or, with strict=True, be told), nothing logged before is
lost, and nothing is written outside savedir."""

from __future__ import annotations

import json
import subprocess
import warnings
from pathlib import Path

import pytest
from conftest import fill_filesystem

from itwinai_journal import Journal, verify
from itwinai_journal.loggers import JournalWarning, MLFlowLogger, TensorBoardLogger
from itwinai_journal.writer.rank import JournalWriteError


def _logger(savedir: Path, **kwargs) -> MLFlowLogger:
    lg = MLFlowLogger(savedir=savedir, experiment_name="exp", run_id="r1", log_freq="batch",
                      flush_interval=0.05, **kwargs)
    lg.create_logger_context()
    return lg


def test_disk_full_warns_once_counts_drops_and_keeps_everything_else(tiny_fs):
    savedir = tiny_fs / "mllogs"
    lg = _logger(savedir)
    for i in range(100):
        lg.log(float(i), "loss", step=i)
    lg._writer.flush()
    filler = fill_filesystem(tiny_fs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(100, 2100):  # training goes on: no exception reaches the loop
            lg.log(float(i), "loss", step=i)
        lg._writer.flush()
    full_warnings = [w for w in caught if "cannot write" in str(w.message)]
    assert len(full_warnings) == 1
    dropped = lg._writer._dropped
    assert dropped > 0
    filler.unlink()  # space comes back
    for i in range(2100, 2200):
        lg.log(float(i), "loss", step=i)
    lg.destroy_logger_context()

    manifest = json.loads(next(savedir.glob("*/r1/rank-00000/manifest.json")).read_text())
    assert manifest["dropped_records"] == dropped
    steps = Journal(savedir).metrics()["step"].to_pylist()
    assert steps[:100] == list(range(100))  # nothing logged before is lost
    assert steps[-100:] == list(range(2100, 2200))
    assert len(steps) == 2200 - dropped
    assert [p for p in verify(savedir) if p.severity == "error"] == []


def test_read_only_savedir_at_start_is_a_clear_error(tiny_fs):
    # A filesystem cannot be remounted read-only under a writer's open files, so this is the
    # start-up case: failing before training is better than a run that records nothing.
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    try:
        with pytest.raises(OSError, match="Read-only file system"):
            # creates savedir/mlflow at construction, as itwinai's does
            MLFlowLogger(savedir=tiny_fs / "mllogs", experiment_name="exp", run_id="r1")
        lg = TensorBoardLogger(savedir=tiny_fs / "mllogs", run_id="r1")
        with pytest.raises(OSError, match="Read-only file system"):
            lg.create_logger_context()
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(tiny_fs)], check=True)


def test_strict_mode_raises_in_the_training_loop(tiny_fs):
    savedir = tiny_fs / "mllogs"
    lg = _logger(savedir, strict=True)
    lg.log(1.0, "loss", step=0)
    lg._writer.flush()
    fill_filesystem(tiny_fs)
    for i in range(1, 2000):  # more than the page the active segment already holds
        lg.log(2.0, "loss", step=i)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lg._writer.flush()
    with pytest.raises(JournalWriteError, match="journal write failed"):
        lg.log(3.0, "loss", step=2000)
    for f in tiny_fs.glob("filler"):
        f.unlink()
    lg.destroy_logger_context()
    assert Journal(savedir).metrics()["step"].to_pylist() == [0]


@pytest.mark.parametrize("bad, stored", [
    ("a\x00b", "a\x00b"), ("a\nb", "a\nb"), ("x" * 5000, "x" * 5000), (42, "42"),
])
def test_hostile_identifiers_are_names_but_not_paths(tmp_path, bad, stored):
    """Any str is a record name (trackers that refuse one get it mapped at export); one that
    would become a path (an artifact's) carries no control character; a non-str identifier is
    its str(), with a warning."""
    savedir = tmp_path / "mllogs"
    lg = _logger(savedir)
    lg.log(1.0, "ok", step=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", JournalWarning)
        lg.log(1.0, bad, kind="metric")
        lg.log("t", bad, kind="text")
    if "\x00" in stored or "\n" in stored:
        with pytest.raises(ValueError, match="control character"):
            lg.log(__file__, bad, kind="artifact")
    lg.destroy_logger_context()
    got = [(r["kind"], r["name"]) for r in Journal(savedir).records().to_pylist()]
    assert got == [("metric", "ok"), ("metric", stored), ("text", stored)]


@pytest.mark.parametrize("bad", ["../x", "/etc/x", "a/../../x"])
def test_path_identifiers_cannot_leave_savedir(tmp_path, bad):
    """As a metric name a path is just a name (exporters map it); where it would become a path
    (artifact, serialize) it is refused, and nothing is written outside savedir."""
    savedir = tmp_path / "mllogs"
    lg = _logger(savedir)
    lg.log(1.0, bad, step=0)
    with pytest.raises(ValueError, match="escape|absolute"):
        lg.log(__file__, bad, kind="artifact")
    with pytest.raises(ValueError, match="escape|absolute"):
        lg.serialize({"a": 1}, bad)
    lg.destroy_logger_context()
    assert [r["name"] for r in Journal(savedir).records().to_pylist()] == [bad]
    assert {p for p in tmp_path.rglob("*") if not p.is_relative_to(savedir)} == set()


def test_hostile_values(tmp_path):
    import threading

    savedir = tmp_path / "mllogs"
    lg = _logger(savedir)
    lg.log("y" * (10 << 20), "huge", kind="text")  # 10 MB: stored as a blob
    lg.log({"lock": threading.Lock()}, "d", kind="dict")  # journaled as its str()
    with pytest.raises(TypeError, match="pickled"):
        lg.log(threading.Lock(), "obj", kind="artifact")
    lg.log(float("nan"), "nan", step=0)
    lg.log(float("inf"), "inf", step=0)
    lg.destroy_logger_context()
    recs = {r["name"]: r for r in Journal(savedir).records().to_pylist()}
    assert set(recs) == {"huge", "d", "nan", "inf"}
    assert json.loads(recs["d"]["text"]).startswith("{'lock': <unlocked _thread.lock object")
    assert recs["huge"]["text"] is None and recs["huge"]["blob"]
    assert recs["inf"]["value"] == float("inf") and recs["nan"]["value"] != recs["nan"]["value"]
