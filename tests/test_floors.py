"""The dependency floors in pyproject.toml and the constraints file .ci/run tests them with (.ci/floors.txt) agree,
and the smoke tests .ci/run names still exist."""

import ast
import re

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from conftest import REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

FLOORS = REPO / ".ci" / "floors.txt"
# The libraries whose oldest supported versions are tested; each must have a line in .ci/floors.txt.
TESTED = {"transformers", "trl", "accelerate", "datasets", "peft"}


def pyproject_floors() -> dict[str, Version]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    floors = {}
    for line in project["dependencies"]:
        requirement = Requirement(line)
        lower = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
        if lower:
            floors[requirement.name.lower()] = max(lower)
    return floors


def constraint_pins() -> dict[str, Version]:
    pins = {}
    for line in FLOORS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        specs = list(requirement.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"{FLOORS.name}: {line!r} is not an exact pin"
        name = requirement.name.lower()
        assert name not in pins, f"{FLOORS.name}: {name} pinned twice"
        pins[name] = Version(specs[0].version)
    return pins


def test_constraints_pin_exactly_the_pyproject_floors():
    floors, pins = pyproject_floors(), constraint_pins()
    assert TESTED <= pins.keys(), f"{FLOORS.name} lacks {sorted(TESTED - pins.keys())}"
    for name, pinned in pins.items():
        assert name in floors, f"{FLOORS.name} pins {name}, which has no `>=` floor in pyproject.toml"
        assert pinned == floors[name], (
            f"pyproject.toml says {name}>={floors[name]} but {FLOORS.name} tests {name}=={pinned}: change both together"
        )


def test_the_floor_smoke_tests_named_in_ci_run_exist():
    script = (REPO / ".ci" / "run").read_text()
    assert ".ci/floors.txt" in script
    node_ids = re.findall(r"(tests/\S+\.py)::(\w+)", script)
    assert node_ids, "no smoke tests named in .ci/run"
    for path, name in node_ids:
        tree = ast.parse((REPO / path).read_text())
        functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        assert name in functions, f".ci/run runs {path}::{name}, which does not exist"
