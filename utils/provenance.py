"""Provenance of every result: library versions, device, wall time, written as ``NN_run.json``."""

from __future__ import annotations

import datetime as dt
import json
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from utils.paths import run_dir

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
    """Name of the device the numbers come from (GPU name and capability, or the CPU)."""
    import torch

    from utils.modeling import device_name

    info: dict[str, Any] = {"device": device_name(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 1024**3, 2)
    return info


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
    """Write ``runs/<profile>/<NN>_run.json`` (``notebook`` is the two-digit number) and return it."""
    record = {
        "notebook": notebook,
        "profile": profile,
        "parameters": parameters,
        "started_at": stopwatch.started_at,
        "wall_time_s": stopwatch.seconds,
        "versions": library_versions(),
        **device_info(),
        **results,
    }
    path = run_dir(profile) / f"{notebook}_run.json"
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    return path
