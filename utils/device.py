"""The device runs happen on, its compute capability, and the one vocabulary of dtypes ("fp32", "fp16", "bf16").

``QLORA_EMULATE_CAPABILITY=7.5`` makes a newer GPU take every decision an older one would (fp16 instead of bf16,
SDPA instead of FlashAttention): the Turing path (RTX 20xx) measured on whatever GPU is at hand.
"""

from __future__ import annotations

import os
import platform

import torch

# Compute and storage dtypes by the names settings, profiles, command lines and result files use.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# "7.5": every capability check in utils sees this capability instead of the GPU's own (only a lower one).
EMULATE_CAPABILITY_ENV = "QLORA_EMULATE_CAPABILITY"


class CapabilityEmulationError(ValueError):
    """``QLORA_EMULATE_CAPABILITY`` is malformed, or asks for a capability this GPU does not have."""


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


def emulated_capability() -> tuple[int, int] | None:
    """The capability ``QLORA_EMULATE_CAPABILITY`` asks for (``"7.5"`` → (7, 5)), or None when it is not set."""
    text = os.environ.get(EMULATE_CAPABILITY_ENV, "").strip()
    if not text:
        return None
    major, dot, minor = text.partition(".")
    if not (major.isdigit() and dot and minor.isdigit()):
        raise CapabilityEmulationError(
            f"{EMULATE_CAPABILITY_ENV}={text!r}: write the compute capability as MAJOR.MINOR, e.g. "
            f"{EMULATE_CAPABILITY_ENV}=7.5 for an RTX 20xx (Turing), or unset it to use the GPU's own."
        )
    return int(major), int(minor)


def real_capability(device: int | str | torch.device | None = None) -> tuple[int, int]:
    """The GPU's own CUDA compute capability (emulation ignored)."""
    major, minor = torch.cuda.get_device_capability(device)
    return int(major), int(minor)


def compute_capability(device: int | str | torch.device | None = None) -> tuple[int, int]:
    """The CUDA compute capability every check in utils uses: the GPU's, or ``QLORA_EMULATE_CAPABILITY``'s.

    Emulating a capability above the GPU's own is an error: a GPU cannot run kernels it lacks.
    """
    real = real_capability(device)
    emulated = emulated_capability()
    if emulated is None:
        return real
    if emulated > real:
        raise CapabilityEmulationError(
            f"{EMULATE_CAPABILITY_ENV}={'.'.join(map(str, emulated))} is above the compute capability of "
            f"{torch.cuda.get_device_name(device)} ({'.'.join(map(str, real))}): only an older GPU can be "
            f"emulated. Set {EMULATE_CAPABILITY_ENV} to {'.'.join(map(str, real))} or lower, or unset it."
        )
    return emulated


def gpu_supports_bf16(device: int | str | torch.device | None = None) -> bool:
    """bf16 only from compute capability 8.0 (``is_bf16_supported()`` says yes on Turing)."""
    if not torch.cuda.is_available():
        return False
    major, _ = compute_capability(device)
    return major >= 8


def restrict_sdpa_to_capability(device: int | str | torch.device | None = None) -> list[str]:
    """Under an emulated capability below 8.0, switch off SDPA's FlashAttention and cuDNN backends; return which.

    PyTorch's FlashAttention (and cuDNN attention) kernels need Ampere or newer, so a Turing GPU's
    ``scaled_dot_product_attention`` runs the memory-efficient or the math kernel: an emulated run must too.
    Without CUDA, emulation or on a real capability the backends stay as they are (empty list).
    """
    if not torch.cuda.is_available() or emulated_capability() is None or compute_capability(device)[0] >= 8:
        return []
    off = []
    for name in ("flash", "cudnn"):
        switch = getattr(torch.backends.cuda, f"enable_{name}_sdp", None)  # cuDNN's since torch 2.5
        if switch is not None:
            switch(False)
            off.append(name)
    return off


def pick_compute_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """bf16 on Ampere and newer, fp16 on older GPUs (RTX 2070 SUPER), fp32 on the CPU."""
    device = torch.device(device) if device is not None else default_device()
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if gpu_supports_bf16(device) else torch.float16
