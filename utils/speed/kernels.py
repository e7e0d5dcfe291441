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


# --------------------------------------------------------------------------------------------
# LoRA dropout fused into the LoRA GEMMs
# --------------------------------------------------------------------------------------------
# PEFT computes ``B(A(dropout(x)))``. Run as PyTorch ops, the dropout writes a dropped copy of every (tokens ×
# features) LoRA input (and a byte mask when autograd records it), and its backward pass makes two more such passes
# (the mask applied, then a sum with the frozen GEMM's input gradient): ~20 bytes of memory traffic per input
# element, 6-7 % of a micro-batch-32 step at p = 0.05 (results/04_speed_notes.md). Here the mask is one bit per
# element, drawn by ``dropout_bits`` (Philox, from a seed the device's generator draws, so a checkpointed layer's
# recomputation replays it by restoring the generator's state), and the three kernels that read the LoRA input or
# write its gradient apply it as they go:
#   ``lora_down``    xa = (x ⊙ keep) @ Aᵀ · s              (forward: x is read once, as the GEMM reads it anyway)
#   ``lora_up``      gx = ((g @ A) ⊙ keep) · s            (the LoRA part of the input gradient; the frozen GEMM then
#                                                          adds itself onto it in its epilogue, as without dropout)
#   ``lora_grad_a``  gA = gᵀ @ (x ⊙ keep) · s
# with s = 1 / (1 − q). Each element is dropped when a 16-bit draw falls below round(p · 65536), so the drop
# probability is q = that count / 65536 (0.05 → 0.0500031) and s keeps every element's expectation exact.

DROP_LEVELS = 1 << 16  # each element's draw: 16 random bits (one Philox call gives 128 bits: 8 elements)


def dropout_threshold(p: float) -> int:
    """The 16-bit draws below which an element is dropped: round(p · 65536), so q = threshold / 65536."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"LoRA dropout p={p!r}: the fused kernels take 0 < p < 1.")
    return min(max(round(p * DROP_LEVELS), 1), DROP_LEVELS - 1)


@triton.jit
def _dropout_bits_kernel(seed_ptr, bits, n_bytes, threshold, BLOCK: tl.constexpr):
    """Byte i of the mask: bit j (element 8·i + j) kept when the j-th 16 bits of Philox(seed, i) ≥ threshold."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    r0, r1, r2, r3 = tl.randint4x(tl.load(seed_ptr), i)
    byte = _keep_pair(r0, threshold) | (_keep_pair(r1, threshold) << 2) | (_keep_pair(r2, threshold) << 4) | \
        (_keep_pair(r3, threshold) << 6)
    tl.store(bits + i, byte.to(tl.uint8), mask=i < n_bytes)


@triton.jit
def _keep_pair(word, threshold):
    """Two mask bits from one 32-bit random word: its low and its high 16 bits, each kept when ≥ threshold."""
    return ((word & 0xFFFF) >= threshold).to(tl.int32) | ((((word >> 16) & 0xFFFF) >= threshold).to(tl.int32) << 1)


@triton.jit
def _keep(bits, rows, cols, row_bytes, mask):
    """The kept flags of the (rows × cols) elements of a mask with ``row_bytes`` bytes per row."""
    byte = tl.load(bits + rows[:, None] * row_bytes + (cols[None, :] >> 3), mask=mask, other=0).to(tl.int32)
    return ((byte >> (cols[None, :] & 7)) & 1) != 0


@triton.jit
def _lora_down_kernel(x, a, bits, out, tokens, features, rank, scale,
                      BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """out (T × R) = ((x ⊙ keep) @ aᵀ) · scale, one block of tokens per program; x (T × F), a (R × F)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    r = tl.arange(0, BLOCK_R)
    row_ok = rows < tokens
    acc = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
    for k in range(0, features, BLOCK_K):
        cols = k + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (cols[None, :] < features)
        xt = tl.load(x + rows[:, None] * features + cols[None, :], mask=mask, other=0.0)
        xt = tl.where(_keep(bits, rows, cols, features // 8, mask), xt, tl.zeros_like(xt))
        at = tl.load(a + r[None, :] * features + cols[:, None], mask=(cols[:, None] < features) & (r[None, :] < rank),
                     other=0.0)
        acc = tl.dot(xt, at, acc, input_precision=PRECISION)
    tl.store(out + rows[:, None] * rank + r[None, :], (acc * scale).to(out.dtype.element_ty),
             mask=row_ok[:, None] & (r[None, :] < rank))


@triton.jit
def _lora_up_kernel(g, a, bits, out, tokens, features, rank, scale,
                    BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """out (T × F) = ((g @ a) ⊙ keep) · scale, one (tokens × features) tile per program; g (T × R), a (R × F)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    r = tl.arange(0, BLOCK_R)
    row_ok, col_ok = rows < tokens, cols < features
    gt = tl.load(g + rows[:, None] * rank + r[None, :], mask=row_ok[:, None] & (r[None, :] < rank), other=0.0)
    at = tl.load(a + r[:, None] * features + cols[None, :], mask=(r[:, None] < rank) & col_ok[None, :], other=0.0)
    mask = row_ok[:, None] & col_ok[None, :]
    y = tl.where(_keep(bits, rows, cols, features // 8, mask), tl.dot(gt, at, input_precision=PRECISION) * scale, 0.0)
    tl.store(out + rows[:, None] * features + cols[None, :], y.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _lora_grad_a_kernel(g, x, bits, partial, tokens, features, rank, split_tokens,
                        BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """partial[s] (R × F) = gᵀ @ (x ⊙ keep) over split s's tokens, one block of features; the caller sums them."""
    cols = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    split = tl.program_id(1)
    r = tl.arange(0, BLOCK_R)
    col_ok = cols < features
    acc = tl.zeros([BLOCK_R, BLOCK_F], dtype=tl.float32)
    start = split * split_tokens
    end = tl.minimum(start + split_tokens, tokens)
    for t in range(start, end, BLOCK_T):
        rows = t + tl.arange(0, BLOCK_T)
        row_ok = rows < end
        gt = tl.load(g + rows[:, None] * rank + r[None, :], mask=row_ok[:, None] & (r[None, :] < rank), other=0.0)
        mask = row_ok[:, None] & col_ok[None, :]
        xt = tl.load(x + rows[:, None] * features + cols[None, :], mask=mask, other=0.0)
        xt = tl.where(_keep(bits, rows, cols, features // 8, mask), xt, tl.zeros_like(xt))
        acc = tl.dot(tl.trans(gt), xt, acc, input_precision=PRECISION)
    tl.store(partial + split * rank * features + r[:, None] * features + cols[None, :], acc,
             mask=(r[:, None] < rank) & col_ok[None, :])


MAX_FUSED_RANK = 256  # the LoRA ranks of one fused group, summed (q/k/v at r = 32: 96)


def fused_dropout_supported(features: int, rank: int) -> bool:
    """The kernels take inputs whose features are a multiple of 8 (whole mask bytes per row), and ranks up to 256."""
    return features % 8 == 0 and features >= 16 and 0 < rank <= MAX_FUSED_RANK


def _precision(x: torch.Tensor) -> str:
    """fp32 inputs multiply in full precision (Triton's default for them is TF32); 16-bit ones need no choice."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _rank_block(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))  # tl.dot takes dimensions of 16 or more


class DropMask:
    """The LoRA-dropout mask of one (tokens × features) input: a bit per element; its keep scale 1 / (1 − q)."""

    def __init__(self, tokens: int, features: int, p: float, device: torch.device):
        if features % 8:
            raise ValueError(f"dropout mask over {features} features: the bit mask needs a multiple of 8.")
        threshold = dropout_threshold(p)
        self.shape = (tokens, features)
        self.scale = DROP_LEVELS / (DROP_LEVELS - threshold)
        # the seed comes from the device's generator: restoring its state (a checkpoint's recomputation) replays it
        seed = torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)
        n_bytes = tokens * features // 8
        self.bits = torch.empty(n_bytes, dtype=torch.uint8, device=device)
        if n_bytes:
            block = 1024
            _dropout_bits_kernel[(triton.cdiv(n_bytes, block),)](seed, self.bits, n_bytes, threshold, BLOCK=block)

    def keep(self) -> torch.Tensor:
        """The kept flags as a (tokens × features) bool tensor (for tests and the PyTorch reference)."""
        flags = (self.bits[:, None].to(torch.int32) >> torch.arange(8, device=self.bits.device)) & 1
        return flags.bool().reshape(self.shape)


def lora_down(x: torch.Tensor, a: torch.Tensor, drop: DropMask) -> torch.Tensor:
    """((x ⊙ keep) @ aᵀ) · s: x (T × F), a (R × F) → (T × R), in x's dtype."""
    x, a = x.contiguous(), a.contiguous()
    tokens, features = x.shape
    rank = a.shape[0]
    out = x.new_empty(tokens, rank)
    block_t = 64
    _lora_down_kernel[(triton.cdiv(tokens, block_t),)](
        x, a, drop.bits, out, tokens, features, rank, drop.scale,
        BLOCK_T=block_t, BLOCK_K=64 if features >= 64 else 16, BLOCK_R=_rank_block(rank), PRECISION=_precision(x),
        num_warps=4)
    return out


def lora_up(g: torch.Tensor, a: torch.Tensor, drop: DropMask) -> torch.Tensor:
    """((g @ a) ⊙ keep) · s: g (T × R), a (R × F) → (T × F), in g's dtype (the frozen GEMM adds onto it)."""
    g, a = g.contiguous(), a.contiguous()
    tokens, rank = g.shape
    features = a.shape[1]
    out = g.new_empty(tokens, features)
    block_t, block_f = 64, 64 if features >= 64 else 16
    _lora_up_kernel[(triton.cdiv(tokens, block_t), triton.cdiv(features, block_f))](
        g, a, drop.bits, out, tokens, features, rank, drop.scale,
        BLOCK_T=block_t, BLOCK_F=block_f, BLOCK_R=_rank_block(rank), PRECISION=_precision(g), num_warps=4)
    return out


def lora_grad_a(g: torch.Tensor, x: torch.Tensor, drop: DropMask) -> torch.Tensor:
    """(gᵀ @ (x ⊙ keep)) · s: g (T × R), x (T × F) → (R × F), in x's dtype.

    The sum over tokens is split across programs (a (R × F) output alone would occupy only F / 64 of them) into fp32
    partial sums, added by one PyTorch sum: deterministic, unlike atomic adds.
    """
    g, x = g.contiguous(), x.contiguous()
    tokens, features = x.shape
    rank = g.shape[1]
    block_t, block_f = 64, 64 if features >= 64 else 16
    col_blocks, token_blocks = triton.cdiv(features, block_f), triton.cdiv(tokens, block_t)
    programs = 4 * _sm_count(x.device)
    splits = max(1, min(token_blocks, programs // col_blocks))
    split_tokens = triton.cdiv(token_blocks, splits) * block_t
    splits = triton.cdiv(tokens, split_tokens) if tokens else 1
    partial = torch.empty(splits, rank, features, dtype=torch.float32, device=x.device)
    _lora_grad_a_kernel[(col_blocks, splits)](
        g, x, drop.bits, partial, tokens, features, rank, split_tokens,
        BLOCK_T=block_t, BLOCK_F=block_f, BLOCK_R=_rank_block(rank), PRECISION=_precision(x), num_warps=4)
    return partial.sum(0).mul_(drop.scale).to(x.dtype)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # Triton's interpreter (tests on a CPU)
    return torch.cuda.get_device_properties(device).multi_processor_count
