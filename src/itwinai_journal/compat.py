"""Every use of a third-party library's private API, each gated by the versions it was tested
with (the same ranges are written in pyproject.toml's extras).

- Lightning (`lightning>=2.1,<3`, tested with 2.6.6; or the older `pytorch_lightning` with
  `lightning_fabric`): the helpers its own loggers use to flatten hyperparameters
  (`_convert_params`, `_sanitize_callable_params`, `_flatten_dict`), to find the checkpoints
  `ModelCheckpoint` saved (`_scan_checkpoints`), and the step a checkpoint was saved at
  (`ModelCheckpoint._last_global_step_saved`).
- codecarbon (`codecarbon>=3.3,<4`, tested with 3.3.2, the version yprov4ml 2.0.9 installs):
  `OfflineEmissionsTracker`'s running totals (`_total_energy`, `_total_<component>_energy`),
  current powers (`_<component>_power`), configuration (`_conf`) and scheduler
  (`_scheduler`).

Outside its range a library is still used, after one RuntimeWarning naming the tested range;
a private name that is gone makes the feature that needs it fall back (said once), never fail
the training: hyperparameters and checkpoints of a Lightning run are then not journaled
through the adapter, and carbon is measured from the energy counters instead of codecarbon.
Nothing here is imported with `itwinai_journal`: each library is imported when first used.
"""

from __future__ import annotations

import inspect
import logging
import re
import warnings
from argparse import Namespace
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

#: A tested version range: (distribution, lowest tested release, first release not tested),
#: `low <= release < high`. Parsed by hand (`in_range`): `packaging` costs 30-45 ms to import.
Gate = tuple[str, tuple[int, ...], tuple[int, ...]]
LIGHTNING_RANGE: Gate = ("lightning", (2, 1), (3,))
CODECARBON_RANGE: Gate = ("codecarbon", (3, 3), (4,))

_warned: set[str] = set()


def _release(version: str) -> tuple[int, ...] | None:
    """The numeric release of a version string ('2.6.6' -> (2, 6, 6)); None when it has none."""
    match = re.match(r"\d+(\.\d+)*", str(version))
    return tuple(int(p) for p in match.group().split(".")) if match else None


def in_range(version: str | None, gate: Gate) -> bool:
    """Whether `version` is within the tested range `gate`."""
    _, low, high = gate
    release = _release(version) if version else None
    return release is not None and low <= release < high


def _say_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def check_version(version: str | None, gate: Gate) -> None:
    """Warn once when `version` of the library is outside its tested range."""
    if not in_range(version, gate):
        name, low, high = gate
        tested = f"{name}>={'.'.join(map(str, low))},<{'.'.join(map(str, high))}"
        _say_once(f"range:{name}", f"itwinai_journal: {name} {version} is outside the "
                  f"tested range {tested}; its private API is used as in that range")


# -- Lightning ---------------------------------------------------------------------------------


class Lightning(NamedTuple):
    """What the Lightning adapter uses of Lightning."""

    #: `lightning.pytorch.loggers.logger.Logger`, the base class of Lightning's loggers.
    Logger: type
    #: `rank_zero_only`, whose `rank` attribute is the process's global rank.
    rank_zero_only: Any
    #: hyperparameters (dict or Namespace) -> flat {"a/b": value}, callables by their names.
    flat_params: Callable[[dict[str, Any] | Namespace], dict[str, Any]]
    #: (checkpoint callback, {path: mtime} logged) -> [(mtime, path, score, tag)] not logged.
    scan_checkpoints: Callable[[Any, dict[str, float]], list[tuple[float, str, Any, str]]]
    version: str


def lightning() -> Lightning:
    """Lightning (`lightning.pytorch`), else the standalone `pytorch_lightning` package.
    Raises ImportError when neither is installed."""
    try:
        import lightning as package
        from lightning.fabric.utilities.rank_zero import rank_zero_only
        from lightning.pytorch.loggers.logger import Logger
        fabric = "lightning.fabric.utilities.logger"
        utilities = "lightning.pytorch.loggers.utilities"
    except ImportError:
        import pytorch_lightning as package  # type: ignore[no-redef]
        from lightning_fabric.utilities.rank_zero import (  # type: ignore[no-redef]
            rank_zero_only,
        )
        from pytorch_lightning.loggers.logger import Logger  # type: ignore[no-redef]
        fabric = "lightning_fabric.utilities.logger"
        utilities = "pytorch_lightning.loggers.utilities"
    version = getattr(package, "__version__", None)
    check_version(version, LIGHTNING_RANGE)
    helpers = _private(fabric, ("_convert_params", "_sanitize_callable_params", "_flatten_dict"))
    scan = _private(utilities, ("_scan_checkpoints",))
    if helpers is None:
        _say_once("lightning:params", f"itwinai_journal: Lightning {version} lacks the "
                  "hyperparameter helpers the adapter uses: hyperparameters are not journaled")

        def flat_params(params: Any) -> dict[str, Any]:
            return {}
    else:
        convert, sanitize, flatten = helpers

        def flat_params(params: Any) -> dict[str, Any]:
            return flatten(sanitize(convert(params)))
    if scan is None:
        _say_once("lightning:checkpoints", f"itwinai_journal: Lightning {version} lacks "
                  "_scan_checkpoints: checkpoints are not journaled by the adapter")

        def scan_checkpoints(callback: Any, seen: dict[str, float]) -> list:
            return []
    else:
        (scan_checkpoints,) = scan
    return Lightning(Logger, rank_zero_only, flat_params, scan_checkpoints, str(version))


def _private(module: str, names: Iterable[str]) -> tuple[Any, ...] | None:
    """`names` from `module`, or None when any of them is gone."""
    try:
        imported = __import__(module, fromlist=list(names))
        return tuple(getattr(imported, name) for name in names)
    except (ImportError, AttributeError):
        return None


def last_global_step_saved(checkpoint_callback: Any) -> int | None:
    """The global step `ModelCheckpoint` last saved at (None when unknown)."""
    step = getattr(checkpoint_callback, "_last_global_step_saved", None)
    return step if isinstance(step, int) else None


# -- codecarbon --------------------------------------------------------------------------------


#: Options passed to codecarbon that keep it off the network and off the disk, whatever a
#: ~/.codecarbon.config or CODECARBON_* variable says; filtered by what the installed version
#: accepts (names changed across versions).
_CODECARBON_OPTIONS: dict[str, Any] = {
    "save_to_file": False, "save_to_api": False, "save_to_logger": False,
    "save_to_prometheus": False, "save_to_logfire": False, "emissions_endpoint": None,
    "co2_signal_api_token": None, "electricitymaps_api_token": None, "log_level": "error",
    "tracking_mode": "machine", "allow_multiple_runs": True,
}


def start_codecarbon_tracker(codecarbon: Any, country: str) -> Any:
    """An OfflineEmissionsTracker, started, with its periodic measure-and-output scheduler
    stopped: like every other kind, carbon is measured at `log()` time (`flush()` measures), and
    energy counters integrate exactly between two calls. codecarbon 3's power-monitor sampler
    keeps running (a daemon thread): its load-based estimates need it. Raises RuntimeError when
    the tracker lacks what `codecarbon_energy_kwh` reads (the caller falls back)."""
    check_version(getattr(codecarbon, "__version__", None), CODECARBON_RANGE)
    cls = codecarbon.OfflineEmissionsTracker
    accepted = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            accepted |= set(inspect.signature(klass.__init__).parameters)
    options = {k: v for k, v in _CODECARBON_OPTIONS.items() if k in accepted}
    if "electricitymaps_api_token" in options:  # the old name is deprecated, and warns
        options.pop("co2_signal_api_token", None)
    # What log_level="error" does, but before the constructor's own INFO/WARNING lines.
    logging.getLogger("codecarbon").setLevel(logging.ERROR)
    tracker = cls(country_iso_code=country, **options)
    if not hasattr(tracker, "_total_energy"):
        raise RuntimeError("OfflineEmissionsTracker could not be set up (no _total_energy: "
                           "a codecarbon outside the tested range?)")
    tracker.start()
    scheduler = getattr(tracker, "_scheduler", None)
    if scheduler is not None:
        scheduler.stop()
    return tracker


def codecarbon_energy_kwh(tracker: Any) -> float:
    """The tracker's total energy since it started, in kWh."""
    return float(tracker._total_energy.kWh)


def codecarbon_components(tracker: Any) -> dict[str, tuple[float | None, float | None]]:
    """{component: (total energy in kWh, current power in W)} for the components codecarbon
    reports, by the journal's names (its `ram` is `dram`); None where it reports nothing."""
    found: dict[str, tuple[float | None, float | None]] = {}
    for ours, theirs in (("cpu", "cpu"), ("gpu", "gpu"), ("dram", "ram")):
        energy = getattr(getattr(tracker, f"_total_{theirs}_energy", None), "kWh", None)
        power = getattr(getattr(tracker, f"_{theirs}_power", None), "W", None)
        energy = float(energy) if isinstance(energy, (int, float)) else None
        power = float(power) if isinstance(power, (int, float)) else None
        if energy is not None or power is not None:
            found[ours] = (energy, power)
    return found


def codecarbon_hardware(tracker: Any) -> Any:
    """How codecarbon got its numbers, e.g. "CPU(Cpu Load)": estimated from load and TDP, not
    read from a counter (None when it does not say)."""
    conf = getattr(tracker, "_conf", None)
    return conf.get("hardware") if isinstance(conf, dict) else None
