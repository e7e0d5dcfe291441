"""The measured configurations: the original recipe, the fast path and its ablations, the corpus rows and Unsloth."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from utils.config import THESIS
from utils.speed.fastpath import FastPathOptions


@dataclass(frozen=True)
class BenchConfig:
    """One measured configuration. ``impl``: "hf" (transformers + PEFT), "fast" (utils.speed.fastpath), "unsloth"."""

    name: str
    impl: str
    dtype: str  # "fp16" | "bf16" ("fp32": the large-pass check's reference only)
    micro_batch: int = 1  # sequences per micro-batch (synthetic) or a token budget of micro_batch × max_seq_length
    accumulation: int = 1
    max_seq_length: int = THESIS.max_seq_length
    workload: str = "synthetic"  # "synthetic": full rows of random ids; "corpus": the shipped training examples
    prepare: bool = False  # hf: prepare_model_for_kbit_training (fp32 upcast + reentrant checkpointing)
    liger: bool = False  # hf: Liger's monkey patch (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy)
    optim: str = "paged_adamw_8bit"  # per tensor; "paged_adamw_8bit_flat" (utils.speed.optim) or "adamw_torch_fused"
    lora_dropout: float = THESIS.lora_dropout
    fast: FastPathOptions = field(default_factory=FastPathOptions)  # fast: how the fast path runs (see fastpath)
    fused_loss: bool = True  # fast: Liger's fused linear cross-entropy where it runs (False: PyTorch's, in chunks)
    expandable_segments: bool = False  # PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    # The BLAS library the row's process prefers (torch.backends.cuda.preferred_blas_library): "" leaves PyTorch's
    # default (cuBLAS); "cublaslt" asks cuBLASLt, whose kernel choices for a shape and dtype may differ
    blas: str = ""
    group: str = ""  # what the row tests (for the notes and the figure)
    prediction: str = ""  # what we expected before measuring

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BenchConfig":
        """The configuration of ``asdict(config)`` (a child's task, a row's fields); other keys are left out."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if isinstance(values.get("fast"), dict):
            values["fast"] = FastPathOptions(**values["fast"])
        return cls(**values)


def _c(name: str, impl: str, dtype: str, **kw: Any) -> BenchConfig:
    return BenchConfig(name=name, impl=impl, dtype=dtype, **kw)


def _fast(**options: Any) -> FastPathOptions:
    """The fast path as the benchmark's fast rows run it: each checkpoint keeps mid+qkv unless told otherwise."""
    return FastPathOptions(**{"checkpoint_keep": "mid+qkv", **options})


ORIGINAL = dict(micro_batch=1, accumulation=2, prepare=True)
FAST = dict(expandable_segments=True, optim="paged_adamw_8bit_flat", fast=_fast())
# The fast path's step replayed from CUDA graphs (utils.speed.graphs): checkpoints on the GPU (a graph cannot capture
# their offloading), lengths padded up to multiples of 128 tokens
GRAPHS = {**FAST, "fast": _fast(offload_checkpoints=False, cuda_graphs=True, graph_bucket_tokens=128)}

CONFIGS: list[BenchConfig] = [
    # The original configuration, in the student's fp16 and in bf16
    _c("original_fp16", "hf", "fp16", **ORIGINAL, group="original"),
    _c("original_bf16", "hf", "bf16", **ORIGINAL, group="original"),
    # One step at a time: what each change buys at the original recipe (2 sequences per optimizer step)
    _c("hf_2x1_fp16", "hf", "fp16", micro_batch=2, prepare=True, group="recipe",
       prediction="one micro-batch of 2 instead of 2 x 1: ~1.8x fewer s/step (launch-bound step, half the launches)"),
    _c("hf_2x1_noprep_liger_bf16", "hf", "bf16", micro_batch=2, liger=True, group="recipe",
       prediction="no fp32 upcast + Liger: little speed (launch-bound), ~1.5 GiB less"),
    _c("fast_2x1_fp16", "fast", "fp16", micro_batch=2, **FAST, group="recipe",
       prediction="fused layers: ~5x fewer kernels per layer -> >= 4x fewer s/step than the original, < 4 GiB"),
    _c("fast_2x1_bf16", "fast", "bf16", micro_batch=2, **FAST, group="recipe"),
    _c("fast_2x1_on_gpu_fp16", "fast", "fp16", micro_batch=2, **{**FAST, "fast": _fast(offload_checkpoints=False)},
       group="recipe",
       prediction="the 2 x 512 tokens' checkpoints (0.6 GiB) kept on the GPU: ~8 stream operations fewer per "
       "checkpoint on a CPU-bound step, ~10 % faster, 0.6 GiB more on the GPU"),
    _c("fast_2x1_torch_kernels_fp16", "fast", "fp16", micro_batch=2, **{**FAST, "fast": _fast(kernels="torch")},
       group="recipe",
       prediction="PyTorch's RMSNorm/RoPE/SwiGLU ops instead of Liger's Triton kernels (the default below "
                  "small_pass_tokens since): a Triton launch costs several times an ATen op's CPU time; more "
                  "kernels but less CPU: ~5 % faster on the CPU-bound 2 x 1 step"),
    _c("fast_2x1_per_tensor_optim_fp16", "fast", "fp16", micro_batch=2, **{**FAST, "optim": "paged_adamw_8bit"},
       group="recipe", prediction="bitsandbytes updating 392 tensors one by one (a GPU sync after each): "
       "~45 ms more per step than one flat update"),
    _c("fast_2x1_fused_adamw_fp16", "fast", "fp16", micro_batch=2, **{**FAST, "optim": "adamw_torch_fused"},
       group="recipe", prediction="fused AdamW: one kernel instead of ~450 per step; ~10 ms less per step"),
    _c("fast_2x1_graphs_fp16", "fast", "fp16", micro_batch=2, **GRAPHS, group="recipe",
       prediction="forward and backward replayed from one CUDA graph: the CPU's launches leave the step, which "
                  "becomes GPU-bound (the optimizer update stays eager): >= 4x fewer s/step than the original"),
    # Throughput within the 8 GB budget
    _c("fast_mb16_bf16", "fast", "bf16", micro_batch=16, **FAST, group="throughput"),
    _c("fast_mb32_bf16", "fast", "bf16", micro_batch=32, **FAST, group="throughput",
       prediction="~85 % of the GEMM ceiling: >= 25,000 tokens/s under 7.5 GiB reserved"),
    _c("fast_mb40_bf16", "fast", "bf16", micro_batch=40, **FAST, group="throughput"),
    _c("fast_mb48_bf16", "fast", "bf16", micro_batch=48, **FAST, group="throughput"),
    _c("fast_mb32_per_tensor_optim_bf16", "fast", "bf16", micro_batch=32, **{**FAST, "optim": "paged_adamw_8bit"},
       group="throughput", prediction="per-tensor bitsandbytes update: ~45 ms (6 %) more per step"),
    _c("fast_mb32_fused_adamw_bf16", "fast", "bf16", micro_batch=32, **{**FAST, "optim": "adamw_torch_fused"},
       group="throughput", prediction="the profile showed 50 ms in PagedAdamW8bit.step: fused AdamW saves ~6 %"),
    _c("fast_mb32_fp16", "fast", "fp16", micro_batch=32, **FAST, group="throughput",
       prediction="fp16 as fast as bf16 on the H100 (same tensor-core rate), same memory"),
    _c("fast_mb48_fp16", "fast", "fp16", micro_batch=48, **FAST, group="throughput"),
    # Ablations at micro-batch 32 (bf16): what each piece of the fast path is worth
    _c("fast_mb32_keep_down_bf16", "fast", "bf16", micro_batch=32,
       **{**FAST, "fast": _fast(skip_down_recompute=False)}, group="ablation",
       prediction="recomputing down_proj costs ~8 % of the step"),
    _c("fast_mb32_no_offload_bf16", "fast", "bf16", micro_batch=32,
       **{**FAST, "fast": _fast(offload_checkpoints=False, checkpoint_keep="input")}, group="ablation",
       prediction="checkpoints on the GPU: same speed, +2.6 GiB (28 layers x 16k tokens x 6 KiB)"),
    _c("fast_mb32_torch_kernels_bf16", "fast", "bf16", micro_batch=32, **{**FAST, "fast": _fast(kernels="torch")},
       group="ablation", prediction="PyTorch RMSNorm/RoPE/SwiGLU instead of Liger: ~10 % slower, more memory"),
    _c("fast_mb32_dropout0_bf16", "fast", "bf16", micro_batch=32, lora_dropout=0.0, **FAST, group="throughput",
       prediction="no LoRA dropout: ~5 % faster, less memory (Unsloth's fast LoRA needs dropout 0)"),
    _c("fast_mb32_dropout0_fp16", "fast", "fp16", micro_batch=32, lora_dropout=0.0, **FAST, group="throughput"),
    _c("fast_mb32_dropout0_keep_input_bf16", "fast", "bf16", micro_batch=32, lora_dropout=0.0,
       **{**FAST, "fast": _fast(checkpoint_keep="input")}, group="ablation", prediction="only the layer input as "
       "checkpoint (o_proj's and q/k/v's GEMMs recomputed): ~7 % slower, 7.5 GB less pinned CPU memory"),
    _c("fast_mb32_dropout0_keep_mid_bf16", "fast", "bf16", micro_batch=32, lora_dropout=0.0,
       **{**FAST, "fast": _fast(checkpoint_keep="mid")}, group="ablation", prediction="input and residual after "
       "attention (q/k/v's GEMM recomputed): ~4 % slower, 4.7 GB less pinned CPU memory"),
    _c("fast_mb32_dropout0_keep_mid_fp16", "fast", "fp16", micro_batch=32, lora_dropout=0.0,
       **{**FAST, "fast": _fast(checkpoint_keep="mid")}, group="ablation"),
    _c("fast_mb32_dropout0_mlp8k_bf16", "fast", "bf16", micro_batch=32, lora_dropout=0.0,
       **{**FAST, "fast": _fast(mlp_chunk_tokens=8192)}, group="ablation", prediction="the MLP in two chunks of "
       "8,192 tokens: ~0.6 GiB less at the peak, fewer allocator retries under the cap; GEMMs of half the rows as "
       "fast: ~3 % faster capped"),
    _c("fast_mb40_dropout0_bf16", "fast", "bf16", micro_batch=40, lora_dropout=0.0, **FAST, group="throughput"),
    _c("fast_mb40_dropout0_mlp8k_bf16", "fast", "bf16", micro_batch=40, lora_dropout=0.0,
       **{**FAST, "fast": _fast(mlp_chunk_tokens=8192)}, group="throughput"),
    _c("fast_mb48_dropout0_mlp8k_bf16", "fast", "bf16", micro_batch=48, lora_dropout=0.0,
       **{**FAST, "fast": _fast(mlp_chunk_tokens=8192)}, group="throughput"),
    _c("fast_mb40_dropout0_fp16", "fast", "fp16", micro_batch=40, lora_dropout=0.0, **FAST, group="throughput"),
    _c("hf_mb16_noprep_liger_bf16", "hf", "bf16", micro_batch=16, liger=True, group="ablation",
       prediction="Hugging Face path with Liger, no upcast, GC: ~13k tokens/s within 6 GiB (shared/bench)"),
    # Real examples (the shipped corpus): padding must not eat the gain
    _c("original_corpus_fp16", "hf", "fp16", workload="corpus", **ORIGINAL, group="corpus"),
    _c("fast_2x1_corpus_fp16", "fast", "fp16", micro_batch=2, workload="corpus", **FAST, group="corpus"),
    _c("fast_2x1_graphs_corpus_fp16", "fast", "fp16", micro_batch=2, workload="corpus", **GRAPHS, group="corpus",
       prediction="real lengths padded to 128-token buckets, one graph per bucket captured before the timing: "
                  "the twin's gain, less up to 127 padding tokens per step"),
    _c("fast_mb32_corpus_bf16", "fast", "bf16", micro_batch=32, workload="corpus", **FAST, group="corpus",
       prediction="padding-free packing keeps the synthetic throughput (-5 % for shorter attention rows)"),
    _c("fast_mb32_corpus_fp16", "fast", "fp16", micro_batch=32, workload="corpus", **FAST, group="corpus"),
    # Within the strict 8 GB budget (``run --budget strict8``): at most 4 GiB of pinned host memory, so fewer
    # offloaded checkpoints per token than mid+qkv (~594 KiB per token counted, more as pinned blocks round up to
    # powers of two), or checkpoints on the GPU
    _c("fast_mb32_keep_input_bf16", "fast", "bf16", micro_batch=32, **{**FAST, "fast": _fast(checkpoint_keep="input")},
       group="throughput", prediction="only the layer input offloaded: 27 x 96 MiB counted (3.4 GiB pinned as "
       "128 MiB blocks), within 4 GiB; ~7 % slower than mid+qkv"),
    _c("fast_mb32_keep_input_fp16", "fast", "fp16", micro_batch=32,
       **{**FAST, "fast": _fast(checkpoint_keep="input")}, group="throughput"),
    _c("fast_mb32_keep_input_varlen_bf16", "fast", "bf16", micro_batch=32,
       **{**FAST, "fast": _fast(checkpoint_keep="input", attention="varlen")}, group="ablation",
       prediction="FlashAttention's variable-length kernel in every pass, where attention='auto' takes SDPA's cuDNN "
       "kernel for these rows of one length (0.16 + 0.74 ms per layer against 0.41 + 1.13 + 0.19 in an H200 "
       "timing): ~35 ms (5 %) more per step"),
    _c("fast_mb32_keep_input_varlen_fp16", "fast", "fp16", micro_batch=32,
       **{**FAST, "fast": _fast(checkpoint_keep="input", attention="varlen")}, group="ablation"),
    _c("fast_mb32_keep_input_unfused_lora_bf16", "fast", "bf16", micro_batch=32,
       **{**FAST, "fast": _fast(checkpoint_keep="input", fused_lora=False)}, group="ablation",
       prediction="PyTorch's dropout (a byte mask, a masked copy of the gradient, autograd's sum of two input "
       "gradients) and the LoRA update as a separate (tokens x out) GEMM read back as the frozen GEMM's beta: the "
       "profile put them at ~45 and ~30 ms of a 640 ms step; ~10 % slower than the fused path"),
    _c("fast_mb32_keep_input_cublaslt_fp16", "fast", "fp16", micro_batch=32, blas="cublaslt",
       **{**FAST, "fast": _fast(checkpoint_keep="input")}, group="ablation",
       prediction="PyTorch's GEMMs through cuBLASLt instead of cuBLAS: fp16 loses 3.3 % against bf16 here and "
       "Unsloth 1.9 %; if cuBLAS picks slower fp16 kernels for these shapes (tools/gemm_dtypes.py), up to ~2 %"),
    _c("fast_mb32_keep_input_cublaslt_bf16", "fast", "bf16", micro_batch=32, blas="cublaslt",
       **{**FAST, "fast": _fast(checkpoint_keep="input")}, group="ablation"),
    _c("fast_mb36_keep_input_bf16", "fast", "bf16", micro_batch=36, **{**FAST, "fast": _fast(checkpoint_keep="input")},
       group="throughput", prediction="between micro-batch 32 (0.67 GiB of the GPU budget unused in bf16) and 40: "
       "12 % more activations, the same 27 x 128 MiB pinned blocks; ~1 % more tokens/s if it fits"),
    _c("fast_mb36_keep_input_fp16", "fast", "fp16", micro_batch=36, **{**FAST, "fast": _fast(checkpoint_keep="input")},
       group="throughput"),
    _c("fast_mb40_keep_input_bf16", "fast", "bf16", micro_batch=40, **{**FAST, "fast": _fast(checkpoint_keep="input")},
       group="throughput", prediction="27 x 120 MiB counted, the same 128 MiB blocks as micro-batch 32: within 4 GiB "
       "pinned if the GPU side fits"),
    _c("fast_mb40_keep_input_fp16", "fast", "fp16", micro_batch=40, **{**FAST, "fast": _fast(checkpoint_keep="input")},
       group="throughput", prediction="the fp16 row at micro-batch 32 left 0.99 GiB of the GPU budget unused: 40 rows "
       "may fit it, with the pinned blocks of micro-batch 32; ~1-2 % more tokens/s (longer GEMMs, the per-step costs "
       "spread over more tokens)"),
    # Offloaded checkpoints page-locked at their exact size (``FastPathOptions.exact_pinned``): 27 x 96 MiB of layer
    # inputs at micro-batch 32 is 2.53 GiB instead of 27 x 128 MiB blocks (3.38 GiB). The pinned memory this frees
    # keeps the residual after attention for the first layers (``keep_layers``): their recomputation skips o_proj's
    # frozen GEMM (keeping it in every layer was +2.7 % in invocation c4 of 04_speed_runs_h200.json)
    _c("fast_mb32_keep_input_exact_pin_fp16", "fast", "fp16", micro_batch=32,
       **{**FAST, "fast": _fast(checkpoint_keep="input", exact_pinned=True)}, group="ablation",
       prediction="the same speed as fast_mb32_keep_input_fp16 with 2.53 GiB pinned instead of 3.38"),
    _c("fast_mb32_mid14_exact_pin_fp16", "fast", "fp16", micro_batch=32,
       **{**FAST, "fast": _fast(checkpoint_keep="mid", keep_layers=14, exact_pinned=True)}, group="throughput",
       prediction="27 x 96 MiB of inputs + 14 x 96 MiB of residuals = 3.84 GiB pinned; 14 layers skip o_proj's "
       "recomputation: ~1.4 % more tokens/s than keep_input"),
    _c("fast_mb32_mid14_exact_pin_bf16", "fast", "bf16", micro_batch=32,
       **{**FAST, "fast": _fast(checkpoint_keep="mid", keep_layers=14, exact_pinned=True)}, group="throughput"),
    _c("fast_mb32_midqkv5_exact_pin_fp16", "fast", "fp16", micro_batch=32,
       **{**FAST, "fast": _fast(checkpoint_keep="mid+qkv", keep_layers=5, exact_pinned=True)}, group="ablation",
       prediction="5 layers keep residual and q/k/v (256 MiB each): 3.78 GiB pinned; the same pinned memory spent "
       "on fewer layers that skip more (q/k/v too): about the gain of mid14"),
    _c("fast_mb36_mid10_exact_pin_fp16", "fast", "fp16", micro_batch=36,
       **{**FAST, "fast": _fast(checkpoint_keep="mid", keep_layers=10, exact_pinned=True)}, group="throughput",
       prediction="27 x 108 + 10 x 108 MiB = 3.90 GiB pinned; micro-batch 36's +0.5 % and 10 layers' residuals"),
    _c("fast_mb36_mid10_exact_pin_bf16", "fast", "bf16", micro_batch=36,
       **{**FAST, "fast": _fast(checkpoint_keep="mid", keep_layers=10, exact_pinned=True)}, group="throughput"),
    _c("fast_mb20_keep_mid_bf16", "fast", "bf16", micro_batch=20, **{**FAST, "fast": _fast(checkpoint_keep="mid")},
       group="throughput", prediction="input and residual: 54 x 60 MiB counted (3.4 GiB as 64 MiB blocks)"),
    _c("fast_mb16_no_offload_bf16", "fast", "bf16", micro_batch=16,
       **{**FAST, "fast": _fast(offload_checkpoints=False, checkpoint_keep="input")}, group="throughput",
       prediction="no pinned memory: 28 x 48 MiB of checkpoints on the GPU"),
    # The peer, where it is installed next to the benchmark
    _c("unsloth_2x1_bf16", "unsloth", "bf16", micro_batch=2, lora_dropout=0.0, group="peer"),
    _c("unsloth_mb32_bf16", "unsloth", "bf16", micro_batch=32, lora_dropout=0.0, group="peer"),
    _c("unsloth_mb36_bf16", "unsloth", "bf16", micro_batch=36, lora_dropout=0.0, group="peer"),
    _c("unsloth_mb40_bf16", "unsloth", "bf16", micro_batch=40, lora_dropout=0.0, group="peer"),
    _c("unsloth_mb48_bf16", "unsloth", "bf16", micro_batch=48, lora_dropout=0.0, group="peer"),
    _c("unsloth_mb32_fp16", "unsloth", "fp16", micro_batch=32, lora_dropout=0.0, group="peer"),
    _c("unsloth_mb36_fp16", "unsloth", "fp16", micro_batch=36, lora_dropout=0.0, group="peer"),
    _c("unsloth_mb40_fp16", "unsloth", "fp16", micro_batch=40, lora_dropout=0.0, group="peer"),
]


CONFIGS_BY_NAME = {config.name: config for config in CONFIGS}


def config_by_name(name: str) -> BenchConfig:
    """The configuration called ``name``; an unknown name lists the known ones."""
    if name in CONFIGS_BY_NAME:
        return CONFIGS_BY_NAME[name]
    raise SystemExit(f"error: unknown configuration {name!r}. Known: {', '.join(c.name for c in CONFIGS)}")
