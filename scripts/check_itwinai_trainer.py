"""itwinai's TorchTrainer driving itwinai_journal's loggers: does the journal record what
itwinai's own MLFlowLogger records?

itwinai needs a newer torch than this project's test environment pins, so this is a script run
with the interpreter of a virtualenv that has itwinai 0.4.2 (and its MLflow), with this
repository's `src` on the path:

    PYTHONPATH=src /path/to/itwinai-venv/bin/python scripts/check_itwinai_trainer.py

It trains the same small model twice on CPU, with the same seeds, under a temporary directory:
once with itwinai's `MLFlowLogger` (MLflow writes to a sqlite file there; nothing reaches the
network), once with `itwinai_journal.loggers.MLFlowLogger` (only the import differs). Both use
`log_freq=2`, so per-batch metrics are filtered by `should_log` as well. It then compares every
metric point (name, step, value) and every parameter the trainer logged: MLflow's stored ones
against the journal's. Exit status 0 when they are the same, 1 otherwise.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

EPOCHS = 3
#: Metrics that measure wall-clock time differ between any two runs.
TIMING = ("epoch_time_s",)


def data() -> tuple[Any, Any]:
    import torch
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 8, generator=g)
    y = (x[:, :4].sum(1) > x[:, 4:].sum(1)).long()
    return TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])


def train(logger: Any, workdir: Path) -> None:
    import torch
    import torchmetrics
    from itwinai.torch.trainer import TorchTrainer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 2))
    trainer = TorchTrainer(
        config={"batch_size": 16, "optimizer": "sgd", "optim_lr": 0.1,
                "num_workers_dataloader": 0, "loss": "cross_entropy"},
        epochs=EPOCHS, model=model, strategy=None, random_seed=42, logger=logger,
        metrics={"accuracy": torchmetrics.Accuracy(task="multiclass", num_classes=2)},
        checkpoints_location=str(workdir / "checkpoints"), disable_tqdm=True,
        run_name="trainer-check",
    )
    train_set, validation_set = data()
    trainer.execute(train_set, validation_set)


def itwinai_points(tracking_uri: str) -> tuple[dict[str, list], dict[str, str]]:
    """Metric points and params of the run itwinai's MLFlowLogger logged into."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("trainer-check")
    runs = client.search_runs([experiment.experiment_id])
    worker = [r for r in runs if r.data.metrics or r.data.params]
    assert len(worker) == 1, f"expected one run with data, got {len(worker)}"
    run = worker[0]
    points = {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id,
                                                                               key))
              for key in run.data.metrics}
    return points, dict(run.data.params)


def journal_points(savedir: Path) -> tuple[dict[str, list], dict[str, str]]:
    from itwinai_journal import Journal

    journal = Journal(savedir)
    points: dict[str, list] = {}
    for row in journal.metrics().to_pylist():
        points.setdefault(row["name"], []).append((row["step"], row["value"]))
    params = {}
    for row in journal.records(kinds=["param"]).to_pylist():
        meta = json.loads(row["meta"]) if row["meta"] else {}
        # MLflow stores str(value); the journal keeps it in meta when the JSON's differs
        params[row["name"]] = meta.get("str", str(json.loads(row["text"])))
    return {k: sorted(v) for k, v in points.items()}, params


def compare(ref: dict[str, list], ours: dict[str, list]) -> list[str]:
    problems = []
    for name in sorted(set(ref) | set(ours)):
        if name in TIMING:
            if len(ref.get(name, [])) != len(ours.get(name, [])):
                problems.append(f"{name}: {len(ref.get(name, []))} points with itwinai, "
                                f"{len(ours.get(name, []))} in the journal")
            continue
        if ref.get(name) != ours.get(name):
            problems.append(f"{name}: itwinai {ref.get(name)} != journal {ours.get(name)}")
    return problems


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="itwinai-trainer-check-") as tmp:
        workdir = Path(tmp)
        os.chdir(workdir)
        tracking_uri = f"sqlite:///{workdir}/mlflow.db"
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
        warnings.simplefilter("ignore")

        import itwinai.loggers

        import itwinai_journal.loggers

        train(itwinai.loggers.MLFlowLogger(savedir=str(workdir / "itwinai"),
                                           experiment_name="trainer-check",
                                           tracking_uri=tracking_uri, log_freq=2),
              workdir / "a")
        train(itwinai_journal.loggers.MLFlowLogger(savedir=str(workdir / "journal"),
                                                   experiment_name="trainer-check",
                                                   log_freq=2),
              workdir / "b")

        ref_points, ref_params = itwinai_points(tracking_uri)
        our_points, our_params = journal_points(workdir / "journal")
    problems = compare(ref_points, our_points)
    if ref_params != our_params:
        problems.append(f"params: itwinai {ref_params} != journal {our_params}")
    print(f"{'metric':32} {'points':>6}  first (step, value) -> last")
    for name, pts in sorted(our_points.items()):
        print(f"{name:32} {len(pts):6d}  {pts[0]} -> {pts[-1]}")
    print(f"{len(our_params)} params; {sum(map(len, our_points.values()))} metric points in "
          f"the journal, {sum(map(len, ref_points.values()))} in itwinai's MLflow run")
    for problem in problems:
        print("MISMATCH", problem)
    print("same metrics and params" if not problems else f"{len(problems)} mismatches")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
