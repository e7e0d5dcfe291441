"""Measurements in fresh child processes: ``python -m <module> child <task as JSON>``.

A measurement of memory must start from an empty process (nothing else allocated, no cached kernels), so
notebook 02 and the speed benchmark run each one as a child and read back the one JSON line it prints
after ``RESULT_MARK``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Callable

from utils.paths import REPO_ROOT
from utils.quiet import quiet_known_noise

RESULT_MARK = "@@RESULT@@"


class ChildProcessFailed(RuntimeError):
    """A ``python -m <module> child`` process ended without printing its result line."""

    def __init__(self, returncode: int, tail: str):
        super().__init__(f"exit {returncode}):\n{tail}")
        self.returncode, self.tail = returncode, tail


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child: quiet libraries, the repository importable, passive OpenMP threads."""
    # OMP_WAIT_POLICY=PASSIVE: OpenMP threads that spin while waiting make a CPU shared with other
    # processes several times slower (measured here: a forward pass 4-6x slower with 2 spinning threads).
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "TRANSFORMERS_VERBOSITY": "error",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false", **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def run_module_child(module: str, task: dict, timeout: float, env: dict | None = None) -> dict:
    """Run ``python -m <module> child <task as JSON>`` and return the JSON it prints after ``RESULT_MARK``.

    Raises ``subprocess.TimeoutExpired`` past ``timeout`` and ``ChildProcessFailed`` (exit code and the last lines
    of its output) when no result line comes back.
    """
    cmd = [sys.executable, "-m", module, "child", json.dumps(task)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=child_env(env))
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    raise ChildProcessFailed(proc.returncode, "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:]))


def serve_child(task_json: str, run: Callable[[dict], dict[str, Any]]) -> int:
    """The ``child`` side: run one task and print its result line (what ``run_module_child`` reads)."""
    quiet_known_noise()  # the same narrow filters as the notebooks (utils/quiet.py)
    result = run(json.loads(task_json))
    print(RESULT_MARK + json.dumps(result, default=str), flush=True)
    return 0
