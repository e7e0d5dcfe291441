"""Triton kernels of the fast path (CUDA only; ``utils.speed.fastpath`` imports this module where Triton can run).

``rope_qkv``: rotary position embedding applied straight to the fused q/k/v projection. The projection is one
(tokens × (q + k + v features)) tensor; rotating q and k with PyTorch ops or Liger's kernel first copies them out
of it (they are strided views), and the backward pass concatenates the three gradients back. Here one kernel reads
the projection once and writes rotated q, rotated k and v as the contiguous tensors FlashAttention takes, and one
kernel writes the projection's gradient from theirs.

``LoraDropout``: the LoRA dropout of one projection input as one pass that writes the dropped copy and a one-bit
mask (and, for the fused-LoRA GEMM, a copy of the input itself), and one in-place pass in the backward.
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


# --------------------------------------------------------------------------------------------
# LoRA dropout: one elementwise pass each way, with a one-bit mask
# --------------------------------------------------------------------------------------------
# PEFT computes ``B(A(dropout(x)))``. PyTorch's dropout writes the dropped copy and a one-byte mask (5 bytes of
# traffic per 16-bit element), and its backward pass costs two more passes: the mask applied to the LoRA part of the
# input gradient, then autograd's sum of that with the frozen GEMM's part (45 ms of a 641 ms micro-batch-32 step at
# p = 0.05 in the H200 profile). Here ``LoraDropout`` draws a one-bit mask, then writes the dropped copy (4⅛ bytes),
# and its backward applies the mask in place to the LoRA part, onto which the frozen GEMM then adds itself in its
# epilogue as it does without dropout. The GEMMs stay cuBLAS's (Triton GEMMs that applied the mask as they read were
# slower).
#
# Each element is dropped when a 16-bit draw falls below round(p · 65536), so the drop probability is
# q = that count / 65536 (0.05 → 0.0500031; p under 2⁻¹⁷ rounds to 0: nothing dropped) and s = 1 / (1 − q) keeps every
# element's expectation exact. One Philox call gives 128 bits: the draws of 8 elements, whose keep bits make one byte.

DROP_LEVELS = 1 << 16


def dropout_threshold(p: float) -> int:
    """The 16-bit draws below which an element is dropped: round(p · 65536), so q = threshold / 65536."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"LoRA dropout p={p!r}: use 0 <= p < 1.")
    return min(round(p * DROP_LEVELS), DROP_LEVELS - 1)


@triton.jit
def _dropout_bits_kernel(seed_ptr, bits, n_bytes, threshold, BLOCK: tl.constexpr):
    """Byte i of the mask covers elements 8i…8i+7: element 8i+k is kept when the k-th 16 bits of Philox(seed, i) are
    ≥ threshold. One Philox call per byte, in a one-dimensional layout (drawn inside the two-dimensional pass below,
    the compiler recomputed each draw for each of the byte's 8 elements: 4× slower than PyTorch's dropout)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    r0, r1, r2, r3 = tl.randint4x(tl.load(seed_ptr), i)
    byte = _keep_pair(r0, threshold) | (_keep_pair(r1, threshold) << 2) | (_keep_pair(r2, threshold) << 4) | \
        (_keep_pair(r3, threshold) << 6)
    tl.store(bits + i, byte.to(tl.uint8), mask=i < n_bytes)


@triton.jit
def _keep_pair(word, threshold):
    """Two keep bits from one 32-bit random word: its low and its high 16 bits, each kept when ≥ threshold."""
    return ((word & 0xFFFF) >= threshold).to(tl.int32) | ((((word >> 16) & 0xFFFF) >= threshold).to(tl.int32) << 1)


@triton.jit
def _dropout_apply_kernel(x, out, bits, copy, n_bytes, row_bytes, copy_row, scale,
                          COPY: tl.constexpr, BLOCK: tl.constexpr):
    """out = x · keep · scale (``out`` may be ``x``: in place), keep read from the one-bit mask; ``COPY``: x also
    written into ``copy`` (rows of ``copy_row`` elements)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n_bytes
    k = tl.arange(0, 8)[None, :]
    keep = ((tl.load(bits + i, mask=ok, other=0).to(tl.int32)[:, None] >> k) & 1) != 0
    i64 = i.to(tl.int64)[:, None]
    elements = i64 * 8 + k
    inside = ok[:, None]
    xv = tl.load(x + elements, mask=inside, other=0.0)
    tl.store(out + elements, tl.where(keep, xv.to(tl.float32) * scale, 0.0).to(out.dtype.element_ty), mask=inside)
    if COPY:
        row = i64 // row_bytes
        tl.store(copy + row * copy_row + (i64 - row * row_bytes) * 8 + k, xv, mask=inside)


DROPOUT_BLOCK = 256  # mask bytes per program of the apply pass: 2,048 elements
BITS_BLOCK = 1024  # mask bytes per program of the draw


def lora_dropout_supported(features: int) -> bool:
    """Whole mask bytes per row: the input's features are a multiple of 8."""
    return features % 8 == 0


class LoraDropout:
    """The dropout of one (tokens × features) LoRA input: the dropped copy ``out`` and its one-bit mask.

    The seed comes from the device's generator (``torch.randint``): restoring its state, as a checkpointed layer's
    recomputation does, draws the same mask again. ``copy``: a (tokens × features) view (rows may be strided) that
    receives x itself in the same pass.
    """

    def __init__(self, x: torch.Tensor, p: float, copy: torch.Tensor | None = None):
        tokens, features = x.shape
        if not lora_dropout_supported(features) or not x.is_contiguous():
            raise ValueError(f"LoRA dropout kernel: a contiguous input with a multiple of 8 features, not "
                             f"{tuple(x.shape)} (contiguous: {x.is_contiguous()}).")
        if copy is not None and (copy.shape != x.shape or copy.stride(1) != 1):
            raise ValueError(f"LoRA dropout kernel: the copy must be a {tuple(x.shape)} view with unit column stride.")
        threshold = dropout_threshold(p)
        self.scale = DROP_LEVELS / (DROP_LEVELS - threshold)
        self.shape = (tokens, features)
        seed = torch.randint(0, 2**31 - 1, (1,), device=x.device, dtype=torch.int64)
        n_bytes = tokens * features // 8
        self.out = torch.empty_like(x)
        self.bits = torch.empty(n_bytes, dtype=torch.uint8, device=x.device)
        if n_bytes:
            _dropout_bits_kernel[(triton.cdiv(n_bytes, BITS_BLOCK),)](seed, self.bits, n_bytes, threshold,
                                                                     BLOCK=BITS_BLOCK, num_warps=4)
            _dropout_apply_kernel[(triton.cdiv(n_bytes, DROPOUT_BLOCK),)](
                x, self.out, self.bits, copy if copy is not None else x, n_bytes, features // 8,
                copy.stride(0) if copy is not None else 0, self.scale,
                COPY=copy is not None, BLOCK=DROPOUT_BLOCK, num_warps=4)

    def backward_(self, g: torch.Tensor) -> torch.Tensor:
        """g (tokens × features, contiguous) ← g · keep · s, in place: the gradient through the dropout."""
        if g.shape != self.shape or not g.is_contiguous():
            raise ValueError(f"LoRA dropout backward: a contiguous {self.shape} gradient, not {tuple(g.shape)}.")
        n_bytes = self.bits.numel()
        if n_bytes:
            _dropout_apply_kernel[(triton.cdiv(n_bytes, DROPOUT_BLOCK),)](g, g, self.bits, g, n_bytes, 1, 0,
                                                                        self.scale, COPY=False, BLOCK=DROPOUT_BLOCK,
                                                                        num_warps=4)
        return g

    def keep(self) -> torch.Tensor:
        """The kept flags as a (tokens × features) bool tensor (for tests and the PyTorch reference)."""
        flags = (self.bits[:, None].to(torch.int32) >> torch.arange(8, device=self.bits.device)) & 1
        return flags.bool().reshape(self.shape)


# --------------------------------------------------------------------------------------------
# 4-bit dequantisation into rows with a stride
# --------------------------------------------------------------------------------------------
# The fused-LoRA GEMM reads [W | alpha·B] (``FusedProjection.frozen_weight_with_lora``): W's rows have the LoRA
# columns after them. bitsandbytes' kernel writes a contiguous tensor, which then had to be copied into place (10 ms
# of a micro-batch-32 step); this kernel writes the rows where they go. Same maths as bitsandbytes' blockwise NF4/FP4
# dequantisation (``dequantize_4bit``): element e = code[its 4 bits] · absmax[e // blocksize] in fp32, rounded once;
# the high nibble of each byte is the first element; with double quantisation, absmax[b] = code2[absmax_q[b]] ·
# absmax2[b // blocksize2] + offset.


@triton.jit
def _dequantize_4bit_kernel(packed, code, absmax, code2, absmax2, offset, out, n, cols, out_row, blocksize,
                            blocksize2, NESTED: tl.constexpr, BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = e < n
    byte = tl.load(packed + (e >> 1), mask=ok, other=0).to(tl.int32)
    nibble = tl.where((e & 1) == 0, byte >> 4, byte & 0xF)
    block = e // blocksize
    if NESTED:
        scale = tl.load(code2 + tl.load(absmax + block, mask=ok, other=0).to(tl.int32), mask=ok, other=0.0) * \
            tl.load(absmax2 + block // blocksize2, mask=ok, other=0.0) + offset
    else:
        scale = tl.load(absmax + block, mask=ok, other=0.0)
    value = tl.load(code + nibble, mask=ok, other=0.0) * scale
    row = e // cols
    tl.store(out + row * out_row + (e - row * cols), value.to(out.dtype.element_ty), mask=ok)


DEQUANT_BLOCK = 1024


def dequantize_4bit_rows(packed: torch.Tensor, state, out: torch.Tensor, offset: float | None = None) -> torch.Tensor:
    """bitsandbytes' 4-bit ``packed`` weight (its quant ``state``) into ``out``: a (rows × cols) view, unit column
    stride, any row stride. ``offset``: the double quantisation's offset as a float (None: read from ``state``,
    a device-to-host copy)."""
    rows, cols = state.shape
    if tuple(out.shape) != (rows, cols) or out.stride(1) != 1:
        raise ValueError(f"4-bit dequantisation: the output must be a {(rows, cols)} view with unit column stride.")
    n = rows * cols
    nested = bool(state.nested)
    if offset is None:
        offset = float(state.offset) if nested else 0.0
    absmax2 = state.state2.absmax if nested else state.absmax
    code2 = state.state2.code if nested else state.code
    if n:
        _dequantize_4bit_kernel[(triton.cdiv(n, DEQUANT_BLOCK),)](
            packed, state.code, state.absmax, code2, absmax2, offset, out, n, cols,
            out.stride(0), state.blocksize, state.state2.blocksize if nested else 1,
            NESTED=nested, BLOCK=DEQUANT_BLOCK, num_warps=4)
    return out
