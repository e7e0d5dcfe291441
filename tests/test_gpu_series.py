"""``tools/gpu_campaign/series.sh``: every job it launches is a command its program accepts.

A GPU session is 30 minutes; a job that dies on its own command line (as ``turing-off`` did once, with an option
``tools/turing_path.py`` does not have) costs one of its runs. Each job is launched here with a ``python`` that
adds ``--dry-run``, so the runner and ``turing_path.py`` check the profile, notebooks, ``--set`` overrides and run
names, and start nothing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from utils.paths import REPO_ROOT
from utils.runner import main as runner_main

SERIES = REPO_ROOT / "tools" / "gpu_campaign" / "series.sh"
# the twin's jobs write the 6.4 GB twin first; they are the runner's own `thesis-twin` profile, tested below
SKIPPED = {"thesis-twin", "thesis-twin-late"}


def series_jobs() -> list[str]:
    """Every job name of ``launch_one``'s case block."""
    text = SERIES.read_text(encoding="utf-8")
    block = text[text.index("launch_one() {"):text.index("ALL_JOBS=")]
    return [m.group(1) for m in re.finditer(r"^\s{4}([a-z0-9-]+)\)", block, re.MULTILINE)]


def wait_for(campaign, jobs: list[str], seconds: float) -> None:
    """Wait until every job has written its exit code."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not all((campaign / f"{j}.rc").exists() for j in jobs):
        time.sleep(0.2)


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory) -> dict[str, tuple[int, str]]:
    """``series.sh launch`` of every job at once, ``--dry-run`` appended to each python command: code and log."""
    tmp = tmp_path_factory.mktemp("series")
    fake = tmp / "python-dry-run"
    fake.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@" --dry-run\n', encoding="utf-8")
    fake.chmod(0o755)
    jobs = [j for j in series_jobs() if j not in SKIPPED]
    env = {**os.environ, "CAMPAIGN_DIR": str(tmp / "campaign"), "PYTHON": str(fake), "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run(["bash", str(SERIES), "launch", *jobs], cwd=REPO_ROOT, env=env, check=True, capture_output=True)
    wait_for(tmp / "campaign", jobs, 180)
    return {j: (int((tmp / "campaign" / f"{j}.rc").read_text().strip()) if (tmp / "campaign" / f"{j}.rc").exists()
                else None, (tmp / "campaign" / f"{j}.log").read_text(encoding="utf-8")) for j in jobs}


def test_series_lists_the_jobs_of_the_campaign():
    jobs = series_jobs()
    assert {"gpu", "gpu-tuned", "gpu-off-s42", "gpu-off-s43", "gpu-auto-s43", "turing", "turing-off", "gpu-05",
            "gpu-auto-s43-05", "gpu-off-s42-05", "gpu-off-s43-05"} <= set(jobs)


@pytest.mark.parametrize("job", [j for j in series_jobs() if j not in SKIPPED])
def test_every_job_command_is_accepted_by_its_program(job, dry_runs):
    rc, log = dry_runs[job]
    assert rc == 0, f"series.sh job {job!r} fails on its own command line:\n{log}"
    assert "would run" in log or "turing_path" in log or "utils.training" in log, log


def test_a_job_with_a_wrong_option_is_caught(tmp_path):
    """The check can fail: the option that broke ``turing-off`` once is refused."""
    fake = tmp_path / "series.sh"
    fake.write_text(SERIES.read_text(encoding="utf-8").replace("turing_path.py --only", "turing_path.py --steps 300 "
                                                                "--only"), encoding="utf-8")
    env = {**os.environ, "CAMPAIGN_DIR": str(tmp_path / "c"), "PYTHON": sys.executable,
           "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run(["bash", str(fake), "launch", "turing-off"], cwd=REPO_ROOT, env=env, check=True,
                   capture_output=True)
    wait_for(tmp_path / "c", ["turing-off"], 60)
    assert (tmp_path / "c" / "turing-off.rc").read_text().strip() == "2"
    assert "unrecognized arguments: --steps 300" in (tmp_path / "c" / "turing-off.log").read_text()


def test_thesis_twin_profile_passes_the_runner_dry_run(capsys):
    assert runner_main(["--profile", "thesis-twin", "--only", "04", "05", "--dry-run"]) == 0
    assert "would run 04_training, 05_evaluation" in capsys.readouterr().out


def test_runner_dry_run_names_a_wrong_override(capsys):
    assert runner_main(["--profile", "gpu", "--only", "04", "--set", "04.fast_pth=off", "--dry-run"]) == 1
    assert "'fast_pth' is not declared by notebook 04" in capsys.readouterr().err
