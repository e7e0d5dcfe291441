"""Attention over variable-length sequences packed in one token stream (no padding)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from utils.device import compute_capability


@dataclass
class Segments:
    """Where each sequence of a flattened token stream starts: what padding-free attention needs."""

    cu_seqlens: torch.Tensor  # int32 (n + 1,): cumulative lengths
    max_len: int
    count: int
    index: torch.Tensor  # long (T,): the sequence of each token
    position: torch.Tensor  # long (T,): the token's position inside its sequence


def find_segments(position_ids: torch.Tensor, row_starts: torch.Tensor | None = None) -> Segments:
    """Segments of a flat token stream: a new sequence starts where the position is 0 (or a row starts)."""
    tokens = position_ids.numel()
    start = position_ids == 0
    if row_starts is not None:
        start = start | row_starts
    start[0] = True
    starts = start.nonzero().squeeze(1)
    ends = torch.cat([starts[1:], starts.new_tensor([tokens])])
    lengths = ends - starts
    index = torch.cumsum(start.long(), 0) - 1
    position = torch.arange(tokens, device=position_ids.device) - starts[index]
    cu = torch.cat([starts.new_zeros(1), torch.cumsum(lengths, 0)]).to(torch.int32)
    return Segments(cu, int(lengths.max()), int(starts.numel()), index, position)


_FLASH: dict[str, Any] = {}  # "native_gqa": whether the kernel reads grouped k/v heads as they are


class _FlashVarlen(torch.autograd.Function):
    """Causal FlashAttention over sequences packed in one stream: PyTorch's own kernels, called directly.

    ``torch.nn.attention.varlen.varlen_attn`` reaches the same kernels through a Python custom op, whose
    dispatch cost ~1 ms of CPU time per call in the original recipe's launch-bound step.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int):
        out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, 0.0, True, False)
        empty = q.new_empty(0)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, empty if seed is None else seed,
                              empty if offset is None else offset)
        ctx.max_len = max_len
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, v, out, lse, cu, seed, offset = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad.contiguous(), q, k, v, out, lse, cu, cu, ctx.max_len, ctx.max_len, 0.0, True, seed, offset)
        return dq, dk, dv, None, None


def varlen_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """FlashAttention's variable-length kernel runs on Ampere or newer GPUs in fp16/bf16.

    The capability is ``utils.device.compute_capability``'s: under ``QLORA_EMULATE_CAPABILITY=7.5`` it is False.
    """
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and hasattr(torch.ops.aten, "_flash_attention_forward")
            and compute_capability(device)[0] >= 8)


def _repeat_kv(x: torch.Tensor, n_rep: int, dim: int) -> torch.Tensor:
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=dim)


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segments) -> torch.Tensor:
    """Causal attention within each sequence; q (T, Hq, D), k/v (T, Hk, D) → (T, Hq, D)."""
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        # FlashAttention reads grouped k/v heads natively; checked once against repeated heads, and where that
        # fails or differs, heads are repeated from then on.
        if "native_gqa" not in _FLASH:
            with torch.no_grad():
                expanded = _FlashVarlen.apply(q, _repeat_kv(k, n_rep, 1), _repeat_kv(v, n_rep, 1),
                                              seg.cu_seqlens, seg.max_len)
                try:
                    native = _FlashVarlen.apply(q, k, v, seg.cu_seqlens, seg.max_len)
                    _FLASH["native_gqa"] = bool(torch.allclose(native.float(), expanded.float(), atol=2e-2, rtol=0))
                except RuntimeError:
                    _FLASH["native_gqa"] = False
        if not _FLASH["native_gqa"]:
            k, v = _repeat_kv(k, n_rep, 1), _repeat_kv(v, n_rep, 1)
    return _FlashVarlen.apply(q, k, v, seg.cu_seqlens, seg.max_len)


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segments) -> torch.Tensor:
    """Same result as ``attention_varlen`` with SDPA: each sequence in its own right-padded row."""
    n_rep = q.shape[1] // k.shape[1]

    def rows(x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(seg.count, seg.max_len, *x.shape[1:])
        out[seg.index, seg.position] = x
        return out.transpose(1, 2)

    # Padding sits at the end of each row, so a causal mask alone keeps real queries off it
    out = F.scaled_dot_product_attention(rows(q), _repeat_kv(rows(k), n_rep, 1), _repeat_kv(rows(v), n_rep, 1),
                                         is_causal=True)
    return out.transpose(1, 2)[seg.index, seg.position]
