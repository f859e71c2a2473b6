"""Live sync, the training side: start the sidecar that follows this run's journal to its
trackers while the job runs (`itwinai-sync live`, in `itwinai_sync.cli.live`).

Opt-in, with the logger argument `live_sync` (True: the run's declared destinations; a name or
a list of names: those targets; False: off) or, when the argument is not given, the variable
`ITWINAI_SYNC_LIVE` (`1`/`true`/`all`: declared destinations; `mlflow,wandb`: those; empty or
`0`: off).

Once per job and run, not once per node: the sync engine exports a run (all its ranks) under
one lock per target, so a second sidecar of the same run would only find it busy; one sidecar
makes one set of connections to the tracker and keeps one status. It is started by the lowest
rank that logs (rank 0 unless `log_on_workers` excludes it), which on a shared savedir sees
every rank's journal.

It is a separate process, never a thread: exports (HTTP, Arrow, protobuf) would otherwise take
the GIL from the training loop. This package never imports `itwinai_sync` (the login-node
package may not be installed on a compute node): the sidecar is started as
`python -m itwinai_sync.cli live ...` when this interpreter has it, else as the `itwinai-sync`
console script on PATH, else live sync is off with one warning. Starting it never raises; its
output goes to `<savedir>/.sync/live/<experiment>/<run_id>.log`. It watches its parent (the
training process) itself and ends after it (see `itwinai_sync.cli.live`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from itwinai_journal.format import names

ENV = "ITWINAI_SYNC_LIVE"
#: Directory below savedir of the sidecars' logs and status files.
LIVE_DIR = Path(".sync") / "live"

LiveSetting = bool | str | list[str] | tuple[str, ...] | None

#: Sidecars started by this process, per (savedir, experiment, run id): one per run at a time.
_sidecars: dict[tuple[str, str, str], subprocess.Popen] = {}
#: Problems already reported by this process: each is said once, not once per logger.
_said: set[str] = set()


def live_paths(savedir: Path, experiment: str, run_id: str) -> tuple[Path, Path]:
    """The sidecar's log file and status file of one run."""
    base = Path(savedir) / LIVE_DIR / names.experiment_dirname(experiment)
    return base / f"{run_id}.log", base / f"{run_id}.json"


def targets_of(setting: LiveSetting) -> list[str] | None:
    """The targets live sync goes to: None for off, [] for the run's declared destinations.
    The argument wins over the environment variable when it is given."""
    if setting is None:
        setting = os.environ.get(ENV, "")
    if setting is True:
        return []
    if setting is False:
        return None
    if isinstance(setting, str):
        words = [w.strip() for w in setting.split(",") if w.strip()]
        if not words or [w.lower() for w in words] in (["0"], ["false"], ["no"], ["off"]):
            return None
        if [w.lower() for w in words] in (["1"], ["true"], ["yes"], ["on"], ["all"]):
            return []
        return words
    return [str(t) for t in setting]


def starts_here(rank: int, log_on_workers: Any) -> bool:
    """Whether this rank is the one that starts the run's sidecar: the lowest rank that logs."""
    if isinstance(log_on_workers, list) and log_on_workers and -1 not in log_on_workers:
        ints = [w for w in log_on_workers if isinstance(w, int)]
        return bool(ints) and rank == min(ints)
    if isinstance(log_on_workers, int) and log_on_workers >= 0:
        return rank == log_on_workers
    return rank == 0


def _command() -> list[str] | None:
    """How to run `itwinai-sync` from here, without importing it."""
    if find_spec("itwinai_sync") is not None:
        return [sys.executable, "-m", "itwinai_sync.cli"]
    script = shutil.which("itwinai-sync")
    return [script] if script else None


def start(savedir: Path, experiment: str, run_id: str, targets: list[str]) -> str | None:
    """Start the sidecar of this run unless one started by this process still runs. Never
    raises: a problem is returned as the text of a warning to give (once per process), for
    live sync is a convenience and the journal is the record."""
    key = (str(Path(savedir).resolve()), experiment, run_id)
    running = _sidecars.get(key)
    if running is not None and running.poll() is None:
        return None
    command = _command()
    if command is None:
        return _once("missing", f"live sync requested ({ENV} or live_sync=) but itwinai-sync "
                     "is not installed here (neither importable nor on PATH): the run is only "
                     "journaled; sync it later with `itwinai-sync`")
    log_path, _ = live_paths(savedir, experiment, run_id)
    argv = [*command, "live", key[0], "--run", f"{experiment}/{run_id}",
            "--parent", str(os.getpid())]
    for target in targets:
        argv += ["--to", target]
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            # Its own session: a Ctrl-C meant for the training does not cut an export short;
            # the sidecar sees its parent end and drains then.
            _sidecars[key] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                              stderr=subprocess.STDOUT, close_fds=True,
                                              start_new_session=True)
    except OSError as e:
        return _once(f"start:{e}", f"live sync could not start ({e}): the run is only "
                     "journaled; sync it later with `itwinai-sync`")
    return None


def _once(key: str, message: str) -> str | None:
    if key in _said:
        return None
    _said.add(key)
    return message
