"""The PyTorch Lightning adapter: a real `Trainer.fit` on CPU writing through our loggers."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys

import pytest
from conftest import child_env

L = pytest.importorskip("lightning")
torch = pytest.importorskip("torch")

from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from itwinai_journal import Journal  # noqa: E402
from itwinai_journal.loggers import (  # noqa: E402
    LoggersCollection,
    MLFlowLogger,
    TensorBoardLogger,
)
from itwinai_journal.loggers.lightning import JournalLogger  # noqa: E402


class Tiny(L.LightningModule):
    def __init__(self, lr: float = 0.05, optim: dict | None = None, act=torch.relu):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Linear(3, 1)
        self.seen: list[tuple[int, float]] = []  # (global_step, loss) of each training batch
        self.val: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.seen.append((self.global_step, loss.item()))
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        if not self.trainer.sanity_checking:
            self.val.append(loss.item())
        self.log("val/loss", loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def _loaders(n: int = 16, batch: int = 4):
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(n, 3, generator=g), torch.randn(n, 1, generator=g))
    return DataLoader(ds, batch_size=batch), DataLoader(ds, batch_size=n)


def _trainer(tmp_path, logger, max_epochs: int = 1, callbacks=None):
    return L.Trainer(max_epochs=max_epochs, logger=logger, log_every_n_steps=1,
                     enable_checkpointing=True, default_root_dir=tmp_path / "root",
                     callbacks=callbacks,
                     accelerator="cpu", devices=1, enable_progress_bar=False,
                     enable_model_summary=False)


def _metric_points(savedir, name):
    m = Journal(savedir).metrics(name=name)
    return list(zip(m["step"].to_pylist(), m["value"].to_pylist()))


def test_importing_itwinai_journal_does_not_import_lightning():
    code = ("import sys, itwinai_journal, itwinai_journal.loggers\n"
            "bad = [m for m in ('lightning', 'pytorch_lightning', 'torch') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, env=child_env())


def test_trainer_fit_writes_metrics_hyperparameters_and_checkpoints(tmp_path):
    savedir = tmp_path / "mllogs"
    wrapped = MLFlowLogger(savedir=savedir, experiment_name="lit", run_id="fit-1")
    adapter = JournalLogger(wrapped)
    assert adapter.name == "lit"
    model = Tiny(optim={"name": "sgd", "momentum": 0.9})
    trainer = _trainer(tmp_path, adapter)
    trainer.fit(model, *_loaders())
    assert adapter.version == "fit-1"

    # Every training batch's loss, at the step Lightning logged it (log_every_n_steps=1).
    assert [s for s, _ in model.seen] == [0, 1, 2, 3]
    got = _metric_points(savedir, "train_loss")
    assert [s for s, _ in got] == [0, 1, 2, 3]
    assert [v for _, v in got] == pytest.approx([v for _, v in model.seen], rel=1e-6)
    # The epoch-level validation metric, at the last training step, as Lightning logs it.
    assert _metric_points(savedir, "val/loss") == [(3, pytest.approx(model.val[0], rel=1e-6))]
    assert {s for s, _ in _metric_points(savedir, "epoch")} == {3, 0, 1, 2}

    # Hyperparameters: flattened, callables by name, one param record each.
    params = Journal(savedir).records(kinds=["param"])
    got_params = {n: json.loads(t) for n, t in zip(params["name"].to_pylist(),
                                                   params["text"].to_pylist())}
    assert got_params == {"lr": 0.05, "optim/name": "sgd", "optim/momentum": 0.9,
                          "act": "relu"}

    # The checkpoint: saved where Lightning puts it for this name/version, and in the journal.
    ckpt_dir = tmp_path / "root" / "lit" / "fit-1" / "checkpoints"
    assert trainer.checkpoint_callback.dirpath == str(ckpt_dir)
    (ckpt,) = ckpt_dir.glob("*.ckpt")
    assert ckpt.name == "epoch=0-step=4.ckpt"
    arts = Journal(savedir).records(kinds=["artifact"]).to_pylist()
    assert [a["name"] for a in arts] == ["checkpoints/epoch=0-step=4.ckpt"]
    art = arts[0]
    assert art["step"] == 4
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert art["blob"] == sha
    blob = savedir / "lit" / "fit-1" / "rank-00000" / "blobs" / sha[:2] / sha
    assert blob.read_bytes() == ckpt.read_bytes()
    assert json.loads(art["meta"])["kwargs"]["checkpoint"]["tag"] == "best"

    # finalize closed the session the adapter opened.
    (run,) = Journal(savedir).runs()
    assert run.status == "finished" and not wrapped.is_initialized


def test_steps_match_lightnings_own_csv_logger_and_an_open_collection_stays_open(tmp_path):
    """Two epochs, a monitored top-1 checkpoint, a LoggersCollection opened by the user: every
    metric row of Lightning's CSVLogger is in the journal with the same step and value."""
    savedir = tmp_path / "mllogs"
    collection = LoggersCollection([
        MLFlowLogger(savedir=savedir, experiment_name="lit", run_id="fit-2"),
        TensorBoardLogger(savedir=savedir),
    ])
    adapter = JournalLogger(collection)
    assert adapter.name == "lit"  # the collection's experiment, before it is opened
    reference = CSVLogger(tmp_path / "csv")
    with collection.start_logging(rank=0):
        checkpoint = L.pytorch.callbacks.ModelCheckpoint(
            dirpath=tmp_path / "ckpt", monitor="val/loss", save_top_k=1, save_last=True)
        trainer = _trainer(tmp_path, [adapter, reference], max_epochs=2,
                           callbacks=[checkpoint])
        trainer.fit(Tiny(), *_loaders())
        assert collection.is_initialized  # not the adapter's to close
        assert (adapter.name, adapter.version) == ("lit", "fit-2")
        collection.log(1.0, "after_fit", step=99)
    expected = set()
    with open(reference.log_dir + "/metrics.csv") as f:
        for row in csv.DictReader(f):
            for name, value in row.items():
                if name != "step" and value != "":
                    expected.add((name, int(row["step"]), float(value)))
    m = Journal(savedir).metrics()
    got = {(n, s, v) for n, s, v in zip(m["name"].to_pylist(), m["step"].to_pylist(),
                                        m["value"].to_pylist()) if n != "after_fit"}
    assert got == expected
    # Nothing twice: Lightning adds `epoch` to both the training and the validation log call
    # of the last step of an epoch (CSVLogger merges them into one row); all else is once.
    pairs = [(n, s) for n, s in zip(m["name"].to_pylist(), m["step"].to_pylist())
             if n not in ("epoch", "after_fit")]
    assert len(pairs) == len(set(pairs)) == len([e for e in expected if e[0] != "epoch"])
    arts = Journal(savedir).records(kinds=["artifact"])
    names = arts["name"].to_pylist()
    assert "checkpoints/last.ckpt" in names
    assert any(n.startswith("checkpoints/epoch=1-step=8") for n in names)
    assert Journal(savedir).runs()[0].status == "finished"
