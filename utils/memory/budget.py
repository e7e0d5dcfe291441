"""What an 8 GB card leaves to PyTorch, imposed on a bigger GPU; and the peak memory a run reached.

``cap_gpu_memory`` caps PyTorch's caching allocator (``torch.cuda.set_per_process_memory_fraction``) at the card's
memory minus the CUDA context (measured here) minus what the Windows display driver keeps for the desktop (a
published figure, ``WINDOWS_DISPLAY_RESERVE_GIB``). Past the cap the allocator frees its cached blocks, retries and
then raises out of memory, as on the small card. The cap is also written to ``QLORA_GPU_MEMORY_CAP_GIB`` so that
child processes (notebook 02's measurements) apply the same one (``apply_gpu_memory_cap_from_env``).

What the cap does not bound: the CUDA context itself, and bitsandbytes' paged optimizer states (CUDA unified
memory, outside PyTorch's allocator), which on the small card would page to host memory instead. The strict budget
(``strict_budget_use``, the speed benchmark's ``--budget strict8``) counts them: the memory a process uses outside
the allocator (``OutsideAllocatorTracker``, at least ``paged_state_bytes``), its context, and its pinned host
memory (``pinned_host_bytes``, at most ``PINNED_HOST_LIMIT_GIB``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

import torch

from utils.units import GIB

CAP_ENV = "QLORA_GPU_MEMORY_CAP_GIB"  # the allocator budget in GiB, inherited by child processes

# GPU memory the Windows display driver model (WDDM) keeps for the desktop, out of an 8 GiB card. Ollama measures
# this "OS VRAM overhead" at every start (NVML free memory minus CUDA free memory, ollama discover/gpu.go) and logs
# it; logs that users of 8 GiB GeForce cards under Windows posted show 125 MiB (RTX 4060) to 283-582 MiB (RTX 3060
# Ti), and far more with other programs open (ollama/ollama#9167: 3.2 GiB on an RTX 2080 Ti, attributed there to
# Windows 10 WDDM reserving about 15 % of VRAM). 0.5 GiB is the upper end of a bare single-monitor desktop; pass
# display_reserve_gib to model another one.
WINDOWS_DISPLAY_RESERVE_GIB = 0.5
WINDOWS_DISPLAY_RESERVE_SOURCE = (
    "'OS VRAM overhead' that Ollama measures on Windows GeForce cards (discover/gpu.go; ollama/ollama#9167)"
)
# A CUDA context is a few hundred MiB; more than this means the device-wide reading counted other processes.
MAX_PLAUSIBLE_CONTEXT_GIB = 2.0


def _nvidia_smi(query: list[str]) -> list[list[str]] | None:
    """Rows of an ``nvidia-smi --query-...`` CSV (no header, no units), or None without nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, *query, "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [[cell.strip() for cell in line.split(",")] for line in out.strip().splitlines() if line.strip()]


def _device_uuid(device: torch.device) -> str | None:
    """The GPU's UUID as nvidia-smi writes it (``GPU-...``), which survives ``CUDA_VISIBLE_DEVICES`` renumbering."""
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    return None if uuid is None else (str(uuid) if str(uuid).startswith("GPU-") else f"GPU-{uuid}")


def _process_used_bytes(device: torch.device) -> int | None:
    """GPU memory nvidia-smi attributes to this process on ``device`` (None when it cannot see our PID)."""
    rows = _nvidia_smi(["--query-compute-apps=pid,gpu_uuid,used_memory"])
    uuid = _device_uuid(device)
    for row in rows or []:
        if len(row) == 3 and row[0] == str(os.getpid()) and (uuid is None or row[1] == uuid):
            return int(float(row[2]) * 2**20)
    return None  # e.g. inside a container, where nvidia-smi reports the host's PIDs


def _device_used_bytes(device: torch.device) -> int | None:
    """GPU memory in use on ``device`` by every process (nvidia-smi), or None without it."""
    uuid = _device_uuid(device)
    for row in _nvidia_smi(["--query-gpu=uuid,memory.used"]) or []:
        if len(row) == 2 and (uuid is None or row[0] == uuid):
            return int(float(row[1]) * 2**20)
    return None


def measure_cuda_context(device: torch.device) -> tuple[int, str]:
    """Bytes of this process's CUDA context on ``device`` and how they were measured; starts CUDA if needed.

    In order of preference: what nvidia-smi attributes to this process minus PyTorch's reserved memory; the
    device-wide memory in use before and after starting CUDA (when this call starts it); the device's used memory
    minus PyTorch's reserved (right only when no other process uses the GPU, so a reading above
    ``MAX_PLAUSIBLE_CONTEXT_GIB`` is refused).
    """
    before = None if torch.cuda.is_initialized() else _device_used_bytes(device)
    torch.empty(1, device=device)  # creates the context (and a 2 MiB allocator block)
    torch.cuda.synchronize(device)
    reserved = torch.cuda.memory_reserved(device)
    used = _process_used_bytes(device)
    if used is not None:
        return used - reserved, "nvidia-smi, memoria de este proceso − reservada por PyTorch"
    after = _device_used_bytes(device)
    if before is not None and after is not None:
        return after - before - reserved, "nvidia-smi, memoria del dispositivo antes y después de iniciar CUDA"
    free, total = torch.cuda.mem_get_info(device)
    context = total - free - reserved
    if context > MAX_PLAUSIBLE_CONTEXT_GIB * GIB:
        raise RuntimeError(
            f"cannot measure the CUDA context on {torch.cuda.get_device_name(device)}: without nvidia-smi the only "
            f"reading is the device's used memory ({context / GIB:.1f} GiB), which includes other processes. Run "
            "on a GPU nobody else uses, or pass context_gib (a CUDA context is typically 0.3-0.6 GiB)."
        )
    return context, "torch.cuda.mem_get_info: memoria usada del dispositivo − reservada por PyTorch"


def cap_gpu_memory(total_gib: float = 8.0, display_reserve_gib: float = WINDOWS_DISPLAY_RESERVE_GIB,
                   context_gib: float | None = None, device: str | torch.device | None = None) -> dict[str, Any]:
    """Cap PyTorch's allocator at what a ``total_gib`` card under Windows leaves; return the budget's parts in GiB.

    budget = ``total_gib`` − this process's CUDA context (measured, or ``context_gib``) − ``display_reserve_gib``.
    Sets ``QLORA_GPU_MEMORY_CAP_GIB`` for child processes. Without CUDA it prints one line and changes nothing.
    """
    if total_gib <= 0:
        raise ValueError(f"gpu_memory_cap_gib={total_gib}: the card's memory must be > 0 GiB (8.0 for the RTX 2070 "
                         "SUPER); use 0 to leave the GPU uncapped (and do not call cap_gpu_memory).")
    if not torch.cuda.is_available():
        print(f"Sin GPU: gpu_memory_cap_gib={total_gib} no limita nada en este dispositivo.")
        return {"applied": False, "card_gib": total_gib, "reason": "sin CUDA"}
    device = torch.device(device or f"cuda:{torch.cuda.current_device()}")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    device_total = torch.cuda.get_device_properties(device).total_memory
    if total_gib * GIB > device_total:
        raise ValueError(f"gpu_memory_cap_gib={total_gib} is more than this GPU has "
                         f"({device_total / GIB:.1f} GiB): a cap can only model a smaller card.")
    if context_gib is None:
        context, method = measure_cuda_context(device)
        context_gib = context / GIB
    else:
        torch.empty(1, device=device)
        method = "dado (context_gib)"
    budget_gib = total_gib - context_gib - display_reserve_gib
    if budget_gib <= 0:
        raise ValueError(f"gpu_memory_cap_gib={total_gib} leaves nothing to PyTorch after the CUDA context "
                         f"({context_gib:.2f} GiB) and the display reserve ({display_reserve_gib} GiB).")
    fraction = budget_gib * GIB / device_total
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    os.environ[CAP_ENV] = f"{budget_gib:.6f}"
    budget = {
        "applied": True, "device": torch.cuda.get_device_name(device), "device_total_gib": round(device_total / GIB, 3),
        "card_gib": total_gib, "cuda_context_gib": round(context_gib, 3), "cuda_context_method": method,
        "display_reserve_gib": display_reserve_gib, "display_reserve_source": WINDOWS_DISPLAY_RESERVE_SOURCE,
        "allocator_budget_gib": round(budget_gib, 3), "memory_fraction": round(fraction, 6),
    }
    print(f"Memoria de la GPU limitada como en una tarjeta de {total_gib:g} GiB: {budget_gib:.2f} GiB para PyTorch "
          f"(contexto CUDA {context_gib:.2f} GiB, reserva de la pantalla en Windows {display_reserve_gib:g} GiB).")
    return budget


def apply_gpu_memory_cap_from_env() -> float | None:
    """In a child process: apply the allocator budget a parent's ``cap_gpu_memory`` left in the environment."""
    value = os.environ.get(CAP_ENV)
    if not value or not torch.cuda.is_available():
        return None
    budget_gib = float(value)
    device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gib * GIB / total), device)
    return budget_gib


def peak_gpu_memory(device: str | torch.device | None = None) -> dict[str, float]:
    """This process's peak GPU memory so far, in GiB: reserved by PyTorch's allocator and allocated; {} on a CPU."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    return {"peak_gpu_reserved_gib": round(torch.cuda.max_memory_reserved(device) / GIB, 3),
            "peak_gpu_allocated_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 3)}


# The strict 8 GB budget (``python -m utils.speed.benchmark run --budget strict8``): what a row may use on the
# student's card and PC, every part counted, the same for every row
STRICT_CARD_GIB = 8.0
PINNED_HOST_LIMIT_GIB = 4.0  # pinned (page-locked) host memory a 16 GB student PC can spare for checkpoints


class PinnedMemoryOverBudget(RuntimeError):
    """A row pinned more host memory than the strict budget allows (it is stopped after its first step)."""


def paged_state_bytes(optimizer: Any) -> int:
    """Bytes of optimizer state in CUDA unified memory (bitsandbytes' paged states, ``is_paged``), counted.

    bitsandbytes allocates them with cudaMallocManaged, outside PyTorch's caching allocator: neither its cap nor
    its peaks see them. Walks ``optimizer.state`` and that of a wrapped optimizer (``inner``, ``FlatOptimizer``).
    """
    total, seen = 0, set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        for state in getattr(optimizer, "state", {}).values():
            for value in state.values():
                if isinstance(value, torch.Tensor) and getattr(value, "is_paged", False):
                    total += value.numel() * value.element_size()
        optimizer = getattr(optimizer, "inner", None)
    return total


def pinned_host_bytes(buffers: Any = (), host_stats: dict | None = None) -> int:
    """Pinned host memory of a run: the larger of the buffers counted (e.g. the fast path's checkpoint buffers)
    and the peak of pinned blocks PyTorch's pinned-memory allocator owned (``torch.cuda.host_memory_stats()``
    ``allocated_bytes.peak``: it also sees other libraries' pinned copies, e.g. Unsloth's offloaded checkpoints,
    and it rounds each block up to a power of two, which is what the host really gives up). The fast path's buffers
    under ``FastPathOptions(exact_pinned=True)`` are page-locked in place at their own size, and counted at it."""
    counted = sum(t.numel() * t.element_size() for t in buffers)
    owned = (host_stats or {}).get("allocated_bytes.peak") or 0
    return max(counted, int(owned))


def host_memory_stats() -> dict:
    """PyTorch's pinned host allocator counters ({} where this PyTorch or machine has none)."""
    try:
        return dict(torch.cuda.host_memory_stats())
    except (AttributeError, RuntimeError):
        return {}


class OutsideAllocatorTracker:
    """GPU memory this process uses outside PyTorch's caching allocator, at its largest since the baseline.

    The baseline is read when the tracker is made (after CUDA starts, before the model): the device's used memory
    and PyTorch's reserved memory. Each ``sample`` reads both again; what the device gained beyond what PyTorch's
    allocator reserved is memory outside it: bitsandbytes' paged optimizer states (cudaMallocManaged), kernel
    modules loaded lazily, cuBLAS/cuDNN handles. Other processes on the GPU (the parent that saved the twin) cancel
    out as long as they stay idle. ``read`` gives (device used bytes, reserved bytes); by default
    ``torch.cuda.mem_get_info`` and ``torch.cuda.memory_reserved``.
    """

    def __init__(self, device: str | torch.device | None = None, read=None):
        self.read = read or (lambda: _used_and_reserved(device))
        self.used0, self.reserved0 = self.read()
        self.peak = 0

    def sample(self) -> int:
        used, reserved = self.read()
        outside = (used - self.used0) - (reserved - self.reserved0)
        self.peak = max(self.peak, outside)
        return outside


def _used_and_reserved(device: str | torch.device | None) -> tuple[int, int]:
    free, total = torch.cuda.mem_get_info(device)
    return total - free, torch.cuda.memory_reserved(device)


def strict_budget_use(peak_reserved_gib: float, outside_allocator_gib: float, cuda_context_gib: float,
                      pinned_host_gib: float, paged_optimizer_gib: float = 0.0, card_gib: float = STRICT_CARD_GIB,
                      display_reserve_gib: float = WINDOWS_DISPLAY_RESERVE_GIB,
                      pinned_limit_gib: float = PINNED_HOST_LIMIT_GIB) -> dict[str, Any]:
    """A row's use of the strict budget, part by part, and whether it fits (``in_budget``; ``over`` says why not).

    On the card: PyTorch's peak reserved memory + memory outside its allocator (measured; at least the paged
    optimizer states counted, in case the measurement misses unified memory) + the CUDA context must not exceed
    ``card_gib`` − ``display_reserve_gib``. On the host: pinned memory must not exceed ``pinned_limit_gib``.
    """
    outside = max(outside_allocator_gib, paged_optimizer_gib)
    device_gib = peak_reserved_gib + outside + cuda_context_gib
    device_limit = card_gib - display_reserve_gib
    over = []
    if device_gib > device_limit:
        over.append(f"GPU {device_gib:.2f} GiB > {device_limit:g} GiB")
    if pinned_host_gib > pinned_limit_gib:
        over.append(f"pinned host memory {pinned_host_gib:.2f} GiB > {pinned_limit_gib:g} GiB")
    return {
        "card_gib": card_gib, "display_reserve_gib": display_reserve_gib, "device_limit_gib": device_limit,
        "cuda_context_gib": round(cuda_context_gib, 3), "peak_reserved_gib": round(peak_reserved_gib, 3),
        "outside_allocator_gib": round(outside_allocator_gib, 3), "paged_optimizer_gib": round(paged_optimizer_gib, 3),
        "device_gib": round(device_gib, 3), "device_headroom_gib": round(device_limit - device_gib, 3),
        "pinned_host_gib": round(pinned_host_gib, 3), "pinned_limit_gib": pinned_limit_gib,
        "in_budget": not over, "over": over,
    }
