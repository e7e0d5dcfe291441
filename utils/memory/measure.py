"""Measurements, each in a fresh ``python -m utils.memory child`` process (``utils.childproc``).

One format's or one variant's allocations never pollute another's: every measurement starts from an empty
process. The child side of each task is ``utils.memory.tasks``.
"""

from __future__ import annotations

import subprocess
import time
from typing import Sequence

import pandas as pd

from utils.childproc import ChildProcessFailed, run_module_child
from utils.config import THESIS
from utils.device import default_device
from utils.memory.analytic import QUANTIZED
from utils.memory.loading import cache_is_fresh

CHILD_MODULE = "utils.memory"


class MeasurementError(RuntimeError):
    """A measurement child process failed; the message carries its stderr tail."""


def task_id(task: dict) -> dict:
    """The fields that name a task in messages and failed results."""
    return {k: task[k] for k in ("name", "format", "variant") if k in task}


def run_child(task: dict, timeout: float = 1800, env: dict | None = None) -> dict:
    """Run ``task`` in a fresh ``python -m utils.memory child`` process and return its JSON result."""
    try:
        return run_module_child(CHILD_MODULE, task, timeout, env)
    except subprocess.TimeoutExpired:
        raise MeasurementError(
            f"measurement {task_id(task) or task['task']} took over {timeout:.0f} s and was stopped; raise the "
            "notebook's measure_timeout_s parameter or measure fewer formats."
        ) from None
    except ChildProcessFailed as exc:
        raise MeasurementError(
            f"measurement {task_id(task) or task['task']} failed in its child process ({exc}"
        ) from None


def measure_formats(model: str, formats: Sequence[str], tokenizer: str | None = None, eval_file: str | None = None,
                    eval_formats: Sequence[str] = (), eval_examples: int = 0,
                    max_seq_length: int = THESIS.max_seq_length, device: str | None = None,
                    compute_dtype: str | None = None, timeout: float = 1800,
                    cache_formats: Sequence[str] = ("nf4_dq",), verbose: bool = True) -> list[dict]:
    """Load ``model`` in each format in its own child process; return one result dict per format.

    Formats in ``eval_formats`` also get the completion loss on ``eval_examples`` records of ``eval_file``, cut
    to ``max_seq_length`` tokens. A format that fails to load is kept as ``{"ok": False, "error": ...}`` (the
    reason, for the table).
    """
    results = []
    for fmt in formats:
        task = {"task": "weights", "model": model, "format": fmt, "device": device, "compute_dtype": compute_dtype,
                "eval_file": eval_file if fmt in eval_formats else None, "eval_examples": eval_examples,
                "tokenizer": tokenizer or model, "max_seq_length": max_seq_length,
                "save_cache": fmt in cache_formats}
        start = time.perf_counter()
        try:
            result = run_child(task, timeout)
        except MeasurementError as exc:  # a format this machine cannot load: keep the reason, go on
            result = {"ok": False, "format": fmt, "error": str(exc).splitlines()[-1][:300]}
        if verbose:
            print(f"{fmt:>7}: {'listo' if result['ok'] else result['error']} ({time.perf_counter() - start:.0f} s)")
        results.append(result)
    return results


def measure_training_steps(model: str, variants: Sequence[str], fmt: str = "nf4_dq", amp_dtype: str | None = None,
                           max_seq_length: int = THESIS.max_seq_length,
                           batch_size: int = THESIS.per_device_train_batch_size,
                           grad_accum: int = THESIS.gradient_accumulation_steps, optim: str = THESIS.optim,
                           steps: int = 1, warmup_steps: int = 0, device: str | None = None, timeout: float = 1800,
                           verbose: bool = True) -> list[dict]:
    """One child process per variant: peak memory of ``steps`` optimizer steps of LoRA training.

    ``amp_dtype`` is autocast's dtype (``"fp16"``/``"bf16"``; None: no autocast). On a CPU a quantised model is
    quantised once into a cache (its own child process) and each variant reloads it, so no variant's
    measurement carries the quantisation's transient memory.
    """
    results = []
    on_cpu = (device or str(default_device())) == "cpu"
    if on_cpu and fmt in QUANTIZED and not cache_is_fresh(model, fmt):
        run_child({"task": "quantize_cache", "model": model, "format": fmt}, timeout)
    for variant in variants:
        task = {"task": "train_step", "name": f"{fmt}_{variant}", "model": model, "format": fmt, "variant": variant,
                "amp_dtype": amp_dtype, "max_seq_length": max_seq_length, "batch_size": batch_size,
                "grad_accum": grad_accum, "optim": optim, "steps": steps, "warmup_steps": warmup_steps,
                "device": device}
        start = time.perf_counter()
        result = run_child(task, timeout)
        if verbose:
            print(f"{variant:>14}: {'listo' if result['ok'] else result['error']} ({time.perf_counter() - start:.0f} s)")
        results.append(result)
    return results


def measure_quantization_errors(model: str, layers: int = 0, quant_types: Sequence[str] = ("nf4", "fp4", "nf4_dq"),
                                timeout: float = 1800) -> pd.DataFrame:
    """``quantization_errors`` of a named model, computed in a child process (a clean, unshared CPU setup)."""
    result = run_child({"task": "quant_errors", "model": model, "layers": layers, "quant_types": list(quant_types)},
                       timeout)
    return pd.DataFrame(result["rows"])
