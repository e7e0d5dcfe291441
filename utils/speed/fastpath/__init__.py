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
  project's Triton kernel (``utils.speed.kernels``: it rotates q and k straight out of the fused projection, where
  Liger's copies them out first), all three as PyTorch ops for smaller passes (where the CPU's kernel launches
  set the pace and Triton's launcher costs more CPU time than the extra ATen kernels) and off CUDA; attention is
  FlashAttention's variable-length kernel over the real tokens only (no padding), or PyTorch SDPA over one
  padded row per sequence where that kernel is unavailable (CPU, GPUs older than Ampere). Passes of 4096 tokens
  or more whose rows all have one length (fixed-length blocks, the benchmark's rows) take SDPA's cuDNN kernel on
  views of the packed tensors where it runs (``attention_cudnn``; not under CUDA graphs); ``attention="varlen"``
  keeps FlashAttention for every pass, ``attention="cudnn"`` asks for cuDNN for every pass.
- In those large passes on CUDA (``fused_lora``), LoRA dropout is one Triton pass writing the dropped copy and a
  one-bit mask, and one in-place pass in the backward; q/k/v and gate/up add their LoRA update inside the frozen
  GEMM as extra K columns (``[x | x·Aᵀ] @ [W | alpha·B]ᵀ``, W dequantised straight into the wide operand) instead
  of writing it as a (tokens × out) tensor that the GEMM reads back (``results/04_speed_notes.md``: +4.2 %).

One deliberate difference from PEFT: modules fused into one GEMM (q/k/v, gate/up) share one LoRA-dropout mask
per token; PEFT draws one mask per module. Each module still sees inputs dropped with probability p.

Modules: ``options`` (``FastPathOptions``, ``FastPathError``), ``ops`` (the kernel sets and their choice),
``attention`` (padding-free attention), ``layers`` (fused projections, dequantisation, one decoder layer),
``checkpoint`` (checkpointed layers and their recomputation), ``backbone`` (the forward and switching it on),
``loss`` (``causal_lm_loss``).
"""

from utils.speed.fastpath.attention import Segments, attention_sdpa, attention_varlen, find_segments, varlen_supported
from utils.speed.fastpath.backbone import (
    FastPath,
    backbone_of,
    disable_fast_path,
    enable_fast_path,
    unsupported_reason,
)
from utils.speed.fastpath.checkpoint import CheckpointStore
from utils.speed.fastpath.layers import FastLayer, FusedProjection, StepContext, dequantize_4bit_into
from utils.speed.fastpath.loss import causal_lm_loss
from utils.speed.fastpath.ops import KERNELS, liger_available, resolve_kernels
from utils.speed.fastpath.options import (
    ATTENTION_CHOICES,
    KEEP_CHOICES,
    KERNEL_CHOICES,
    FastPathError,
    FastPathOptions,
)

__all__ = [
    "ATTENTION_CHOICES", "KEEP_CHOICES", "KERNEL_CHOICES", "KERNELS", "CheckpointStore", "FastLayer", "FastPath",
    "FastPathError", "FastPathOptions", "FusedProjection", "Segments", "StepContext", "attention_sdpa",
    "attention_varlen", "backbone_of", "causal_lm_loss", "dequantize_4bit_into", "disable_fast_path",
    "enable_fast_path", "find_segments", "liger_available", "resolve_kernels", "unsupported_reason",
    "varlen_supported",
]
