"""End to end: journals written by the real loggers, replayed with `itwinai-sync --to prov4ml`,
and read back from the PROV-JSON documents and metric files yprov4ml wrote (with yprov4ml's own
getters and as plain CSV): one provenance run per rank, params, metrics with their context, step
and original timestamp, the measured kinds with yprov4ml's source labels, models; documents
regenerated deterministically and exactly once across re-syncs, resumed and live runs, and a
sync killed between its two renames."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
import types
from pathlib import Path

# Imported here, not lazily: the journal writer warms pyarrow up in a background thread, which
# imports pandas (yprov4ml's getters then find it half-initialised otherwise).
import pandas  # noqa: F401
import pytest
import torch
from click.testing import CliRunner
from conftest import child_env

from itwinai_journal import Journal, RankInfo
from itwinai_journal.loggers import LoggersCollection, MLFlowLogger, Prov4MLLogger
from itwinai_sync import compat
from itwinai_sync.cli import main
from itwinai_sync.targets.prov4ml import build, layout, measured, models, naming

pytest.importorskip("yprov4ml")

RUN = "run1"
EXP = "provexp"
#: yprov4ml's source labels (LoggingItemKind + get_source_from_kind); system metrics carry the
#: method that measured them, as yprov4ml's carry their hardware access mode.
SOURCES = {"flops_pb": "fvcore.nn.FlopCountAnalysis", "flops_pe": "fvcore.nn.FlopCountAnalysis",
           "carbon": "codecarbon", "execution_time": "std.time"}
#: What itwinai's Prov4MLLogger (yprov4ml 2.0.9) calls the journal's system and carbon fields,
#: and the factor to its units (percent, fractions, W, kWh, kg).
SYSTEM = {"cpu_percent_system": "cpu_usage", "memory_percent": "memory_usage",
          "disk_percent": "disk_usage"}
CARBON = {"emissions_total_g": ("emissions", 1e-3), "cpu_power_w": ("cpu_power", 1),
          "gpu_power_w": ("gpu_power", 1), "dram_power_w": ("ram_power", 1),
          "cpu_energy_total_j": ("cpu_energy", 1 / 3.6e6),
          "gpu_energy_total_j": ("gpu_energy", 1 / 3.6e6),
          "dram_energy_total_j": ("ram_energy", 1 / 3.6e6),
          "energy_total_j": ("energy_consumed", 1 / 3.6e6)}




# -- helpers ------------------------------------------------------------------------------------


def sync(savedir: Path, *args: str) -> str:
    result = CliRunner().invoke(main, [str(savedir), "--to", "prov4ml", *args],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def log_measured(logger: Prov4MLLogger, model: torch.nn.Module, step: int) -> None:
    """Each measured kind through the logger (FLOPs twice: yprov4ml shows running totals)."""
    batch = torch.randn(4, 3)
    logger.log((model, batch), "flops_batch", kind="flops_pb", step=step)
    logger.log((model, batch), "flops_batch", kind="flops_pb", step=step)
    logger.log((model, [batch, batch]), "flops_epoch", kind="flops_pe", step=step)
    logger.log(None, "system", kind="system", step=step)
    logger.log(None, "carbon", kind="carbon", step=step)
    logger.log(None, "carbon", kind="carbon", step=step)
    logger.log(None, "epoch_time", kind="execution_time", step=step)
    # the marker asking for the documents (not among Prov4MLLogger's supported kinds: written
    # as the capture writes it); the exporter makes the documents on every export anyway
    logger._writer.append((time.time(), "prov_documents", "prov_documents", None, None, None,
                           None, None, {"marker": True}, None))


def write_run(savedir: Path, ranks: tuple[int, ...] = (0, 1), **prov_options) -> None:
    """A two-logger run per rank (MLflow + Prov4ML in one collection, one journal)."""
    for rank in ranks:
        torch.manual_seed(rank)
        model = torch.nn.Linear(3, 2)
        prov = Prov4MLLogger(provenance_save_dir=str(savedir), experiment_name=EXP,
                             log_on_workers=-1, run_id=RUN, **prov_options)
        mlf = MLFlowLogger(savedir=savedir, experiment_name=EXP, log_freq="batch",
                           log_on_workers=-1, run_id=RUN)
        logger = LoggersCollection([mlf, prov])
        with logger.start_logging(rank=rank):
            logger.save_hyperparameters({"lr": 0.001, "optimizer": "adam", "layers": [3, 2],
                                         "rank_seed": rank})
            for step in range(4):
                logger.log(1.0 / (step + 1) + rank, "loss", step=step)
                logger.log(0.5 + step / 10, "acc", step=step, context="validation")
                # batch-level: only MLflow takes it (Prov4MLLogger logs per epoch)
                logger.log(9.0, "batch_loss", step=step, batch_idx=1)
            logger.log(0.25, "val:loss", step=3, context="validation")
            logger.log(model, "net", kind="model", step=1)
            logger.log(model, "net", kind="model", step=2)
            logger.log(model, "best", kind="best_model")
            log_measured(prov, model, step=3)


def rank_root(savedir: Path, rank: int) -> Path:
    return savedir / "prov" / EXP / RUN / f"rank-{rank:05d}"


def document(savedir: Path, rank: int, exp: str = EXP) -> Path:
    return rank_root(savedir, rank) / f"{exp}_0" / f"prov_{exp}_GR{rank}_0.json"


def read_csv(path: Path) -> list[tuple[int, float, int]]:
    with open(path, newline="") as f:
        return [(int(r["epoch"]), float(r["value"]), int(r["timestep"]))
                for r in csv.DictReader(f)]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def expected_metrics(savedir: Path, rank: int) -> dict[tuple[str, str, str], list[tuple]]:
    """From the journal: (name, context, source) -> [(step, value, timestamp ms)] of what the
    prov4ml target shows (the records routed to it, measured kinds field by field)."""
    table = Journal(savedir).records(run_id=RUN, rank=rank)
    out: dict[tuple[str, str, str], list[tuple]] = {}
    totals: dict[str, float] = {}
    for rec in table.to_pylist():
        meta = json.loads(rec["meta"]) if rec["meta"] else {}
        if "targets" in meta and "prov4ml" not in meta["targets"]:
            continue
        kind = rec["kind"]
        context = meta.get("context") or "training"
        point = (rec["step"] or 0, rec["time"])
        name = rec["name"].replace(":", "_")
        fields = json.loads(rec["text"] or "{}") if kind in ("system", "carbon") else {}
        if kind == "metric":
            out.setdefault((name, context, "None"), []).append((*point, rec["value"]))
        elif kind in ("flops_pb", "flops_pe"):  # yprov4ml logs the running total of the kind
            totals[kind] = totals.get(kind, 0) + rec["value"]
            out.setdefault((name, context, SOURCES[kind]), []).append((*point, totals[kind]))
        elif kind == "execution_time":
            out.setdefault((name, context, SOURCES[kind]), []).append((*point, rec["value"]))
        elif kind == "system":
            for key, value in fields.items():
                out.setdefault((SYSTEM.get(key, key), context, meta["method"]), []).append(
                    (*point, float(value)))
        elif kind == "carbon":
            for key, (label, factor) in CARBON.items():
                if key in fields:
                    out.setdefault((label, context, "codecarbon"), []).append(
                        (*point, fields[key] * factor))
            if "duration_s" in fields:
                out.setdefault(("emissions_rate", context, "codecarbon"), []).append(
                    (*point, fields["emissions_total_g"] / 1000 / fields["duration_s"]))
    return {k: sorted((step, value, int(round(t * 1000))) for step, t, value in v)
            for k, v in out.items()}


# -- the tests ----------------------------------------------------------------------------------


def test_export_documents_per_rank_and_exactly_once(tmp_path):
    savedir = tmp_path / "mllogs"
    write_run(savedir, save_after_n_logs=3)
    out = sync(savedir)
    assert "exported" in out and "failed" not in out.split("pairs,")[0]
    assert "name 'val:loss' is written as 'val_loss'" in out

    from yprov4ml.utils import getters

    for rank in (0, 1):
        doc_path = document(savedir, rank)
        doc = json.loads(doc_path.read_text())
        root = doc["activity"][f"{EXP}_GR{rank}_0"]
        assert root["yprov:global_rank"] == str(rank)  # not a no-op run for rank 1
        assert root["yprov:itwinai_run_id"] == RUN
        sessions = Journal(savedir).run(RUN).rank(rank).manifest["sessions"]
        assert root["prov:startedAtTime"] == build._iso(sessions[0]["start"])
        assert root["prov:endedAtTime"] == build._iso(sessions[-1]["end"])
        # params: inputs of the run, values as yprov4ml writes them (str of the value)
        entities = doc["entity"]
        assert entities["lr"]["prov:value"] == "0.001"
        assert entities["optimizer"]["prov:value"] == "adam"
        assert entities["layers"]["prov:value"] == "[3, 2]"
        assert entities["rank_seed"]["prov:value"] == str(rank)
        assert entities["lr"]["prov:type"] == "provml:HyperParameter"
        assert getters.get_parameter(str(doc_path), "lr", "value") == "0.001"
        # every metric of the journal, with context, step and original timestamp
        expected = expected_metrics(savedir, rank)
        assert ("loss", "training", "None") in expected
        assert ("acc", "validation", "None") in expected
        assert not any(name == "batch_loss" for name, _, _ in expected)
        metric_entities = {k: v for k, v in entities.items()
                           if v.get("prov:type") == "provml:Metric"}
        assert len(metric_entities) == len(expected)
        for (name, context, source), points in expected.items():
            entity_id = f"{name}//{context}" if source == "None" else \
                f"{source}//{name}//{context}"
            entity = metric_entities[entity_id]
            assert entity["yprov:context"] == context
            assert entity["yprov:source"] == source
            path = Path(entity["dcterms:identifier"])
            assert path.parent == rank_root(savedir, rank) / f"{EXP}_0" / f"metrics_GR{rank}"
            assert sorted(read_csv(path)) == points, (name, context)
        frame = getters.get_metric(str(doc_path), "loss", "training", "None")
        assert frame["value"].tolist() == pytest.approx([1.0 + rank, 0.5 + rank,
                                                         1 / 3 + rank, 0.25 + rank])
        assert frame["epoch"].tolist() == [0, 1, 2, 3]
        # measured kinds: yprov4ml's names and source labels, the method that measured them
        labels = {v["yprov:source"] for v in metric_entities.values()}
        assert {"fvcore.nn.FlopCountAnalysis", "std.time"} <= labels
        assert labels & {"psutil", "procfs"}
        flops = metric_entities["fvcore.nn.FlopCountAnalysis//flops_batch//training"]
        assert flops["yprov:measurement_method"] == "fvcore.nn.FlopCountAnalysis"
        totals = [v for _, v, _ in expected[("flops_batch", "training", SOURCES["flops_pb"])]]
        assert totals == [24.0, 48.0]  # Linear(3, 2) on 4 rows: 24 multiply-adds, summed
        system = {name for name, _, source in expected if source in ("psutil", "procfs")}
        assert {"cpu_usage", "memory_usage", "disk_usage"} <= system
        # models: two versions and the best model, as files of the journal's bytes
        art = rank_root(savedir, rank) / f"{EXP}_0" / f"artifacts_GR{rank}"
        torch.manual_seed(rank)
        weights = torch.nn.Linear(3, 2).state_dict()  # the model write_run logs
        for entity_id, file in (("torch//net_0//training", art / "net" / "net_0.pt"),
                                ("torch//net_1//training", art / "net" / "net_1.pt"),
                                ("torch//best//training", art / "best" / "best.pt")):
            assert entities[entity_id]["prov:type"] == "provml:Model"
            assert entities[entity_id]["dcterms:identifier"] == str(file)
            state = torch.load(file, weights_only=True)  # a state_dict, as yprov4ml saves
            assert list(state) == list(weights)
            assert all(torch.equal(state[k], weights[k]) for k in weights)
        assert entities["torch//best//training"]["yprov:best_total_params"]["$"] == "8"
        assert doc_path.with_suffix(".dot").stat().st_size > 0  # create_graph=True
        cursor = json.loads((doc_path.parent / layout.MARKER).read_text())["cursor"]
        assert cursor == Journal(savedir).run(RUN).rank(rank).last_seq

    # a second sync: nothing to do, the documents are untouched (byte for byte)
    before = snapshot(savedir / "prov")
    out = sync(savedir)
    assert "up-to-date" in out
    assert snapshot(savedir / "prov") == before
    # rebuilt from scratch (markers gone): the same bytes, and still one run folder per rank
    for rank in (0, 1):
        (document(savedir, rank).parent / layout.MARKER).unlink()
    sync(savedir)
    assert snapshot(savedir / "prov") == before
    for rank in (0, 1):
        assert [p.name for p in rank_root(savedir, rank).iterdir()] == [f"{EXP}_0"]
    assert sorted(p.name for p in rank_root(savedir, 0).parent.iterdir()) == [
        ".itwinai-journal.json", "rank-00000", "rank-00001"]  # the marker: whose run it is


def test_resumed_run_is_regenerated_not_appended(tmp_path):
    savedir = tmp_path / "mllogs"
    write_run(savedir, ranks=(0,))
    sync(savedir)
    first = expected_metrics(savedir, 0)
    prov = Prov4MLLogger(provenance_save_dir=str(savedir), experiment_name=EXP,
                         log_on_workers=-1, run_id=RUN)
    with prov.start_logging(rank=0):  # the job resumed: a new session, seq continues
        for step in range(4, 7):
            prov.log(0.1 * step, "loss", step=step)
    sync(savedir)
    expected = expected_metrics(savedir, 0)
    assert len(expected[("loss", "training", "None")]) == 7
    assert expected[("acc", "validation", "None")] == first[("acc", "validation", "None")]
    doc = json.loads(document(savedir, 0).read_text())
    path = Path(doc["entity"]["loss//training"]["dcterms:identifier"])
    assert sorted(read_csv(path)) == expected[("loss", "training", "None")]  # each point once
    assert [p.name for p in rank_root(savedir, 0).iterdir()] == [f"{EXP}_0"]


def test_a_commit_builds_from_what_the_documents_hold_not_from_the_journal(tmp_path):
    """Commits are incremental in what they read: the records committed documents cover are
    kept beside them, and a later sync takes only the new ones from the engine. Shown by moving
    the first session's segments out of the journal before the second sync: the rebuilt
    documents still hold every point of both sessions, once."""
    savedir = tmp_path / "mllogs"
    write_run(savedir, ranks=(0,))
    sync(savedir)
    folder = document(savedir, 0).parent
    cursor = json.loads((folder / layout.MARKER).read_text())["cursor"]
    assert (folder / layout.HELD).is_file()
    prov = Prov4MLLogger(provenance_save_dir=str(savedir), experiment_name=EXP,
                         log_on_workers=-1, run_id=RUN)
    with prov.start_logging(rank=0):  # the job resumed: a new session, seq continues
        for step in range(4, 7):
            prov.log(0.1 * step, "loss", step=step)
    expected = expected_metrics(savedir, 0)

    rank_dir = savedir / EXP / RUN / "rank-00000"
    index = [json.loads(line) for line in (rank_dir / "index.jsonl").read_text().splitlines()]
    old = [e for e in index if e["last_seq"] <= cursor]
    assert old and len(old) < len(index)
    aside = tmp_path / "aside"
    aside.mkdir()
    for entry in old:
        (rank_dir / "segments" / entry["file"]).rename(aside / entry["file"])
    sync(savedir)

    doc = json.loads(document(savedir, 0).read_text())
    path = Path(doc["entity"]["loss//training"]["dcterms:identifier"])
    assert sorted(read_csv(path)) == expected[("loss", "training", "None")]
    assert len(expected[("loss", "training", "None")]) == 7
    marker = json.loads((folder / layout.MARKER).read_text())
    assert marker["cursor"] == index[-1]["last_seq"] > cursor


def test_unreadable_records_beside_the_documents_are_one_error_and_a_rebuild(tmp_path):
    """The records kept beside the documents damaged: the rank fails with one line saying what
    to delete, and once it is deleted the next sync rebuilds every point from the journal."""
    savedir = tmp_path / "mllogs"
    write_run(savedir, ranks=(0,))
    sync(savedir)
    folder = document(savedir, 0).parent
    prov = Prov4MLLogger(provenance_save_dir=str(savedir), experiment_name=EXP,
                         log_on_workers=-1, run_id=RUN)
    with prov.start_logging(rank=0):
        prov.log(0.5, "loss", step=9)
    (folder / layout.HELD).write_bytes(b"not arrow")
    result = CliRunner().invoke(main, [str(savedir), "--to", "prov4ml"])
    assert result.exit_code == 1
    assert f"{folder / layout.HELD} cannot be read" in result.output
    assert "delete it, and the next sync rebuilds" in result.output
    (folder / layout.HELD).unlink()
    sync(savedir)
    doc = json.loads(document(savedir, 0).read_text())
    path = Path(doc["entity"]["loss//training"]["dcterms:identifier"])
    expected = expected_metrics(savedir, 0)[("loss", "training", "None")]
    assert sorted(read_csv(path)) == expected and (9, 0.5) in {r[:2] for r in expected}


def test_live_rank_is_exported_up_to_its_last_record(tmp_path):
    savedir = tmp_path / "mllogs"
    prov = Prov4MLLogger(provenance_save_dir=str(savedir), experiment_name=EXP,
                         log_on_workers=-1, run_id=RUN, create_graph=False, create_svg=False)
    with prov.start_logging(rank=0):
        prov.save_hyperparameters({"lr": 0.1})
        prov.log(1.0, "loss", step=0)
        prov._writer.flush()
        sync(savedir)  # the rank is running: built when the sync closes it
        doc = json.loads(document(savedir, 0).read_text())
        assert doc["entity"]["lr"]["prov:value"] == "0.1"
        assert "loss//training" in doc["entity"]
        assert not document(savedir, 0).with_suffix(".dot").exists()  # create_graph=False
        prov.log(2.0, "loss", step=1)
    sync(savedir)
    doc = json.loads(document(savedir, 0).read_text())
    path = Path(doc["entity"]["loss//training"]["dcterms:identifier"])
    assert [(e, v) for e, v, _ in read_csv(path)] == [(0, 1.0), (1, 2.0)]
    session = Journal(savedir).run(RUN).rank(0).manifest["sessions"][-1]
    assert doc["activity"][f"{EXP}_GR0_0"]["prov:endedAtTime"] == build._iso(session["end"])


def test_crash_between_renames_and_leftovers(tmp_path):
    savedir = tmp_path / "mllogs"
    write_run(savedir, ranks=(0,))
    sync(savedir)
    before = snapshot(savedir / "prov")
    run_dir = rank_root(savedir, 0).parent
    # killed after renaming the old documents aside, before renaming the new ones in
    rank_root(savedir, 0).rename(run_dir / f"{layout.OLD_PREFIX}00000-dead")
    (run_dir / f"{layout.TMP_PREFIX}00000-half").mkdir()
    (run_dir / f"{layout.TMP_PREFIX}00000-half" / "junk").write_text("x")
    out = sync(savedir)
    assert "up-to-date" in out  # the old documents are back, with their cursor
    assert snapshot(savedir / "prov") == before
    assert sorted(p.name for p in run_dir.iterdir()) == [".itwinai-journal.json", "rank-00000"]


def test_svg_needs_graphviz(tmp_path, monkeypatch):
    savedir = tmp_path / "mllogs"
    prov = Prov4MLLogger(provenance_save_dir=str(savedir), experiment_name=EXP,
                         log_on_workers=-1, run_id=RUN, create_graph=True, create_svg=True)
    with prov.start_logging(rank=0):
        prov.log(1.0, "loss", step=0)
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    out = sync(savedir)
    assert "Graphviz 'dot' is not installed" in out
    assert document(savedir, 0).with_suffix(".dot").stat().st_size > 0
    assert not document(savedir, 0).with_suffix(".svg").exists()


@pytest.mark.parametrize("works", [True, False])
def test_svg_through_dot(tmp_path, monkeypatch, works):
    """How Graphviz is called (a stand-in `dot` on PATH), and a failing `dot` reported."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = ('#!/bin/sh\n[ "$1" = -Tsvg ] && [ "$3" = -o ] && [ -s "$2" ] || exit 2\n'
              'printf "<svg/>" > "$4"\n') if works else \
        '#!/bin/sh\necho "syntax error in line 1" >&2\nprintf partial > "$4"\nexit 1\n'
    (bin_dir / "dot").write_text(script)
    (bin_dir / "dot").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    savedir = tmp_path / "mllogs"
    prov = Prov4MLLogger(provenance_save_dir=str(savedir), experiment_name=EXP,
                         log_on_workers=-1, run_id=RUN)
    with prov.start_logging(rank=0):
        prov.log(1.0, "loss", step=0)
    out = sync(savedir)
    svg = document(savedir, 0).with_suffix(".svg")
    if works:
        assert svg.read_text() == "<svg/>"
    else:
        assert "could not render" in out and "syntax error in line 1" in out
        assert not svg.exists()


@pytest.mark.skipif(build.shutil.which("dot") is None, reason="Graphviz is not installed")
def test_svg_with_graphviz(tmp_path):
    savedir = tmp_path / "mllogs"
    prov = Prov4MLLogger(provenance_save_dir=str(savedir), experiment_name=EXP,
                         log_on_workers=-1, run_id=RUN)
    with prov.start_logging(rank=0):
        prov.log(1.0, "loss", step=0)
    sync(savedir)
    assert b"<svg" in document(savedir, 0).with_suffix(".svg").read_bytes()


def test_dir_option_and_dry_run(tmp_path):
    savedir = tmp_path / "mllogs"
    write_run(savedir, ranks=(0,))
    target = tmp_path / "elsewhere"
    result = CliRunner().invoke(main, [str(savedir), "--to", "prov4ml", "--dir", str(target),
                                       "--dry-run"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert not target.exists()
    sync(savedir, "--dir", str(target))
    assert (target / EXP / RUN / "rank-00000" / f"{EXP}_0" / f"prov_{EXP}_GR0_0.json").exists()
    assert not (savedir / "prov").exists()


def test_module_import_is_light():
    code = ("import sys, itwinai_sync.targets.prov4ml.exporter; "
            "assert 'yprov4ml' not in sys.modules and 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env=child_env())


def test_prov_name_mapping():
    assert naming.prov_name("train/loss", 100) == "train_loss"
    assert naming.prov_name("val:acc", 100) == "val_acc"
    assert naming.prov_name("..", 100) == "__"
    long = naming.prov_name("x" * 300, 60)
    assert len(long) == 60 and long != naming.prov_name("x" * 299, 60)


class _Evil:
    """Runs a command when unpickled by a normal unpickler."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, (["touch", str(self.marker)],))


def test_model_state_dict_is_read_without_running_journal_code(tmp_path):
    """The journal's `torch.save` of a module becomes its state_dict without importing its
    class (here a module that exists nowhere) and without calling anything it names."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
            self.register_buffer("scratch", torch.zeros(2), persistent=False)
            self.payload = _Evil(tmp_path / "ran")

    # pickled as a class of a training package that the sync side does not have
    package = types.ModuleType("no_such_training_package")
    Net.__module__, Net.__qualname__, package.Net = package.__name__, "Net", Net
    net = Net()
    path = tmp_path / "net.pt"
    sys.modules[package.__name__] = package
    try:
        torch.save(net, path)
    finally:
        del sys.modules[package.__name__]
    with open(path, "rb") as f:
        state = models.state_dict_from_module(f)
    assert not (tmp_path / "ran").exists()
    expected = {k: v for k, v in net.state_dict().items()}
    assert list(state) == list(expected)  # parameters, persistent buffers, submodules
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    torch.save(torch.zeros(3), path)
    with open(path, "rb") as f, pytest.raises(models.NotAModule,
                                               match="holds a Tensor, not a torch.nn.Module"):
        models.state_dict_from_module(f)


def test_a_model_torch_cannot_read_safely_is_written_as_its_file_and_says_why(
        tmp_path, monkeypatch):
    """Without torch's `get_unsafe_globals_in_checkpoint` (torch before 2.5) a module's pickle
    cannot be read without running it: the journal's file is written, and the note says why
    (not that it is not a module); a file that is not a torch.save file says so too."""
    prov = Prov4MLLogger(provenance_save_dir=str(tmp_path / "mllogs"), run_id=RUN,
                         create_graph=False, create_svg=False)
    with prov.start_logging():
        prov.log(torch.nn.Linear(2, 2), "net", kind="model")
    monkeypatch.delattr(torch.serialization, "get_unsafe_globals_in_checkpoint")
    result = CliRunner().invoke(main, [str(tmp_path / "mllogs"), "--to", "prov4ml"])
    assert result.exit_code == 0, result.output
    assert (f"model 'net' is written as the journal's torch.save file, not as a state_dict: "
            f"torch {torch.__version__} cannot read a module's pickle without running it"
            ) in " ".join(result.output.split())
    (written,) = (tmp_path / "mllogs" / "prov").rglob("net_0.pt")
    (blob,) = [p for p in (tmp_path / "mllogs").rglob("blobs/*/*")]
    assert written.read_bytes() == blob.read_bytes()
    monkeypatch.undo()
    (tmp_path / "junk").write_bytes(b"not a zip")
    with open(tmp_path / "junk", "rb") as f, pytest.raises(
            models.NotAModule, match="weights-only unpickler cannot read it"):
        models.state_dict_from_module(f)


def test_measured_view_names_units_and_totals():
    """MeasuredView, field by field, against what yprov4ml 2.0.9's helpers log."""
    rank = RankInfo(0, Path("."), {"sessions": [{"start": 100.0}, {"start": 200.0}]})
    view = measured.MeasuredView(rank)
    # FLOPs: one running total per kind across labels, reset by a new session
    assert view.metrics("flops_pb", "a", 10.0, None, {}, 101.0) == [("a", 10.0, None)]
    assert view.metrics("flops_pb", "b", 5.0, None, {}, 102.0) == [("b", 15.0, None)]
    assert view.metrics("flops_pe", "a", 7.0, None, {}, 103.0) == [("a", 7.0, None)]
    assert view.metrics("flops_pb", "a", 1.0, None, {}, 201.0) == [("a", 1.0, None)]
    # a journal written when FLOPs were FlopCounterMode's (two per multiply-add)
    assert view.metrics("flops_pb", "a", 8.0, None, {"method": "FlopCounterMode"}, 202.0) == [
        ("a", 5.0, "FlopCounterMode/2")]
    # execution time: Unix seconds; older journals' seconds since the session started
    assert view.metrics("execution_time", "t", 123.5, None, {}, 0) == [("t", 123.5, None)]
    assert view.metrics("execution_time", "t", 3.0, None,
                        {"method": "session_clock", "session_start": 200.0}, 0) == [
        ("t", 203.0, "session_clock + session_start")]
    system = {"cpu_percent_system": 12.5, "memory_percent": 40.0, "disk_percent": 71.2,
              "process_rss_bytes": 1e8, "gpu1_utilization_percent": 80.0,
              "gpu1_memory_used_bytes": 4.0, "gpu1_memory_total_bytes": 16.0,
              "gpu1_temperature_c": 60.0, "gpu1_power_w": 250.0, "gpu0_power_w": 90.0}
    shown = {n: v for n, v, _ in view.metrics("system", "system", None, json.dumps(system),
                                               {"gpu_current": 1}, 0)}
    assert {k: shown[k] for k in ("cpu_usage", "memory_usage", "disk_usage", "gpu_usage",
                                  "gpu_memory_usage", "gpu_temperature", "gpu_power_usage")} == {
        "cpu_usage": 12.5, "memory_usage": 40.0, "disk_usage": 71.2, "gpu_usage": 0.8,
        "gpu_memory_usage": 0.25, "gpu_temperature": 60.0, "gpu_power_usage": 250.0}
    assert shown["process_rss_bytes"] == 1e8 and shown["gpu0_power_w"] == 90.0
    assert "cpu_percent_system" not in shown
    carbon = {"interval_s": 5.0, "energy_j": 360.0, "energy_total_j": 7200.0,
              "emissions_total_g": 2.0, "duration_s": 10.0, "cpu_energy_total_j": 3600.0,
              "dram_energy_total_j": 36.0, "cpu_power_w": 65.0, "dram_power_w": 4.0}
    shown = view.metrics("carbon", "co2", 2.0, json.dumps(carbon), {}, 0)
    assert [n for n, _, _ in shown] == ["emissions", "emissions_rate", "cpu_power", "ram_power",
                                        "cpu_energy", "ram_energy", "energy_consumed"]
    assert [v for _, v, _ in shown] == pytest.approx([0.002, 0.0002, 65.0, 4.0, 0.001, 1e-05,
                                                      0.002])  # kg, kg/s, W, kWh
    assert view.metrics("carbon", "co2", None, "{}", {}, 0) == []  # a baseline


def test_an_unsupported_yprov4ml_is_named(tmp_path, monkeypatch):
    """itwinai pins yprov4ml 2.0.9, whose API (Context enums, no run index or timestamps) and
    documents differ: the exporter says so instead of failing inside yprov4ml."""
    prov = Prov4MLLogger(provenance_save_dir=str(tmp_path), run_id=RUN)
    with prov.start_logging():
        prov.log(1.0, "loss", step=0)
    monkeypatch.setattr(compat, "yprov4ml_version", lambda: "2.0.9")
    result = CliRunner().invoke(main, [str(tmp_path), "--to", "prov4ml"])
    assert result.exit_code != 0
    assert "drives yprov4ml 3.2.x; 2.0.9 is installed" in result.output
