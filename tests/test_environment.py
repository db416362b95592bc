"""environment.yml (conda/mamba) and pyproject.toml (pip) install the same packages."""

from __future__ import annotations

import re
import tomllib

import yaml
from conftest import REPO
from packaging.requirements import Requirement

# conda-forge names that differ from PyPI's
CONDA_TO_PYPI = {"python-kubernetes": "kubernetes"}


def pip_side() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["test"]
    requirements += project["optional-dependencies"]["engine-cpu"]
    return {Requirement(r).name.lower(): str(Requirement(r).specifier) for r in requirements}


def conda_side() -> dict[str, str]:
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    found = {}
    for item in env["dependencies"]:
        entries = item["pip"] if isinstance(item, dict) else [item]
        for entry in entries:
            # conda writes an exact pin with one "=", pip with two
            requirement = Requirement(re.sub(r"(?<![<>=!~])=(?!=)", "==", entry))
            name = CONDA_TO_PYPI.get(requirement.name.lower(), requirement.name.lower())
            found[name] = str(requirement.specifier)
    found.pop("python"), found.pop("pip")
    return found


def test_same_packages_and_versions():
    assert conda_side() == pip_side()


def test_conda_python_is_the_projects():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "python=3.11" in env["dependencies"] and project["requires-python"] == ">=3.11"
