"""GPU training speed: the fast QLoRA path, its kernels, the flat optimizer and the benchmark.

``utils.speed.fastpath`` (the fast path), ``utils.speed.kernels`` (its Triton kernels, CUDA only),
``utils.speed.optim`` (the flat 8-bit optimizer), ``utils.speed.benchmark`` (``python -m utils.speed.benchmark``:
speed, correctness and multi-GPU measurements) and ``utils.speed.results`` (reading and tabulating their JSON).

This package exports the fast path's and the optimizer's names only. It does not import the benchmark:
``utils.train_step`` imports ``utils.speed.optim``, and the benchmark imports ``utils.train_step``.
"""

from utils.speed.fastpath import (
    FastPath,
    FastPathError,
    FastPathOptions,
    backbone_of,
    causal_lm_loss,
    disable_fast_path,
    enable_fast_path,
    liger_available,
    unsupported_reason,
)
from utils.speed.optim import FlatOptimizer, build_flat_paged_adamw_8bit, flat_unsupported_reason

__all__ = [
    "FastPath", "FastPathError", "FastPathOptions", "FlatOptimizer", "backbone_of", "build_flat_paged_adamw_8bit",
    "causal_lm_loss", "disable_fast_path", "enable_fast_path", "flat_unsupported_reason", "liger_available",
    "unsupported_reason",
]
