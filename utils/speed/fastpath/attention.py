"""Attention over variable-length sequences packed in one token stream (no padding)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

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


def cudnn_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """SDPA's cuDNN attention can be asked for: a CUDA GPU of compute capability 8.0 or newer, fp16/bf16, cuDNN."""
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and torch.backends.cudnn.is_available() and hasattr(SDPBackend, "CUDNN_ATTENTION")
            and compute_capability(device)[0] >= 8)


_CUDNN: dict[str, Any] = {}  # "failed": the reason cuDNN's kernel refused a pass (varlen from then on)


def attention_cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segments) -> torch.Tensor:
    """``attention_varlen``'s result; where every sequence of the pass has the same length, from SDPA's cuDNN kernel.

    Rows of one length (the benchmark's synthetic rows, or a batch of equal-length examples) are the (rows × heads ×
    length × dim) tensors SDPA takes, as views: no padding, no copies, the grouped k/v heads read as they are. On an
    H200, 32 rows of 512 tokens: 0.16 + 0.74 ms forward + backward against 0.41 + 1.13 (+ 0.19) for the variable-length
    FlashAttention (``results/04_speed_notes.md``). Packed rows of different lengths take the variable-length kernel.
    """
    tokens = q.shape[0]
    if seg.count * seg.max_len != tokens or "failed" in _CUDNN:
        return attention_varlen(q, k, v, seg)

    def rows(x: torch.Tensor) -> torch.Tensor:
        return x.view(seg.count, seg.max_len, x.shape[1], x.shape[2]).transpose(1, 2)

    try:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            out = F.scaled_dot_product_attention(rows(q), rows(k), rows(v), is_causal=True,
                                                 enable_gqa=q.shape[1] != k.shape[1])
    except (RuntimeError, TypeError) as exc:  # this PyTorch/cuDNN cannot run it (shape, layout, version): say so once
        _CUDNN["failed"] = str(exc).splitlines()[0]
        warnings.warn(f"fast path: cuDNN attention unavailable ({_CUDNN['failed']}); using FlashAttention's "
                      "variable-length kernel.", RuntimeWarning, stacklevel=2)
        return attention_varlen(q, k, v, seg)
    return out.transpose(1, 2).reshape(tokens, q.shape[1], q.shape[2])


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


ATTENTION_KERNELS = {"varlen": attention_varlen, "cudnn": attention_cudnn, "sdpa": attention_sdpa}
