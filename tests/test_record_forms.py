"""Every storable form the loggers journal, synced to every target and read back with the
tracker's own reader: a metric that is not a number (meta['logged_as'] = 'metric'), inline or
in a blob, or one JSON cannot hold (meta['stringified']); an object a kind's capture refuses
under a W&B destination (a dict as text, a list as image); a complex metric (meta['imag']);
steps the int64 column cannot hold (meta['step']: 1.5, 2**70, '12') on metrics and texts; lone
surrogates (meta['surrogates']) in texts, dicts and params; a param whose str() is not its
JSON's (meta['str']); a text in a blob; identifier=None and the empty name. Nothing fails,
each target shows or says it skips every record (exact counts, exact values read back), and
the summary says how each form was mapped. Below them, one test per form and target that
fails on its own when that form is mishandled."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import wandb_records as wr
from click.testing import CliRunner
from tensorboard.backend.event_processing import event_accumulator

from itwinai_journal import Journal
from itwinai_journal.loggers import WandBLogger
from itwinai_sync.cli import main

pytest.importorskip("mlflow")
BIG = 2**70
#: A text this long is kept in a blob, not inline.
LONG = 70_000
RUN = "forms"


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        path = tmp_path / "wandb-env" / var.lower()
        path.mkdir(parents=True)
        monkeypatch.setenv(var, str(path))


@pytest.fixture
def savedir(tmp_path) -> Path:
    """A W&B logger's journal holding every form (a W&B destination: objects a kind cannot
    hold are journaled as their JSON), on metrics, texts, dicts, params and an image."""
    savedir = tmp_path / "mllogs"
    lg = WandBLogger(savedir=savedir, project_name="forms", run_id=RUN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lg.create_logger_context()
        lg.save_hyperparameters({"betas": (0.9, 0.999), "path": "p\udcffq"})
        lg.log(2.0, "loss", step=0)
        lg.log("abc", "m_str", step=1)
        lg.log([1, 2, 3], "m_list", step=1)
        lg.log(None, "m_none", step=1)
        lg.log({"a": 1}, "m_dict", step=1)
        lg.log("a,b", "m_comma", step=1)
        lg.log({"x": 1}, "notes", kind="text", step=1)  # a dict given as text
        lg.log(1 + 2j, "cplx", step=2)
        lg.log(5.0, "bigstep", step=BIG)
        lg.log(6.0, "halfstep", step=1.5)
        lg.log("x\udcffy", "surr", kind="text", step=3)
        lg.log(7.0, None, step=3)
        lg.log(8.0, "", step=4)
        lg.log({"k": "v\udcff"}, "d_surr", kind="dict", step=3)
        lg.log("L" * LONG, "long", kind="text", step=5)  # in a blob
        lg.log("M" * LONG, "m_long", step=5)  # a metric that is not a number, in a blob
        lg.log(Ellipsis, "m_ell", step=5)  # JSON cannot hold it: its str()
        lg.log(9.0, "strstep", step="12")
        lg.log("t", "t_half", kind="text", step=6.5)
        lg.log([[0.0, 1.0]], "img_list", kind="image", step=7)  # wandb.log takes a list
        lg.log(np.zeros((4, 4, 3), dtype=np.uint8), "img", kind="image", step=8.5)
        lg.destroy_logger_context()
    records = Journal(savedir).records(run_id=RUN).to_pylist()
    metas = {r["name"]: json.loads(r["meta"] or "{}") for r in records}
    assert metas["m_str"]["logged_as"] == "metric" and metas["notes"]["logged_as"] == "text"
    assert metas["cplx"] == {"imag": 2.0} and metas["bigstep"] == {"step": BIG}
    assert metas["surr"]["surrogates"] and "metric" in metas and "" in metas
    assert metas["d_surr"]["surrogates"] and metas["strstep"] == {"step": "12"}
    assert metas["long"]["media_type"] == "text/plain" and metas["m_long"]["logged_as"] == "metric"
    assert metas["m_ell"]["stringified"] == "ellipsis" and metas["img_list"]["logged_as"] == "image"
    assert metas["t_half"] == {"step": 6.5} and metas["img"]["step"] == 8.5
    return savedir


def sync(savedir: Path, target: str) -> str:
    result = CliRunner().invoke(main, [str(savedir), "--to", target])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "FAILED" not in result.output
    return " ".join(result.output.split())


def test_wandb_shows_each_form_as_wandb_log_would(savedir):
    out = sync(savedir, "wandb")
    assert "exported 23 records (1 dict, 1 image, 7 metric, 2 param, 12 text); skipped 0" in out
    for said in ("history key '' is stored as 'itwinai_empty_name'",
                 "shown as wandb.log shows them: their JSON value",
                 "objects that JSON cannot hold (which wandb.log refuses) are shown as their str",
                 "complex metrics are shown by their real part",
                 "charted at that exact step", "shown as U+FFFD, as W&B itself stores them"):
        assert said in out, said
    (path,) = wr.find_run_files(savedir / "wandb")
    records = wr.read_records(path)
    rows = wr.history_rows(records)
    values = {k: (v, row.get("itwinai/step")) for row in rows for k, v in row.items()
              if not k.startswith("_") and k != "itwinai/step"}
    image, step = values.pop("img")
    assert (image["_type"], image["width"], step) == ("image-file", 4, 8.5)
    assert values == {
        "loss": (2.0, 0), "m_str": ("abc", 1), "m_list": ([1, 2, 3], 1), "m_none": (None, 1),
        "m_dict": ({"a": 1}, 1), "m_comma": ("a,b", 1), "notes": ({"x": 1}, 1),
        "cplx": (1.0, 2), "bigstep": (5.0, float(BIG)), "halfstep": (6.0, 1.5),
        "surr": ("x\ufffdy", 3), "metric": (7.0, 3), "itwinai_empty_name": (8.0, 4),
        "d_surr": ({"k": "v\ufffd"}, 3), "long": ("L" * LONG, 5), "m_long": ("M" * LONG, 5),
        "m_ell": ("Ellipsis", 5), "strstep": (9.0, 12), "t_half": ("t", 6.5),
        "img_list": ([[0, 1]], 7)}
    # a record with a step of its own never joins another step's row
    assert [row for row in rows if "bigstep" in row or "halfstep" in row] == [
        r for r in rows if r.get("itwinai/step") in (float(BIG), 1.5)]
    config = wr.config(records)
    assert config["betas"] == [0.9, 0.999] and config["path"] == "p\ufffdq"


def test_tensorboard_writes_each_form_as_summarywriter_takes_it(savedir):
    out = sync(savedir, "tensorboard")
    # itwinai's TensorBoardLogger has no dict kind
    assert "exported 22 records (1 image, 7 metric, 2 param, 12 text); skipped 1" in out
    assert "not for this target: 1 dict" in out
    for said in ("at int() of it, as SummaryWriter does", "complex metrics are written by "
                 "their real part", "are written as text: their JSON",
                 "written as U+FFFD"):
        assert said in out, said
    (path,) = (savedir / "tensorboard").rglob("rank-00000")
    acc = event_accumulator.EventAccumulator(
        str(path), size_guidance={k: 0 for k in event_accumulator.DEFAULT_SIZE_GUIDANCE})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
               for tag in acc.Tags()["scalars"]}
    assert scalars == {"loss": [(0, 2.0)], "cplx": [(2, 1.0)], "bigstep": [(2**63 - 1, 5.0)],
                       "halfstep": [(1, 6.0)], "metric": [(3, 7.0)], "": [(4, 8.0)],
                       "strstep": [(12, 9.0)]}
    assert {tag: [(e.step, e.width) for e in acc.Images(tag)]
            for tag in acc.Tags()["images"]} == {"img": [(8, 4)]}
    texts = {tag.removesuffix("/text_summary"): [
        (e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]
        for tag in acc.Tags()["tensors"] if tag.endswith("/text_summary")}
    assert texts == {"m_str": [(1, '"abc"')], "m_list": [(1, "[1, 2, 3]")],
                     "m_none": [(1, "null")], "m_dict": [(1, '{"a": 1}')],
                     "m_comma": [(1, '"a,b"')], "notes": [(1, '{"x": 1}')],
                     "surr": [(3, "x\ufffdy")], "long": [(5, "L" * LONG)],
                     "m_long": [(5, json.dumps("M" * LONG))], "m_ell": [(5, '"Ellipsis"')],
                     "t_half": [(6, "t")], "img_list": [(7, "[[0.0, 1.0]]")]}


def test_mlflow_logs_each_form_deliberately(savedir):
    from mlflow import MlflowClient

    out = sync(savedir, "mlflow")
    assert "exported 23 records (1 dict, 1 image, 7 metric, 2 param, 12 text); skipped 0" in out
    for said in ("metric name '' is stored as '_'", "logged at int() of it (1.5 -> 1)",
                 "complex metrics are logged by their real part",
                 "logged as text artifacts of their JSON at their name", "logged as U+FFFD"):
        assert said in out, said
    client = MlflowClient(f"sqlite:///{savedir.resolve()}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("forms").experiment_id])
    history = {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
               for key in run.data.metrics}
    assert history == {"loss": [(0, 2.0)], "cplx": [(2, 1.0)], "bigstep": [(2**63 - 1, 5.0)],
                       "halfstep": [(1, 6.0)], "metric": [(3, 7.0)], "_": [(4, 8.0)],
                       "strstep": [(12, 9.0)]}
    assert run.data.params == {"betas": "(0.9, 0.999)", "path": "p\ufffdq"}
    texts = {name: Path(client.download_artifacts(run.info.run_id, name)).read_text()
             for name in ("m_str", "m_list", "m_none", "m_dict", "m_comma", "notes", "surr",
                          "d_surr", "long", "m_long", "m_ell", "t_half", "img_list")}
    assert json.loads(texts.pop("d_surr")) == {"k": "v\ufffd"}  # log_dict's indented JSON
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {*texts, "d_surr", "img.png"}
    assert texts == {"m_str": '"abc"', "m_list": "[1, 2, 3]", "m_none": "null",
                     "m_dict": '{"a": 1}', "m_comma": '"a,b"', "notes": '{"x": 1}',
                     "surr": "x\ufffdy", "long": "L" * LONG, "m_long": json.dumps("M" * LONG),
                     "m_ell": '"Ellipsis"', "t_half": "t", "img_list": "[[0.0, 1.0]]"}


def test_prov4ml_takes_metrics_that_are_not_numbers_as_yprov4ml_does(savedir):
    from yprov4ml.utils import getters

    out = sync(savedir, "prov4ml")
    # texts that are not metrics are not for this target (itwinai's Prov4MLLogger has no
    # text kind), and said so in the summary
    assert "exported 16 records (7 metric, 2 param, 7 text); skipped 7" in out
    assert "not for this target: 1 dict, 1 image, 5 text" in out
    for said in ("metrics that are not numbers are written as yprov4ml writes them",
                 "complex metrics are written as yprov4ml writes them, (1+2j)",
                 "written as logged (1.5, 2**70)", "lone surrogates in params"):
        assert said in out, said
    (doc,) = (savedir / "prov").rglob("prov_*.json")
    entities = json.loads(doc.read_text())["entity"]
    assert entities["betas"]["prov:value"] == "(0.9, 0.999)"  # str() as itwinai logs it
    assert entities["path"]["prov:value"] == "p\ufffdq"

    def metric(name: str) -> list[tuple]:
        frame = getters.get_metric(str(doc), name, "training", "None")
        return [(e, v) for e, v in zip(frame["epoch"].tolist(), frame["value"].tolist())]

    assert metric("m_str") == [(1, "abc")]  # yprov4ml 2.0.9 writes str() of the value
    assert metric("m_list") == [(1, "[1, 2, 3]")]
    assert metric("m_dict") == [(1, "{'a': 1}")]
    assert metric("m_comma") == [(1, "a,b")]  # quoted, so that get_metric reads it
    assert metric("cplx") == [(2, "(1+2j)")]
    assert metric("m_long") == [(5, "M" * LONG)] and metric("m_ell") == [(5, "Ellipsis")]
    assert metric("strstep") == [(12, 9.0)]  # '12' as logged; get_metric reads a number
    assert metric("bigstep") == [(BIG, 5.0)] and metric("halfstep") == [(1.5, 6.0)]
    assert "name '' is written as '_'" in out
    assert metric("metric") == [(3, 7.0)] and metric("_") == [(4, 8.0)]
    none = metric("m_none")
    assert len(none) == 1 and none[0][0] == 1 and none[0][1] != none[0][1]  # None -> NaN


# -- one form at a time: each test fails when its own form is mishandled --------------------


def _history_values(savedir: Path) -> dict[str, tuple]:
    """Every non-internal history value of the one W&B run under savedir, with its row's
    journal step."""
    (path,) = wr.find_run_files(savedir / "wandb")
    rows = wr.history_rows(wr.read_records(path))
    return {k: (v, row.get("itwinai/step")) for row in rows for k, v in row.items()
            if not k.startswith("_") and k != "itwinai/step"}


def test_wandb_shows_objects_kept_as_json_as_itwinais_wandb_log_did(tmp_path):
    """meta.logged_as: itwinai's WandBLogger hands any object to `wandb.log({name: item})`.
    The expected values are what W&B's history held when itwinai 0.4.2 made these calls
    (offline, read back from its .wandb file): the object as wandb stores it, not its JSON
    text; an array above 32 values as the histogram wandb makes of it. Those logged as a
    metric or a dict are charted against the journal step, as plain ones are."""
    savedir = tmp_path / "mllogs"
    lg = WandBLogger(savedir=savedir, project_name="forms", run_id=RUN)
    calls = [("abc", "m_str", "metric"), ([1, 2, 3], "m_list", "metric"),
             (None, "m_none", "metric"), ({"a": 1}, "m_dict", "metric"),
             ({"x": 1}, "notes", "text"), ([[0.0, 1.0]], "img_list", "image"),
             (np.arange(3.0), "arr3", "metric"), (np.arange(40.0), "arr", "metric"),
             ([4, 5], "d_list", "dict")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lg.create_logger_context()
        for item, name, kind in calls:
            lg.log(item, name, kind=kind, step=5)
        lg.destroy_logger_context()
    # A list given as a dict is a dict record of its JSON (MLflow's log_dict takes lists too);
    # the others are kept as text records of their JSON, saying how they were logged.
    kept = {(r["kind"], json.loads(r["meta"] or "{}").get("logged_as"))
            for r in Journal(savedir).records(run_id=RUN).to_pylist()}
    assert kept == {("text", "metric"), ("text", "text"), ("text", "image"), ("dict", None)}
    assert "exported 9 records (1 dict, 8 text); skipped 0" in sync(savedir, "wandb")
    values = _history_values(savedir)
    histogram, step = values.pop("arr")
    assert values == {"m_str": ("abc", 5), "m_list": ([1, 2, 3], 5), "m_none": (None, 5),
                      "m_dict": ({"a": 1}, 5), "notes": ({"x": 1}, 5),
                      "img_list": ([[0, 1]], 5), "arr3": ([0, 1, 2], 5), "d_list": ([4, 5], 5)}
    assert step == 5 and histogram["_type"] == "histogram" and sum(histogram["values"]) == 40
    (path,) = wr.find_run_files(savedir / "wandb")
    charted = {r.metric.name or r.metric.glob_name: r.metric.step_metric
               for r in wr.read_records(path)
               if r.WhichOneof("record_type") == "metric"}
    assert charted == {"itwinai/step": "", **{name: "itwinai/step" for name in (
        "m_str", "m_list", "m_none", "m_dict.*", "arr3", "arr", "d_list")}}


@pytest.fixture
def meta_steps(tmp_path) -> Path:
    """Steps the journal's int64 column cannot hold (kept in meta.step) between ordinary
    ones, through a collection of W&B and TensorBoard loggers."""
    from itwinai_journal.loggers import LoggersCollection, TensorBoardLogger

    savedir = tmp_path / "mllogs"
    c = LoggersCollection([WandBLogger(savedir=savedir, project_name="forms", run_id=RUN),
                           TensorBoardLogger(savedir=savedir, run_id=RUN)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c.create_logger_context()
        c.log(1.0, "loss", step=10)
        c.log(2.0, "half", step=10.5)
        c.log(3.0, "loss", step=11)
        c.log(4.0, "big", step=BIG)
        c.log(5.0, "loss", step=12)
        c.log(6.0, "strstep", step="13")
        c.log(7.0, "odd", step="abc")
        c.destroy_logger_context()
    steps = [(r["name"], r["step"], json.loads(r["meta"] or "{}").get("step"))
             for r in Journal(savedir).records(run_id=RUN).to_pylist()]
    assert steps == [("loss", 10, None), ("half", None, 10.5), ("loss", 11, None),
                     ("big", None, BIG), ("loss", 12, None), ("strstep", None, "13"),
                     ("odd", None, "abc")]
    return savedir


def test_wandb_charts_a_step_kept_in_meta_at_that_step(meta_steps):
    """Never at a neighbour's step: a number at itself (W&B's numbers are float64), a string
    at the number it spells, one that spells none at no step (NaN); each in a row of its
    own."""
    sync(meta_steps, "wandb")
    (path,) = wr.find_run_files(meta_steps / "wandb")
    rows = [{k: v for k, v in row.items() if not k.startswith("_")}
            for row in wr.history_rows(wr.read_records(path))]
    odd = rows.pop()
    assert odd.pop("itwinai/step") != odd.get("itwinai/step")  # NaN
    assert odd == {"odd": 7.0}
    assert rows == [{"loss": 1.0, "itwinai/step": 10}, {"half": 2.0, "itwinai/step": 10.5},
                    {"loss": 3.0, "itwinai/step": 11}, {"big": 4.0, "itwinai/step": float(BIG)},
                    {"loss": 5.0, "itwinai/step": 12}, {"strstep": 6.0, "itwinai/step": 13}]


def test_tensorboard_writes_a_step_kept_in_meta_at_int_of_it(meta_steps):
    """As SummaryWriter writes it (itwinai 0.4.2's TensorBoardLogger, run side by side:
    step 10.5 -> 10, '13' -> 13; it raises on 2**70, clamped here to int64's largest). A
    step int() refuses ('abc', on which itwinai raises) is written where TensorBoard puts a
    record without a step: at its journal seq (7)."""
    sync(meta_steps, "tensorboard")
    (path,) = (meta_steps / "tensorboard").rglob("rank-00000")
    acc = event_accumulator.EventAccumulator(str(path))
    acc.Reload()
    assert {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"]} == {
        "loss": [(10, 1.0), (11, 3.0), (12, 5.0)], "half": [(10, 2.0)],
        "big": [(2**63 - 1, 4.0)], "strstep": [(13, 6.0)], "odd": [(7, 7.0)]}
