"""The GPU report: the Llama-3.2-3B twin's weights per format and its training-step peaks, measured on a GPU.

``python -m utils.memory gpu-report --out results/02_twin_gpu_memory.json`` wrote the committed H100 file;
``--tiny`` runs the same logic on a 2-layer twin on a CPU (a test, not a result).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from utils.config import THESIS
from utils.device import default_device
from utils.files import save_json
from utils.memory.analytic import config_dict
from utils.memory.measure import run_child
from utils.modeling import tiny_twin_config, twin_config
from utils import provenance  # a module, not its names: utils.provenance reads utils.memory.budget
from utils.units import GB, GIB

TWIN_LABEL = "llama-3.2-3b-twin (random weights)"
TINY_LABEL = "tiny twin (logic test, not a result)"
TINY_MAX_SEQ_LENGTH = 64  # the tiny twin's micro-batch: the logic in a minute on a CPU
GPU_WEIGHT_FORMATS = ("fp32", "bf16", "fp16", "int8", "fp4", "nf4", "nf4_dq")
# (name, storage format, variant, autocast dtype); all at 1 × 2 × 512, paged AdamW 8-bit, LoRA r=32 × 7
GPU_TRAIN_CONFIGS = (
    ("qlora_fp16_prepare", "nf4_dq", "prepare", "fp16"),  # the original script
    ("qlora_bf16_prepare", "nf4_dq", "prepare", "bf16"),
    ("qlora_fp16_no_prepare_gc", "nf4_dq", "no_prepare_gc", "fp16"),
    ("qlora_bf16_no_prepare_gc", "nf4_dq", "no_prepare_gc", "bf16"),
    ("qlora_fp16_no_prepare", "nf4_dq", "no_prepare", "fp16"),
    ("lora_fp16_weights_gc", "fp16", "no_prepare_gc", "fp16"),
    ("lora_fp32_weights_gc", "fp32", "no_prepare_gc", "fp16"),
)


def _log(message: str) -> None:
    print(f"[gpu-report] {message}", flush=True)


def _new_report(tiny: bool, saved: dict, steps: int, warmup_steps: int, command: str | None) -> dict[str, Any]:
    """The report's header: what was measured, where, with which code and command, and how."""
    return {
        "label": TINY_LABEL if tiny else TWIN_LABEL,
        "model_config": config_dict(tiny_twin_config() if tiny else twin_config()),
        **provenance.result_provenance(command),
        "notes": ("Random weights: memory does not depend on weight values. Weights: each format loaded in a fresh "
                  "process from the bf16 safetensors of the twin (quantised formats with compute dtype bf16); "
                  "measure = torch.cuda.memory_allocated after - before, peak = max_memory_allocated during loading. "
                  "Training: utils.train_step loop, random token ids without padding, autocast, GradScaler for fp16, "
                  f"clip {THESIS.max_grad_norm}, paged AdamW 8-bit, LoRA r={THESIS.lora_r} alpha={THESIS.lora_alpha} "
                  f"on the seven projections; {warmup_steps} warm-up + {steps} measured optimizer steps; peak over "
                  "all of them."),
        "twin_save": saved,
        "weights": [],
        "train": [],
    }


def _measure_weights(report: dict, work: Path, device: str, formats: Sequence[str], jobs: int,
                     timeout: float) -> None:
    """Each format loaded in its own process; weight measurements may run side by side."""
    def weights_task(fmt: str) -> dict:
        return run_child({"task": "weights", "model": str(work), "format": fmt, "device": device,
                          "compute_dtype": "bf16" if device != "cpu" else None}, timeout)

    # Each process reads its own allocator counters, so the loads may overlap.
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for fmt, res in zip(formats, pool.map(weights_task, formats)):
            _log(f"weights {fmt:>7}: " + (f"{res['weights_bytes'] / GIB:.3f} GiB (peak load "
                 f"{res['peak_load_bytes'] / GIB:.3f} GiB, {res['load_seconds']} s)" if res["ok"] else res["error"]))
            report["weights"].append(res)


def _train_task(name: str, fmt: str, variant: str, amp: str, work: Path, device: str, tiny: bool, steps: int,
                warmup_steps: int) -> dict:
    """The ``train_step`` task of one configuration at the thesis's batch, accumulation and optimizer."""
    return {"task": "train_step", "name": name, "model": str(work), "format": fmt, "variant": variant,
            "amp_dtype": amp if device != "cpu" else None,
            "max_seq_length": TINY_MAX_SEQ_LENGTH if tiny else THESIS.max_seq_length,
            "batch_size": THESIS.per_device_train_batch_size, "grad_accum": THESIS.gradient_accumulation_steps,
            "optim": THESIS.optim, "steps": steps, "warmup_steps": warmup_steps, "device": device,
            "use_cache": False}


def _log_train(name: str, res: dict) -> None:
    if res["ok"]:
        _log(f"train {name:>26}: peak {res['peak_bytes'] / GIB:.3f} GiB allocated, "
             f"{(res['peak_reserved_bytes'] or 0) / GIB:.3f} GiB reserved, {res['seconds_per_step']:.3f} s/step, "
             f"losses {res['losses'][-2:]}")
    else:
        _log(f"train {name:>26}: {res['error']}")


def gpu_report(out: Path, tiny: bool = False, folder: str | None = None, formats: Sequence[str] = GPU_WEIGHT_FORMATS,
               train_configs: Sequence[tuple] = GPU_TRAIN_CONFIGS, steps: int = 3, warmup_steps: int = 1,
               jobs: int = 1, timeout: float = 900, command: str | None = None) -> dict:
    """Measure the twin's weights per format and its training-step peaks; write the JSON to ``out``.

    The JSON records the commit and ``command`` (default: this process's command line), and is rewritten
    after every training configuration, so a run stopped by a time limit keeps what it measured.
    """
    started = time.perf_counter()
    device = str(default_device())
    work = Path(folder or tempfile.mkdtemp(prefix="twin-"))
    _log(f"device {device}; twin folder {work}; tiny={tiny}")
    saved = run_child({"task": "save_twin", "folder": str(work), "tiny": tiny, "device": device}, timeout)
    _log(f"saved twin: {saved.get('safetensors_bytes', 0) / GB:.2f} GB in {saved.get('seconds')} s")
    report = _new_report(tiny, saved, steps, warmup_steps, command)
    _measure_weights(report, work, device, formats, jobs, timeout)
    save_json(report, out)
    # Training steps one at a time, so that no other process shares their timings.
    for name, fmt, variant, amp in train_configs:
        res = run_child(_train_task(name, fmt, variant, amp, work, device, tiny, steps, warmup_steps), timeout)
        _log_train(name, res)
        report["train"].append(res)
        report["wall_seconds"] = round(time.perf_counter() - started, 1)
        save_json(report, out)
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    save_json(report, out)
    _log(f"wrote {out} in {report['wall_seconds']} s")
    if folder is None:
        shutil.rmtree(work, ignore_errors=True)
    return report
