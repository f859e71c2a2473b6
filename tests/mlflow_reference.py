"""The same logging calls through itwinai 0.4.2's MLFlowLogger (online, into a sqlite store) and
through ours (journal, then `itwinai-sync --to mlflow` into a sqlite store), and what each store
then holds: runs, run name, params, MLflow's system tags, artifact paths, a metric's history.

Runs as a script in either environment, printing that description as JSON:

    $ITWINAI_PYTHON tests/mlflow_reference.py itwinai DIR   (the Python of itwinai's venv)
    .venv/bin/python tests/mlflow_reference.py journal DIR

It imports only the logger API, mlflow, numpy, torch and matplotlib, so that it runs unchanged
in itwinai's own virtualenv. `describe_store` runs it in a fresh process of either: for
test_mlflow_fidelity.py (ours) and for scripts/record_itwinai_reference.py (itwinai's, recorded
in tests/reference/mlflow-itwinai-0.4.2.json). Calls the reference cannot make with the MLflow
it pins (an image name without an extension, `kind="model"`, which MLflow 3 refuses without an
input example) are left out here and tested on our side alone.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

PARAMS = {"lr": 0.001, "flag": True, "none": None, "layers": [8, 4],
          "nested": {"a": 1, "b": [True, None]},
          "tiny": 1e-05, "big": 1.0e20, "optim": "adam", "epochs": 3}


def log_everything(logger, tmp: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    logger.create_logger_context()
    logger.save_hyperparameters(PARAMS)
    for step in range(3):
        logger.log(1.0 / (step + 1), "loss", step=step)
    logger.log("some notes", "notes/readme", kind="text")
    logger.log("more notes", "notes.txt", kind="text")
    logger.log({"a": 1, "b": [1, 2]}, "config", kind="dict")
    logger.log({"a": 1, "b": [1, 2]}, "config.json", kind="dict")
    logger.log({"a": 1, "b": [1, 2]}, "config.yaml", kind="dict")
    fig = plt.figure(figsize=(2, 2))
    plt.plot([1, 2, 3])
    logger.log(fig, "plots/curve", kind="figure")
    logger.log(fig, "curve.v2", kind="figure")
    logger.log(fig, "done.png", kind="figure")
    plt.close(fig)
    pixels = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    logger.log(pixels, "img/grid.png", kind="image")
    logger.log(pixels, "grid.jpg", kind="image")
    logger.log(torch.arange(4), "tensor.pt", kind="torch")
    logger.log(torch.arange(4), "tensors/t", kind="torch")
    (tmp / "ckpt.bin").write_bytes(b"checkpoint")
    logger.log(str(tmp / "ckpt.bin"), "checkpoints", kind="artifact")
    (tmp / "tree" / "sub").mkdir(parents=True, exist_ok=True)
    (tmp / "tree" / "a.txt").write_text("A")
    (tmp / "tree" / "sub" / "b.txt").write_text("B")
    logger.log(str(tmp / "tree"), "dirs", kind="artifact")
    logger.destroy_logger_context()


def describe(uri: str, experiment: str) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    run = runs[0]

    def walk(path: str = "") -> list[str]:
        out = []
        for a in client.list_artifacts(run.info.run_id, path):
            out.extend(walk(a.path) if a.is_dir else [a.path])
        return out

    tags = {k: v for k, v in run.data.tags.items() if k.startswith("mlflow.")}
    if tags.get("mlflow.user") == getpass.getuser():
        tags["mlflow.user"] = "<user>"
    if "mlflow.source.name" in tags:
        tags["mlflow.source.name"] = os.path.basename(tags["mlflow.source.name"])
    dl = Path(client.download_artifacts(run.info.run_id, "config.yaml"))
    return {
        "runs": len(runs),
        "run_name": run.info.run_name,
        "status": run.info.status,
        "params": dict(sorted(run.data.params.items())),
        "tags": dict(sorted(tags.items())),
        "artifacts": sorted(walk()),
        "config.yaml": dl.read_text(),
        "loss": [(m.step, m.value) for m in sorted(
            client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)],
    }


def main(impl: str, tmp: Path) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{tmp.resolve()}/{impl}.db"
    kwargs = {"experiment_name": "exp", "run_name": "kinds", "run_description": "all kinds"}
    if impl == "itwinai":
        from itwinai.loggers import MLFlowLogger

        log_everything(MLFlowLogger(savedir=tmp / "itwinai", tracking_uri=uri, **kwargs), tmp)
    else:
        from itwinai_journal.loggers import MLFlowLogger
        from itwinai_sync.cli import main as cli

        savedir = tmp / "mllogs"
        log_everything(MLFlowLogger(savedir=savedir, tracking_uri=uri, **kwargs), tmp)
        try:
            cli([str(savedir), "--to", "mlflow"], standalone_mode=False)
        except SystemExit as e:
            if e.code:
                raise
    return describe(uri, "exp")


def describe_store(python: Path, impl: str, tmp: Path) -> dict:
    """Run the calls with `impl`'s MLFlowLogger ("itwinai" or "journal") with `python` in a
    fresh process, from a copy of this file outside any git checkout (MLflow tags the git
    commit of the script's directory), and return what the MLflow store then holds. The run
    name is left out: itwinai 0.4.2 ignores MLFlowLogger(run_name=...) and draws a random one,
    ours uses it; `run_name` is returned beside the description for the caller to check."""
    from conftest import child_env
    from mlflow_server import hermetic_mlflow_env

    work = tmp / impl
    work.mkdir()
    script = shutil.copy(__file__, work / Path(__file__).name)
    proc = subprocess.run([str(python), script, impl, str(work / "out")], cwd=work,
                          env=hermetic_mlflow_env(child_env()), capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{python} {script} {impl} failed:\n{proc.stderr[-3000:]}")
    found = json.loads(proc.stdout.split("=== DESCRIPTION ===", 1)[1])
    name = found.pop("run_name")
    if found["tags"].pop("mlflow.runName") != name:
        raise RuntimeError("the mlflow.runName tag is not the run's name")
    return found if impl == "itwinai" else {"run_name": name, **found}


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    result = main(sys.argv[1], Path(sys.argv[2]))
    sys.stdout.write("\n=== DESCRIPTION ===\n" + json.dumps(result, indent=1, sort_keys=True))
