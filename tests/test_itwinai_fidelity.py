"""Our export against what itwinai 0.4.2's own loggers put into each tracker for the same calls.

The reference cannot run here (itwinai needs torch 2.14, this environment pins 2.13): its
tracker contents were recorded by running the same training (tests/itwinai_reference.py)
through itwinai's real WandBLogger (offline), TensorBoardLogger and Prov4MLLogger (yprov4ml
2.0.9) in itwinai's own virtualenv, by scripts/record_itwinai_reference.py (its `trackers`
part, which also prints both sides side by side), into
tests/reference/trackers-itwinai-0.4.2.json. Values that depend on the machine and the moment
(system, carbon, clock readings) are recorded by their steps only. Here our side runs for real:
our loggers, `itwinai-sync --to <target>`, and the same readers of what each tracker holds.
Every difference the tests allow is one the README lists under 'What each tracker shows'."""

from __future__ import annotations

import itwinai_reference as ir
import pytest
import recordings

REFERENCE = recordings.load("trackers")
#: Each logger skips the kinds it does not support, with a warning, as itwinai's do silently.
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*is a kind it does not support; such calls are ignored"
    ":itwinai_journal.loggers.JournalWarning")


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        return ir.without_volatile(ir.run_ours(tmp_path_factory.mktemp("ours"), mp.setenv))


def test_the_recording_is_itwinais():
    assert REFERENCE["versions"]["itwinai"] == "0.4.2"
    assert REFERENCE["versions"]["yprov4ml"] == "2.0.9"


def test_nothing_raises_and_every_export_succeeds(ours):
    """itwinai's WandBLogger stops the training on a matplotlib figure without plotly, its
    TensorBoardLogger on any `torch` item (add_graph without inputs); ours never does."""
    assert [e.split(":")[0] for e in REFERENCE["wandb"]["errors"]] == ["figure"]
    assert [e.split(":")[0] for e in REFERENCE["tensorboard"]["errors"]] == ["torch"]
    assert REFERENCE["prov4ml"]["errors"] == []
    for target in ("wandb", "tensorboard", "prov4ml"):
        assert ours[target]["errors"] == [], target
        assert ours[target]["sync_exit_code"] == 0, ours[target]["sync_output"]


def test_wandb_history_config_and_media(ours):
    ref, got = REFERENCE["wandb"], ours["wandb"]
    # every value itwinai's WandBLogger puts in the history, the same, nothing dropped
    for key in ("train_loss", "val_loss", "status", "summary", "weights_vec"):
        assert got["history"][key] == ref["history"][key], key
    assert got["config"] == ref["config"]
    # the training step with every value (itwinai's has none: its _step counts calls)
    assert got["steps"]["train_loss"] == list(range(ir.EPOCHS * ir.BATCHES))
    assert got["steps"]["val_loss"] == got["steps"]["status"] == list(range(ir.EPOCHS))
    # records of one step share a row: fewer rows than itwinai's one per call
    assert (ref["rows"], got["rows"]) == (14, 9)
    # media: an image where itwinai's wandb.log makes a histogram of the pixels of a tensor,
    # and the figure it could not log without plotly
    assert ref["history"]["sample"] == [{"_type": "histogram"}]
    assert got["history"]["sample"] == [{"_type": "image-file"}]
    assert "curve" not in ref["history"] and got["history"]["curve"] == [{"_type": "image-file"}]
    # beyond itwinai: the torch object as an artifact too, the watched model's graph
    assert got["artifacts"] == ["torch:weights_vec"] and not ref["artifacts"]
    assert set(got["summary_keys"]) - set(ref["summary_keys"]) == {
        "curve", "graph_model", ir.STEP_KEY}


def test_tensorboard_scalars_text_images_and_hparams(ours):
    ref, got = REFERENCE["tensorboard"], ours["tensorboard"]
    for kind in ("scalars", "texts", "images"):
        assert got[kind] == ref[kind], kind  # tags, steps, values, sizes
    assert got["hparams"] == ref["hparams"]  # types as add_hparams stores them, None left out
    # add_hparams writes its own run (a sub-directory named after the time); ours are the
    # rank's run's
    assert (ref["run_dirs"], got["run_dirs"]) == (2, 1)


def test_prov4ml_metrics_params_and_models(ours):
    ref, got = REFERENCE["prov4ml"], ours["prov4ml"]
    deterministic = {k for k in ref["metrics"] if k.split("|")[0] not in ir.VOLATILE}
    assert deterministic == {"train_loss|training", "val_loss|training",
                             "flops_batch|training", "flops_epoch|training"}
    for key in deterministic:  # values and steps, FLOPs as yprov4ml's running totals
        assert got["metrics"][key] == ref["metrics"][key], key
    # system metrics and the execution time: the same names and steps
    for name in ("cpu_usage", "memory_usage", "disk_usage", "epoch_time"):
        key = f"{name}|training"
        assert got["metrics"][key] == ref["metrics"][key], key
    # what this machine cannot measure is left out, where yprov4ml writes 0.0 (no GPU) or
    # codecarbon's estimate (no readable energy counter, no codecarbon on our side)
    missing = {k.split("|")[0] for k in set(ref["metrics"]) - set(got["metrics"])}
    assert missing <= {"gpu_memory_usage", "gpu_usage", "gpu_temperature", "gpu_power_usage",
                       "emissions", "emissions_rate", "cpu_power", "gpu_power", "ram_power",
                       "cpu_energy", "gpu_energy", "ram_energy", "energy_consumed"}
    assert got["params"] == ref["params"]  # str() of each value, the tensor's included
    for name, held in ref["files"].items():  # models as state_dicts, same names and shapes
        assert got["files"][name] == held, name
    assert set(got["files"]) - set(ref["files"]) == {"weights_vec/object.pt"}
