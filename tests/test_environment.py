"""environment.yml (conda, Windows) and pyproject.toml (pip) list the same dependencies."""

from __future__ import annotations

import tomllib

import yaml

from utils.paths import REPO_ROOT


def _pip_requirements_of_environment() -> list[str]:
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    pip_block = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return [r for r in pip_block if not r.startswith("-e")]


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    expected = project["dependencies"] + project["optional-dependencies"]["test"]
    assert sorted(_pip_requirements_of_environment()) == sorted(expected)


def test_environment_installs_the_project_itself():
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    pip_block = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert "-e ." in pip_block
    assert "python=3.11" in env["dependencies"]
