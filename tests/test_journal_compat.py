"""The version gates of third-party private API (itwinai_journal/compat.py): the ranges are the
ones pyproject.toml's extras declare, the installed Lightning is inside its range and gives the
adapter every helper, and a library outside its range or missing a helper is said once and
falls back instead of failing the training."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from itwinai_journal import compat

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _spec(gate) -> str:
    name, low, high = gate
    return f"{name}>={'.'.join(map(str, low))},<{'.'.join(map(str, high))}"


def test_ranges_are_the_extras_of_pyproject():
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    assert extras["lightning"] == [_spec(compat.LIGHTNING_RANGE)] == ["lightning>=2.1,<3"]
    assert extras["codecarbon"] == [_spec(compat.CODECARBON_RANGE)] == ["codecarbon>=3.3,<4"]
    assert _spec(compat.LIGHTNING_RANGE) in extras["test"]


@pytest.mark.parametrize(("version", "inside"), [
    ("2.1", True), ("2.1.0", True), ("2.6.6", True), ("2.99.1rc1", True), ("2.0.9", False),
    ("3.0.0", False), ("1.9", False), ("fake", False), (None, False), ("", False)])
def test_in_range(version, inside):
    assert compat.in_range(version, compat.LIGHTNING_RANGE) is inside


def test_installed_lightning_is_in_range_and_complete():
    pytest.importorskip("lightning")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no out-of-range or missing-helper warning
        api = compat.lightning()
    assert compat.in_range(api.version, compat.LIGHTNING_RANGE)
    flat = api.flat_params({"optim": {"lr": 0.1}, "fn": len, "epochs": 3})
    assert flat == {"optim/lr": 0.1, "fn": "len", "epochs": 3}


def test_lightning_without_its_helpers_falls_back_and_says_so(monkeypatch):
    pytest.importorskip("lightning")
    monkeypatch.setattr(compat, "_warned", set())
    monkeypatch.setattr(compat, "_private", lambda module, names: None)
    with pytest.warns(RuntimeWarning) as said:
        api = compat.lightning()
    messages = [str(w.message) for w in said]
    assert any("hyperparameters are not journaled" in m for m in messages)
    assert any("checkpoints are not journaled" in m for m in messages)
    assert api.flat_params({"lr": 1}) == {}
    assert api.scan_checkpoints(object(), {}) == []


def test_a_version_outside_the_range_is_said_once(monkeypatch):
    monkeypatch.setattr(compat, "_warned", set())
    with pytest.warns(RuntimeWarning, match=r"codecarbon 2\.8\.0 is outside the tested range "
                      r"codecarbon>=3\.3,<4"):
        compat.check_version("2.8.0", compat.CODECARBON_RANGE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.check_version("2.8.0", compat.CODECARBON_RANGE)  # once
        compat.check_version("3.3.2", compat.CODECARBON_RANGE)  # inside: nothing


def test_codecarbon_readings_through_the_gate():
    class Reading:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    tracker = Reading(_total_energy=Reading(kWh=0.5), _total_cpu_energy=Reading(kWh=0.3),
                      _cpu_power=Reading(W=42), _total_ram_energy=Reading(kWh=0.2),
                      _conf={"hardware": ["CPU(Cpu Load)"]})
    assert compat.codecarbon_energy_kwh(tracker) == 0.5
    assert compat.codecarbon_components(tracker) == {"cpu": (0.3, 42.0), "dram": (0.2, None)}
    assert compat.codecarbon_hardware(tracker) == ["CPU(Cpu Load)"]
    assert compat.codecarbon_hardware(Reading()) is None
