"""How the fast path runs (``FastPathOptions``) and the one error it raises (``FastPathError``)."""

from __future__ import annotations

from dataclasses import dataclass

KERNEL_CHOICES = ("auto", "liger", "torch")
KEEP_CHOICES = ("auto", "input", "mid", "mid+qkv")
ATTENTION_CHOICES = ("auto", "varlen", "sdpa", "cudnn")


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
    # With checkpoint_keep "mid" or "mid+qkv": how many layers (the first ones) keep those extra tensors; the others
    # keep their input only (None: every layer). Bounds the pinned memory of offloaded checkpoints: at micro-batch 32
    # of Llama-3.2-3B a layer's input and its residual after attention are 96 MiB each
    keep_layers: int | None = None
    # Offloaded checkpoints in host memory page-locked at its exact size (cudaHostRegister) instead of PyTorch's
    # pinned-memory allocator, which rounds each buffer up to a power of two (96 MiB -> 128 MiB at micro-batch 32)
    exact_pinned: bool = False
    # "liger" (Triton, CUDA), "torch", or "auto": liger where it can run, for passes of ``small_pass_tokens`` tokens
    # or more; smaller passes are bound by the CPU's kernel launches, and Triton's launcher costs several times the
    # CPU time of an ATen op (the original recipe's 2 × 512 tokens ran ~10 % faster with PyTorch's ops). Training
    # sets it with ``fast_path_kernels`` ("torch": what a machine without Triton runs, e.g. Windows)
    kernels: str = "auto"
    small_pass_tokens: int = 4096
    # A checkpointed layer runs its MLP (and its recomputation and backward) over at most this many tokens at a
    # time (0: the whole pass at once): the MLP's (tokens × 2 · intermediate) activations are the largest alive
    mlp_chunk_tokens: int = 0
    # "varlen" (FlashAttention over packed rows), "sdpa" (one padded row per sequence), "cudnn" (SDPA's cuDNN kernel
    # where all rows of a pass have one length, varlen otherwise; Ampere or newer), or "auto": varlen where it runs,
    # and "cudnn" for passes of ``small_pass_tokens`` or more where that runs (not under CUDA graphs), else "sdpa"
    attention: str = "auto"
    fp32_residual: bool = False  # keep the residual stream in fp32 (costs memory; for activations beyond fp16)
    # Where the Triton kernel set runs (CUDA, passes of ``small_pass_tokens`` or more): LoRA dropout as one Triton
    # pass each way with a one-bit mask, and the LoRA update of q/k/v and gate/up inside the frozen GEMM
    # (``layers._FusedLoraLinear``). False: PyTorch's dropout and a separate LoRA GEMM (the A/B of the benchmark)
    fused_lora: bool = True
    # Opt-in, CUDA only (``utils.speed.graphs.GraphedStep``): each micro-batch's forward and backward pass replayed
    # from a CUDA graph, one per length bucket (tokens padded up to a multiple of ``graph_bucket_tokens``, labels
    # -100), so a launch-bound step costs one graph launch instead of thousands of kernel launches. The checkpoints
    # stay on the GPU (offloading copies through pinned memory on side streams that a graph cannot capture)
    cuda_graphs: bool = False
    graph_bucket_tokens: int = 128

    def __post_init__(self) -> None:
        if self.kernels not in KERNEL_CHOICES:
            raise FastPathError(f"kernels={self.kernels!r}: use one of {KERNEL_CHOICES}.")
        if self.attention not in ATTENTION_CHOICES:
            raise FastPathError(f"attention={self.attention!r}: use one of {ATTENTION_CHOICES}.")
        if self.checkpoint_keep not in KEEP_CHOICES:
            raise FastPathError(f"checkpoint_keep={self.checkpoint_keep!r}: use one of {KEEP_CHOICES}.")
        if self.keep_layers is not None:
            if isinstance(self.keep_layers, bool) or not isinstance(self.keep_layers, int) or self.keep_layers < 0:
                raise FastPathError(f"keep_layers={self.keep_layers!r}: use None (every layer) or a whole number of "
                                    "layers, 0 or more.")
            if self.checkpoint_keep not in ("mid", "mid+qkv"):
                raise FastPathError(f"keep_layers={self.keep_layers} with checkpoint_keep={self.checkpoint_keep!r}: "
                                    "keep_layers says how many layers keep the extra tensors of 'mid' or 'mid+qkv'; "
                                    "set checkpoint_keep to one of them, or keep_layers=None.")
        if not isinstance(self.exact_pinned, bool):
            raise FastPathError(f"exact_pinned={self.exact_pinned!r}: use True or False.")
        if not isinstance(self.mlp_chunk_tokens, int) or self.mlp_chunk_tokens < 0:
            raise FastPathError(f"mlp_chunk_tokens={self.mlp_chunk_tokens!r}: use a whole number of tokens, 0 or more "
                                "(0: the MLP runs over the whole pass at once).")
        if not isinstance(self.small_pass_tokens, int) or self.small_pass_tokens < 0:
            raise FastPathError(f"small_pass_tokens={self.small_pass_tokens!r}: use a whole number of tokens, 0 or "
                                "more (0: Liger's kernels for every pass where they can run).")
        if not isinstance(self.fused_lora, bool):
            raise FastPathError(f"fused_lora={self.fused_lora!r}: use True or False.")
        self._check_graphs()

    def _check_graphs(self) -> None:
        """The CUDA-graph settings: a positive bucket, and checkpoints kept on the GPU when graphs are on."""
        if not isinstance(self.cuda_graphs, bool):
            raise FastPathError(f"cuda_graphs={self.cuda_graphs!r}: use True or False.")
        if not isinstance(self.graph_bucket_tokens, int) or self.graph_bucket_tokens < 1:
            raise FastPathError(f"graph_bucket_tokens={self.graph_bucket_tokens!r}: use a whole number of tokens, 1 "
                                "or more (e.g. 128: lengths are padded up to multiples of it).")
        if self.cuda_graphs and self.offload_checkpoints:
            raise FastPathError("cuda_graphs=True with offload_checkpoints=True: offloaded checkpoints are copied "
                                "through pinned host memory on side streams, which a CUDA graph cannot capture; set "
                                "offload_checkpoints=False (checkpoints on the GPU) or cuda_graphs=False.")
