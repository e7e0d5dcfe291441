"""Loading the profile's model the way the measurements need it: config only, shapes only, each format, cached.

A quantised CPU copy is quantised once and saved under ``.cache/models`` (``load_quantized_cached``): later
steps (notebook 02's training step, notebook 03) reload it in about a second.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from utils.device import DTYPES, default_device, gpu_supports_bf16, torch_dtype
from utils.memory.analytic import FORMATS, QUANTIZED
from utils.modeling import build_bnb_config, load_model, model_folder, resolve_model, twin_config
from utils.paths import MODELS_CACHE_DIR


def load_model_config(name: str):
    """``config`` of a named model (embedded, hub id, folder or the twin) without loading its weights."""
    if resolve_model(name).is_twin:
        return twin_config()
    return AutoConfig.from_pretrained(model_folder(name))


def meta_model(config):
    """The model transformers builds from ``config`` on the ``meta`` device: every tensor's shape, no memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def reference_model(name: str):
    """The model in full precision for error measurements: fp32 on a CPU, its 16-bit dtype on a GPU."""
    device = default_device()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(name, quantization="fp32" if device.type == "cpu" else None, device=device)


def supported_formats(formats: Sequence[str], device: str | None = None) -> tuple[list[str], dict[str, str]]:
    """Split ``formats`` into those this device can hold and ``{format: reason}`` for the others."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"formats {unknown} are unknown: the 'formats' parameter takes values from {FORMATS}.")
    device = device or str(default_device())
    keep, skipped = [], {}
    for fmt in formats:
        if device.startswith("cuda") and fmt == "bf16" and not gpu_supports_bf16():
            skipped[fmt] = "la GPU no tiene bf16 nativo (capacidad de cómputo < 8.0, p. ej. la RTX 2070 SUPER)"
        else:
            keep.append(fmt)
    return keep, skipped


def load_for_measurement(model: str, fmt: str, device: str, compute_dtype: str | None = None):
    """Load ``model`` (a name or folder) in ``fmt`` on ``device``, the way the measurements need it.

    ``compute_dtype`` (``"fp16"``/``"bf16"``/``"fp32"``) is bitsandbytes' compute dtype and the dtype of what
    it leaves unquantised. On a GPU this is ``utils.modeling.load_model``. On a CPU the safetensors are read
    into memory instead of memory-mapped (``disable_mmap``): a mapped fp32 file would otherwise stay resident
    behind the tensors that still point into it (the unquantised embeddings of a 4-bit model), and the
    process's resident memory would no longer say what the weights hold.
    """
    dtype = torch_dtype(compute_dtype) if compute_dtype else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if device.startswith("cuda"):
            return load_model(model, quantization=fmt, device=device, compute_dtype=dtype)
        kwargs: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": False, "device_map": {"": "cpu"},
                                  "disable_mmap": True}
        if fmt in QUANTIZED:
            kwargs["dtype"] = dtype or torch.float32
            kwargs["quantization_config"] = build_bnb_config(fmt, kwargs["dtype"])
        else:
            kwargs["dtype"] = DTYPES[fmt]
        return AutoModelForCausalLM.from_pretrained(model_folder(model), **kwargs)


# --------------------------------------------------------------------------------------------
# The quantised CPU cache
# --------------------------------------------------------------------------------------------


def quantized_cache_folder(model: str, fmt: str) -> Path:
    """Folder where a pre-quantised copy of ``model`` in ``fmt`` is cached (``.cache/models``)."""
    spec = resolve_model(model)
    base = Path(spec.location).name if spec.kind in {"embedded", "local", "twin"} else spec.location.replace("/", "--")
    return MODELS_CACHE_DIR / f"{base}-{fmt}-cpu"


def _source_stamp(model: str) -> dict:
    """Size and modification time of a model's weight files (a cache made from other weights is stale)."""
    files = sorted(model_folder(model).glob("*.safetensors"))
    return {f.name: [f.stat().st_size, int(f.stat().st_mtime)] for f in files}


def cache_is_fresh(model: str, fmt: str) -> bool:
    """Whether the quantised cache of ``model`` in ``fmt`` exists and was made from the current weights."""
    stamp = quantized_cache_folder(model, fmt) / "source.json"
    return stamp.is_file() and json.loads(stamp.read_text()) == _source_stamp(model)


def save_quantized_cache(quantized, model: str, fmt: str) -> Path:
    """Save a quantised model as the cache of ``model`` in ``fmt`` (unless a fresh one exists); return the folder."""
    folder = quantized_cache_folder(model, fmt)
    if cache_is_fresh(model, fmt):
        return folder
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    quantized.save_pretrained(tmp, safe_serialization=True)
    (tmp / "source.json").write_text(json.dumps(_source_stamp(model)))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def load_quantized_cached(model: str, fmt: str):
    """CPU copy of ``model`` quantised to ``fmt``, quantised once and then reloaded from a saved copy.

    Quantising on a CPU takes tens of seconds; reloading the saved bitsandbytes tensors takes about one.
    The saved copy holds exactly the tensors the quantisation produced (same bytes, same outputs).
    """
    if fmt not in QUANTIZED:
        raise ValueError(f"fmt={fmt!r} is not a bitsandbytes format ({QUANTIZED})")
    folder = quantized_cache_folder(model, fmt)
    if not cache_is_fresh(model, fmt):
        quantized = load_for_measurement(model, fmt, "cpu")
        save_quantized_cache(quantized, model, fmt)
        return quantized
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(
            folder, device_map={"": "cpu"}, dtype=torch.float32, use_safetensors=True, disable_mmap=True
        )
