"""The environment: the lock of tested versions, the conda file for Windows, and the make-free commands."""

from __future__ import annotations

import re
import subprocess
import tomllib
from importlib import metadata

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from utils.paths import REPO_ROOT

LOCK = REPO_ROOT / "requirements" / "lock-cpu.txt"
RELOCK = "re-lock with `make lock` (README, \"Tested versions\")"


def read_lock() -> dict[str, str]:
    """``{normalised name: version}`` of every ``name==version`` line of the lock."""
    pins = {}
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line)
        if match:
            pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def declared_requirements() -> list[Requirement]:
    """pyproject's dependencies and the extras the lock covers (``test``, ``tensorboard``)."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in [*project["dependencies"], *extras["test"], *extras["tensorboard"]]]


def readme_section(title: str) -> str:
    """The text of one ``## title`` section of the README."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def test_lock_pins_every_dependency_within_its_range():
    pins = read_lock()
    for requirement in declared_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} (pyproject.toml) is not in {LOCK.name}: {RELOCK}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{LOCK.name} pins {name}=={pins[name]}, outside pyproject's {requirement}: {RELOCK}")


def test_lock_is_the_small_cpu_build():
    pins = read_lock()
    assert re.fullmatch(r"\d+\.\d+\.\d+", pins["torch"]), "torch==X without a local label (+cpu), see the Makefile"
    cuda = sorted(n for n in pins if n.startswith(("nvidia-", "cuda-")) or n == "triton")
    assert not cuda, f"{LOCK.name} carries CUDA packages {cuda}: it was resolved against the CUDA build of torch"


def test_installed_versions_are_the_locked_ones():
    pins = read_lock()
    if metadata.version("torch").split("+")[0] != pins["torch"]:
        pytest.skip("a torch of your own (TORCH_SPEC or installed first): the lock is for its CPU build")
    wrong = []
    for name, version in pins.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "missing"
        if installed.split("+")[0] != version:
            wrong.append(f"{name} {installed} (locked {version})")
    assert not wrong, (f"this environment differs from {LOCK.name}: {', '.join(wrong)}. Install the lock: "
                       f"python -m pip install -r requirements/lock-cpu.txt (make does it when the lock changes)")


def test_make_installs_the_lock_and_the_project_without_other_dependencies(tmp_path):
    venv = tmp_path / "venv"
    out = subprocess.run(["make", "-n", "setup", f"VENV={venv}"], cwd=REPO_ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert "requirements/lock-cpu.txt" in out and f"-r {venv}/requirements.txt" in out
    assert "--no-deps -e ." in out


def test_environment_yml_leaves_torch_to_the_user():
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text(encoding="utf-8"))
    assert env["dependencies"] == ["python=3.11", "pip"], "conda gives Python and pip only (README, Windows)"


def test_windows_steps_install_cuda_torch_before_the_project():
    steps = [line.strip() for line in readme_section("Windows / conda").splitlines()]
    torch_line = next(i for i, s in enumerate(steps) if "download.pytorch.org/whl/cu" in s and "pip install" in s)
    project_line = next(i for i, s in enumerate(steps) if re.search(r"pip install (-c \S+ )?-e ", s))
    assert torch_line < project_line, "torch from the CUDA index must come before the project (else: CPU torch)"


def test_environment_yml_repeats_the_readme_steps():
    header = [line[1:].strip() for line in (REPO_ROOT / "environment.yml").read_text(encoding="utf-8").splitlines()
              if line.startswith("#   ")]
    block = readme_section("Windows / conda").split("```bat\n", 1)[1].split("```", 1)[0]
    assert header == [line.strip() for line in block.splitlines() if line.strip()]


def test_every_make_target_has_a_command_without_make():
    makefile = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    targets = re.search(r"^\.PHONY:(.*)$", makefile, re.M).group(1).split()
    section = readme_section("Windows / conda")
    missing = [t for t in targets if f"`make {t}" not in section]
    assert not missing, f"README, Windows / conda: no command given for make {missing}"


def test_readme_table_of_tested_versions_is_the_lock():
    pins = read_lock()
    rows = re.findall(r"^\| ([A-Za-z0-9_.-]+) \| ([0-9][^ |]*) \|$", readme_section("Tested versions"), re.M)
    assert len(rows) >= 10
    stale = [f"{name} {version} (lock: {pins.get(canonicalize_name(name))})" for name, version in rows
             if pins.get(canonicalize_name(name)) != version]
    assert not stale, f"README, Tested versions: {stale}"


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped (hyphens kept), spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_in_page_link_of_the_readme_names_one_of_its_headings():
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)  # a "# comment" in a code block is no heading
    anchors = [github_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", prose, re.M)]
    assert len(anchors) == len(set(anchors)), "two headings share an anchor: a link can reach only the first"
    links = re.findall(r"\]\(#([^)\s]+)\)", text)
    assert len(links) >= 10, "the contents list links every main section"
    broken = sorted(set(links) - set(anchors))
    assert not broken, f"README links to anchors no heading has: {broken}"
