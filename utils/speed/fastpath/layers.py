"""Fused projections (frozen GEMM plus LoRA), 4-bit dequantisation, and one Llama decoder layer on a flat stream."""

from __future__ import annotations

import copy
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes; where CUDA is available also its CUDA backend)
import torch
import torch.nn.functional as F
from bitsandbytes.cextension import lib as BNB_LIB

from utils.speed.fastpath.attention import ATTENTION_KERNELS, Segments
from utils.speed.fastpath.ops import _Kernels
from utils.speed.fastpath.options import FastPathError

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
        # Where the output is wider than the input (q/k/v, gate/up), the fused-LoRA path runs the LoRA update inside
        # the frozen GEMM as extra columns of K (``_FusedLoraLinear``)
        self.concat = self.out_features > self.in_features
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
                state.code = state.code.to(base.weight.device)
            self.quant_states.append(state)
        # double quantisation's offset as a Python float, read once (the strided kernel takes it as an argument)
        self.offsets = [float(s.offset) if s is not None and s.nested else 0.0 for s in self.quant_states]

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
        return self._write_frozen(out)

    def _write_frozen(self, out: torch.Tensor, strided: bool = False) -> torch.Tensor:
        """Each module's frozen weight into its rows of ``out``, columns ``:in_features``. ``strided``: ``out`` has
        more columns, so 4-bit weights go through the Triton kernel that writes rows with a stride."""
        for base, state, offset, rows in zip(self.bases, self.quant_states, self.offsets, out.split(self.out_sizes)):
            part = rows[:, :self.in_features]
            if state is None:
                part.copy_(base.weight)
            elif strided:
                from utils.speed.kernels import dequantize_4bit_rows  # Triton: the fused-LoRA path runs where it can

                dequantize_4bit_rows(base.weight.data, state, part, offset)
            else:
                dequantize_4bit_into(base.weight.data, state, part)
        return out

    def frozen_weight_with_lora(self, b: torch.Tensor, alpha: float) -> torch.Tensor:
        """[W | alpha · B] (out_features × (in_features + r_total)): the frozen weight with the LoRA up-projection
        as extra columns, so that [x | x·Aᵀ] @ [W | alpha·B]ᵀ = x·Wᵀ + alpha·(x·Aᵀ)·Bᵀ is one GEMM."""
        device = self.bases[0].weight.device
        out = torch.empty(self.out_features, self.in_features + b.shape[1], dtype=self.dtype, device=device)
        # straight into the strided rows (bitsandbytes' kernel writes contiguous tensors only)
        self._write_frozen(out, strided=True)
        torch.mul(b, alpha, out=out[:, self.in_features:])
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
        p = self.dropout if step.training else 0.0
        if step.kernels.fused_lora and self.in_features % 8 == 0 and x.is_contiguous():
            return _FusedLoraLinear.apply(x, a, b, self, alpha, base, p, self.concat)
        xd = F.dropout(x, p, True) if p > 0 else None
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
    """bitsandbytes' CUDA library with its argument types declared, or None (no CUDA backend: the torch.ops route).

    ``import bitsandbytes`` loads its CUDA backend where CUDA is available, and that declares the ctypes argument types.
    """
    return BNB_LIB if "bitsandbytes.backends.cuda.ops" in sys.modules else None


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
        grad_xa, grad_a, grad_b = _lora_grads(grad, lora_in, a, b, xa, ctx.alpha)
        if weight is None:
            return None, None, grad_a, grad_b, None, None, None
        if ctx.dropped:  # the LoRA input is a different tensor: its gradient goes back through the dropout
            return grad @ weight, grad_xa @ a, grad_a, grad_b, None, None, None
        grad_x = (grad_xa @ a).addmm_(grad, weight)
        return grad_x, None, grad_a, grad_b, None, None, None


def _lora_grads(grad: torch.Tensor, lora_in: torch.Tensor, a: torch.Tensor, b: torch.Tensor, xa: torch.Tensor | None,
                alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gradient of x·Aᵀ, of A, of B) of ``alpha · (lora_in·Aᵀ)·Bᵀ`` for the output gradient ``grad``; ``xa`` is
    lora_in·Aᵀ (None after a skipped forward: recomputed)."""
    if xa is None:
        xa = lora_in @ a.t()
    grad_xa = (grad @ b).mul_(alpha)  # (T × r): small
    grad_b = (grad.t() @ xa).mul_(alpha)
    return grad_xa, grad_xa.t() @ lora_in, grad_b


class _FusedLoraLinear(torch.autograd.Function):
    """``_LoraLinear``'s maths for large passes on CUDA: the dropout as Triton passes, the LoRA update inside the GEMM.

    - Dropout (``p`` > 0): ``utils.speed.kernels.LoraDropout`` writes the dropped copy of ``x`` and a one-bit mask in
      one pass; the backward pass applies the mask in place to the LoRA part of the input gradient, onto which the
      frozen GEMM adds itself in its epilogue, as without dropout (PyTorch's dropout cost a byte mask, a masked
      copy of the gradient and autograd's sum of the two input gradients).
    - ``concat`` (outputs wider than the input: q/k/v, gate/up): the forward GEMM is [x | xa] @ [W | alpha·B]ᵀ,
      K = in + r, instead of writing ``xa @ Bᵀ`` as a (T × out) tensor that the frozen GEMM then reads back as its
      beta: two passes over the widest tensor of the layer saved for a copy of x (written by the dropout pass when
      there is one) and of W.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, projection: FusedProjection, alpha: float,
                base: str, p: float, concat: bool) -> torch.Tensor:
        from utils.speed.kernels import LoraDropout  # Triton: CUDA only, imported where it runs

        ctx.projection, ctx.alpha = projection, alpha
        features = projection.in_features
        concat = concat and base != "skip"
        wide = x.new_empty(x.shape[0], features + a.shape[0]) if concat else None
        drop = LoraDropout(x, p, copy=wide[:, :features] if concat else None) if p > 0 else None
        ctx.drop = drop
        lora_in = drop.out if drop is not None else x
        if drop is not None:
            drop.out = None  # saved below; the mask alone stays on the object
        if base == "skip":  # the caller never reads the output; the backward computes x @ A.T itself
            ctx.weight = None
            ctx.save_for_backward(lora_in, a, b, None)
            return x.new_empty(x.shape[0], projection.out_features)
        xa = lora_in @ a.t()
        if concat:
            if drop is None:
                wide[:, :features].copy_(x)
            wide[:, features:].copy_(xa)
            weight = projection.frozen_weight_with_lora(b, alpha)
            y = wide @ weight.t()
            ctx.weight = weight[:, :features]  # a view with strided rows: cuBLAS reads it as it is
        else:
            ctx.weight = projection.frozen_weight()
            y = (xa @ b.t()).addmm_(x, ctx.weight.t(), beta=alpha)
        ctx.save_for_backward(lora_in, a, b, xa)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        lora_in, a, b, xa = ctx.saved_tensors
        drop, ctx.drop = ctx.drop, None
        weight = _weight_for_backward(ctx, needed=ctx.needs_input_grad[0])
        grad_xa, grad_a, grad_b = _lora_grads(grad, lora_in, a, b, xa, ctx.alpha)
        if weight is None:
            return None, grad_a, grad_b, None, None, None, None, None
        grad_x = grad_xa @ a
        if drop is not None:
            drop.backward_(grad_x)
        return grad_x.addmm_(grad, weight), grad_a, grad_b, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# One decoder layer
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
    attention: Callable | None = None  # this pass's attention kernel (None: the one each layer was built with)


class FastLayer:
    """One Llama decoder layer as fused operations on a flat (tokens × hidden) stream."""

    def __init__(self, layer: torch.nn.Module, index: int, config, dtype: torch.dtype, attention: str):
        where = f"model.layers.{index}"
        attn, mlp = layer.self_attn, layer.mlp
        if getattr(attn, "q_norm", None) is not None:  # biases are refused for the whole model by FastPath
            raise FastPathError(f"{where}: only Llama-style attention (no q/k norm) is supported.")
        self.index = index
        self.dtype = dtype
        self.attention_kernel = ATTENTION_KERNELS[attention]
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
        attention = ctx.attention or self.attention_kernel
        a = attention(q, k, v, ctx.segments).reshape(qkv.shape[0], self.heads * self.head_dim)
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


def _chunks(tokens: int, size: int) -> list[slice]:
    """Row ranges of at most ``size`` tokens covering ``tokens`` (one range when ``size`` is 0 or covers all)."""
    if size <= 0 or size >= tokens:
        return [slice(None)]
    return [slice(start, min(start + size, tokens)) for start in range(0, tokens, size)]
