"""The causal-LM loss over the label positions only, without materialising the logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from utils.speed.fastpath.ops import liger_available


def causal_lm_loss(model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                   num_items: int | torch.Tensor | None = None, chunk: int = 4096, fused: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not -100 (sum / ``num_items`` if given).

    ``fused``: Liger's fused linear cross-entropy where it runs (CUDA, liger-kernel installed); otherwise, or with
    ``fused=False``, PyTorch's, ``chunk`` positions of logits at a time."""
    inner = getattr(model, "module", model)
    head = inner.get_output_embeddings()
    shifted = labels[:, 1:]
    mask = shifted != -100
    h = hidden[:, :-1][mask]
    target = shifted[mask]
    weight = head.weight if head.weight.dtype == h.dtype else head.weight.to(h.dtype)
    denominator = num_items if num_items is not None else mask.sum().clamp(min=1)
    if fused and h.is_cuda and liger_available():
        # optional, CUDA only: imported where it runs
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        total = LigerFusedLinearCrossEntropyFunction.apply(h, weight, target, None, None, -100, 0.0, 0.0, "sum")
        total = total[0] if isinstance(total, tuple) else total
        return total / denominator
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk):
        logits = (h[start:start + chunk] @ weight.t()).float()
        total = total + F.cross_entropy(logits, target[start:start + chunk], reduction="sum")
    return total / denominator
