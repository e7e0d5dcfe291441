"""Units and the one memory budget of the thesis GPU (RTX 2070 SUPER, 8 GB)."""

from __future__ import annotations

GIB = 1024**3  # binary units, as PyTorch and nvidia-smi report memory
MIB = 1024**2
GB = 10**9  # decimal units, as file sizes and model cards are quoted
MB = 10**6

# RTX 2070 SUPER: 8 GB of GDDR6 = 8 GiB as the card reports it (8192 MiB).
CARD_GIB = 8.0
# What a card holds besides PyTorch's allocations (CUDA context, cuBLAS workspaces): an upper estimate of
# 0.3-0.5 GiB, not measured on the RTX 2070 SUPER.
CUDA_CONTEXT_GIB = 0.5
# What PyTorch's allocator may reserve on that card: a configuration fits when its peak reserved memory does.
BUDGET_GIB = CARD_GIB - CUDA_CONTEXT_GIB


def gib(n_bytes: float | None) -> float | None:
    """Bytes to GiB (None stays None)."""
    return None if n_bytes is None else n_bytes / GIB
