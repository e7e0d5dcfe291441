"""The device runs happen on and the one vocabulary of dtypes (``"fp32"``, ``"fp16"``, ``"bf16"``)."""

from __future__ import annotations

import os
import platform

import torch

# Compute and storage dtypes by the names settings, profiles, command lines and result files use.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def torch_dtype(name: str) -> torch.dtype:
    """``"fp16"`` → ``torch.float16``; an unknown name is one error listing the known ones."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}") from None


def dtype_name(dtype: torch.dtype | None) -> str | None:
    """``torch.bfloat16`` → ``"bf16"``; a dtype outside the vocabulary keeps torch's name (None stays None)."""
    if dtype is None:
        return None
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def default_device() -> torch.device:
    """This process's GPU (``LOCAL_RANK`` under ``accelerate launch``), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def device_name(device: torch.device | None = None) -> str:
    """Human-readable name of the device runs are measured on."""
    device = device or default_device()
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} núcleos)"


def gpu_supports_bf16(device: int | torch.device | None = None) -> bool:
    """bf16 only from compute capability 8.0 (``is_bf16_supported()`` says yes on Turing)."""
    if not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def pick_compute_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """bf16 on Ampere and newer, fp16 on older GPUs (RTX 2070 SUPER), fp32 on the CPU."""
    device = torch.device(device) if device is not None else default_device()
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if gpu_supports_bf16(device) else torch.float16
