"""End to end: every notebook executes under papermill on the smallest profile."""

from __future__ import annotations

import json

import nbformat
import pytest

from utils.paths import RUNS_DIR
from utils.runner import list_notebooks


@pytest.mark.slow
def test_all_notebooks_run_on_smoke(smoke_run):
    out = smoke_run  # python -m utils.runner --profile smoke, once per session (conftest.py)
    assert out.returncode == 0, out.stdout + out.stderr
    run = RUNS_DIR / "smoke"
    for source in list_notebooks():
        executed = nbformat.read(run / source.name, as_version=4)
        errors = [
            o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"
        ]
        assert not errors, source.name
        record = json.loads((run / f"{source.name[:2]}_run.json").read_text())
        assert record["profile"] == "smoke"
        assert record["wall_time_s"] > 0
    figures = list((run / "figures").glob("*.pdf"))
    assert figures, "smoke run wrote no figures"
