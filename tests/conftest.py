"""Shared fixtures: the embedded assets are prepared once per session (cheap when cached).

``make test`` runs the suite on two workers (pytest-xdist, ``--dist loadfile``: a file's tests share one worker and
its module fixtures). The tests of the smoke run (``smoke_run``, five minutes of notebooks) are collected first and
``--no-loadscope-reorder`` keeps that order (xdist would otherwise hand out the files with most tests first), so one
worker starts with them while the other works through the rest.
"""

from __future__ import annotations

import subprocess
import sys

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The smoke run's tests first (a stable sort: the rest keep their order)."""
    items.sort(key=lambda item: "smoke_run" not in getattr(item, "fixturenames", ()))


@pytest.fixture(scope="session")
def embedded_tokenizer():
    from utils.modeling import load_tokenizer

    return load_tokenizer("embedded")


@pytest.fixture(scope="session")
def llama_tokenizer():
    from utils.modeling import load_tokenizer

    return load_tokenizer("llama-3.2")


@pytest.fixture(scope="session")
def embedded_model():
    from utils.modeling import load_model

    return load_model("embedded", device="cpu")


@pytest.fixture(scope="session")
def smoke_run():
    """Every notebook run once on the smoke profile through the runner's command line (as `make smoke` does).

    The notebook tests read what this one run wrote (runs/smoke/): a second run of notebooks 04 and 05 only for
    notebook 05's checks cost about five minutes of CI. Returns the finished process; each test asserts its exit.
    """
    from utils.paths import REPO_ROOT

    return subprocess.run([sys.executable, "-m", "utils.runner", "--profile", "smoke"], cwd=REPO_ROOT,
                          capture_output=True, text=True)
