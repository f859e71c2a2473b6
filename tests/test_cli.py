"""The itwinai-sync command line: inspection commands, exit codes, errors in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from itwinai_journal import __version__
from itwinai_journal.loggers import MLFlowLogger, TensorBoardLogger
from itwinai_sync.cli import main


def _journal(savedir, run_id="r1", n=20, cls=MLFlowLogger, **kwargs):
    lg = cls(savedir=savedir, run_id=run_id, log_freq="batch", **kwargs)
    lg.create_logger_context()
    for i in range(n):
        lg.log(float(i), "loss", step=i)
    lg.destroy_logger_context()


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_version_and_help():
    assert __version__ in invoke("--version").output
    out = invoke("sync", "--help").output
    for text in ("--to", "mlflow", "tensorboard", "wandb", "--tracking-uri", "--logdir",
                 "--dry-run", "--watch", "--ranks"):
        assert text in out


def test_ls_shows_runs_status_records_and_sync_progress(tmp_path):
    savedir = tmp_path / "mllogs"
    _journal(savedir, "a", experiment_name="exp")
    _journal(savedir, "b", n=5, cls=TensorBoardLogger)
    out = invoke("ls", str(savedir)).output
    assert "exp" in out and "unnamed-experiment" in out
    assert "a  finished  1 rank(s)  20 records  -> mlflow" in out
    assert "b  finished  1 rank(s)  5 records  -> tensorboard" in out
    assert invoke(str(savedir), "--to", "tensorboard", "--run", "a").exit_code == 0
    rows = {r["run_id"]: r for r in json.loads(invoke("ls", str(savedir), "--json").output)}
    (synced,) = rows["a"]["synced"].values()
    assert synced == {"records": 20, "of": 20, "ranks": 1}
    assert rows["b"]["synced"] == {}
    assert "synced to tensorboard:" in invoke("ls", str(savedir)).output
    # a ledger file that is not a ledger entry is skipped: the ledger only mirrors the targets
    (ledger_file,) = [p for p in (savedir / ".sync").glob("*/*.json") if p.name != "target.json"]
    for junk in ("[1, 2]", '{"cursors": {}}', "{not json"):
        (ledger_file.parent / "junk.json").write_text(junk)
        result = invoke("ls", str(savedir), "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.output) == list(rows.values())


def test_show_prints_manifest_kinds_and_last_values(tmp_path):
    savedir = tmp_path / "mllogs"
    _journal(savedir, "a", experiment_name="exp", run_name="nice")
    out = invoke("show", str(savedir), "a").output
    assert "exp / a" in out and "run_name: nice" in out
    assert "records: 20 metric" in out
    assert "loss = 19" in out and "(step 19)" in out
    result = invoke("show", str(savedir), "nope")
    assert result.exit_code == 1 and "no run 'nope'" in result.output


def test_verify_exit_codes(tmp_path):
    savedir = tmp_path / "mllogs"
    _journal(savedir, "a", experiment_name="exp")
    ok = invoke("verify", str(savedir))
    assert ok.exit_code == 0 and "0 error(s)" in ok.output
    seg = next(savedir.glob("exp/a/rank-00000/segments/*.parquet"))
    seg.write_bytes(seg.read_bytes()[:-10] + b"0123456789")
    bad = invoke("verify", str(savedir))
    assert bad.exit_code == 1 and str(seg) in bad.output


def test_errors_are_one_line(tmp_path):
    savedir = tmp_path / "mllogs"
    _journal(savedir, "a", experiment_name="exp")
    result = invoke(str(savedir), "--to", "nosuchtracker")
    assert result.exit_code != 0 and "unknown target 'nosuchtracker'" in result.output
    assert "Traceback" not in result.output
    proc = subprocess.run([sys.executable, "-m", "itwinai_sync.cli", str(tmp_path / "missing"),
                           "--to", "mlflow"], capture_output=True, text=True)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    result = invoke(str(savedir), "--run", "zzz", "--to", "tensorboard")
    assert result.exit_code == 1 and "error: no run zzz" in result.output


def test_no_declared_destination_says_so(tmp_path):
    savedir = tmp_path / "mllogs"
    from itwinai_journal.loggers import ConsoleLogger

    lg = ConsoleLogger(savedir=savedir, run_id="c")
    lg.create_logger_context()
    lg.log(1.0, "x")
    lg.destroy_logger_context()
    out = invoke(str(savedir)).output
    assert "no runs with declared destinations (use --to)" in out


def _hand_made_rank(run_dir, rank, sessions, index_last_seq=None):
    rank_dir = run_dir / f"rank-{rank:05d}"
    (rank_dir / "segments").mkdir(parents=True)
    (rank_dir / "manifest.json").write_text(json.dumps(
        {"rank": rank, "destinations": {"mlflow": {}}, "sessions": sessions}))
    if index_last_seq is not None:
        (rank_dir / "index.jsonl").write_text(
            json.dumps({"segment": 1, "first_seq": 1, "last_seq": 7}) + "\n"
            + json.dumps({"segment": 2, "first_seq": 8, "last_seq": index_last_seq}) + "\n")


def test_ls_finds_runs_down_to_the_layouts_depth_and_counts_from_manifests_and_indexes(tmp_path):
    """Run discovery matches an os.walk over the tree (no descent into runs or hidden
    directories); counts take the larger of the closed sessions' last_seq and the index's.
    (Runs named like journal directories and symlinked experiments: test_untrusted_journal.)"""
    import os

    from itwinai_journal import Journal
    from itwinai_journal.read.journal import find_run_dirs

    savedir = tmp_path / "mllogs"
    run_dirs = [savedir / "exp" / "r1", savedir / "prov_logs" / "deep" / "exp" / "r2"]
    for d in run_dirs:
        d.mkdir(parents=True)
        (d / "run.json").write_text(json.dumps({"experiment": "exp", "run_id": d.name}))
    _hand_made_rank(run_dirs[0], 0, [{"status": "finished", "last_seq": 30}], index_last_seq=30)
    _hand_made_rank(run_dirs[0], 1, [{"status": "finished", "last_seq": 5},
                                     {"status": "running"}], index_last_seq=12)
    (run_dirs[0] / "rank-00002").mkdir()  # no manifest yet
    _hand_made_rank(run_dirs[1], 0, [{"status": "failed", "last_seq": 3}])
    (savedir / ".hidden/exp/r3").mkdir(parents=True)
    (savedir / ".hidden/exp/r3/run.json").write_text("{}")

    def walked(top):
        for root, dirs, files in os.walk(top):
            if "run.json" in files:
                dirs[:] = []
                yield root
                continue
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))

    assert [str(d) for d in find_run_dirs(savedir)] == list(walked(savedir)) \
        == [str(d) for d in run_dirs]
    assert list(find_run_dirs(run_dirs[0])) == [run_dirs[0]]
    assert list(find_run_dirs(tmp_path / "missing")) == []

    r1, r2 = Journal(savedir).runs()
    assert [(r.rank, r.path, r.status, r.last_seq) for r in r1.ranks] == [
        (0, run_dirs[0] / "rank-00000", "finished", 30),
        (1, run_dirs[0] / "rank-00001", "running", 12),
        (2, run_dirs[0] / "rank-00002", "running", 0)]
    assert r1.ranks[2].manifest == {} and r1.records == 42 and r2.status == "failed"
    rows = json.loads(invoke("ls", str(savedir), "--json").output)
    assert [(r["run_id"], r["status"], r["ranks"], r["records"]) for r in rows] == [
        ("r1", "running", 3, 42), ("r2", "failed", 1, 3)]


def test_ls_imports_no_sync_engine_exporter_or_view(tmp_path):
    """`ls` starts fast: the sync engine, views, pyarrow.compute and exporter plugins (each
    with its option definitions) are only imported by the commands that use them."""
    savedir = tmp_path / "mllogs"
    _journal(savedir, "a", experiment_name="exp")
    code = ("import sys\nfrom itwinai_sync.cli import main\n"
            f"main(['ls', {str(savedir)!r}], standalone_mode=False)\n"
            "print(' '.join(sorted(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert "a  finished  1 rank(s)  20 records  -> mlflow" in proc.stdout
    loaded = set(proc.stdout.split("\n")[-2].split())
    for module in ("itwinai_sync.engine", "itwinai_sync.inspect", "itwinai_sync.targets.mlflow",
                   "itwinai_sync.targets.wandb", "itwinai_sync.targets.tensorboard",
                   "itwinai_sync.targets.prov4ml",
                   "pyarrow.compute", "filelock", "mlflow", "wandb", "torch"):
        assert module not in loaded


# -- target options: each target's own, declared as data ------------------------------------

JSONL_DIR = Path(__file__).parent / "jsonl_target"

#: A target installed by a test, declaring flags other targets have: one of `sync` itself
#: (`--run`), one with another meaning than W&B's (`--mode`), one with the same meaning as
#: TensorBoard's (`--logdir`), and one of its own with a type (`--count`).
CLASH_PLUGIN = '''
from itwinai_sync.api import TargetOption
from itwinai_sync.testing import InMemoryExporter

SEEN = []


class ClashExporter(InMemoryExporter):
    name = "clash"
    cli_options = (
        TargetOption("--run", help="Not offered: a flag of sync itself."),
        TargetOption("--mode", choices=("fast", "slow"), help="How fast."),
        TargetOption("--logdir", type="dir",
                     help="TensorBoard log directory (default: SAVEDIR/tensorboard)."),
        TargetOption("--count", key="how_many", type="int", help="How many."),
    )

    def __init__(self, savedir, options, notes):
        super().__init__(savedir, options, notes)
        SEEN.append(options)
'''


def install_plugin(tmp_path, monkeypatch, name: str, cls: str, source: str) -> None:
    """Target `name` installed as a package is: module `<name>_target` with class `cls`, and a
    dist-info whose entry point registers it, on sys.path for this test."""
    root = tmp_path / "plugins"
    dist = root / f"{name}_target-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}-target\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        f"[itwinai_sync.exporters]\n{name} = {name}_target:{cls}\n")
    (root / f"{name}_target.py").write_text(source)
    monkeypatch.syspath_prepend(str(root))


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """The JSON-lines example target and the `clash` target installed (found through their
    entry points, as installed packages are)."""
    monkeypatch.syspath_prepend(str(JSONL_DIR))
    install_plugin(tmp_path, monkeypatch, "clash", "ClashExporter", CLASH_PLUGIN)
    import clash_target

    clash_target.SEEN.clear()
    yield clash_target.SEEN
    monkeypatch.delitem(sys.modules, "clash_target")


def test_a_flag_goes_to_the_chosen_targets_that_declare_it(tmp_path, plugins):
    savedir = tmp_path / "mllogs"
    _journal(savedir, "a", experiment_name="exp")
    out_dir, tb_dir = tmp_path / "lines", tmp_path / "tb"
    result = invoke(str(savedir), "--to", "jsonl", "--dir", str(out_dir))
    assert result.exit_code == 0, result.output
    assert len((out_dir / "exp" / "a" / "rank-00000.jsonl").read_text().splitlines()) == 20
    assert not (savedir / "jsonl").exists() and not (savedir / "prov").exists()
    # each target gets its own options only, typed as it declared them; --run stays sync's
    result = invoke(str(savedir), "--to", "clash", "--to", "tensorboard", "--mode", "fast",
                    "--count", "3", "--logdir", str(tb_dir), "--run", "a")
    assert result.exit_code == 0, result.output
    assert "the clash target declares --run, an option of `sync` itself" in result.output
    assert plugins == [{"run": None, "mode": "fast", "logdir": tb_dir, "how_many": 3}]
    assert list((tb_dir / "exp" / "a").iterdir())  # TensorBoard took the same --logdir
    assert "exp/a -> clash" in result.output and "20 metric" in result.output


@pytest.mark.parametrize("args, message", [
    (["--to", "mlflow", "--dir", "x"],
     "--dir is not an option of mlflow (it is an option of jsonl, prov4ml)"),
    (["--to", "jsonl", "--to", "prov4ml", "--dir", "x"],
     "--dir means different things to jsonl and prov4ml: sync to them separately"),
    (["--dir", "x"], "--dir means different things to jsonl and prov4ml: say which target "
                     "with --to"),
    (["--to", "wandb", "--mode", "fast"],
     "--mode of wandb: 'fast' is not one of 'offline', 'online'"),
    (["--to", "clash", "--mode", "offline"],
     "--mode of clash: 'offline' is not one of 'fast', 'slow'"),
    (["--to", "clash", "--count", "many"], "'many' is not a valid integer"),
    (["--to", "nosuchtracker", "--dir", "x"], "unknown target 'nosuchtracker'"),
])
def test_a_flag_no_chosen_target_takes_or_that_means_two_things_is_refused(
        tmp_path, plugins, args, message):
    savedir = tmp_path / "mllogs"
    _journal(savedir, "a", experiment_name="exp")
    result = invoke(str(savedir), *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert plugins == [] and not (savedir / "jsonl").exists()
    assert not any(p.name in ("prov", "tensorboard", "wandb") for p in savedir.iterdir())


def test_help_shows_each_meaning_of_a_shared_flag(plugins):
    out = invoke("sync", "--help").output
    assert "--mode VALUE" in out and "clash: How fast." in out
    assert "jsonl: JSON-lines directory" in out and "prov4ml: Prov4ML provenance" in out
    assert "--count INTEGER" in out and "How many." in out
    assert "Not offered" not in out


def test_installed_targets_are_found_in_one_scan_and_a_new_path_is_scanned_again(
        tmp_path, monkeypatch):
    """Scanning the installed distributions costs ~10 ms; a sync asks for every target's
    options, and the engine for its exporters: one scan per sys.path serves them all."""
    from importlib import metadata

    scans = []
    real = metadata.entry_points

    def counted(**kw):
        scans.append(kw)
        return real(**kw)

    monkeypatch.setattr(metadata, "entry_points", counted)
    monkeypatch.syspath_prepend(str(tmp_path / "nothing-here"))  # a path not scanned yet
    savedir = tmp_path / "mllogs"
    _journal(savedir, "a", experiment_name="exp")
    result = invoke(str(savedir), "--to", "tensorboard", "--logdir", str(tmp_path / "tb"))
    assert result.exit_code == 0, result.output
    assert len(scans) == 1
    monkeypatch.syspath_prepend(str(JSONL_DIR))  # a target installed since is found
    result = invoke(str(savedir), "--to", "jsonl", "--dir", str(tmp_path / "lines"))
    assert result.exit_code == 0, result.output
    assert len(scans) == 2


def test_the_engine_gives_each_exporter_only_its_own_options(tmp_path):
    from itwinai_sync.api import OptionError
    from itwinai_sync.engine import SyncEngine, SyncRequest

    options = {"mlflow": {"experiment": "e"}, "tensorboard": {"logdir": tmp_path / "tb"}}
    engine = SyncEngine(SyncRequest(tmp_path, ["mlflow", "tensorboard"], options=options))
    assert engine.exporter("mlflow").options == {"tracking_uri": None, "experiment": "e"}
    assert engine.exporter("tensorboard").options == {"logdir": tmp_path / "tb"}
    assert engine.exporter("wandb").options == {"project": None, "entity": None, "mode": None,
                                                "on_step_regression": None}
    engine = SyncEngine(SyncRequest(tmp_path, ["mlflow"], options={"mlflow": {"logdir": "x"}}))
    with pytest.raises(OptionError, match="mlflow has no option logdir"):
        engine.exporter("mlflow")


# -- one error root ----------------------------------------------------------------------------


def test_every_error_of_the_project_has_one_root_and_keeps_its_builtin_base():
    from itwinai_journal.capture.numbers import NotAPlainMetric
    from itwinai_journal.errors import ItwinaiSyncError, UsageError
    from itwinai_journal.format.fsio import JournalWriteError
    from itwinai_journal.format.validate import JournalCorruption
    from itwinai_sync.api import (
        ExportError,
        OptionError,
        TargetChanged,
        TargetUnavailable,
        UnknownTarget,
        load_exporter,
    )
    from itwinai_sync.engine import SeqGap
    from itwinai_sync.inspect import ViewError
    from itwinai_sync.targets.prov4ml.models import NotAModule

    for error in (JournalWriteError, JournalCorruption, NotAPlainMetric, ExportError, SeqGap,
                  TargetChanged, TargetUnavailable, UnknownTarget, OptionError, NotAModule,
                  ViewError):
        assert issubclass(error, ItwinaiSyncError), error
    assert issubclass(UnknownTarget, UsageError) and issubclass(OptionError, UsageError)
    assert issubclass(JournalWriteError, OSError) and issubclass(NotAPlainMetric, TypeError)
    written = JournalWriteError(28, "No space left on device")
    assert written.errno == 28 and written.strerror == "No space left on device"
    with pytest.raises(UnknownTarget, match="unknown target 'nope' \\(available: .*mlflow"):
        load_exporter("nope")


def test_library_code_does_not_import_click():
    """The plugin interface, the engine and every target are used without the command line:
    only `itwinai_sync.cli` knows click."""
    code = ("import sys, itwinai_journal.loggers, itwinai_sync.api, itwinai_sync.engine, "
            "itwinai_sync.testing, itwinai_sync.targets.mlflow, itwinai_sync.targets.wandb, "
            "itwinai_sync.targets.tensorboard, itwinai_sync.targets.prov4ml\n"
            "print('click' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert proc.stdout.strip() == "False"


def test_options_not_given_per_target_are_refused(tmp_path):
    """The engine takes each target's options under its name; the flat form of earlier
    versions (`options={"tracking_uri": ...}`) would otherwise be dropped in silence."""
    from itwinai_sync.api import OptionError
    from itwinai_sync.engine import SyncRequest

    with pytest.raises(OptionError, match="per target.*tracking_uri at the top level"):
        SyncRequest(savedir=tmp_path, targets=["mlflow"], options={"tracking_uri": "x"})
    assert SyncRequest(savedir=tmp_path, targets=["mlflow"],
                       options={"mlflow": {"tracking_uri": "x"}}).options


OLD_STYLE_PLUGIN = '''
from itwinai_sync.testing import InMemoryExporter


class OldStyleExporter(InMemoryExporter):
    name = "oldstyle"

    @classmethod
    def cli_options(cls):  # the click-based form of earlier versions
        return []
'''


def test_a_plugin_with_the_old_option_form_breaks_no_other_target(tmp_path, monkeypatch):
    """A target still declaring click options through a classmethod is unusable, said in one
    line when it is asked for; the other targets and `--help` work as before."""
    install_plugin(tmp_path, monkeypatch, "oldstyle", "OldStyleExporter", OLD_STYLE_PLUGIN)
    savedir = tmp_path / "mllogs"
    _journal(savedir, "a", experiment_name="exp")
    assert invoke("sync", "--help").exit_code == 0
    result = invoke(str(savedir), "--to", "tensorboard", "--logdir", str(tmp_path / "tb"))
    assert result.exit_code == 0, result.output
    result = invoke(str(savedir), "--to", "oldstyle")
    assert result.exit_code == 1
    assert "oldstyle exporter declares its options in a form this version does not read" in (
        result.output)
    monkeypatch.delitem(sys.modules, "oldstyle_target", raising=False)
