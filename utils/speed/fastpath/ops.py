"""Kernels of the fast path: Triton (Liger's, and ``utils.speed.kernels``' RoPE) on CUDA, PyTorch ops elsewhere.

The two sets compute the same maths; ``resolve_kernels`` picks one for a device and a ``kernels`` choice.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from utils.speed.fastpath.options import FastPathError


@functools.cache
def liger_available() -> bool:
    """True when Liger's Triton kernels can run here (CUDA and the ``liger-kernel`` package)."""
    if not torch.cuda.is_available():
        return False
    try:  # optional heavy packages: absent on CPU-only installs
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction  # noqa: F401
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction  # noqa: F401
        import triton  # noqa: F401  (the RoPE kernel of utils.speed.kernels)
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
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction  # optional, CUDA only: imported where it runs

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
    """Same as ``_rope_qkv_torch`` in one Triton kernel each way (``utils.speed.kernels``): no copies out of ``qkv``."""
    # Triton is optional (CUDA builds only): its kernels are imported where they run
    from utils.speed.kernels import RopeQKV, rope_qkv_supported

    if not rope_qkv_supported(head_dim):
        return _rope_qkv_torch(qkv, cos, sin, heads, kv_heads, head_dim)
    return RopeQKV.apply(qkv, cos, sin, heads, kv_heads, head_dim)


def _swiglu_torch(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _swiglu_liger(gate_up: torch.Tensor) -> torch.Tensor:
    from liger_kernel.ops.swiglu import LigerFusedGateUpSiLUMulFunction  # optional, CUDA only: imported where it runs

    return LigerFusedGateUpSiLUMulFunction.apply(gate_up)


@dataclass(frozen=True)
class _Kernels:
    name: str
    rms_norm: Any
    rope_qkv: Any
    swiglu: Any
    # LoRA projections through ``layers._FusedLoraLinear``: Triton dropout passes, the LoRA update inside the GEMM
    fused_lora: bool = False


KERNELS = {
    "torch": _Kernels("torch", _rms_norm_torch, _rope_qkv_torch, _swiglu_torch),
    # Liger's RMSNorm and SwiGLU; RoPE from this project's kernel on the fused projection (Liger's copies q/k out)
    "liger": _Kernels("liger", _rms_norm_liger, _rope_qkv_triton, _swiglu_liger, fused_lora=True),
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
