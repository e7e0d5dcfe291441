"""Triton kernels of the fast path (CUDA only; ``utils.speed.fastpath`` imports this module where Triton can run).

``rope_qkv``: rotary position embedding applied straight to the fused q/k/v projection. The projection is one
(tokens × (q + k + v features)) tensor; rotating q and k with PyTorch ops or Liger's kernel first copies them out
of it (they are strided views), and the backward pass concatenates the three gradients back. Here one kernel reads
the projection once and writes rotated q, rotated k and v as the contiguous tensors FlashAttention takes, and one
kernel writes the projection's gradient from theirs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(src, dst, cos1, sin1, cos2, sin2, heads, src_head, dst_head,
            HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr, INVERSE: tl.constexpr):
    """Rotate ``heads`` heads of one token: (x1, x2) → (x1·c1 − x2·s1, x2·c2 + x1·s2), or back (INVERSE)."""
    h = tl.arange(0, BLOCK_HEADS)[:, None]
    d = tl.arange(0, HALF)[None, :]
    mask = h < heads
    x1 = tl.load(src + h * src_head + d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + h * src_head + HALF + d, mask=mask, other=0.0).to(tl.float32)
    if INVERSE:  # the transpose of the rotation: the gradient of the input from the gradient of the output
        y1 = x1 * cos1 + x2 * sin2
        y2 = x2 * cos2 - x1 * sin1
    else:
        y1 = x1 * cos1 - x2 * sin1
        y2 = x2 * cos2 + x1 * sin2
    tl.store(dst + h * dst_head + d, y1.to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + h * dst_head + HALF + d, y2.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _copy_heads(src, dst, heads, src_head, dst_head, HEAD_DIM: tl.constexpr, BLOCK_HEADS: tl.constexpr):
    h = tl.arange(0, BLOCK_HEADS)[:, None]
    d = tl.arange(0, HEAD_DIM)[None, :]
    mask = h < heads
    tl.store(dst + h * dst_head + d, tl.load(src + h * src_head + d, mask=mask), mask=mask)


@triton.jit
def _rope_qkv_kernel(q_src, k_src, v_src, q_dst, k_dst, v_dst, cos, sin,
                     q_src_row, k_src_row, v_src_row, q_src_head, k_src_head, v_src_head,
                     q_dst_row, k_dst_row, v_dst_row, q_dst_head, k_dst_head, v_dst_head,
                     cos_row, q_heads, kv_heads,
                     HALF: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, INVERSE: tl.constexpr):
    """One token per program: q and k rotated (or rotated back), v copied, between strided (token, head) layouts."""
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, HALF)[None, :]
    cos1 = tl.load(cos + t * cos_row + d).to(tl.float32)
    cos2 = tl.load(cos + t * cos_row + HALF + d).to(tl.float32)
    sin1 = tl.load(sin + t * cos_row + d).to(tl.float32)
    sin2 = tl.load(sin + t * cos_row + HALF + d).to(tl.float32)
    _rotate(q_src + t * q_src_row, q_dst + t * q_dst_row, cos1, sin1, cos2, sin2, q_heads, q_src_head, q_dst_head,
            HALF, BLOCK_Q, INVERSE)
    _rotate(k_src + t * k_src_row, k_dst + t * k_dst_row, cos1, sin1, cos2, sin2, kv_heads, k_src_head, k_dst_head,
            HALF, BLOCK_KV, INVERSE)
    _copy_heads(v_src + t * v_src_row, v_dst + t * v_dst_row, kv_heads, v_src_head, v_dst_head, 2 * HALF, BLOCK_KV)


def _launch(src: tuple, dst: tuple, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> None:
    """Rotate (or rotate back) ``src`` = (q, k, v) of shape (tokens, heads, head_dim) into ``dst``."""
    q, k, v = src
    tokens, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    # (row, head) strides of q, k, v, then of their destinations: the kernel takes the three row strides of the
    # sources, their three head strides, then the same for the destinations
    strides = [s for t in (*src, *dst) for s in (t.stride(0), t.stride(1))]
    _rope_qkv_kernel[(tokens,)](
        *src, *dst, cos, sin,
        *strides[0:6:2], *strides[1:6:2], *strides[6:12:2], *strides[7:12:2],
        cos.stride(0), q_heads, kv_heads,
        HALF=head_dim // 2, BLOCK_Q=triton.next_power_of_2(q_heads), BLOCK_KV=triton.next_power_of_2(kv_heads),
        INVERSE=inverse, num_warps=4,
    )


def rope_qkv_supported(head_dim: int) -> bool:
    """The kernel handles head dimensions whose half is a power of two (64 for Llama-3.2: head_dim 128)."""
    half = head_dim // 2
    return head_dim % 2 == 0 and half >= 1 and half & (half - 1) == 0


class RopeQKV(torch.autograd.Function):
    """(tokens × (q + k + v features)) projection → rotated q (T, Hq, D), rotated k (T, Hk, D), v (T, Hk, D).

    Same maths as transformers' ``apply_rotary_pos_emb`` (``x·cos + rotate_half(x)·sin``), computed in fp32 and
    rounded once. ``cos``/``sin``: (T, D), one row per token.
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_heads: int, kv_heads: int,
                head_dim: int):
        tokens = qkv.shape[0]
        nq, nk = q_heads * head_dim, kv_heads * head_dim
        src = tuple(part.view(tokens, -1, head_dim) for part in qkv.split([nq, nk, nk], dim=1))
        dst = tuple(qkv.new_empty(tokens, heads, head_dim) for heads in (q_heads, kv_heads, kv_heads))
        cos, sin = cos.contiguous(), sin.contiguous()
        _launch(src, dst, cos, sin, inverse=False)
        ctx.save_for_backward(cos, sin)
        return dst

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor):
        # autograd hands zeros for an unused output (materialised grads), so all three are tensors
        cos, sin = ctx.saved_tensors
        tokens, q_heads, head_dim = dq.shape
        nq, nk = q_heads * head_dim, dk.shape[1] * head_dim
        src = tuple(g if g.stride(-1) == 1 else g.contiguous() for g in (dq, dk, dv))
        out = dq.new_empty(tokens, nq + 2 * nk)
        dst = tuple(part.view(tokens, -1, head_dim) for part in out.split([nq, nk, nk], dim=1))
        _launch(src, dst, cos, sin, inverse=True)
        return out, None, None, None, None, None
