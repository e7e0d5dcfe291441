"""The fast QLoRA path for Llama models: fused projections, offloaded checkpoints, padding-free attention.

``enable_fast_path(model)`` replaces the forward of a PEFT-wrapped Llama backbone (4-bit bitsandbytes or plain
weights) for training; generation keeps the original forward. The LoRA parameters stay PEFT's own tensors, so
saving, loading and merging adapters are unchanged. What changes, and why it pays (measured in
``results/04_speed_benchmark.json``; predictions and outcomes in ``results/04_speed_notes.md``):

- q/k/v and gate/up each run as one GEMM over weights dequantised into one buffer; their LoRA ``A`` matrices run
  as one GEMM and the ``B`` matrices as one block-diagonal GEMM added in place: about 30 kernels per layer
  instead of about 150, so small batches stop being bound by kernel launches.
- No fp32 upcast of the embedding and norms (``prepare_model_for_kbit_training``): the trainable LoRA
  parameters are fp32, the rest (the residual stream too) runs in the compute dtype, as transformers' own
  forward does without the upcast; ``fp32_residual=True`` keeps the residual in fp32 at a memory cost.
- Every decoder layer is checkpointed. With checkpoints offloaded (the default on CUDA) each layer keeps its
  input, the residual after attention and the q/k/v projection in pinned CPU memory, copied on side streams
  that may run at most two layers behind the compute (and fetched back one layer ahead in the backward pass);
  the recomputation then skips the frozen GEMMs of q/k/v, ``o_proj`` and ``down_proj`` (the last two only
  feed the residual stream, whose values the backward pass does not need) and runs the MLP half, then the
  attention half, so only one half's activations are alive at a time. ``checkpoint_keep`` chooses less.
- The LoRA matrices are cast, stacked and scaled once per forward pass and shared by the recomputation;
  the LoRA scaling rides on the GEMM (``alpha``) instead of costing a multiplication per matrix. Each fused
  projection is one autograd function: the LoRA part of the input gradient is added inside the frozen
  GEMM of the backward pass (beta = 1) rather than as a separate sum.
- RMSNorm and SwiGLU run as Liger's Triton kernels on CUDA for passes of 4096 tokens or more, RoPE as this
  project's Triton kernel (``utils.kernels``: it rotates q and k straight out of the fused projection, where
  Liger's copies them out first), all three as PyTorch ops for smaller passes (where the CPU's kernel launches
  set the pace and Triton's launcher costs more CPU time than the extra ATen kernels) and off CUDA; attention is
  FlashAttention's variable-length kernel over the real tokens only (no padding), or PyTorch SDPA over one
  padded row per sequence where that kernel is unavailable (CPU, GPUs older than Ampere).

One deliberate difference from PEFT: modules fused into one GEMM (q/k/v, gate/up) share one LoRA-dropout mask
per token; PEFT draws one mask per module. Each module still sees inputs dropped with probability p.
"""

from __future__ import annotations

import copy
import functools
import types
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

KERNEL_CHOICES = ("auto", "liger", "torch")
KEEP_CHOICES = ("auto", "input", "mid", "mid+qkv")
ATTENTION_CHOICES = ("auto", "varlen", "sdpa")


class FastPathError(ValueError):
    """The model or setting cannot use the fast path; the message names what and the way out."""


@dataclass(frozen=True)
class FastPathOptions:
    """How the fast path runs. The defaults are the fastest configuration measured within 8 GiB."""

    checkpoint: bool = True  # recompute each layer in the backward pass (off: keeps every activation)
    offload_checkpoints: bool = True  # keep each layer's input in pinned CPU memory instead of on the GPU
    skip_down_recompute: bool = True  # the recomputation skips down_proj's frozen GEMM (not needed for grads)
    # What each checkpointed layer keeps: "input" (the layer's input only), "mid" (also the residual after
    # attention: the recomputation skips o_proj's frozen GEMM), "mid+qkv" (also the q/k/v projection: the
    # recomputation skips that GEMM and its LoRA too). "auto": "mid+qkv" where checkpoints are offloaded (it costs
    # pinned CPU memory and copies that overlap the compute: for Llama-3.2-3B ~630 KB per token of a step, against
    # ~172 KB for "input"), "input" where they stay on the GPU
    checkpoint_keep: str = "auto"
    # "liger" (Triton, CUDA), "torch", or "auto": liger where it can run, for passes of ``small_pass_tokens`` tokens
    # or more; smaller passes are bound by the CPU's kernel launches, and Triton's launcher costs several times the
    # CPU time of an ATen op (the original recipe's 2 × 512 tokens ran ~10 % faster with PyTorch's ops)
    kernels: str = "auto"
    small_pass_tokens: int = 4096
    # A checkpointed layer runs its MLP (and its recomputation and backward) over at most this many tokens at a
    # time (0: the whole pass at once): the MLP's (tokens × 2 · intermediate) activations are the largest alive
    mlp_chunk_tokens: int = 0
    attention: str = "auto"  # "varlen" (FlashAttention), "sdpa" (one padded row per sequence), or "auto"
    fp32_residual: bool = False  # keep the residual stream in fp32 (costs memory; for activations beyond fp16)

    def __post_init__(self) -> None:
        if self.kernels not in KERNEL_CHOICES:
            raise FastPathError(f"kernels={self.kernels!r}: use one of {KERNEL_CHOICES}.")
        if self.attention not in ATTENTION_CHOICES:
            raise FastPathError(f"attention={self.attention!r}: use one of {ATTENTION_CHOICES}.")
        if self.checkpoint_keep not in KEEP_CHOICES:
            raise FastPathError(f"checkpoint_keep={self.checkpoint_keep!r}: use one of {KEEP_CHOICES}.")
        if not isinstance(self.mlp_chunk_tokens, int) or self.mlp_chunk_tokens < 0:
            raise FastPathError(f"mlp_chunk_tokens={self.mlp_chunk_tokens!r}: use a whole number of tokens, 0 or more "
                                "(0: the MLP runs over the whole pass at once).")
        if not isinstance(self.small_pass_tokens, int) or self.small_pass_tokens < 0:
            raise FastPathError(f"small_pass_tokens={self.small_pass_tokens!r}: use a whole number of tokens, 0 or "
                                "more (0: Liger's kernels for every pass where they can run).")


# --------------------------------------------------------------------------------------------
# Kernels: Triton (Liger's, and utils.kernels' RoPE) on CUDA, PyTorch ops elsewhere (same maths)
# --------------------------------------------------------------------------------------------


@functools.cache
def liger_available() -> bool:
    """True when Liger's Triton kernels can run here (CUDA and the ``liger-kernel`` package)."""
    if not torch.cuda.is_available():
        return False
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction  # noqa: F401
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction  # noqa: F401
        import triton  # noqa: F401  (the RoPE kernel of utils.kernels)
        from liger_kernel.ops.swiglu import LigerFusedGateUpSiLUMulFunction  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: use the PyTorch ops
        return False
    return True


def _rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # LlamaRMSNorm: statistics in fp32, normalised values cast back, then scaled
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight.to(x.dtype) * y.to(x.dtype)


def _rms_norm_liger(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    return LigerRMSNormFunction.apply(x, weight.to(x.dtype), eps, 0.0, "llama", False)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope_qkv_torch(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
                    head_dim: int):
    """The q/k/v projection (T × features) → RoPE'd q (T, Hq, D), RoPE'd k (T, Hk, D), v (T, Hk, D); cos/sin (T, D)."""
    tokens = qkv.shape[0]
    nq, nk = heads * head_dim, kv_heads * head_dim
    # split (one concatenation in the backward pass), not three slices (three zero-filled full-size grads)
    q, k, v = qkv.split([nq, nk, nk], dim=1)
    q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return (q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin,
            v.reshape(tokens, kv_heads, head_dim).contiguous())


def _rope_qkv_triton(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
                     head_dim: int):
    """Same as ``_rope_qkv_torch`` in one Triton kernel each way (``utils.kernels``): no copies out of ``qkv``."""
    from utils.speed.kernels import RopeQKV, rope_qkv_supported

    if not rope_qkv_supported(head_dim):
        return _rope_qkv_torch(qkv, cos, sin, heads, kv_heads, head_dim)
    return RopeQKV.apply(qkv, cos, sin, heads, kv_heads, head_dim)


def _swiglu_torch(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _swiglu_liger(gate_up: torch.Tensor) -> torch.Tensor:
    from liger_kernel.ops.swiglu import LigerFusedGateUpSiLUMulFunction

    return LigerFusedGateUpSiLUMulFunction.apply(gate_up)


@dataclass(frozen=True)
class _Kernels:
    name: str
    rms_norm: Any
    rope_qkv: Any
    swiglu: Any


KERNELS = {
    "torch": _Kernels("torch", _rms_norm_torch, _rope_qkv_torch, _swiglu_torch),
    # Liger's RMSNorm and SwiGLU; RoPE from this project's kernel on the fused projection (Liger's copies q/k out)
    "liger": _Kernels("liger", _rms_norm_liger, _rope_qkv_triton, _swiglu_liger),
}


def resolve_kernels(choice: str, device: torch.device) -> _Kernels:
    """The kernel set for ``choice`` on ``device``; asking for Liger where it cannot run is an error."""
    if choice == "torch" or (choice == "auto" and (device.type != "cuda" or not liger_available())):
        return KERNELS["torch"]
    if device.type != "cuda" or not liger_available():
        raise FastPathError(
            "kernels='liger' needs a CUDA GPU and the liger-kernel package (pip install liger-kernel); "
            "use kernels='torch' or 'auto'."
        )
    return KERNELS["liger"]


# --------------------------------------------------------------------------------------------
# Attention over variable-length sequences
# --------------------------------------------------------------------------------------------


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
    """FlashAttention's variable-length kernel runs on Ampere or newer GPUs in fp16/bf16."""
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and hasattr(torch.ops.aten, "_flash_attention_forward")
            and torch.cuda.get_device_capability(device)[0] >= 8)


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


# --------------------------------------------------------------------------------------------
# Frozen weights and fused LoRA projections
# --------------------------------------------------------------------------------------------


class FusedProjection:
    """Linear layers that read the same input (q/k/v, gate/up, or one alone), run as one GEMM plus fused LoRA."""

    def __init__(self, modules: list[torch.nn.Module], dtype: torch.dtype, where: str):
        self.where = where
        self.dtype = dtype
        self.bases, self.loras = [], []
        for module in modules:
            base = getattr(module, "base_layer", module)
            if getattr(base, "bias", None) is not None:
                raise FastPathError(f"{where}: linear layers with a bias are not supported by the fast path.")
            weight = base.weight
            if weight.requires_grad:  # the projections' backward computes no gradient for frozen weights
                raise FastPathError(f"{where}: the base weight is trainable; the fast path trains LoRA adapters only. "
                                    "Freeze the base model (get_peft_model does) or use fast_path='off'.")
            if type(base).__name__ == "Linear8bitLt" or getattr(weight, "SCB", None) is not None:
                raise FastPathError(f"{where}: 8-bit weights are not supported by the fast path; "
                                    "use quantization='nf4_dq' (or nf4, fp4) or unquantised weights.")
            self.bases.append(base)
            self.loras.append(self._lora_of(module))
        self.out_sizes = [b.out_features for b in self.bases]
        self.in_features = self.bases[0].in_features
        self.out_features = sum(self.out_sizes)
        ps = {lora["p"] for lora in self.loras if lora is not None}
        if len(ps) > 1:
            raise FastPathError(f"{where}: the fused modules have different LoRA dropouts {sorted(ps)}.")
        self.dropout = ps.pop() if ps else 0.0
        self.has_lora = any(lora is not None for lora in self.loras)
        # Dequantise straight into the compute dtype (bitsandbytes writes quant_state.dtype)
        self.quant_states = []
        for base in self.bases:
            state = getattr(base.weight, "quant_state", None)
            if state is not None:
                state = copy.copy(state)  # shares the packed data; only the output dtype differs
                state.dtype = dtype
                if state.nested:  # bitsandbytes moves the nested code table to the device on every call
                    state.state2 = copy.copy(state.state2)
                    state.state2.code = state.state2.code.to(base.weight.device)
            self.quant_states.append(state)

    def _lora_of(self, module: torch.nn.Module) -> dict | None:
        if not hasattr(module, "lora_A"):
            return None
        adapters = [a for a in module.active_adapters if a in module.lora_A]
        if not adapters:
            return None
        if len(adapters) > 1:
            raise FastPathError(f"{self.where}: one active LoRA adapter at a time (active: {adapters}).")
        name = adapters[0]
        if getattr(module, "use_dora", {}).get(name, False):
            raise FastPathError(f"{self.where}: DoRA adapters are not supported by the fast path.")
        if getattr(module.lora_B[name], "bias", None) is not None:
            raise FastPathError(f"{self.where}: LoRA biases are not supported by the fast path.")
        drop = module.lora_dropout[name]
        return {"A": module.lora_A[name].weight, "B": module.lora_B[name].weight, "scale": module.scaling[name],
                "p": float(drop.p) if isinstance(drop, torch.nn.Dropout) else 0.0}

    def frozen_weight(self) -> torch.Tensor:
        """The concatenated frozen weight (out_features × in_features) in the compute dtype."""
        if len(self.bases) == 1 and self.quant_states[0] is None:
            w = self.bases[0].weight
            return w if w.dtype == self.dtype else w.to(self.dtype)
        device = self.bases[0].weight.device
        out = torch.empty(self.out_features, self.in_features, dtype=self.dtype, device=device)
        for base, state, part in zip(self.bases, self.quant_states, out.split(self.out_sizes)):
            if state is None:
                part.copy_(base.weight)
            else:
                dequantize_4bit_into(base.weight.data, state, part)
        return out

    def lora_matrices(self, step: StepContext | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``A`` stacked (r_total × in), ``B`` block-diagonal (out × r_total) and the scaling for the GEMM.

        With one scaling for all modules (the usual case) it becomes the GEMM's ``alpha``; otherwise it is
        folded into ``B``. ``step`` keeps the result for the rest of the pass and its recomputation; a pass that
        records a graph prepares them with autograd on, even inside a checkpointed layer's no-grad forward.
        """
        if step is not None and id(self) in step.lora:
            return step.lora[id(self)]
        if step is not None and step.grad and not torch.is_grad_enabled():
            with torch.enable_grad():
                return self.lora_matrices(step)
        a_parts, b_parts = [], []
        device = self.bases[0].weight.device
        scales = {lora["scale"] for lora in self.loras if lora is not None}
        shared = len(scales) == 1
        alpha = next(iter(scales)) if shared else 1.0
        lora_dtype = next(lora["B"].dtype for lora in self.loras if lora is not None)
        for lora, size in zip(self.loras, self.out_sizes):
            if lora is None:
                b_parts.append(torch.zeros(size, 0, dtype=lora_dtype, device=device))
                continue
            a_parts.append(lora["A"])
            b_parts.append(lora["B"] if shared else lora["B"] * lora["scale"])
        # stacked in the parameters' dtype, then cast once (one cast per matrix, and one back in the backward)
        a = (a_parts[0] if len(a_parts) == 1 else torch.cat(a_parts)).to(self.dtype)
        b = (b_parts[0] if len(b_parts) == 1 else torch.block_diag(*b_parts)).to(self.dtype)
        if step is not None:
            step.lora[id(self)] = (a, b, alpha)
        return a, b, alpha

    def __call__(self, x: torch.Tensor, step: StepContext, base: str = "mm") -> torch.Tensor:
        """``x`` (T × in) → (T × out): the frozen GEMM plus every module's LoRA update.

        ``base``: "mm" (the forward GEMM runs) or "skip" (a recomputation whose output nobody reads: no forward
        work at all, the same backward).
        """
        if not self.has_lora:
            return _FrozenLinear.apply(x, self, base)
        a, b, alpha = self.lora_matrices(step)
        xd = F.dropout(x, self.dropout, step.training) if self.dropout > 0 else None
        return _LoraLinear.apply(x, xd, a, b, self, alpha, base)


def dequantize_4bit_into(packed: torch.Tensor, state, out: torch.Tensor) -> torch.Tensor:
    """``bitsandbytes.functional.dequantize_4bit(packed, state, out=out)`` as its two kernel calls.

    The library's Python layers (checks, code-table moves) cost ~0.1 ms of CPU time per weight, and the fast
    path dequantises each frozen weight two or three times per step.
    """
    kernels = _bnb_kernels(out) if out.device.type == "cuda" else None
    if kernels is not None:
        return _dequantize_4bit_direct(packed, state, out, kernels)
    absmax = state.absmax
    if state.nested:  # double quantisation: the block scales are themselves 8-bit blockwise-quantised
        nested = state.state2
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(absmax, nested.absmax, nested.code,
                                                                     nested.blocksize, torch.float32)
        absmax += state.offset
    args = (packed, absmax, state.blocksize, state.quant_type, state.shape, out.dtype)
    if out.device.type == "cuda":
        torch.ops.bitsandbytes.dequantize_4bit.out(*args, out=out)
    else:  # bitsandbytes' CPU backend has no out= variant
        out.copy_(torch.ops.bitsandbytes.dequantize_4bit.default(*args))
    return out


@functools.cache
def _bnb_library():
    """bitsandbytes' CUDA library with its argument types declared (by importing its CUDA backend), or None."""
    try:
        import bitsandbytes.backends.cuda.ops  # noqa: F401  (declares the ctypes argument types)
        from bitsandbytes.cextension import lib
    except Exception:  # noqa: BLE001 - no CUDA backend: the torch.ops route stays
        return None
    return lib


def _bnb_kernels(out: torch.Tensor) -> tuple | None:
    """(nested-absmax kernel, 4-bit kernel by quant type) that can write ``out`` directly, else None.

    Only for a tensor on the current device (the library launches on the current device's stream).
    """
    return _bnb_kernels_for(out.dtype) if out.device.index == torch.cuda.current_device() else None


@functools.cache
def _bnb_kernels_for(dtype: torch.dtype) -> tuple | None:
    """The kernels of ``_bnb_kernels`` for an output dtype, looked up once (it runs for every dequantisation)."""
    lib = _bnb_library()
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    if lib is None or dtype not in names:
        return None
    try:
        return (lib.cdequantize_blockwise_fp32,
                {q: getattr(lib, f"cdequantize_blockwise_{names[dtype]}_{q}") for q in ("nf4", "fp4")})
    except AttributeError:
        return None


def _dequantize_4bit_direct(packed: torch.Tensor, state, out: torch.Tensor, kernels: tuple) -> torch.Tensor:
    """The two bitsandbytes kernels that ``dequantize_4bit`` runs, called straight through ctypes.

    Same kernels, same arguments as bitsandbytes' own CUDA backend (``bitsandbytes/backends/cuda/ops.py``):
    what it skips is the dispatcher and Python checks around them, ~40 µs of CPU time per call, which add up in
    the original recipe's launch-bound step (every frozen weight is dequantised twice per step).
    """
    nested_kernel, four_bit = kernels
    stream = torch._C._cuda_getCurrentRawStream(out.device.index)
    absmax = state.absmax
    if state.nested:
        nested = state.state2
        scales = torch.empty(absmax.shape, dtype=torch.float32, device=out.device)
        nested_kernel(nested.code.data_ptr(), absmax.data_ptr(), nested.absmax.data_ptr(), scales.data_ptr(),
                      nested.blocksize, absmax.numel(), stream)
        absmax = scales.add_(state.offset)
    four_bit[state.quant_type](None, packed.data_ptr(), absmax.data_ptr(), out.data_ptr(), state.blocksize,
                               out.numel(), stream)
    return out


def _weight_for_backward(ctx, needed: bool = True) -> torch.Tensor | None:
    """The dequantised weight the forward kept, or (after a skipped forward) a fresh one; released from ``ctx``.

    ``needed=False`` (no input gradient wanted): only releases it, and dequantises nothing.
    """
    weight = ctx.weight
    ctx.weight = None
    if not needed:
        return None
    return weight if weight is not None else ctx.projection.frozen_weight()


class _FrozenLinear(torch.autograd.Function):
    """``x @ W.T`` for a frozen (dequantised) ``W``; with ``base="skip"`` only its backward runs."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, projection: FusedProjection, base: str) -> torch.Tensor:
        ctx.projection = projection
        if base == "skip":
            ctx.weight = None
            return x.new_empty(x.shape[0], projection.out_features)
        ctx.weight = projection.frozen_weight()
        return x @ ctx.weight.t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ _weight_for_backward(ctx), None, None


class _LoraLinear(torch.autograd.Function):
    """``x @ W.T + alpha · (xd @ A.T) @ B.T`` with ``W`` frozen; ``xd`` is the LoRA input after dropout (None: x).

    Written out so that each LoRA part rides inside a frozen GEMM (as its beta) instead of costing a separate pass
    over a (tokens × features) tensor, in the forward and in the backward pass, and so a skipped recomputation
    runs nothing.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, xd: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
                projection: FusedProjection, alpha: float, base: str) -> torch.Tensor:
        ctx.projection, ctx.alpha, ctx.dropped = projection, alpha, xd is not None
        lora_in = xd if xd is not None else x
        if base == "skip":  # the caller never reads the output; the backward computes x @ A.T itself
            ctx.weight = None
            ctx.save_for_backward(lora_in, a, b, None)
            return x.new_empty(x.shape[0], projection.out_features)
        ctx.weight = projection.frozen_weight()
        xa = lora_in @ a.t()
        # The LoRA update first (K = r: a pass that writes the output), then the frozen GEMM adds itself to it
        # (beta = the LoRA scaling), reading it in the epilogue of a compute-bound GEMM; adding the update after
        # the frozen GEMM instead costs a second read and write of the (T × out) output
        y = (xa @ b.t()).addmm_(x, ctx.weight.t(), beta=alpha)
        ctx.save_for_backward(lora_in, a, b, xa)  # x itself is not needed: W is frozen
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        lora_in, a, b, xa = ctx.saved_tensors
        # no input gradient for an input nobody trains through (the first layer's): no frozen GEMM
        weight = _weight_for_backward(ctx, needed=ctx.needs_input_grad[0])
        if xa is None:
            xa = lora_in @ a.t()
        grad_xa = (grad @ b).mul_(ctx.alpha)  # (T × r): small
        grad_b = (grad.t() @ xa).mul_(ctx.alpha)
        grad_a = grad_xa.t() @ lora_in
        if weight is None:
            return None, None, grad_a, grad_b, None, None, None
        if ctx.dropped:  # the LoRA input is a different tensor: its gradient goes back through the dropout
            return grad @ weight, grad_xa @ a, grad_a, grad_b, None, None, None
        grad_x = (grad_xa @ a).addmm_(grad, weight)
        return grad_x, None, grad_a, grad_b, None, None, None


# --------------------------------------------------------------------------------------------
# Decoder layers and their checkpoints
# --------------------------------------------------------------------------------------------


@dataclass
class StepContext:
    """What every layer of one forward pass shares."""

    cos: torch.Tensor
    sin: torch.Tensor
    segments: Segments
    training: bool
    kernels: _Kernels  # RMSNorm, RoPE and SwiGLU for this pass (and its recomputation)
    grad: bool = False  # the pass records a graph: the LoRA matrices are prepared with autograd on
    mlp_chunk: int = 0  # a checkpointed layer's MLP runs over at most this many tokens at a time (0: all)
    lora: dict = field(default_factory=dict)  # each projection's LoRA matrices for this pass (and its recomputation)


class FastLayer:
    """One Llama decoder layer as fused operations on a flat (tokens × hidden) stream."""

    def __init__(self, layer: torch.nn.Module, index: int, config, dtype: torch.dtype, attention: str):
        where = f"model.layers.{index}"
        attn, mlp = layer.self_attn, layer.mlp
        if getattr(attn, "q_norm", None) is not None:  # biases are refused for the whole model by FastPath
            raise FastPathError(f"{where}: only Llama-style attention (no q/k norm) is supported.")
        self.index = index
        self.dtype = dtype
        self.attention_kernel = attention_varlen if attention == "varlen" else attention_sdpa
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps_in = layer.input_layernorm.variance_epsilon
        self.eps_post = layer.post_attention_layernorm.variance_epsilon
        self.norm_in = layer.input_layernorm.weight
        self.norm_post = layer.post_attention_layernorm.weight
        self.qkv = FusedProjection([attn.q_proj, attn.k_proj, attn.v_proj], dtype, f"{where}.self_attn.q/k/v_proj")
        self.o = FusedProjection([attn.o_proj], dtype, f"{where}.self_attn.o_proj")
        self.gate_up = FusedProjection([mlp.gate_proj, mlp.up_proj], dtype, f"{where}.mlp.gate/up_proj")
        self.down = FusedProjection([mlp.down_proj], dtype, f"{where}.mlp.down_proj")

    def qkv_projection(self, x: torch.Tensor, ctx: StepContext, base: str = "mm") -> torch.Tensor:
        """x (T × hidden), in the residual dtype → the q/k/v projection (T × (q + k + v features)), before RoPE.

        ``base="skip"``: no forward work (a recomputation whose output is read from a checkpoint instead).
        """
        return self.qkv(ctx.kernels.rms_norm(x, self.norm_in, self.eps_in).to(self.dtype), ctx, base)

    def attend(self, qkv: torch.Tensor, ctx: StepContext, o: str = "mm") -> torch.Tensor:
        """The q/k/v projection → what attention adds to the residual stream (T × hidden).

        ``o="skip"``: no forward GEMM for o_proj's frozen weight (a recomputation that only needs the graph).
        """
        q, k, v = ctx.kernels.rope_qkv(qkv, ctx.cos, ctx.sin, self.heads, self.kv_heads, self.head_dim)
        a = self.attention_kernel(q, k, v, ctx.segments).reshape(qkv.shape[0], self.heads * self.head_dim)
        return self.o(a, ctx, o)

    def attention(self, x: torch.Tensor, ctx: StepContext, o: str = "mm") -> torch.Tensor:
        """x (T × hidden), in the residual dtype → what attention adds to the residual stream (T × hidden)."""
        return self.attend(self.qkv_projection(x, ctx), ctx, o)

    def mlp(self, x: torch.Tensor, ctx: StepContext, down: str = "mm") -> torch.Tensor:
        """x (T × hidden) → what the MLP adds to the residual stream; ``down="skip"`` as ``o`` above."""
        h = ctx.kernels.rms_norm(x, self.norm_post, self.eps_post).to(self.dtype)
        return self.down(ctx.kernels.swiglu(self.gate_up(h, ctx)), ctx, down)

    def mlp_residual(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """x + mlp(x), over at most ``ctx.mlp_chunk`` tokens at a time (the recomputation uses the same chunks)."""
        chunks = _chunks(x.shape[0], ctx.mlp_chunk)
        if len(chunks) == 1:
            return x + self.mlp(x, ctx)
        if torch.is_grad_enabled():  # autograd records the chunks (out= is not differentiable)
            return torch.cat([x[rows] + self.mlp(x[rows], ctx) for rows in chunks])
        out = torch.empty_like(x)
        for rows in chunks:
            torch.add(x[rows], self.mlp(x[rows], ctx), out=out[rows])
        return out

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """x (T × hidden), in the residual dtype → the layer's output, same shape and dtype."""
        x = x + self.attention(x, ctx)
        return self.mlp_residual(x, ctx)


class CheckpointStore:
    """Keeps the checkpointed tensors of each layer: on the GPU, or in pinned CPU memory copied on side streams.

    Tensors are kept under a key, ``(layer index, slot)``: slot 0 is the layer's input, 1 the residual after
    attention, 2 the q/k/v projection. One pinned buffer per key is reused from step to step, so a second forward
    pass with gradients before the first one's backward would overwrite it: ``load`` detects that and raises
    instead of computing wrong grads.

    A GPU tensor being copied cannot be reused until its copy ends, so copies that fall behind the compute hold
    GPU memory: ``throttle`` makes the compute stream wait whenever they are more than ``lag`` layers behind.
    """

    def __init__(self, offload: bool, device: torch.device, lag: int = 2):
        self.offload = offload and device.type == "cuda"
        self.device = device
        self.lag = lag
        self.copied: dict[int, Any] = {}  # layer index -> event recorded after that layer's copies
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.handles: dict[tuple, tuple] = {}
        self.generation: dict[tuple, int] = {}
        self.prefetched: dict[tuple, tuple[torch.Tensor, Any]] = {}  # key -> (GPU copy, copy-done event)
        if self.offload:
            self.d2h = torch.cuda.Stream(device)
            self.h2d = torch.cuda.Stream(device)

    def _buffer(self, key: tuple, x: torch.Tensor) -> torch.Tensor:
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < x.numel() or buf.dtype != x.dtype:
            buf = torch.empty(x.numel(), dtype=x.dtype, pin_memory=True)
            self.buffers[key] = buf
        return buf[:x.numel()].view(x.shape)

    def save(self, key: tuple, x: torch.Tensor, on_gpu: bool = False) -> Any:
        """Keep ``x`` for the backward pass; ``on_gpu``: as it is, even when offloading (needed first)."""
        if not self.offload or on_gpu:
            return x
        buf = self._buffer(key, x)
        self.d2h.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.d2h):
            buf.copy_(x, non_blocking=True)
        x.record_stream(self.d2h)  # the caller may free x; its memory waits for the copy
        self.generation[key] = self.generation.get(key, 0) + 1
        self._drop_prefetch(key)
        handle = (key, buf, self.generation[key])
        self.handles[key] = handle
        return handle

    def throttle(self, index: int) -> None:
        """Before layer ``index`` runs: the compute stream waits for layer ``index - lag``'s copies to end."""
        event = self.copied.pop(index - self.lag, None) if self.offload else None
        if event is not None and not event.query():
            torch.cuda.current_stream(self.device).wait_event(event)

    def mark(self, index: int) -> None:
        """After layer ``index``'s copies are queued: remember where they end."""
        if self.offload:
            event = torch.cuda.Event()
            event.record(self.d2h)
            self.copied[index] = event

    def prefetch(self, key: tuple) -> None:
        """Start copying ``key``'s tensor back to the GPU: the backward pass needs it next."""
        handle = self.handles.get(key)
        if not self.offload or handle is None or key in self.prefetched:
            return
        _, buf, _ = handle
        # Allocated on the compute stream, so its memory returns to that stream's pool (no per-stream reserve).
        # No record_stream: the compute stream waits for the copy before it uses or drops the tensor, so its
        # memory is free for reuse the moment the compute stream releases it (record_stream would hold it until
        # the copy stream's later work, the next layer's prefetch, had ended)
        x = torch.empty(buf.shape, dtype=buf.dtype, device=self.device)
        self.h2d.wait_stream(torch.cuda.current_stream(self.device))
        self.h2d.wait_stream(self.d2h)
        with torch.cuda.stream(self.h2d):
            x.copy_(buf, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.h2d)
        self.prefetched[key] = (x, event)

    def _drop_prefetch(self, key: tuple) -> None:
        """Forget a prefetched copy that was never loaded, after the compute stream has waited for its copy."""
        entry = self.prefetched.pop(key, None)
        if entry is not None:
            torch.cuda.current_stream(self.device).wait_event(entry[1])

    def load(self, handle: Any) -> torch.Tensor:
        if isinstance(handle, torch.Tensor):
            return handle
        key, buf, generation = handle
        if self.generation.get(key) != generation:
            raise RuntimeError(
                "fast path: a second forward pass with gradients ran before the backward pass of the first one; "
                "run backward after each forward (gradient accumulation does), or use offload_checkpoints=False."
            )
        stream = torch.cuda.current_stream(self.device)
        if key in self.prefetched:
            x, event = self.prefetched.pop(key)
            stream.wait_event(event)
            return x
        stream.wait_stream(self.d2h)
        return buf.to(self.device, non_blocking=True)


@dataclass(frozen=True)
class _Recompute:
    """How a checkpointed layer is recomputed."""

    skip_down: bool  # no forward GEMM for down_proj's frozen weight
    mid: bool  # the residual after attention is kept too: no forward GEMM for o_proj's frozen weight either
    qkv: bool  # the q/k/v projection is kept too (with mid): no q/k/v GEMM, LoRA or RMSNorm forward work
    rng: bool  # LoRA dropout is on: replay the forward pass's random masks
    last: int  # the last layer's index: its checkpoints stay on the GPU (the backward pass starts with them)


class _CheckpointedLayer(torch.autograd.Function):
    """Run a layer without keeping its activations; recompute them, one half at a time, for the backward pass.

    The backward pass recomputes the MLP half and runs its backward, then the attention half: only one half's
    activations are alive at a time. The frozen GEMMs whose outputs only feed the residual stream (down_proj, and
    o_proj when the residual after attention is kept) are not recomputed: the backward pass never reads them.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: FastLayer, step: StepContext, store: CheckpointStore,
                plan: _Recompute) -> torch.Tensor:
        ctx.layer, ctx.step, ctx.store, ctx.plan = layer, step, store, plan
        ctx.rng = _rng_state(x.device) if plan.rng else None
        on_gpu = layer.index == plan.last
        store.throttle(layer.index)
        ctx.handle = store.save((layer.index, 0), x, on_gpu)
        with torch.no_grad():
            qkv = layer.qkv_projection(x, step)
            ctx.qkv = store.save((layer.index, 2), qkv, on_gpu) if plan.qkv else None
            mid = x + layer.attend(qkv, step)
            del qkv
            ctx.rng_mid = _rng_state(x.device) if plan.rng else None
            ctx.mid = store.save((layer.index, 1), mid, on_gpu) if plan.mid else None
            store.mark(layer.index)
            return layer.mlp_residual(mid, step)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        layer, step, store, plan = ctx.layer, ctx.step, ctx.store, ctx.plan
        for slot in (1, 2, 0) if plan.qkv else (1, 0) if plan.mid else (0,):  # in the order they are needed
            store.prefetch((layer.index - 1, slot))
        # The first layer's input is the embedding, detached (frozen): its gradient would go nowhere, so neither
        # the input-gradient GEMMs of q/k/v nor the RMSNorm backward run for it
        input_grad = layer.index > 0
        restore = _rng_state(grad.device) if plan.rng else None
        with torch.enable_grad():
            attention = None
            if ctx.mid is not None:
                mid = store.load(ctx.mid)
            else:
                x = store.load(ctx.handle).detach().requires_grad_(input_grad)
                if plan.rng:
                    _set_rng_state(x.device, ctx.rng)
                attention = layer.attention(x, step)
                with torch.no_grad():
                    mid = x + attention
            if plan.rng:
                _set_rng_state(grad.device, ctx.rng_mid)
            grad_mid = _mlp_backward(layer, step, mid.detach(), grad, "skip" if plan.skip_down else "mm")
            del mid
            if attention is None:
                x = store.load(ctx.handle).detach().requires_grad_(input_grad)
                if plan.rng:
                    _set_rng_state(x.device, ctx.rng)
                if ctx.qkv is None:
                    _backward(layer.attention(x, step, o="skip"), grad_mid)
                else:  # the projection's graph first (its dropout mask comes first), its values from the checkpoint
                    projection = layer.qkv_projection(x, step, base="skip")
                    qkv = store.load(ctx.qkv).detach().requires_grad_(True)
                    torch.autograd.backward(layer.attend(qkv, step, o="skip"), grad_mid)
                    _backward(projection, qkv.grad)
                    del qkv, projection
            else:
                _backward(attention, grad_mid)
        if restore is not None:
            _set_rng_state(grad.device, restore)
        return (x.grad.add_(grad_mid) if input_grad else None), None, None, None, None


def _chunks(tokens: int, size: int) -> list[slice]:
    """Row ranges of at most ``size`` tokens covering ``tokens`` (one range when ``size`` is 0 or covers all)."""
    if size <= 0 or size >= tokens:
        return [slice(None)]
    return [slice(start, min(start + size, tokens)) for start in range(0, tokens, size)]


def _mlp_backward(layer: FastLayer, step: StepContext, mid: torch.Tensor, grad: torch.Tensor,
                  down: str) -> torch.Tensor:
    """Recompute the MLP over ``mid`` chunk by chunk (as the forward pass ran it) and backpropagate ``grad``.

    Returns the gradient of ``mid``: the MLP's plus ``grad`` itself (the residual connection passes it on).
    """
    chunks = _chunks(mid.shape[0], step.mlp_chunk)
    if len(chunks) == 1:
        mid.requires_grad_(True)
        torch.autograd.backward(layer.mlp(mid, step, down), grad)
        return mid.grad.add_(grad)
    grad_mid = torch.empty_like(grad)
    for rows in chunks:
        part = mid[rows].requires_grad_(True)
        torch.autograd.backward(layer.mlp(part, step, down), grad[rows])
        torch.add(part.grad, grad[rows], out=grad_mid[rows])
    return grad_mid


def _backward(output: torch.Tensor, grad: torch.Tensor) -> None:
    """Backpropagate ``grad`` unless nothing upstream of ``output`` is trained (the first layer without LoRA)."""
    if output.requires_grad:
        torch.autograd.backward(output, grad)


def _rng_state(device: torch.device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


# --------------------------------------------------------------------------------------------
# The backbone forward, and switching it on
# --------------------------------------------------------------------------------------------


class FastPath:
    """The fused layers of one model and the state the forward pass needs."""

    def __init__(self, backbone: torch.nn.Module, dtype: torch.dtype, options: FastPathOptions):
        config = backbone.config
        reason = unsupported_reason(backbone)
        if reason:
            raise FastPathError(f"{reason}. Train it with fast_path='off'.")
        device = backbone.embed_tokens.weight.device
        self.device = device
        self.dtype = dtype
        self.options = options
        self.kernels = resolve_kernels(options.kernels, device)
        self.small_kernels = KERNELS["torch"] if options.kernels == "auto" else self.kernels
        attention = options.attention
        if attention == "auto":
            attention = "varlen" if varlen_supported(device, dtype) else "sdpa"
        elif attention == "varlen" and not varlen_supported(device, dtype):
            raise FastPathError("attention='varlen' needs an Ampere-or-newer GPU, fp16/bf16 and PyTorch's "
                                "FlashAttention kernels (torch.ops.aten._flash_attention_forward); use attention='sdpa' or 'auto'.")
        self.attention = attention
        self.residual_dtype = torch.float32 if options.fp32_residual else dtype
        self.layers = [FastLayer(layer, i, config, dtype, attention)
                       for i, layer in enumerate(backbone.layers)]
        self.store = CheckpointStore(options.offload_checkpoints, device)
        keep = options.checkpoint_keep
        self.checkpoint_keep = ("mid+qkv" if self.store.offload else "input") if keep == "auto" else keep
        self.dropout = any(p.dropout > 0 for layer in self.layers
                           for p in (layer.qkv, layer.o, layer.gate_up, layer.down))

    def describe(self) -> dict[str, Any]:
        """The resolved choices, for run records."""
        kernels = self.kernels.name
        if self.small_kernels is not self.kernels:
            kernels += f" ({self.small_kernels.name} below {self.options.small_pass_tokens} tokens per pass)"
        return {"kernels": kernels, "attention": self.attention,
                "compute_dtype": str(self.dtype).replace("torch.", ""),
                "residual_dtype": str(self.residual_dtype).replace("torch.", ""),
                "checkpoint": self.options.checkpoint, "offload_checkpoints": self.store.offload,
                "skip_down_recompute": self.options.skip_down_recompute, "checkpoint_keep": self.checkpoint_keep,
                "mlp_chunk_tokens": self.options.mlp_chunk_tokens,
                "native_gqa": _FLASH.get("native_gqa")}

    def run(self, backbone: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
            position_ids: torch.Tensor | None) -> torch.Tensor:
        """input ids (B × S) → last hidden state (B × S × hidden), padding positions zero."""
        batch, seq = input_ids.shape
        valid = attention_mask.bool() if attention_mask is not None else None
        if position_ids is None:
            position_ids = (valid.long().cumsum(-1) - 1).clamp(min=0) if valid is not None else \
                torch.arange(seq, device=input_ids.device).expand(batch, seq)
        row_starts = torch.zeros(batch, seq, dtype=torch.bool, device=input_ids.device)
        if valid is not None:
            first = valid.long().argmax(-1)
            row_starts[torch.arange(batch, device=input_ids.device), first] = True
            ids, pos, row_starts = input_ids[valid], position_ids[valid], row_starts[valid]
        else:
            row_starts[:, 0] = True
            ids, pos, row_starts = input_ids.reshape(-1), position_ids.reshape(-1), row_starts.reshape(-1)
        segments = find_segments(pos, row_starts)
        training = backbone.training
        grad = torch.is_grad_enabled()
        with torch.autocast(self.device.type, enabled=False):
            x = backbone.embed_tokens(ids).to(self.residual_dtype)
            if grad and self.options.checkpoint:
                x = x.detach().requires_grad_(True)  # so the checkpointed layers' backward runs
            cos, sin = backbone.rotary_emb(x, pos.unsqueeze(0))
            kernels = self.small_kernels if ids.numel() < self.options.small_pass_tokens else self.kernels
            step = StepContext(cos[0].to(self.dtype), sin[0].to(self.dtype), segments, training, kernels, grad,
                               mlp_chunk=self.options.mlp_chunk_tokens)
            keep = self.checkpoint_keep
            plan = _Recompute(self.options.skip_down_recompute, keep != "input", keep == "mid+qkv",
                              training and self.dropout, len(self.layers) - 1)
            for layer in self.layers:
                if grad and self.options.checkpoint:
                    x = _CheckpointedLayer.apply(x, layer, step, self.store, plan)
                else:
                    x = layer.forward(x, step)  # without checkpoints autograd keeps what it needs
            x = kernels.rms_norm(x, backbone.norm.weight, backbone.norm.variance_epsilon).to(self.dtype)
        if valid is None:
            return x.view(batch, seq, -1)
        out = x.new_zeros(batch, seq, x.shape[-1])
        out[valid] = x
        return out


def _fast_backbone_forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                           use_cache=None, **kwargs):
    """Replacement forward of a Llama backbone: the fast path for training and cache-free evaluation."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    wants_more = kwargs.get("output_attentions") or kwargs.get("output_hidden_states")
    if input_ids is None or inputs_embeds is not None or use_cache or cache is not None or wants_more:
        return self._original_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                      inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
    if attention_mask is not None and attention_mask.dim() != 2:
        raise FastPathError("the fast path takes a 2-D padding mask (batch × seq) or none (padding-free batches).")
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    hidden = self._fast_path.run(self, input_ids, attention_mask, position_ids)
    return BaseModelOutputWithPast(last_hidden_state=hidden)


def backbone_of(model: torch.nn.Module) -> torch.nn.Module:
    """The ``LlamaModel`` inside a causal LM, a PEFT model, or a DDP wrapper of either."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    backbone = getattr(inner, "model", inner)
    if not hasattr(backbone, "layers") or not hasattr(backbone, "embed_tokens"):
        raise FastPathError(f"cannot find the decoder layers of {type(model).__name__}; the fast path needs a "
                            "Llama causal LM (optionally wrapped by PEFT).")
    return backbone


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot use the fast path (None when it can): checked before a trainer is built."""
    config = getattr(getattr(model, "module", model), "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type != "llama":
        return f"the fast path supports Llama models (model_type 'llama'), not {model_type!r}"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "the fast path supports Llama layers without biases"
    if any(type(m).__name__ == "Linear8bitLt" for m in model.modules()):
        return "the fast path does not support 8-bit weights (use nf4_dq, nf4, fp4 or 16-bit)"
    return None


def enable_fast_path(model: torch.nn.Module, dtype: torch.dtype | None = None,
                     options: FastPathOptions | None = None) -> FastPath:
    """Switch ``model``'s backbone to the fast forward (call after ``get_peft_model``); returns its state.

    The fused layers hold references to the active adapter's LoRA tensors: after loading or switching
    adapters, call it again. ``disable_fast_path`` restores the original forward.
    """
    backbone = backbone_of(model)
    if dtype is None:
        state = getattr(backbone.layers[0].self_attn.q_proj, "base_layer", backbone.layers[0].self_attn.q_proj)
        dtype = getattr(state, "compute_dtype", None) or backbone.embed_tokens.weight.dtype
        if dtype == torch.float32 and backbone.embed_tokens.weight.device.type == "cuda":
            dtype = torch.bfloat16
    fast = FastPath(backbone, dtype, options or FastPathOptions())
    if not hasattr(backbone, "_original_forward"):
        backbone._original_forward = backbone.forward
    backbone._fast_path = fast
    backbone.forward = types.MethodType(_fast_backbone_forward, backbone)
    return fast


def disable_fast_path(model: torch.nn.Module) -> None:
    """Give the backbone its original forward back."""
    backbone = backbone_of(model)
    if hasattr(backbone, "_original_forward"):
        backbone.forward = backbone._original_forward
        del backbone._original_forward
        del backbone._fast_path


# --------------------------------------------------------------------------------------------
# Loss over the label positions only, without materialising the logits
# --------------------------------------------------------------------------------------------


def causal_lm_loss(model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                   num_items: int | torch.Tensor | None = None, chunk: int = 4096) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not -100 (sum / ``num_items`` if given)."""
    inner = getattr(model, "module", model)
    head = inner.get_output_embeddings()
    shifted = labels[:, 1:]
    mask = shifted != -100
    h = hidden[:, :-1][mask]
    target = shifted[mask]
    weight = head.weight if head.weight.dtype == h.dtype else head.weight.to(h.dtype)
    denominator = num_items if num_items is not None else mask.sum().clamp(min=1)
    if h.is_cuda and liger_available():
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        total = LigerFusedLinearCrossEntropyFunction.apply(h, weight, target, None, None, -100, 0.0, 0.0, "sum")
        total = total[0] if isinstance(total, tuple) else total
        return total / denominator
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk):
        logits = (h[start:start + chunk] @ weight.t()).float()
        total = total + F.cross_entropy(logits, target[start:start + chunk], reduction="sum")
    return total / denominator
