"""The trackers' versions the exporters' private-API uses (itwinai_sync/compat.py) are tested
with: the installed ones are inside the ranges pyproject.toml's extras declare (yprov4ml's in
requirements-prov4ml-nodeps.txt), and the exporters' version gate says so."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from itwinai_sync import compat

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent
#: The trackers whose private API compat.py uses, and the extra declaring each one's range.
TRACKERS = {"mlflow": "mlflow", "wandb": "wandb", "tensorboard": "tensorboard",
            "crc32c": "tensorboard"}


def declared(extra: str, name: str) -> Requirement:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (req,) = [Requirement(line) for line in project["optional-dependencies"][extra]
              if Requirement(line).name == name]
    return req


@pytest.mark.parametrize("name", sorted(TRACKERS))
def test_installed_tracker_is_inside_its_declared_range(name):
    req = declared(TRACKERS[name], name)
    assert str(req.specifier), f"{name}: no version range in the [{TRACKERS[name]}] extra"
    installed = Version(metadata.version(name))
    assert installed in req.specifier, f"{name} {installed} is outside {req.specifier}"
    # the range the exporters check at run time is the one declared
    if name in compat.TESTED:
        assert SpecifierSet(compat.tested_range(name)) == req.specifier
    assert compat.untested(name) is None


def test_installed_yprov4ml_is_inside_its_declared_range():
    lines = [line.strip() for line in (ROOT / "requirements-prov4ml-nodeps.txt").read_text()
             .splitlines() if line.strip() and not line.startswith("#")]
    env = default_environment()
    (req,) = [r for r in map(Requirement, lines) if r.marker is None or r.marker.evaluate(env)]
    installed = metadata.version("yprov4ml")
    assert Version(installed) in req.specifier
    assert installed.startswith(compat.SUPPORTED_YPROV4ML)
    assert compat.yprov4ml_version() == installed


def test_a_version_outside_the_range_is_named(monkeypatch):
    monkeypatch.setitem(compat.TESTED, "wandb", ("wandb", (0, 17), (0, 18)))
    note = compat.untested("wandb")
    assert note is not None and f"wandb {metadata.version('wandb')} is outside" in note
    assert ">=0.17,<0.18" in note


def test_every_tracker_whose_private_api_is_used_has_its_range_checked():
    assert set(compat.TESTED) == {"mlflow", "wandb", "tensorboard"}
    assert all(compat.TESTED[name][0] == name for name in compat.TESTED)
