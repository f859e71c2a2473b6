"""End to end: journals written by the real loggers, replayed with `itwinai-sync --to
tensorboard`, and read back with TensorBoard's own EventAccumulator: exact steps and wall times,
values as float32 (TensorBoard's scalar type, as with add_scalar), decoded images, text,
histograms and hparams; exactly once across re-syncs, a SIGKILLed sync, live runs and ranks."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# Imported here, not lazily: the journal writer warms pyarrow up in a background thread, which
# imports pandas, and plotly (in the test's thread) then finds pandas half-initialised.
import pandas  # noqa: F401
import pytest
import torch
from click.testing import CliRunner
from conftest import child_env, train_watched_linear
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
from tensorboard.plugins.hparams import metadata as hparams_metadata

from itwinai_journal import Journal
from itwinai_journal.format.blobs import BlobStore
from itwinai_journal.format.names import experiment_dirname
from itwinai_journal.loggers import MLFlowLogger, TensorBoardLogger, WandBLogger
from itwinai_sync.cli import main
from itwinai_sync.targets.tensorboard import EVENTS_RE, HPARAMS_FILE, frame, masked_crc32c

ALL = {kind: 0 for kind in event_accumulator.DEFAULT_SIZE_GUIDANCE}  # 0: keep every event




# -- helpers ------------------------------------------------------------------------------------


def sync(savedir: Path, *args: str, to: tuple[str, ...] = ("--to", "tensorboard")) -> str:
    result = CliRunner().invoke(main, [str(savedir), *to, *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def rank_dir(savedir: Path, run_id: str, rank: int = 0, logdir: Path | None = None) -> Path:
    (run,) = [r for r in Journal(savedir).runs() if r.run_id == run_id]
    root = logdir or savedir / "tensorboard"
    return root / experiment_dirname(run.experiment) / run_id / f"rank-{rank:05d}"


def journal_rank(savedir: Path, run_id: str, rank: int = 0) -> Path:
    (run,) = [r for r in Journal(savedir).runs() if r.run_id == run_id]
    return run.rank(rank).path


def event_files(path: Path) -> list[Path]:
    """The complete events files of a rank directory, in the order TensorBoard reads them."""
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if EVENTS_RE.match(p.name))


def count_events(path: Path) -> int:
    return sum(1 for f in sorted(path.iterdir()) if "tfevents" in f.name
               for _ in LegacyEventFileLoader(str(f)).Load())


def accumulate(path: Path) -> event_accumulator.EventAccumulator:
    return event_accumulator.EventAccumulator(str(path), size_guidance=ALL).Reload()


def assert_scalars_exact(acc: event_accumulator.EventAccumulator, savedir: Path, run_id: str,
                         rank: int = 0) -> int:
    """Every journal metric of the rank is in TensorBoard exactly once, in order, with its step
    (seq when it had none), its time as wall time and its value as float32. Returns the count."""
    expected: dict[str, list[tuple[int, float, float]]] = {}
    for m in Journal(savedir).metrics(run_id=run_id, rank=rank).to_pylist():
        step = m["step"] if m["step"] is not None else m["seq"]
        expected.setdefault(m["name"], []).append((step, m["time"], m["value"]))
    assert sorted(acc.Tags()["scalars"]) == sorted(expected)
    for name, rows in expected.items():
        got = acc.Scalars(name)
        assert [(e.step, e.wall_time) for e in got] == [(s, t) for s, t, _ in rows], name
        with np.errstate(over="ignore"):  # beyond float32: inf, in TensorBoard as here
            expected_values = np.array([v for *_, v in rows], np.float32)
        np.testing.assert_array_equal(np.array([e.value for e in got], np.float32),
                                      expected_values)
    return sum(map(len, expected.values()))


def assert_complete(path: Path, savedir: Path, run_id: str, rank: int = 0) -> None:
    """No temporary file is left, and the files' seq ranges tile (0, last seq] without gap or
    overlap."""
    assert not [p for p in path.iterdir() if p.name.startswith(".")]
    ranges = [tuple(map(int, EVENTS_RE.match(p.name).groups())) for p in event_files(path)]
    assert ranges and ranges[0][0] == 1
    assert all(b[0] == a[1] + 1 for a, b in zip(ranges, ranges[1:])), ranges
    last = Journal(savedir).records(run_id=run_id, rank=rank)["seq"].to_pylist()[-1]
    assert ranges[-1][1] == last


def session_hparams(acc: event_accumulator.EventAccumulator) -> dict:
    content = acc.SummaryMetadata(hparams_metadata.SESSION_START_INFO_TAG).plugin_data.content
    info = hparams_metadata.parse_session_start_info_plugin_data(content)
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}


def tb_logger(savedir: Path, run_id: str, rank: int = 0, **kwargs) -> TensorBoardLogger:
    logger = TensorBoardLogger(savedir=savedir, log_freq="batch", log_on_workers=-1,
                               run_id=run_id, **kwargs)
    logger.create_logger_context(rank=rank)
    return logger


def log_metrics(logger, n: int, offset: int = 0, scale: float = 1.0) -> None:
    for i in range(offset, offset + n):
        logger.log(scale / (i + 1), "train/loss", step=i)
        if i % 10 == 0:
            logger.log(scale * i / 7, "val/acc", step=i)


# -- tests ------------------------------------------------------------------------------------


def test_every_kind_round_trips(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import plotly.graph_objects as go

    savedir = tmp_path / "mllogs"
    logger = tb_logger(savedir, "kinds")
    logger.save_hyperparameters({"lr": 0.001, "layers": [8, 4], "optimizer": "adam",
                                 "amp": True, "seed": 42})
    log_metrics(logger, 50)
    logger.log(0.5, "no_step")
    logger.log(0.25, "no_step")
    for step, value in enumerate([float("nan"), float("inf"), 0.1, -0.0, 1e300, 5e-324]):
        logger.log(value, "special", step=step)
    rng = np.random.default_rng(0)
    # numpy images in TensorBoard's layout, CHW, as itwinai's TensorBoardLogger takes them
    images = {"rgb": rng.integers(0, 256, (6, 7, 3), np.uint8),
              "grey": rng.integers(0, 256, (5, 4), np.uint8),
              "rgba": rng.integers(0, 256, (3, 2, 4), np.uint8)}
    for name, array in images.items():
        logger.log(np.moveaxis(array, -1, 0) if array.ndim == 3 else array, name,
                   kind="image", step=2)
    fig = plt.figure(figsize=(3, 2), dpi=50)
    plt.plot([1, 3, 2])
    logger.log(fig, "curve", kind="figure", step=3)
    logger.log(go.Figure(data=[go.Bar(y=[1, 2])]), "interactive", kind="figure", step=3)
    long_text = "line of text\n" * 6000  # > 64 KiB: captured as a blob, not inline
    logger.log("hello **markdown**", "notes", kind="text", step=4)
    logger.log(long_text, "log_dump", kind="text", step=5)
    logger.destroy_logger_context()

    out = sync(savedir)
    assert "exported" in out and "FAILED" not in out
    assert "'interactive' is a plotly figure, which TensorBoard cannot show; skipped" in out
    assert "without a step are written at step = their journal seq" in out
    path = rank_dir(savedir, "kinds")
    assert_complete(path, savedir, "kinds")
    acc = accumulate(path)

    assert assert_scalars_exact(acc, savedir, "kinds") == 50 + 5 + 2 + 6
    assert acc.file_version == 2.0

    assert sorted(acc.Tags()["images"]) == ["curve", "grey", "rgb", "rgba"]
    for name, array in images.items():
        (ev,) = acc.Images(name)
        decoded = np.asarray(Image.open(io.BytesIO(ev.encoded_image_string)))
        assert (ev.step, ev.width, ev.height) == (2, array.shape[1], array.shape[0])
        np.testing.assert_array_equal(decoded, array)
    (fig_ev,) = acc.Images("curve")
    (fig_rec,) = [r for r in Journal(savedir).records(kinds=["figure"]).to_pylist()
                  if r["name"] == "curve"]
    png = BlobStore(journal_rank(savedir, "kinds") / "blobs").read(fig_rec["blob"])
    assert fig_ev.encoded_image_string == png
    assert (fig_ev.width, fig_ev.height) == (150, 100)

    texts = {"notes": "hello **markdown**", "log_dump": long_text}
    for name, text in texts.items():  # tag, shape and plugin as SummaryWriter.add_text
        (ev,) = acc.Tensors(f"{name}/text_summary")
        assert ev.tensor_proto.string_val == [text.encode()]
        assert [d.size for d in ev.tensor_proto.tensor_shape.dim] == [1]
        assert acc.SummaryMetadata(f"{name}/text_summary").plugin_data.plugin_name == "text"

    # as itwinai's save_hyperparameters -> add_hparams stores them: bools as numbers,
    # lists as their str()
    assert session_hparams(acc) == {"lr": 0.001, "layers": "[8, 4]", "optimizer": "adam",
                                    "amp": 1.0, "seed": 42.0}


def test_watch_histograms(tmp_path):
    """Histogram records of the W&B-style `watch` capture (a WandBLogger journal synced to
    TensorBoard): bucket counts, right edges and moments exact, at step = forward call."""
    savedir = tmp_path / "mllogs"
    logger = WandBLogger(savedir=savedir, project_name="watch", run_id="w", log_freq="batch")
    logger.create_logger_context()
    model = train_watched_linear(logger)
    with torch.no_grad():
        model.bias.fill_(float("nan"))  # a histogram without finite values: written empty
        model(torch.randn(2, 4))
    logger.destroy_logger_context()

    out = sync(savedir)
    assert "not for this target: 1 watch" in out
    path = rank_dir(savedir, "w")
    assert_complete(path, savedir, "w")
    acc = accumulate(path)
    assert_scalars_exact(acc, savedir, "w")
    expected: dict[str, list] = {}
    for r in Journal(savedir).records(kinds=["histogram"]).to_pylist():
        h = json.loads(r["text"])
        expected.setdefault(r["name"], []).append(
            (json.loads(r["meta"])["call"], h["counts"] or [], (h["bins"] or [])[1:],
             h["num"], h["sum"], h["sum_squares"]))
    assert sorted(acc.Tags()["histograms"]) == sorted(expected) == [
        "gradients/bias", "gradients/weight", "parameters/bias", "parameters/weight"]
    for name, rows in expected.items():
        got = [(e.step, e.histogram_value.bucket, e.histogram_value.bucket_limit,
                e.histogram_value.num, e.histogram_value.sum, e.histogram_value.sum_squares)
               for e in acc.Histograms(name)]
        assert got == rows, name
    assert [e.step for e in acc.Histograms("parameters/bias")] == [1, 2, 3, 4]
    assert acc.Histograms("parameters/bias")[-1].histogram_value.bucket == []


def test_resync_adds_nothing_and_default_destination(tmp_path):
    savedir = tmp_path / "mllogs"
    logger = tb_logger(savedir, "again")
    logger.save_hyperparameters({"lr": 0.1})
    log_metrics(logger, 500)
    logger.destroy_logger_context()

    assert not (savedir / "tensorboard").exists()
    sync(savedir, "--dry-run")
    assert not (savedir / "tensorboard").exists()  # a dry run writes nothing
    out = sync(savedir, to=())  # no --to: the destination the TensorBoardLogger declared
    assert "exported 550 metric, 1 param" in out
    path = rank_dir(savedir, "again")
    files = sorted(p.name for p in path.iterdir())
    events = count_events(path)
    assert events == 550 + 3  # records + file_version in each file + the hparams event

    out = sync(savedir)
    assert "up-to-date" in out and "exported 0 records" in out
    assert sorted(p.name for p in path.iterdir()) == files
    assert count_events(path) == events
    assert_scalars_exact(accumulate(path), savedir, "again")


def test_killed_sync_then_resync_is_exactly_once(tmp_path):
    savedir = tmp_path / "mllogs"
    logger = tb_logger(savedir, "big")
    logger._writer.seal_records = 2000
    n = 61_000  # not a multiple of 2000: see test_run_closed_with_an_empty_active_segment
    for i in range(n):
        logger.log(float(i), "loss" if i % 3 else "acc", step=i)
        if (i + 1) % 2000 == 0:
            logger._writer.flush()  # one sealed segment per 2000 records
    logger.destroy_logger_context()
    segments = list((journal_rank(savedir, "big") / "segments").glob("*.parquet"))
    assert len(segments) == 31  # the engine writes one events file per segment here

    def command(logdir: Path) -> list[str]:
        return [sys.executable, "-m", "itwinai_sync.cli", str(savedir), "--to", "tensorboard",
                "--logdir", str(logdir)]

    # Kill as soon as a new events file appears, resume, kill again: three kills at
    # different points, each followed by a sync that starts from what the files say.
    logdir = tmp_path / "tb"
    path = rank_dir(savedir, "big", logdir=logdir)
    kills = 0
    while kills < 3 and len(event_files(path)) < len(segments):
        before = len(event_files(path))
        proc = subprocess.Popen(command(logdir), env=child_env(), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while (proc.poll() is None and len(event_files(path)) == before
               and time.monotonic() < deadline):
            time.sleep(0.001)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills and len(event_files(path)) < len(segments), "never killed mid-way"
    # Whatever the kill left, a partial file included, the next sync removes and redoes.
    (path / ".tmp-events.out.part.000000999999-000001000000.itwinai.1").write_bytes(b"torn")
    done = subprocess.run(command(logdir), env=child_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert_complete(path, savedir, "big")
    assert assert_scalars_exact(accumulate(path), savedir, "big") == n
    assert count_events(path) == n + len(event_files(path))  # + one file_version per file


def test_live_run_then_the_rest(tmp_path):
    """A run still being written (active JSONL segment) is exported up to its last flushed
    record; the next sync adds only the rest, and params logged later join the hparams."""
    savedir = tmp_path / "mllogs"
    logger = tb_logger(savedir, "live")
    logger.save_hyperparameters({"lr": 0.01})
    log_metrics(logger, 100)
    logger._writer.flush()  # nothing is logged from here to the check: the journal is fixed
    assert list((journal_rank(savedir, "live") / "segments").glob("*.jsonl"))

    sync(savedir)
    path = rank_dir(savedir, "live")
    acc = accumulate(path)
    assert assert_scalars_exact(acc, savedir, "live") == 110
    assert session_hparams(acc) == {"lr": 0.01}

    log_metrics(logger, 1000, offset=100)
    logger.save_hyperparameters({"batch_size": 32})
    logger.log("still running", "status", kind="text", step=1)
    logger._writer.flush()
    out = sync(savedir)
    assert "exported 1100 metric, 1 param, 1 text" in out
    acc = accumulate(path)
    assert assert_scalars_exact(acc, savedir, "live") == 1210
    assert session_hparams(acc) == {"lr": 0.01, "batch_size": 32.0}
    assert (path / HPARAMS_FILE).exists()

    logger.destroy_logger_context()  # seals the active segment: same records, same seqs
    events = count_events(path)
    assert "up-to-date" in sync(savedir)
    assert count_events(path) == events
    assert_complete(path, savedir, "live")


def test_ranks(tmp_path):
    savedir = tmp_path / "mllogs"
    loggers = [tb_logger(savedir, "ddp", rank=rank) for rank in (0, 1)]
    for rank, logger in enumerate(loggers):
        log_metrics(logger, 200, scale=rank + 1)
        logger.destroy_logger_context()

    sync(savedir, "--ranks", "0")
    rank0, rank1 = (rank_dir(savedir, "ddp", rank) for rank in (0, 1))
    assert event_files(rank0) and not rank1.exists()
    events0 = count_events(rank0)

    out = sync(savedir)
    assert "exported 220 metric" in out
    assert count_events(rank0) == events0
    for rank, path in enumerate((rank0, rank1)):
        assert_complete(path, savedir, "ddp", rank)
        assert assert_scalars_exact(accumulate(path), savedir, "ddp", rank) == 220


def test_mlflow_journal_to_custom_logdir(tmp_path):
    """An MLFlowLogger journal goes to TensorBoard too: experiment names become one
    percent-encoded directory, kinds TensorBoard cannot show are counted as skipped, and a
    journal with nothing for TensorBoard makes no TensorBoard run."""
    savedir, logdir = tmp_path / "mllogs", tmp_path / "elsewhere"
    logger = MLFlowLogger(savedir=savedir, experiment_name="team/exp 1", run_id="m1",
                          log_freq="batch")
    logger.create_logger_context()
    logger.save_hyperparameters({"epochs": 3, "note": None})
    log_metrics(logger, 30)
    logger.log({"a": 1}, "config", kind="dict")
    logger.destroy_logger_context()
    only_dicts = MLFlowLogger(savedir=savedir, experiment_name="team/exp 1", run_id="m2")
    only_dicts.create_logger_context()
    only_dicts.log({"b": 2}, "config", kind="dict")
    only_dicts.destroy_logger_context()

    out = sync(savedir, "--logdir", str(logdir))
    assert "not for this target: 1 dict" in out
    path = logdir / "team%2Fexp 1" / "m1" / "rank-00000"
    assert path == rank_dir(savedir, "m1", logdir=logdir)
    acc = accumulate(path)
    assert assert_scalars_exact(acc, savedir, "m1") == 33
    assert session_hparams(acc) == {"epochs": 3.0}  # None is left out, as add_hparams does
    assert not rank_dir(savedir, "m2", logdir=logdir).parent.exists()
    out = sync(savedir, "--logdir", str(logdir))
    assert "exported 0 records" in out and "not for this target: 1 dict" in out
    assert not rank_dir(savedir, "m2", logdir=logdir).parent.exists()


def test_run_closed_with_an_empty_active_segment(tmp_path):
    savedir = tmp_path / "mllogs"
    logger = tb_logger(savedir, "aligned")
    logger._writer.seal_records = 10
    log_metrics(logger, 9)  # 10 records with val/acc at step 0
    logger._writer.flush()  # seals them: the active segment is empty when the logger closes
    logger.destroy_logger_context()
    sync(savedir)
    assert assert_scalars_exact(accumulate(rank_dir(savedir, "aligned")), savedir,
                                "aligned") == 10


@pytest.mark.parametrize("sizes", [[0, 1, 3, 4, 5, 8, 33, 100, 4096, 4097, 70000],
                                   [38] * 500 + [39] * 300 + [2000] * 3])
def test_framing_matches_tensorboard(sizes, tmp_path):
    """The `crc32c` package's CRC, masked, is bit-identical to TensorBoard's own masked
    CRC-32C, and TensorBoard's reader reads the frames."""
    rng = np.random.default_rng(len(sizes))
    records = [rng.integers(0, 256, n, np.uint8).tobytes() for n in sizes]
    assert [masked_crc32c(r) for r in records] == [pywrap_tensorflow.masked_crc32c(r)
                                                   for r in records]
    path = tmp_path / "events.out.tfevents.test"
    path.write_bytes(frame(records))
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader

    assert list(RawEventFileLoader(str(path)).Load()) == records
    assert re.match(EVENTS_RE, "events.out.tfevents.000000000001-000000000002.itwinai")
