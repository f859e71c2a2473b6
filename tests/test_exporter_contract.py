"""The exporters' contract, one suite run over every target: MLflow (embedded sqlite store),
TensorBoard, W&B (offline files), Prov4ML, the in-memory exporter shipped for tests and the
JSON-lines target kept in tests/jsonl_target (the README's worked example).

For each: the cursor the target holds only moves forward and ends at the journal's last seq;
a batch with nothing for the target still advances it; a re-run adds nothing; an export
interrupted mid-way ends exact after a re-run: a real `itwinai-sync` process SIGKILLed at a
random moment (JSON lines, TensorBoard, MLflow), or an exception injected between the write and
the cursor commit (the in-memory target lives in the test's process; Prov4ML commits once per
sync, by renames; W&B, whose SIGKILL tests are in test_wandb_export.py, costs seconds per
process; and JSON lines once more, where a kill between append and commit cannot be timed).
The cursor is read through the exporter interface (`open(create=False).cursor()`), the records
with each tracker's own reader (helpers of the per-target tests), and compared with the
journal's metrics: every one exactly once, with its name, step and value.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import child_env
from mlflow_server import hermetic_mlflow_env
from test_prov4ml_export import read_csv
from test_tensorboard_export import accumulate, rank_dir
from test_wandb_export import history, offline_wandb, wandb_files, wandb_id

from itwinai_journal import Journal
from itwinai_journal.format.names import experiment_dirname
from itwinai_journal.loggers import MLFlowLogger, Prov4MLLogger
from itwinai_sync.api import Exporter, ExportError, Notes, load_exporter
from itwinai_sync.engine import RunResult, SyncRequest
from itwinai_sync.targets.prov4ml import layout as prov4ml_layout
from itwinai_sync.targets.wandb import exporter as wandb_exporter
from itwinai_sync.targets.wandb import logfile as wandb_logfile
from itwinai_sync.testing import InMemoryExporter, InMemorySink, run_sync

JSONL_DIR = Path(__file__).parent / "jsonl_target"
sys.path.insert(0, str(JSONL_DIR))
import jsonl_target  # noqa: E402

pytestmark = pytest.mark.usefixtures(offline_wandb.__name__)

EXP, RUN = "contract", "run1"
Points = Counter  # (name, step, value) -> occurrences


class Injected(RuntimeError):
    """The fault a test injects into an export."""


# -- reading each target back with its own reader ---------------------------------------------


def jsonl_points(savedir: Path) -> Points:
    run_dir = savedir / "jsonl" / experiment_dirname(EXP) / RUN
    state = json.loads(jsonl_target.cursor_path(run_dir, 0).read_text())
    data = jsonl_target.lines_path(run_dir, 0).read_bytes()[:state["bytes"]]
    return metric_points(json.loads(line) for line in data.splitlines())


def tensorboard_points(savedir: Path) -> Points:
    acc = accumulate(rank_dir(savedir, RUN))
    return Counter((tag, e.step, e.value) for tag in acc.Tags()["scalars"]
                   for e in acc.Scalars(tag))


def mlflow_points(savedir: Path) -> Points:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{savedir.resolve()}/mlflow.db")
    exp = client.get_experiment_by_name(EXP)
    (run,) = [r for r in client.search_runs([exp.experiment_id])
              if r.data.tags.get("itwinai.run") == f"{EXP}/{RUN}"]
    return Counter((key, h.step, h.value) for key in run.data.metrics
                   for h in client.get_metric_history(run.info.run_id, key))


def wandb_points(savedir: Path) -> Points:
    rows = history(wandb_files(savedir, wandb_id(savedir, RUN, 0)))
    return Counter((key, row["itwinai/step"], value) for row in rows
                   for key, value in row.items()
                   if not key.startswith("_") and key != "itwinai/step")


def prov4ml_points(savedir: Path) -> Points:
    folder = savedir / "prov" / EXP / RUN / "rank-00000" / f"{EXP}_0"
    doc = json.loads((folder / f"prov_{EXP}_GR0_0.json").read_text())
    out: Points = Counter()
    for entity_id, entity in doc["entity"].items():
        if entity.get("prov:type") == "provml:Metric":
            name = entity_id.split("//")[0]
            out.update((name, step, value)
                       for step, value, _ in read_csv(Path(entity["dcterms:identifier"])))
    return out


def metric_points(records) -> Points:
    return Counter((r["name"], r["step"], r["value"]) for r in records if r["kind"] == "metric")


def journal_points(savedir: Path) -> Points:
    return metric_points(Journal(savedir).records(run_id=RUN, rank=0).to_pylist())


# -- faults -----------------------------------------------------------------------------------


def fail_on_call(monkeypatch: pytest.MonkeyPatch, owner: object, attr: str, k: int,
                 after: bool) -> None:
    """Make the k-th call of `owner.attr` raise Injected, before or after doing its work."""
    original = getattr(owner, attr)
    calls = 0

    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == k and not after:
            raise Injected(f"injected before {attr} call {k}")
        result = original(*args, **kwargs)
        if calls == k:
            raise Injected(f"injected after {attr} call {k}")
        return result

    monkeypatch.setattr(owner, attr, wrapper)


def fail_between_prov4ml_renames(monkeypatch: pytest.MonkeyPatch, k: int) -> None:
    """The documents are renamed aside, and the export dies before the new ones are renamed
    into place (the cursor marker is inside them)."""
    def swap(new: Path, final: Path, aside: Path) -> None:
        os.rename(final, aside)
        raise Injected("injected between prov4ml's renames")

    monkeypatch.setattr(prov4ml_layout, "swap", swap)


# -- the targets ------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    #: Reads the target back (None: the in-memory target, read from its instance).
    read_back: Callable[[Path], Points] | None
    #: How an export is interrupted: "kill" (a real process, SIGKILLed), or a function that
    #: makes the k-th call of the target's commit step fail.
    fault: str | Callable[[pytest.MonkeyPatch, int], None]
    #: How many times the fault point is reached by the export of the interrupted test's
    #: second part (segments, steps): batches (one per segment), rows (W&B), commits (Prov4ML).
    fault_calls: Callable[[int, int], int] = lambda segments, steps: segments
    memory: InMemoryExporter | None = None
    #: The exporter the test reads the cursor through (one per test: opening a store is slow).
    reader: Exporter | None = None

    def exporter(self, savedir: Path) -> Exporter:
        """What one sync uses: a fresh exporter, as each `itwinai-sync` makes, except the
        in-memory target, which lives as long as its instance."""
        if self.name == "memory":
            if self.memory is None:
                # as a real target, it leaves a kind out (see skipped_kind)
                self.memory = InMemoryExporter(savedir, kinds=InMemoryExporter.kinds - {"dict"})
            return self.memory
        return self.exporter_class()(savedir, {}, Notes())

    def exporter_class(self) -> type[Exporter]:
        return {"memory": InMemoryExporter, "jsonl": jsonl_target.JsonlExporter}.get(
            self.name) or load_exporter(self.name)

    def read(self, savedir: Path) -> Points:
        if self.read_back is None:
            assert self.memory is not None
            return metric_points(self.memory.records(Journal(savedir).run(RUN).journal_id, 0))
        return self.read_back(savedir)

    def skipped_kind(self) -> str:
        """A kind this target does not take (logged to make a batch with nothing for it)."""
        return "execution_time" if "execution_time" not in self.exporter_class().kinds \
            else "dict"


TARGETS = {
    "memory": Target("memory", None,
                     lambda mp, k: fail_on_call(mp, InMemorySink, "export", k, after=False)),
    "jsonl": Target("jsonl", jsonl_points, "kill"),
    "jsonl-injected": Target("jsonl", jsonl_points,
                             lambda mp, k: fail_on_call(mp, jsonl_target, "write_atomic", k,
                                                        after=False)),
    "tensorboard": Target("tensorboard", tensorboard_points, "kill"),
    "mlflow": Target("mlflow", mlflow_points, "kill"),
    "wandb": Target("wandb", wandb_points,
                    lambda mp, k: fail_on_call(mp, wandb_exporter.WandbSink, "_flush_row", k,
                                               after=True),
                    fault_calls=lambda segments, steps: steps),
    "prov4ml": Target("prov4ml", prov4ml_points, fail_between_prov4ml_renames,
                      fault_calls=lambda segments, steps: 1),
}
CONTRACT = ["memory", "jsonl", "tensorboard", "mlflow", "wandb", "prov4ml"]


@pytest.fixture(scope="module")
def empty_mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow sqlite store with its schema and nothing else, made once: creating one takes
    seconds (schema migrations), copying it none."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def target(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
           tmp_path: Path) -> Iterator[Target]:
    """The target, and for MLflow its default store (SAVEDIR/mlflow.db) in place, empty."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    if request.param == "mlflow":
        (tmp_path / "mllogs").mkdir()
        shutil.copyfile(request.getfixturevalue("empty_mlflow_store"),
                        tmp_path / "mllogs" / "mlflow.db")
    monkeypatch.setattr(wandb_logfile, "QUIET_SECONDS", 3.0)  # see test_wandb_export
    spec = dataclasses.replace(TARGETS[request.param])
    yield spec
    if spec.reader is not None:
        spec.reader.close()


# -- helpers ----------------------------------------------------------------------------------


def log(savedir: Path, target: Target, steps: range, skipped: int = 0,
        segment: int | None = None) -> None:
    """One session of rank 0 of the run: two metrics per step (values exact in float32),
    then `skipped` records of a kind the target does not take; with `segment`, a sealed
    segment (one batch of the engine) every `segment` records."""
    kind = target.skipped_kind()
    if kind == "execution_time":
        logger = Prov4MLLogger(provenance_save_dir=str(savedir), experiment_name=EXP,
                               log_freq="batch", log_on_workers=-1, run_id=RUN)
    else:
        logger = MLFlowLogger(savedir=savedir, experiment_name=EXP, log_freq="batch",
                              log_on_workers=-1, run_id=RUN)
    logger.create_logger_context(rank=0)
    if segment:
        logger._writer.seal_records = segment
    for n, step in enumerate(steps, 1):
        logger.log(step / 4, "loss", step=step)
        logger.log(step / 8 + 1, "acc", step=step)
        if segment and (2 * n) % segment == 0:
            logger._writer.flush()
    for i in range(skipped):
        logger.log({"lr": i} if kind == "dict" else 0.5, "skipped", kind=kind, step=i)
    logger.destroy_logger_context()


def sync(target: Target, savedir: Path) -> RunResult:
    (result,) = run_sync(SyncRequest(savedir, [target.name]), target.exporter(savedir))
    return result


def cursor(target: Target, savedir: Path) -> int:
    """The cursor the target holds for rank 0, read through the exporter interface."""
    if target.reader is None:
        target.reader = target.exporter(savedir)
    run = Journal(savedir).run(RUN)
    sink = target.reader.open(run, run.rank(0), create=False)
    if sink is None:
        return 0
    try:
        return sink.cursor()
    finally:
        sink.close()


def last_seq(savedir: Path) -> int:
    return Journal(savedir).run(RUN).rank(0).last_seq


def assert_exact(target: Target, savedir: Path) -> None:
    assert cursor(target, savedir) == last_seq(savedir)
    got, want = target.read(savedir), journal_points(savedir)
    assert got == want
    assert set(got.values()) == {1}


def sync_command(target: Target, savedir: Path) -> tuple[list[str], dict[str, str]]:
    """`itwinai-sync SAVEDIR --to NAME` as a user runs it, the JSON-lines target found through
    its entry point on PYTHONPATH."""
    env = hermetic_mlflow_env(child_env(PYTHONPATH=str(JSONL_DIR)))
    env.pop("WANDB_SERVICE", None)
    script = Path(sys.executable).parent / "itwinai-sync"
    return [str(script), str(savedir), "--to", target.name], env


# -- the contract -----------------------------------------------------------------------------


@pytest.mark.parametrize("target", CONTRACT, indirect=True)
def test_cursor_moves_forward_and_a_rerun_adds_nothing(target, tmp_path):
    savedir = tmp_path / "mllogs"
    log(savedir, target, range(0, 30))
    first = sync(target, savedir)
    assert first.status == "synced", first.error
    assert cursor(target, savedir) == last_seq(savedir) == 60
    assert_exact(target, savedir)

    log(savedir, target, range(30, 50))  # a second session of the same rank
    second = sync(target, savedir)
    assert second.status == "synced", second.error
    assert second.exported["metric"] == 40
    assert cursor(target, savedir) == last_seq(savedir) > 60
    assert_exact(target, savedir)

    again = sync(target, savedir)
    assert again.status == "up-to-date" and not again.exported, again
    assert_exact(target, savedir)


@pytest.mark.parametrize("target", CONTRACT, indirect=True)
def test_a_batch_with_nothing_for_the_target_advances_the_cursor(target, tmp_path):
    savedir = tmp_path / "mllogs"
    log(savedir, target, range(10))
    sync(target, savedir)
    before = cursor(target, savedir)
    assert before == last_seq(savedir) == 20

    target_kind = target.skipped_kind()
    log(savedir, target, range(0), skipped=5)  # records of a kind the target does not take
    result = sync(target, savedir)
    assert result.status == "synced", result.error
    assert not result.exported and result.skipped == {target_kind: 5}
    assert cursor(target, savedir) == last_seq(savedir) == 25
    assert_exact(target, savedir)
    if target.memory is not None:
        assert target.memory.held[(Journal(savedir).run(RUN).journal_id, 0)].batches[-1] == (
            0, 25)


@pytest.mark.parametrize("target", [*CONTRACT, "jsonl-injected"], indirect=True)
def test_an_interrupted_export_ends_exact_after_a_rerun(target, tmp_path, monkeypatch):
    savedir = tmp_path / "mllogs"
    rng = random.Random(target.name)
    log(savedir, target, range(0, 20))
    sync(target, savedir)
    committed = [cursor(target, savedir)]
    segment, steps = 100, 4000  # 80 sealed segments of 100 records: 80 batches
    log(savedir, target, range(20, 20 + steps), segment=segment)
    total = last_seq(savedir)

    if target.fault == "kill":
        cmd, env = sync_command(target, savedir)
        at = rng.uniform(0.1, 0.8) * total
        proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline:
                committed.append(cursor(target, savedir))
                if committed[-1] >= at:
                    time.sleep(rng.uniform(0, 0.005))  # kill at a random moment after it
                    break
                time.sleep(0.005)
        finally:
            with contextlib.suppress(ProcessLookupError):  # it may have just ended
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        committed.append(cursor(target, savedir))
        assert 0 < committed[-1] < total, committed  # killed mid-way
        if target.name == "jsonl":  # the worked example, as a user runs it
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stdout + done.stderr
            assert "1 run/target pairs, 0 failed; exported" in done.stdout, done.stdout
        else:
            assert sync(target, savedir).status == "synced"
    else:
        calls = target.fault_calls(steps * 2 // segment, steps)
        with monkeypatch.context() as mp:
            target.fault(mp, rng.randint(1, max(1, calls - 1)))
            failed = sync(target, savedir)
        assert failed.status == "failed" and "injected" in failed.error, failed
        committed.append(cursor(target, savedir))
        assert committed[0] <= committed[-1] < total
        assert sync(target, savedir).status == "synced"
    committed.append(cursor(target, savedir))
    assert committed == sorted(committed), committed  # the cursor only moved forward
    assert committed[-1] == total
    assert_exact(target, savedir)


def test_the_in_memory_exporter_refuses_what_breaks_the_contract(tmp_path):
    """It checks what the engine hands it, so a test of the engine finds a broken batch."""
    savedir = tmp_path / "mllogs"
    target = dataclasses.replace(TARGETS["memory"])
    log(savedir, target, range(5))
    sync(target, savedir)
    memory = target.memory
    run = Journal(savedir).run(RUN)
    records = Journal(savedir).records(run_id=RUN, rank=0)
    sink = memory.open(run, run.rank(0), create=False)
    held = list(memory.records(run.journal_id, 0)), sink.cursor()
    assert held[1] == 10
    with pytest.raises(ExportError, match="goes back"):
        sink.export(records.slice(0, 0), 9)
    with pytest.raises(ExportError, match="not in order"):
        sink.export(records.slice(8, 2), 12)  # seqs 9 and 10: held already
    assert (memory.records(run.journal_id, 0), sink.cursor()) == held
    assert InMemoryExporter(savedir).open(run, run.rank(0), create=False) is None
