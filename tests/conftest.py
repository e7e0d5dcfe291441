"""Shared fixtures: the embedded assets are prepared once per session (cheap when cached)."""

from __future__ import annotations

import subprocess
import sys

import pytest


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
