"""One small training, logged through itwinai 0.4.2's real loggers and through ours, and
readers that say what each tracker then holds, in one comparable form.

Used by `scripts/record_itwinai_reference.py`, which runs the reference side in itwinai's own
virtualenv (itwinai cannot be installed beside our pinned torch) and our side in ours, prints
both side by side and records the reference's tracker contents in
`tests/reference/trackers-itwinai-0.4.2.json`; and by `tests/test_itwinai_fidelity.py`, which
runs our side and checks it against that recording.

Each tracker gets its own logger (not a collection), so that a call one of itwinai's loggers
fails on does not stop the others; every call that raises is recorded with its error, as
part of the reference's behaviour (the training would have stopped there).

Nothing reaches the network: W&B is offline, every directory is a temporary one, and on the
reference side codecarbon (which yprov4ml starts with every run) is given its location instead
of looking it up online, with HTTP(S) proxies pointing at a closed local port as a guard.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXPERIMENT = "fidelity"
#: Hyperparameters of the training: every type itwinai's loggers treat differently.
PARAMS = {"lr": 0.01, "batch_size": 4, "amp": True, "note": None, "layers": [3, 2],
          "optimizer": "sgd"}
EPOCHS, BATCHES = 2, 3
#: The W&B history key that carries the journal's step in our export.
STEP_KEY = "itwinai/step"


SetEnv = Callable[[str, str], None]


def isolate_wandb(tmp: Path, setenv: SetEnv) -> None:
    """W&B offline and silent, all its directories under `tmp`."""
    setenv("WANDB_MODE", "offline")
    setenv("WANDB_SILENT", "true")
    setenv("NETRC", str(tmp / "no-netrc"))
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        path = tmp / "wandb-env" / var.lower()
        path.mkdir(parents=True, exist_ok=True)
        setenv(var, str(path))


# -- the training ---------------------------------------------------------------------------------


def train(logger: Any, errors: list[str]) -> None:
    """A two-epoch training of a Linear(3, 2), logging every kind itwinai's loggers know, with
    batch metrics at the global step and epoch metrics at step=epoch (the README's pattern).
    A call that raises is recorded in `errors` and the training goes on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from torch.utils.data import TensorDataset

    def call(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - the reference's behaviour, recorded
            errors.append(f"{what}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    data = [(torch.randn(4, 3), torch.randn(4, 2)) for _ in range(BATCHES)]
    dataset = TensorDataset(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data]))
    opt = torch.optim.SGD(model.parameters(), lr=PARAMS["lr"])
    logger.create_logger_context()
    call("save_hyperparameters", logger.save_hyperparameters, PARAMS)
    call("watch", logger.log, model, "model", kind="watch")
    step = 0
    for epoch in range(EPOCHS):
        for batch_idx, (x, y) in enumerate(data):
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            call("metric", logger.log, loss.item(), "train_loss", step=step, batch_idx=batch_idx)
            call("flops_pb", logger.log, (model, (x, y)), "flops_batch", kind="flops_pb",
                 step=step, batch_idx=batch_idx)
            step += 1
        with torch.no_grad():
            val = torch.nn.functional.mse_loss(model(dataset.tensors[0]),
                                               dataset.tensors[1]).item()
        call("metric", logger.log, val, "val_loss", step=epoch)
        call("text", logger.log, f"epoch {epoch} done", "status", kind="text", step=epoch)
        call("dict", logger.log, {"val_loss": val, "best": {"epoch": epoch}}, "summary",
             kind="dict", step=epoch)
        call("flops_pe", logger.log, (model, dataset), "flops_epoch", kind="flops_pe",
             step=epoch)
        call("system", logger.log, None, "system", kind="system", step=epoch)
        call("carbon", logger.log, None, "carbon", kind="carbon", step=epoch)
        call("execution_time", logger.log, None, "epoch_time", kind="execution_time",
             step=epoch)
        call("model", logger.log, model, "net", kind="model", step=epoch)
    image = torch.arange(3 * 8 * 6, dtype=torch.uint8).reshape(3, 8, 6)  # CHW
    call("image", logger.log, image, "sample", kind="image", step=EPOCHS)
    fig, ax = plt.subplots(figsize=(3, 2), dpi=50)
    ax.plot([1, 3, 2])
    call("figure", logger.log, fig, "curve", kind="figure", step=EPOCHS)
    plt.close(fig)
    call("torch", logger.log, torch.arange(6.0), "weights_vec", kind="torch")
    call("best_model", logger.log, model, "best", kind="best_model")
    logger.destroy_logger_context()


def make_loggers(module: Any, savedir: Path) -> dict[str, Any]:
    """The three loggers, from `module` (itwinai.loggers or itwinai_journal.loggers), with
    the same arguments on both sides."""
    return {
        "wandb": module.WandBLogger(savedir=savedir / "wandb-logs", project_name=EXPERIMENT,
                                    log_freq="batch", offline_mode=True),
        "tensorboard": module.TensorBoardLogger(savedir=savedir / "tb-logs", log_freq="batch"),
        "prov4ml": module.Prov4MLLogger(provenance_save_dir=str(savedir / "prov-logs"),
                                        experiment_name=EXPERIMENT, log_freq="batch",
                                        create_graph=False, create_svg=False),
    }


# -- the two sides --------------------------------------------------------------------------------


def keep_codecarbon_offline() -> None:
    """yprov4ml 2.0.9 starts codecarbon's online EmissionsTracker with every run, which looks
    up its location and cloud provider over HTTP: give it both instead."""
    os.environ["HTTP_PROXY"] = os.environ["HTTPS_PROXY"] = "http://127.0.0.1:9"
    os.environ.pop("NO_PROXY", None)
    os.environ.pop("no_proxy", None)
    import codecarbon.emissions_tracker as tracker
    from codecarbon.external.geography import CloudMetadata, GeoMetadata

    tracker.EmissionsTracker._get_geo_metadata = (  # type: ignore[method-assign]
        lambda self: GeoMetadata(country_iso_code="DEU", country_name="Germany"))
    tracker.EmissionsTracker._get_cloud_metadata = (  # type: ignore[method-assign]
        lambda self: CloudMetadata(provider=None, region=None))


def run_reference(tmp: Path) -> dict[str, Any]:
    """Train with itwinai's loggers (in itwinai's virtualenv) and read the trackers."""
    isolate_wandb(tmp, os.environ.__setitem__)
    keep_codecarbon_offline()
    import itwinai.loggers

    loggers = make_loggers(itwinai.loggers, tmp)
    out: dict[str, Any] = {"versions": _versions(["itwinai", "wandb", "tensorboard",
                                                  "yprov4ml", "torch"])}
    for target, logger in loggers.items():
        errors: list[str] = []
        train(logger, errors)
        out[target] = {"errors": errors}
    out["wandb"].update(read_wandb(tmp / "wandb-logs"))
    out["tensorboard"].update(read_tensorboard(tmp / "tb-logs"))
    out["prov4ml"].update(read_prov4ml(tmp / "prov-logs"))
    return out


def run_ours(tmp: Path, setenv: SetEnv = os.environ.__setitem__) -> dict[str, Any]:
    """Train with our loggers, export each journal with `itwinai-sync --to <target>` and
    read the trackers."""
    isolate_wandb(tmp, setenv)
    from click.testing import CliRunner

    import itwinai_journal.loggers
    from itwinai_sync.cli import main

    loggers = make_loggers(itwinai_journal.loggers, tmp)
    out: dict[str, Any] = {"versions": _versions(["itwinai-sync", "wandb", "tensorboard",
                                                  "yprov4ml", "torch"])}
    for target, logger in loggers.items():
        errors: list[str] = []
        train(logger, errors)
        result = CliRunner().invoke(main, [str(logger.journal_savedir), "--to", target])
        out[target] = {"errors": errors, "sync_exit_code": result.exit_code,
                       "sync_output": result.output}
    out["wandb"].update(read_wandb(tmp / "wandb-logs" / "wandb"))
    out["tensorboard"].update(read_tensorboard(tmp / "tb-logs" / "tensorboard"))
    out["prov4ml"].update(read_prov4ml(tmp / "prov-logs" / "prov"))
    return out


def _versions(names: list[str]) -> dict[str, str]:
    from importlib import metadata

    found = {"python": sys.version.split()[0]}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


# -- readers --------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A JSON-comparable value: media as their W&B `_type`, floats as floats."""
    if isinstance(value, dict):
        if "_type" in value:
            return {"_type": value["_type"]}
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    return repr(value)


def read_wandb(root: Path) -> dict[str, Any]:
    """What W&B holds: per history key the values in row order (media by type), the
    journal step of each (ours: `itwinai/step`; itwinai's WandBLogger has none), the config,
    the summary keys, the artifacts, and the number of rows."""
    sys.path.insert(0, str(Path(__file__).parent))
    import wandb_records as wr

    files = sorted(root.rglob("run-*.wandb"))
    records = [r for f in files for r in wr.read_records(f)]
    rows = wr.history_rows(records)
    history: dict[str, list[Any]] = {}
    steps: dict[str, list[Any]] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("_") or key == STEP_KEY:
                continue
            history.setdefault(key, []).append(_plain(value))
            steps.setdefault(key, []).append(row.get(STEP_KEY))
    config = {k: v for k, v in wr.config(records).items()
              if k not in ("_wandb", "itwinai_journal")}
    summary = sorted(k for k in wr.summary(records) if not k.startswith("_"))
    artifacts = sorted(f"{r.artifact.type}:{r.artifact.name}" for r in records
                       if r.WhichOneof("record_type") == "artifact")
    return {"rows": len(rows), "history": history, "steps": steps, "config": config,
            "summary_keys": summary, "artifacts": artifacts}


def read_tensorboard(root: Path) -> dict[str, Any]:
    """What TensorBoard holds, over every run directory below `root`: scalars, text,
    images (step, width, height) by tag, and the hparams of the HParams plugin."""
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.plugins.hparams import metadata as hp_metadata

    scalars: dict[str, list] = {}
    texts: dict[str, list] = {}
    images: dict[str, list] = {}
    hparams: dict[str, Any] = {}
    runs = sorted({p.parent for p in root.rglob("*tfevents*") if ".tmp" not in p.name})
    for run in runs:
        acc = ea.EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0,
                                                           "images": 0})
        acc.Reload()
        tags = acc.Tags()
        for tag in tags["scalars"]:
            scalars[tag] = [[e.step, e.value] for e in acc.Scalars(tag)]
        for tag in tags["tensors"]:
            if acc.SummaryMetadata(tag).plugin_data.plugin_name == "text":
                texts[tag] = [[e.step, e.tensor_proto.string_val[0].decode()]
                              for e in acc.Tensors(tag)]
        for tag in tags["images"]:
            images[tag] = [[e.step, e.width, e.height] for e in acc.Images(tag)]
        try:
            content = acc.SummaryMetadata(hp_metadata.SESSION_START_INFO_TAG)
        except KeyError:
            continue
        info = hp_metadata.parse_session_start_info_plugin_data(content.plugin_data.content)
        for key, value in info.hparams.items():
            hparams[key] = getattr(value, value.WhichOneof("kind"))
    return {"run_dirs": len(runs), "scalars": scalars, "texts": texts, "images": images,
            "hparams": hparams}


def read_prov4ml(root: Path) -> dict[str, Any]:
    """What the Prov4ML documents hold, in a form that does not depend on the yprov4ml
    version that wrote them: metric series by (name, context) from the metric CSV files
    (yprov4ml 2 writes contexts as `Context.TRAINING`), params from the PROV-JSON (2.x:
    attributes of the context activity; 3.x: entities), and the files under
    artifacts_GR<r>/ with, for .pt files, what they hold (state_dict keys or a type)."""
    metrics: dict[str, list] = {}
    for path in sorted(root.rglob("metrics_GR*/*.csv")):
        name, context, series = _read_metric_csv(path)
        metrics[f"{name}|{context}"] = series
    params: dict[str, str] = {}
    for doc_path in sorted(root.rglob("prov_*.json")):
        params.update(_params_of(json.loads(doc_path.read_text())))
    files: dict[str, str] = {}
    for path in sorted(root.rglob("artifacts_GR*/**/*")):
        if path.is_file():
            rel = str(path.relative_to(next(p for p in path.parents
                                            if p.name.startswith("artifacts_GR"))))
            files[rel] = _what_file_holds(path)
    return {"metrics": metrics, "params": params, "files": files}


def _read_metric_csv(path: Path) -> tuple[str, str, list]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    if header[:2] == ["epoch", "value"]:  # yprov4ml 3: the name and context are in the file's
        stem = path.stem.rsplit("_GR", 1)[0]  # name: <name>_<context>_<source>
        name, context = _name_context_3(path, stem)
    else:  # yprov4ml 2: "<name>,Context.<CONTEXT>,<source>" then epoch,value,timestamp
        name, context = header[0], header[1].removeprefix("Context.").lower()
    series = [[int(r[0]), _number(r[1])] for r in body if r]
    return name, context, series


def _name_context_3(path: Path, stem: str) -> tuple[str, str]:
    """(name, context) of a yprov4ml 3 metric file, from the PROV-JSON entity that names it."""
    for doc_path in path.parent.parent.glob("prov_*.json"):
        for entity in json.loads(doc_path.read_text()).get("entity", {}).values():
            if entity.get("dcterms:identifier") == str(path):  # label: [source//]name//context
                label = str(entity.get("prov:label") or stem)
                return label.split("//")[-2], str(entity.get("yprov:context"))
    return stem, ""


def _number(text: str) -> float | str:
    try:
        value = float(text)
    except ValueError:
        return text
    return value if math.isfinite(value) else text


def _params_of(doc: dict[str, Any]) -> dict[str, str]:
    params: dict[str, str] = {}
    for entity in doc.get("entity", {}).values():  # yprov4ml 3
        if entity.get("prov:type") == "provml:HyperParameter":
            params[str(entity.get("prov:label"))] = str(entity.get("prov:value"))
    for activity_id, activity in doc.get("activity", {}).items():  # yprov4ml 2
        if activity_id.startswith("context:Context."):
            for key, value in activity.items():
                if key.startswith("yProv4ML:") and key != "yProv4ML:level":
                    params[key.removeprefix("yProv4ML:")] = _prov2_value(value)
    return params


def _prov2_value(value: Any) -> str:
    """A yprov4ml 2 param as text: typed literals by their text, values it could not type
    (`str({'$': str(value), 'type': ...})`) by the str() inside."""
    if isinstance(value, dict):
        return str(value.get("$"))
    if isinstance(value, str) and value.startswith("{'$': "):
        import ast

        return str(ast.literal_eval(value)["$"])
    return str(value)


def _what_file_holds(path: Path) -> str:
    if path.suffix != ".pt":
        return f"{path.stat().st_size} bytes"
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a whole pickled module, say
        return f"not weights-only loadable ({type(e).__name__})"
    if isinstance(obj, dict):
        return "state_dict: " + ", ".join(f"{k}{list(v.shape)}" for k, v in obj.items())
    return type(obj).__name__


# -- comparing --------------------------------------------------------------------------------


#: Prov4ML metrics whose values depend on the machine and the moment (system, carbon, clock):
#: compared by steps only, and left out of the recorded reference.
VOLATILE = frozenset({"cpu_usage", "memory_usage", "disk_usage", "gpu_memory_usage",
                      "gpu_usage", "gpu_temperature", "gpu_power_usage", "emissions",
                      "emissions_rate", "cpu_power", "gpu_power", "ram_power", "cpu_energy",
                      "gpu_energy", "ram_energy", "energy_consumed", "epoch_time"})


def without_volatile(side: dict[str, Any]) -> dict[str, Any]:
    """`side` with the values of VOLATILE metrics replaced by None (steps kept)."""
    out = json.loads(json.dumps(side))
    for key, series in out["prov4ml"]["metrics"].items():
        if key.split("|")[0] in VOLATILE:
            out["prov4ml"]["metrics"][key] = [[step, None] for step, _ in series]
    return out


def compare(reference: dict[str, Any], ours: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(target, item, verdict) rows: 'same', or what differs, side by side."""
    ref, our = without_volatile(reference), without_volatile(ours)
    rows: list[tuple[str, str, str]] = []

    def diff(target: str, what: str, a: Any, b: Any) -> None:
        if a == b:
            rows.append((target, what, "same"))
        elif a is None:
            rows.append((target, what, f"only ours: {_short(b)}"))
        elif b is None:
            rows.append((target, what, f"only itwinai: {_short(a)}"))
        else:
            rows.append((target, what, f"itwinai {_short(a)} | ours {_short(b)}"))

    for target in ("wandb", "tensorboard", "prov4ml"):
        diff(target, "calls that raised", ref[target]["errors"] or None,
             our[target]["errors"] or None)
    w, v = ref["wandb"], our["wandb"]
    diff("wandb", "history rows (W&B _step)", w["rows"], v["rows"])
    for key in sorted(set(w["history"]) | set(v["history"])):
        diff("wandb", f"history {key!r}", w["history"].get(key), v["history"].get(key))
    for key in sorted(v["steps"]):
        diff("wandb", f"journal step of {key!r}", None, v["steps"][key])
    diff("wandb", "config", w["config"], v["config"])
    diff("wandb", "summary keys", w["summary_keys"], v["summary_keys"])
    diff("wandb", "artifacts", w["artifacts"] or None, v["artifacts"] or None)
    t, u = ref["tensorboard"], our["tensorboard"]
    diff("tensorboard", "run directories", t["run_dirs"], u["run_dirs"])
    for kind in ("scalars", "texts", "images"):
        for tag in sorted(set(t[kind]) | set(u[kind])):
            diff("tensorboard", f"{kind} {tag!r}", t[kind].get(tag), u[kind].get(tag))
    diff("tensorboard", "hparams", t["hparams"], u["hparams"])
    p, q = ref["prov4ml"], our["prov4ml"]
    for key in sorted(set(p["metrics"]) | set(q["metrics"])):
        diff("prov4ml", f"metric {key}", p["metrics"].get(key), q["metrics"].get(key))
    for key in sorted(set(p["params"]) | set(q["params"])):
        diff("prov4ml", f"param {key}", p["params"].get(key), q["params"].get(key))
    for key in sorted(set(p["files"]) | set(q["files"])):
        diff("prov4ml", f"file {key}", p["files"].get(key), q["files"].get(key))
    order = ("wandb", "tensorboard", "prov4ml")
    return sorted(rows, key=lambda row: order.index(row[0]))  # stable: per target, in order


def _short(value: Any, limit: int = 110) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[:limit - 3] + "..."
