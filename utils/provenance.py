"""Provenance of every result: library versions, device, commit, command and wall time."""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from utils.device import EMULATE_CAPABILITY_ENV, device_name, real_capability
from utils.files import save_json
from utils.memory.budget import peak_gpu_memory
from utils.paths import REPO_ROOT, run_dir
from utils.units import GIB

LIBRARIES = (
    "torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "pandas",
    "matplotlib", "papermill",
)


def library_versions() -> dict[str, str]:
    """Installed versions of the stack (``"absent"`` for a missing one)."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def device_info() -> dict[str, Any]:
    """Name of the device the numbers come from (GPU name and capability, or the CPU).

    ``compute_capability`` is the GPU's own; under ``QLORA_EMULATE_CAPABILITY`` the capability the run's
    decisions saw is ``emulated_capability`` (recorded whenever the variable is set, on a CPU too).
    """
    info: dict[str, Any] = {"device": device_name(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["compute_capability"] = ".".join(map(str, real_capability()))
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / GIB, 2)
    if os.environ.get(EMULATE_CAPABILITY_ENV, "").strip():
        info["emulated_capability"] = os.environ[EMULATE_CAPABILITY_ENV].strip()
    return info


def git_commit() -> str:
    """The checked-out commit, with ``+dirty`` when tracked files differ from it; "unknown" outside git.

    ``QLORA_COMMIT`` overrides it, for a copy of the tree whose git metadata is not the tree's own (a working
    tree shipped to a GPU machine without its history).
    """
    if os.environ.get("QLORA_COMMIT"):
        return os.environ["QLORA_COMMIT"]
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("+dirty" if dirty else "")) if commit else "unknown"


def command_line(argv: list[str] | None = None) -> str:
    """The command that is running, as a shell would type it (``python -m utils.x ...``).

    Inside a notebook the process is a Jupyter kernel: the runner names the notebook's command in
    ``QLORA_COMMAND``; a kernel started by hand says it was an interactive session.
    """
    if argv is None and os.environ.get("QLORA_COMMAND"):
        return os.environ["QLORA_COMMAND"]
    argv = list(sys.argv if argv is None else argv)
    if argv and Path(argv[0]).name == "ipykernel_launcher.py":
        return "interactive Jupyter kernel (not started by python -m utils.runner)"
    if argv and argv[0].endswith(".py") and "utils" in Path(argv[0]).parts:
        parts = Path(argv[0]).resolve().relative_to(REPO_ROOT).with_suffix("").parts
        module = ".".join(p for p in parts if p != "__main__")
        argv = ["python", "-m", module, *argv[1:]]
    return shlex.join(argv)


def result_provenance(command: str | None = None) -> dict[str, Any]:
    """What every result JSON records: date, commit, exact command, device and library versions."""
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "command": command or command_line(),
        **device_info(),
        "versions": library_versions(),
    }


class Stopwatch:
    """Wall time since creation, in seconds (notebooks start one in their setup cell)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 2)


def write_run_record(
    notebook: str,
    profile: str,
    parameters: dict[str, Any],
    stopwatch: Stopwatch,
    **results: Any,
) -> Path:
    """Write ``runs/<profile>/<NN>_run.json`` (``notebook`` is the two-digit number) and return it.

    On a GPU the record holds the kernel process's peak memory (``peak_gpu_reserved_gib``; child processes a
    notebook starts report their own). ``QLORA_CONCURRENT_RUNS`` (set by a campaign that runs several notebooks at
    once on one machine) is recorded, since their wall times were measured under that load.
    """
    concurrent = os.environ.get("QLORA_CONCURRENT_RUNS")
    record = {
        "notebook": notebook,
        "profile": profile,
        "parameters": parameters,
        "started_at": stopwatch.started_at,
        "wall_time_s": stopwatch.seconds,
        "commit": git_commit(),
        "command": command_line(),
        "versions": library_versions(),
        **device_info(),
        **peak_gpu_memory(),
        **({"concurrent_runs": int(concurrent)} if concurrent else {}),
        **results,
    }
    return save_json(record, run_dir(profile) / f"{notebook}_run.json")
