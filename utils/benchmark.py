"""Training speed, side by side: the original configuration and the fast path, each in its own process.

Command line::

    python -m utils.benchmark run --out results/04_speed_benchmark.json           # all configurations (GPU)
    python -m utils.benchmark run --only original_fp16,fast_mb32_bf16 --out /tmp/b.json
    python -m utils.benchmark correctness --out results/04_fast_path_correctness.json   # embedded model, 50 steps
    python -m utils.benchmark figure results/04_speed_benchmark.json              # redraw the figures
    python -m utils.benchmark list                                                # the configurations

``run`` saves the random-weight Llama-3.2-3B twin once (bf16 safetensors), then measures every configuration in
a fresh ``python -m utils.benchmark child`` process on the same GPU: a manual loop (autocast for the Hugging
Face path, GradScaler for fp16, clip 0.5, the configuration's optimizer), ``--warmup`` steps, then the median of
``--steps`` optimizer steps. Tokens/s counts real (non-padding) tokens. The JSON is rewritten after every
configuration, so a run stopped by a time limit keeps what it measured. ``--tiny`` runs a 2-layer twin on the
CPU to test the logic (not a result).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from utils.config import THESIS
from utils.memory import save_json
from utils.paths import REPO_ROOT, resolve_path

GIB = 1024**3
BUDGET_GIB = 7.5  # an 8 GB card minus the CUDA context
CARD_GIB = 8.0
DEFAULT_OUT = "results/04_speed_benchmark.json"
DEFAULT_CORRECTNESS_OUT = "results/04_fast_path_correctness.json"
FIGURE = "04_speed_benchmark"
CORRECTNESS_FIGURE = "04_fast_path_loss_match"
TWIN_LABEL = "llama-3.2-3b-twin (random weights, exact Llama-3.2-3B architecture)"
EXPANDABLE = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


@dataclass(frozen=True)
class BenchConfig:
    """One measured configuration. ``impl``: "hf" (transformers + PEFT), "fast" (utils.fastpath), "unsloth"."""

    name: str
    impl: str
    dtype: str  # "fp16" | "bf16"
    micro_batch: int = 1  # sequences per micro-batch (synthetic) or a token budget of micro_batch × seq_len (corpus)
    accumulation: int = 1
    seq_len: int = THESIS.max_seq_length
    workload: str = "synthetic"  # "synthetic": full rows of random ids; "corpus": the shipped training examples
    prepare: bool = False  # hf: prepare_model_for_kbit_training (fp32 upcast + reentrant checkpointing)
    liger: bool = False  # hf: Liger's monkey patch (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy)
    optim: str = "paged_adamw_8bit"  # per tensor; "paged_adamw_8bit_flat" (utils.optim) or "adamw_torch_fused"
    lora_dropout: float = THESIS.lora_dropout
    offload: bool = True  # fast: checkpoints in pinned CPU memory
    skip_down: bool = True  # fast: no down_proj GEMM when recomputing
    checkpoint_keep: str = "auto"  # fast: what each checkpoint keeps ("input", "mid", "mid+qkv"; see fastpath)
    checkpoint: bool = True  # fast: activation checkpointing
    kernels: str = "auto"  # fast: "liger" | "torch" | "auto"
    mlp_chunk_tokens: int = 0  # fast: the MLP over at most this many tokens at a time (0: the whole pass)
    expandable_segments: bool = False  # PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    group: str = ""  # what the row tests (for the notes and the figure)
    prediction: str = ""  # what we expected before measuring


def _c(name: str, impl: str, dtype: str, **kw: Any) -> BenchConfig:
    return BenchConfig(name=name, impl=impl, dtype=dtype, **kw)


ORIGINAL = dict(micro_batch=1, accumulation=2, prepare=True)
FAST = dict(expandable_segments=True, optim="paged_adamw_8bit_flat", checkpoint_keep="mid+qkv")

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
    _c("fast_2x1_on_gpu_fp16", "fast", "fp16", micro_batch=2, offload=False, **FAST, group="recipe",
       prediction="the 2 x 512 tokens' checkpoints (0.6 GiB) kept on the GPU: ~8 stream operations fewer per "
       "checkpoint on a CPU-bound step, ~10 % faster, 0.6 GiB more on the GPU"),
    _c("fast_2x1_torch_kernels_fp16", "fast", "fp16", micro_batch=2, kernels="torch", **FAST, group="recipe",
       prediction="PyTorch's RMSNorm/RoPE/SwiGLU ops instead of Liger's Triton kernels (the default below "
                  "small_pass_tokens since): a Triton launch costs several times an ATen op's CPU time; more "
                  "kernels but less CPU: ~5 % faster on the CPU-bound 2 x 1 step"),
    _c("fast_2x1_per_tensor_optim_fp16", "fast", "fp16", micro_batch=2, **{**FAST, "optim": "paged_adamw_8bit"},
       group="recipe", prediction="bitsandbytes updating 392 tensors one by one (a GPU sync after each): "
       "~45 ms more per step than one flat update"),
    _c("fast_2x1_fused_adamw_fp16", "fast", "fp16", micro_batch=2, **{**FAST, "optim": "adamw_torch_fused"},
       group="recipe", prediction="fused AdamW: one kernel instead of ~450 per step; ~10 ms less per step"),
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
    _c("fast_mb32_keep_down_bf16", "fast", "bf16", micro_batch=32, skip_down=False, **FAST, group="ablation",
       prediction="recomputing down_proj costs ~8 % of the step"),
    _c("fast_mb32_no_offload_bf16", "fast", "bf16", micro_batch=32, offload=False,
       **{**FAST, "checkpoint_keep": "input"}, group="ablation",
       prediction="checkpoints on the GPU: same speed, +2.6 GiB (28 layers x 16k tokens x 6 KiB)"),
    _c("fast_mb32_torch_kernels_bf16", "fast", "bf16", micro_batch=32, kernels="torch", **FAST, group="ablation",
       prediction="PyTorch RMSNorm/RoPE/SwiGLU instead of Liger: ~10 % slower, more memory"),
    _c("fast_mb32_dropout0_bf16", "fast", "bf16", micro_batch=32, lora_dropout=0.0, **FAST, group="throughput",
       prediction="no LoRA dropout: ~5 % faster, less memory (Unsloth's fast LoRA needs dropout 0)"),
    _c("fast_mb32_dropout0_fp16", "fast", "fp16", micro_batch=32, lora_dropout=0.0, **FAST, group="throughput"),
    _c("fast_mb32_dropout0_keep_input_bf16", "fast", "bf16", micro_batch=32, lora_dropout=0.0,
       **{**FAST, "checkpoint_keep": "input"}, group="ablation", prediction="only the layer input as checkpoint "
       "(o_proj's and q/k/v's GEMMs recomputed): ~7 % slower, 7.5 GB less pinned CPU memory"),
    _c("fast_mb32_dropout0_keep_mid_bf16", "fast", "bf16", micro_batch=32, lora_dropout=0.0,
       **{**FAST, "checkpoint_keep": "mid"}, group="ablation", prediction="input and residual after attention "
       "(q/k/v's GEMM recomputed): ~4 % slower, 4.7 GB less pinned CPU memory"),
    _c("fast_mb32_dropout0_keep_mid_fp16", "fast", "fp16", micro_batch=32, lora_dropout=0.0,
       **{**FAST, "checkpoint_keep": "mid"}, group="ablation"),
    _c("fast_mb32_dropout0_mlp8k_bf16", "fast", "bf16", micro_batch=32, lora_dropout=0.0, mlp_chunk_tokens=8192,
       **FAST, group="ablation", prediction="the MLP in two chunks of 8,192 tokens: ~0.6 GiB less at the peak, "
       "fewer allocator retries under the cap; GEMMs of half the rows as fast: ~3 % faster capped"),
    _c("fast_mb40_dropout0_bf16", "fast", "bf16", micro_batch=40, lora_dropout=0.0, **FAST, group="throughput"),
    _c("fast_mb40_dropout0_mlp8k_bf16", "fast", "bf16", micro_batch=40, lora_dropout=0.0, mlp_chunk_tokens=8192,
       **FAST, group="throughput"),
    _c("fast_mb48_dropout0_mlp8k_bf16", "fast", "bf16", micro_batch=48, lora_dropout=0.0, mlp_chunk_tokens=8192,
       **FAST, group="throughput"),
    _c("fast_mb40_dropout0_fp16", "fast", "fp16", micro_batch=40, lora_dropout=0.0, **FAST, group="throughput"),
    _c("hf_mb16_noprep_liger_bf16", "hf", "bf16", micro_batch=16, liger=True, group="ablation",
       prediction="Hugging Face path with Liger, no upcast, GC: ~13k tokens/s within 6 GiB (shared/bench)"),
    # Real examples (the shipped corpus): padding must not eat the gain
    _c("original_corpus_fp16", "hf", "fp16", workload="corpus", **ORIGINAL, group="corpus"),
    _c("fast_2x1_corpus_fp16", "fast", "fp16", micro_batch=2, workload="corpus", **FAST, group="corpus"),
    _c("fast_mb32_corpus_bf16", "fast", "bf16", micro_batch=32, workload="corpus", **FAST, group="corpus",
       prediction="padding-free packing keeps the synthetic throughput (-5 % for shorter attention rows)"),
    _c("fast_mb32_corpus_fp16", "fast", "fp16", micro_batch=32, workload="corpus", **FAST, group="corpus"),
    # The peer, where it is installed next to the benchmark
    _c("unsloth_2x1_bf16", "unsloth", "bf16", micro_batch=2, lora_dropout=0.0, group="peer"),
    _c("unsloth_mb32_bf16", "unsloth", "bf16", micro_batch=32, lora_dropout=0.0, group="peer"),
    _c("unsloth_mb40_bf16", "unsloth", "bf16", micro_batch=40, lora_dropout=0.0, group="peer"),
    _c("unsloth_mb48_bf16", "unsloth", "bf16", micro_batch=48, lora_dropout=0.0, group="peer"),
    _c("unsloth_mb32_fp16", "unsloth", "fp16", micro_batch=32, lora_dropout=0.0, group="peer"),
]


CONFIGS_BY_NAME = {config.name: config for config in CONFIGS}


def config_by_name(name: str) -> BenchConfig:
    """The configuration called ``name``; an unknown name lists the known ones."""
    if name in CONFIGS_BY_NAME:
        return CONFIGS_BY_NAME[name]
    raise SystemExit(f"error: unknown configuration {name!r}. Known: {', '.join(c.name for c in CONFIGS)}")


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One micro-batch: ids (B × S), labels, optional padding mask and position ids, real-token count."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    tokens: int = 0

    def to(self, device: str) -> "Batch":
        move = (lambda t: None if t is None else t.to(device, non_blocking=True))
        return Batch(move(self.input_ids), move(self.labels), move(self.attention_mask), move(self.position_ids),
                     self.tokens)


def synthetic_batches(config: BenchConfig, vocab: int, seed: int = 0) -> list[Batch]:
    """``accumulation`` fixed micro-batches of random ids, full rows, labels = ids (every step the same)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(config.accumulation):
        ids = torch.randint(0, vocab, (config.micro_batch, config.seq_len), generator=gen)
        out.append(Batch(ids, ids.clone(), tokens=ids.numel()))
    return out


def corpus_examples(tokenizer_name: str = "llama-3.2", seed: int = 0, limit: int | None = None,
                    vocab: int | None = None) -> list[dict]:
    """The shipped training examples as token ids and completion-only labels, in a seeded order.

    ``vocab``: fold ids into a smaller vocabulary (only the tiny logic-test twin needs it).
    """
    import random

    from utils.data import completion_mask, load_records
    from utils.modeling import load_tokenizer
    from utils.paths import TRAIN_FILE

    tokenizer = load_tokenizer(tokenizer_name)
    records = load_records(TRAIN_FILE)
    random.Random(seed).shuffle(records)
    out = []
    for record in records[:limit]:
        ids, mask = completion_mask(tokenizer, record["messages"])
        ids = ids[:THESIS.max_seq_length]
        if vocab is not None:
            ids = [t % vocab for t in ids]
        labels = [t if m else -100 for t, m in zip(ids, mask[:len(ids)])]
        out.append({"ids": ids, "labels": labels})
    return out


def one_row(examples: Sequence[dict]) -> Batch:
    """Examples concatenated into one padding-free row; positions restart at 0 for each example."""
    ids, labels, pos = [], [], []
    for ex in examples:
        ids += ex["ids"]
        labels += [-100] + ex["labels"][1:]  # the first token of an example is not predicted from the previous one
        pos += list(range(len(ex["ids"])))
    t = lambda x: torch.tensor([x], dtype=torch.long)  # noqa: E731
    return Batch(t(ids), t(labels), None, t(pos), len(ids))


def corpus_steps(config: BenchConfig, examples: list[dict], steps: int) -> list[list[Batch]]:
    """Micro-batches of real examples for ``steps`` optimizer steps, cycling through the corpus.

    The Hugging Face path takes ``micro_batch`` examples per micro-batch (batch 1: no padding; more: right-padded
    to the longest). The fast path packs examples into one padding-free row up to ``micro_batch × seq_len`` tokens,
    or exactly ``micro_batch`` examples when ``micro_batch`` ≤ 2 (the original recipe: 2 sequences per step).
    """
    out, cursor = [], 0

    def take() -> dict:
        nonlocal cursor
        ex = examples[cursor % len(examples)]
        cursor += 1
        return ex

    for _ in range(steps):
        micro = []
        for _ in range(config.accumulation):
            if config.impl == "fast" and config.micro_batch > 2:
                budget, chosen = config.micro_batch * config.seq_len, []
                while sum(len(e["ids"]) for e in chosen) + len(examples[cursor % len(examples)]["ids"]) <= budget:
                    chosen.append(take())
                micro.append(one_row(chosen))
            elif config.impl == "fast":
                micro.append(one_row([take() for _ in range(config.micro_batch)]))
            else:
                chosen = [take() for _ in range(config.micro_batch)]
                width = max(len(e["ids"]) for e in chosen)
                ids = torch.zeros(len(chosen), width, dtype=torch.long)
                labels = torch.full((len(chosen), width), -100, dtype=torch.long)
                mask = torch.zeros(len(chosen), width, dtype=torch.long)
                for i, e in enumerate(chosen):
                    n = len(e["ids"])
                    ids[i, :n] = torch.tensor(e["ids"])
                    labels[i, :n] = torch.tensor(e["labels"])
                    mask[i, :n] = 1
                micro.append(Batch(ids, labels, mask if len(chosen) > 1 else None, None, int(mask.sum())))
        out.append(micro)
    return out


# --------------------------------------------------------------------------------------------
# One configuration, in a child process
# --------------------------------------------------------------------------------------------


def build_optimizer(params: list, optim: str, lr: float = THESIS.learning_rate):
    """The optimizer of a configuration: bitsandbytes' paged AdamW 8-bit (per tensor or flat) or fused AdamW."""
    if optim == "paged_adamw_8bit_flat":
        from utils.speed.optim import build_flat_paged_adamw_8bit

        return build_flat_paged_adamw_8bit(params, lr=lr, weight_decay=THESIS.weight_decay)
    if optim == "paged_adamw_8bit":
        import bitsandbytes as bnb

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=THESIS.weight_decay)
    if optim == "adamw_torch_fused":
        return torch.optim.AdamW(params, lr=lr, weight_decay=THESIS.weight_decay, fused=torch.cuda.is_available())
    raise ValueError(f"optim={optim!r}: use paged_adamw_8bit, paged_adamw_8bit_flat or adamw_torch_fused")


def load_model_for(config: BenchConfig, model: str, device: str):
    """Load ``model`` (a folder or name) the way ``config`` trains it; returns (peft model, loss function)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    from utils.modeling import build_lora_config, load_model
    from utils.training import DTYPES

    dtype = DTYPES[config.dtype]
    cuda = device.startswith("cuda")
    quantization = "nf4_dq" if cuda else None
    if config.impl == "hf" and config.liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = load_model(model, quantization=quantization, device=device, compute_dtype=dtype if cuda else None)
        base.config.use_cache = False
        if config.impl == "hf":
            if config.prepare:
                base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                base.enable_input_require_grads()
        lora = build_lora_config(lora_dropout=config.lora_dropout)
        peft_model = get_peft_model(base, lora)
    for p in peft_model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # fp32 LoRA weights: GradScaler needs them, and they are 0.2 GB
    if config.impl == "fast":
        from utils.fastpath import FastPathOptions, causal_lm_loss, enable_fast_path

        enable_fast_path(peft_model, dtype if cuda else torch.float32, FastPathOptions(
            checkpoint=config.checkpoint, offload_checkpoints=config.offload, skip_down_recompute=config.skip_down,
            checkpoint_keep=config.checkpoint_keep, kernels=config.kernels, mlp_chunk_tokens=config.mlp_chunk_tokens))
        backbone_forward = peft_model.get_base_model().model

        def loss_fn(batch: Batch, num_items: int) -> torch.Tensor:
            hidden = backbone_forward(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                      position_ids=batch.position_ids).last_hidden_state
            return causal_lm_loss(peft_model, hidden, batch.labels, num_items)

        # measure() adds the fast path's resolved choices after the first step (some are settled there)
        return peft_model, loss_fn, {"alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}

    def hf_loss(batch: Batch, num_items: int) -> torch.Tensor:
        with (torch.autocast("cuda", dtype=dtype) if cuda else nullcontext()):
            out = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             position_ids=batch.position_ids, labels=batch.labels,
                             num_items_in_batch=torch.tensor(num_items, device=batch.input_ids.device))
        return out.loss

    return peft_model, hf_loss, {"prepare": config.prepare, "liger": config.liger}


def load_unsloth_for(config: BenchConfig, model: str):
    """Unsloth's FastLanguageModel on the same weights, LoRA and loop (the peer row)."""
    import unsloth  # noqa: F401  (must come before transformers)
    from unsloth import FastLanguageModel

    from utils.training import DTYPES  # after unsloth, which must patch transformers before it loads

    dtype = DTYPES[config.dtype]
    base, _ = FastLanguageModel.from_pretrained(model, max_seq_length=config.seq_len, dtype=dtype, load_in_4bit=True)
    peft_model = FastLanguageModel.get_peft_model(
        base, r=THESIS.lora_r, lora_alpha=THESIS.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=list(THESIS.target_modules), bias="none", use_gradient_checkpointing="unsloth")

    def loss_fn(batch: Batch, num_items: int) -> torch.Tensor:
        with torch.autocast("cuda", dtype=dtype):
            return peft_model(input_ids=batch.input_ids, labels=batch.labels).loss

    import importlib.metadata as md

    return peft_model, loss_fn, {"unsloth": md.version("unsloth")}


def measure(config: BenchConfig, model: str, steps: int, warmup: int, device: str | None = None,
            lr_schedule: bool = False, seed: int = 0, examples: list[dict] | None = None,
            step_hook: Any = None, memory_cap_gib: float | None = None) -> dict[str, Any]:
    """Train ``config`` for ``warmup + steps`` optimizer steps; times, peaks and losses.

    ``seed`` sets the LoRA initialisation and dropout; the data (fixed random rows, or the corpus in one
    seeded order) is the same for every seed, so two seeds measure run-to-run noise. ``memory_cap_gib`` caps
    what PyTorch's caching allocator may reserve on the GPU, as a smaller card would: past it the allocator
    returns cached blocks to the driver and retries (counted in ``allocator.num_alloc_retries``), or the row
    fails out of memory.
    """
    from utils.memory import clip_and_step

    device = device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    torch.manual_seed(seed)
    if cuda:
        torch.cuda.init()
        if memory_cap_gib:
            total_memory = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, memory_cap_gib * GIB / total_memory), device)
    started = time.perf_counter()
    if config.impl == "unsloth":
        peft_model, loss_fn, details = load_unsloth_for(config, model)
    else:
        peft_model, loss_fn, details = load_model_for(config, model, device)
    load_seconds = time.perf_counter() - started
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, config.optim)
    scheduler = None
    if lr_schedule:
        from transformers import get_cosine_schedule_with_warmup

        scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, (warmup + steps) // 10), warmup + steps)
    scaler = torch.amp.GradScaler("cuda") if (cuda and config.dtype == "fp16") else None
    total = warmup + steps
    if config.workload == "corpus":
        vocab = peft_model.config.vocab_size
        examples = examples if examples is not None else corpus_examples(
            "llama-3.2" if vocab >= 128000 else "embedded", seed=0, vocab=vocab if vocab < 49152 else None)
        plan = corpus_steps(config, examples, total)
    else:
        fixed = synthetic_batches(config, peft_model.config.vocab_size, seed)
        plan = [fixed] * total
    peft_model.train()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses, tokens, label_tokens = [], [], [], []
    for step, micro in enumerate(plan):
        if step_hook is not None:
            step_hook(step)
        num_items = sum(int((b.labels[:, 1:] != -100).sum()) for b in micro)
        micro = [b.to(device) for b in micro]
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step_loss = torch.zeros((), device=device)
        for batch in micro:
            loss = loss_fn(batch, num_items)
            (scaler.scale(loss) if scaler else loss).backward()
            step_loss += loss.detach()
        clip_and_step(params, optimizer, scaler)
        if scheduler:
            scheduler.step()
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        losses.append(round(float(step_loss), 5))
        tokens.append(sum(b.tokens for b in micro))
        label_tokens.append(num_items)
        if step >= warmup:
            times.append(elapsed)
    if step_hook is not None:
        step_hook(len(plan))
    measured_tokens = tokens[warmup:]
    seconds = statistics.median(times)
    out: dict[str, Any] = {
        **asdict(config), "ok": True, "device": device, "details": details,
        "load_seconds": round(load_seconds, 1), "steps": steps, "warmup_steps": warmup,
        "seconds_per_step": round(seconds, 5),
        "seconds_per_step_all": [round(t, 4) for t in times],
        # real tokens over real time: sum of tokens / sum of seconds of the measured steps
        "tokens_per_second": round(sum(measured_tokens) / sum(times), 1),
        "tokens_per_step": round(statistics.mean(measured_tokens), 1),
        "losses": losses, "first_loss": losses[0], "last_loss": losses[-1],
        "label_tokens_per_step": label_tokens,
        "lora_parameters": sum(p.numel() for p in params),
    }
    if config.impl == "fast":
        out["details"]["fast_path"] = peft_model.get_base_model().model._fast_path.describe()
    if cuda:
        stats = torch.cuda.memory_stats()
        out["allocator"] = {k: stats.get(k) for k in ("num_alloc_retries", "inactive_split_bytes.all.peak",
                                                       "active_bytes.all.peak", "reserved_bytes.all.peak")}
        out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
        out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 3)
    return out


def profile_step(config: BenchConfig, model: str, warmup: int = 2, rows: int = 30,
                 shapes: bool = False, sort: str = "gpu") -> dict[str, Any]:
    """One optimizer step of ``config`` under torch.profiler: the kernels (or, ``shapes``, ops by shape) by GPU time.

    ``sort="cpu"``: ops by their own CPU time, then (a second step under cProfile) Python functions by their own
    time: where a launch-bound step spends its CPU.
    """
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    holder: dict[str, Any] = {}

    def hook(step: int) -> Any:
        if step == warmup:
            holder["prof"] = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=shapes)
            holder["prof"].__enter__()
        elif step == warmup + 1 and "prof" in holder:
            torch.cuda.synchronize()
            holder["prof"].__exit__(None, None, None)
            if sort == "cpu":
                holder["python"] = cProfile.Profile()
                holder["python"].enable()
        elif step == warmup + 2 and "python" in holder:
            holder["python"].disable()

    result = measure(config, model, steps=2 if sort == "cpu" else 1, warmup=warmup, step_hook=hook)
    prof = holder["prof"]
    key = "self_cpu_time_total" if sort == "cpu" else "self_cuda_time_total"
    table = prof.key_averages(group_by_input_shape=shapes).table(sort_by=key, row_limit=rows,
                                                                 max_name_column_width=60, max_shapes_column_width=90)
    if "python" in holder:
        text = io.StringIO()
        pstats.Stats(holder["python"], stream=text).sort_stats("tottime").print_stats(rows)
        table += "\n\nPython functions of the next step by own time (cProfile):\n" + text.getvalue()
    events = prof.key_averages()
    cuda_total = sum(e.self_device_time_total for e in events) / 1e3
    return {"name": config.name, "seconds_per_step": result["seconds_per_step"], "gpu_busy_ms": round(cuda_total, 1),
            "table": table}


def _child(task: dict) -> dict:
    config = BenchConfig(**task["config"])
    try:
        return measure(config, task["model"], task["steps"], task["warmup"], lr_schedule=task.get("lr_schedule", False),
                       memory_cap_gib=task.get("memory_cap_gib"),
                       seed=task.get("seed", 0))
    except torch.cuda.OutOfMemoryError as exc:
        return {**asdict(config), "ok": False, "error": f"out of memory: {str(exc).splitlines()[0]}"}
    except ImportError as exc:
        if config.impl == "unsloth":
            return {**asdict(config), "ok": False, "skipped": True, "error": f"unsloth not installed ({exc})"}
        raise


def run_child(task: dict, timeout: float = 900, env: dict | None = None) -> dict:
    """Run one measurement in a fresh ``python -m utils.benchmark child`` process; a failure becomes its row."""
    from utils.memory import ChildProcessFailed, run_module_child

    config = task["config"]
    try:
        return run_module_child("utils.benchmark", task, timeout, env)
    except subprocess.TimeoutExpired:
        return {**config, "ok": False, "error": f"stopped after {timeout:.0f} s"}
    except ChildProcessFailed as exc:
        return {**config, "ok": False, "error": f"child process failed ({exc}"}


# --------------------------------------------------------------------------------------------
# The whole benchmark
# --------------------------------------------------------------------------------------------


def save_twin(folder: Path, tiny: bool, device: str) -> dict:
    """Write the random-weight twin (bf16 safetensors) once; every configuration loads it."""
    from utils.modeling import build_twin

    if (folder / "config.json").exists():
        return {"folder": str(folder), "reused": True}
    start = time.perf_counter()
    if tiny:
        from utils.memory import _tiny_twin

        model = _tiny_twin(device)
    else:
        model = build_twin(device=device, dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    if not tiny:  # a complete local model: `python -m utils.training --model <folder>` finds its tokenizer
        from utils.modeling import load_tokenizer

        load_tokenizer("llama-3.2").save_pretrained(folder)
    del model
    return {"folder": str(folder), "seconds": round(time.perf_counter() - start, 1)}


def merged_rows(rows: Sequence[dict]) -> list[dict]:
    """One row per configuration that ran: with repeats (``run --repeat``), the median tokens/s and s/step over
    them and the largest peaks; the first repeat's other fields. Rows without repeats come back as they are."""
    by_name: dict[str, list[dict]] = {}
    for row in rows:
        if row.get("ok"):
            by_name.setdefault(row["name"], []).append(row)
    merged = []
    for name, group in by_name.items():
        if len(group) == 1:
            merged.append(group[0])
            continue
        row = dict(group[0])
        for key in ("tokens_per_second", "seconds_per_step"):
            row[key] = round(statistics.median(r[key] for r in group), 5)
            row[f"{key}_repeats"] = [r[key] for r in group]
        for key in ("peak_allocated_gib", "peak_reserved_gib"):
            values = [r[key] for r in group if r.get(key) is not None]
            row[key] = max(values) if values else None
        row["repeats"] = len(group)
        merged.append(row)
    return merged


def summarize(rows: Sequence[dict]) -> dict[str, Any]:
    """The ratios the issue asks for, from rows of one run (None where a row is missing; repeats merged)."""
    ok = {r["name"]: r for r in merged_rows(rows)}

    def best(prefix: str, dtype: str, workload: str = "synthetic") -> dict | None:
        fits = [r for r in ok.values() if r["impl"] == prefix and r["dtype"] == dtype and r["workload"] == workload
                and r.get("peak_reserved_gib") is not None and r["peak_reserved_gib"] <= BUDGET_GIB]
        return max(fits, key=lambda r: r["tokens_per_second"], default=None)

    summary: dict[str, Any] = {"budget_reserved_gib": BUDGET_GIB}
    original = ok.get("original_fp16")
    for dtype in ("bf16", "fp16"):
        fast = best("fast", dtype)
        if fast and original:
            summary[f"fast_best_{dtype}"] = {
                "name": fast["name"], "tokens_per_second": fast["tokens_per_second"],
                "peak_reserved_gib": fast["peak_reserved_gib"],
                "x_original_fp16": round(fast["tokens_per_second"] / original["tokens_per_second"], 2)}
        peer = best("unsloth", dtype)
        if fast and peer:
            summary[f"fast_best_{dtype}"]["x_unsloth_best"] = round(fast["tokens_per_second"] /
                                                                    peer["tokens_per_second"], 2)
            summary[f"unsloth_best_{dtype}"] = {"name": peer["name"], "tokens_per_second": peer["tokens_per_second"],
                                                "peak_reserved_gib": peer["peak_reserved_gib"]}
    for dtype in ("fp16", "bf16"):
        recipe, orig = ok.get(f"fast_2x1_{dtype}"), ok.get(f"original_{dtype}")
        if recipe and orig:
            summary[f"recipe_{dtype}"] = {
                "original_seconds_per_step": orig["seconds_per_step"], "fast_seconds_per_step":
                recipe["seconds_per_step"], "x_fewer_seconds": round(orig["seconds_per_step"] /
                                                                     recipe["seconds_per_step"], 2),
                "fast_peak_allocated_gib": recipe.get("peak_allocated_gib"),
                "original_peak_allocated_gib": orig.get("peak_allocated_gib")}
    corpus_orig = ok.get("original_corpus_fp16")
    for dtype in ("bf16", "fp16"):
        fast = best("fast", dtype, "corpus")
        if fast and corpus_orig:
            summary[f"corpus_fast_best_{dtype}"] = {
                "name": fast["name"], "tokens_per_second": fast["tokens_per_second"],
                "x_original_corpus_fp16": round(fast["tokens_per_second"] / corpus_orig["tokens_per_second"], 2)}
    return summary


def run_benchmark(out: Path, names: Sequence[str] | None = None, steps: int = 8, warmup: int = 3,
                  tiny: bool = False, twin_folder: str | None = None, timeout: float = 900,
                  memory_cap_gib: float | None = None, repeat: int = 1,
                  repeat_only: Sequence[str] | None = None) -> dict:
    """Measure every configuration (or ``names``) in its own process; write the JSON and the figure.

    ``memory_cap_gib``: every row runs with the GPU allocator capped there (see ``measure``), like an 8 GB card.
    ``repeat``: run the whole list that many times, round robin, so that slow spells of a shared host fall on
    every configuration alike; the summary takes each configuration's median (``merged_rows``).
    ``repeat_only``: only these configurations run again after the first round (the host-bound ones, whose
    time moves with the host's load; the GPU-bound rows are steady within ±1 %).
    """
    if repeat < 1:
        raise SystemExit(f"--repeat {repeat}: use 1 or more.")
    unknown = sorted(set(repeat_only or ()) - set(names or CONFIGS_BY_NAME))
    if unknown:
        raise SystemExit(f"--repeat-only {','.join(unknown)}: not in the list of configurations to run.")
    from utils.provenance import device_info, library_versions

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    configs = [config_by_name(n) for n in names] if names else CONFIGS
    if device == "cpu":
        configs = [replace(c, micro_batch=min(c.micro_batch, 2), seq_len=64) for c in configs
                   if c.impl != "unsloth" and not c.liger]
    folder = Path(twin_folder or tempfile.mkdtemp(prefix="twin-"))
    started = time.perf_counter()
    print(f"[benchmark] device {device}; twin in {folder}; {len(configs)} configurations", flush=True)
    twin = save_twin(folder, tiny, device)
    report: dict[str, Any] = {
        "label": TWIN_LABEL if not tiny else "tiny twin (logic test, not a result)",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m utils.benchmark run " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["run"] else "",
        **device_info(), "versions": library_versions(), "twin": twin,
        "method": (f"Each configuration in a fresh process on the same GPU, one after another: {warmup} warm-up "
                   f"optimizer steps, then the median of {steps}; tokens/s = real (non-padding) tokens of the "
                   "measured steps / their seconds; peaks = torch.cuda.max_memory_allocated / max_memory_reserved "
                   "over all steps. LoRA r=32, alpha=64 on q,k,v,o,gate,up,down; clip 0.5; GradScaler for fp16. "
                   "Synthetic rows: fixed random ids, 512 tokens, no padding. Corpus rows: the shipped training "
                   "examples (Llama-3.2 chat template, completion-only labels)."
                   + (f" The list ran {repeat} times, round robin"
                      + (f" ({', '.join(repeat_only)} only, after the first round)" if repeat_only else "")
                      + "; the summary takes each configuration's median." if repeat > 1 else "")
                   + (f" Every row ran with PyTorch's caching allocator capped at {memory_cap_gib} GiB "
                      "(torch.cuda.set_per_process_memory_fraction), as on an 8 GB card: past the cap it returns "
                      "cached blocks and retries (allocator.num_alloc_retries) or fails out of memory."
                      if memory_cap_gib else "")),
        "memory_cap_gib": memory_cap_gib,
        "repeat": repeat,
        "rows": [],
    }
    rounds = ((i, c) for i in range(repeat) for c in configs
              if i == 0 or not repeat_only or c.name in repeat_only)
    for round_index, config in rounds:
        env = EXPANDABLE if config.expandable_segments else {}
        row = run_child({"config": asdict(config), "model": str(folder), "steps": steps, "warmup": warmup,
                         "memory_cap_gib": memory_cap_gib}, timeout, env)
        if repeat > 1:
            row["repeat"] = round_index
        report["rows"].append(row)
        if row.get("ok"):
            print(f"[benchmark] {config.name:>30}: {row['tokens_per_second']:>9,.0f} tokens/s  "
                  f"{row['seconds_per_step']:.4f} s/step  peak {row.get('peak_allocated_gib')} GiB alloc / "
                  f"{row.get('peak_reserved_gib')} GiB reserved  loss {row['first_loss']:.3f} -> "
                  f"{row['last_loss']:.3f}  alloc retries {(row.get('allocator') or {}).get('num_alloc_retries')}",
                  flush=True)
        else:
            print(f"[benchmark] {config.name:>30}: {row.get('error')}", flush=True)
        report["summary"] = summarize(report["rows"])
        report["wall_seconds"] = round(time.perf_counter() - started, 1)
        save_json(report, out)
    print("[benchmark] summary " + json.dumps(report["summary"], indent=1), flush=True)
    return report


# --------------------------------------------------------------------------------------------
# Correctness: the fast path's loss against the original path's, on the embedded model
# --------------------------------------------------------------------------------------------


def run_correctness(out: Path, model: str = "embedded", steps: int = 50, seeds: Sequence[int] = (0, 1),
                    dtype: str = "fp16", timeout: float = 900) -> dict:
    """Train ``model`` ``steps`` steps on the corpus with both paths (same data order, each seed); losses."""
    from utils.provenance import device_info, library_versions

    report: dict[str, Any] = {
        "model": model, "steps": steps, "dtype": dtype,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **device_info(), "versions": library_versions(),
        "method": ("Both paths see the same examples in the same order (2 per optimizer step; the original as "
                   "1 x 2 micro-batches, the fast path as one padding-free row), the same cosine schedule (10 % "
                   f"warm-up, lr {THESIS.learning_rate}), paged AdamW 8-bit; the seed sets LoRA init and dropout. "
                   "Loss = mean over the step's completion tokens."),
        "runs": [],
    }
    for seed in seeds:
        for name in ("original_corpus_fp16", "fast_2x1_corpus_fp16"):
            config = replace(config_by_name(name), dtype=dtype, name=f"{name.split('_')[0]}_seed{seed}")
            env = EXPANDABLE if config.expandable_segments else {}
            row = run_child({"config": asdict(config), "model": model, "steps": steps, "warmup": 0,
                             "lr_schedule": True, "seed": seed}, timeout, env)
            print(f"[correctness] {config.name}: " + (f"loss {row['losses'][0]:.3f} -> {row['losses'][-1]:.3f}, "
                  f"{row['seconds_per_step']:.3f} s/step" if row.get("ok") else row.get("error", "")), flush=True)
            report["runs"].append(row)
            save_json(report, out)
    report["comparison"] = compare_losses(report["runs"])
    save_json(report, out)
    print("[correctness] " + json.dumps(report["comparison"]), flush=True)
    return report


def compare_losses(runs: Sequence[dict], tail: int = 10) -> dict[str, Any]:
    """Mean |difference| of per-step losses: fast vs original (same seed) and original vs original (seeds)."""
    ok = {r["name"]: r["losses"] for r in runs if r.get("ok")}
    seeds = sorted({n.split("seed")[1] for n in ok})

    def gap(a: list[float], b: list[float]) -> float:
        return round(statistics.mean(abs(x - y) for x, y in zip(a, b)), 4)

    out: dict[str, Any] = {}
    for s in seeds:
        if f"original_seed{s}" in ok and f"fast_seed{s}" in ok:
            out[f"fast_vs_original_seed{s}"] = gap(ok[f"original_seed{s}"], ok[f"fast_seed{s}"])
            out[f"final_mean_last{tail}_original_seed{s}"] = round(statistics.mean(ok[f"original_seed{s}"][-tail:]), 4)
            out[f"final_mean_last{tail}_fast_seed{s}"] = round(statistics.mean(ok[f"fast_seed{s}"][-tail:]), 4)
    if len(seeds) >= 2 and all(f"original_seed{s}" in ok for s in seeds[:2]):
        out["original_seed_vs_seed"] = gap(ok[f"original_seed{seeds[0]}"], ok[f"original_seed{seeds[1]}"])
    return out


# --------------------------------------------------------------------------------------------
# Several GPUs: the training entry point under `accelerate launch`
# --------------------------------------------------------------------------------------------


def ddp_command(gpus: int, model: str, output_dir: str, steps: int, batch: int) -> list[str]:
    """``python -m utils.training`` on one GPU, or under ``accelerate launch`` (DDP) on several."""
    args = ["-m", "utils.training", "--profile", "thesis", "--model", model, "--max-steps", str(steps),
            "--per-device-train-batch-size", str(batch), "--gradient-accumulation-steps", "1",
            "--warmup-steps", "5", "--eval-steps", "1000000", "--no-eval-on-start", "--save-steps", "1000000",
            "--logging-steps", "5", "--output-dir", output_dir]
    if gpus == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(gpus), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", *args]


def run_ddp(out: Path, model: str, gpus: int = 2, steps: int = 30, batch: int = 64, timeout: float = 900) -> dict:
    """Steady-state training tokens/s on 1 GPU and on ``gpus`` GPUs (DDP), same per-GPU configuration."""
    from utils.provenance import device_info, library_versions

    report: dict[str, Any] = {
        "model": model, "steps": steps, "per_device_batch": batch,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **device_info(),
        "gpu_count": torch.cuda.device_count(), "versions": library_versions(),
        "method": ("python -m utils.training (thesis profile: nf4_dq, LoRA r=32, paged AdamW 8-bit, fast path) with "
                   f"{batch} real examples per GPU per optimizer step; tokens/s = tokens seen by all ranks between "
                   "the end of step 3 and the last step / the seconds between them."),
        "runs": [],
    }
    for n in (1, gpus):
        folder = tempfile.mkdtemp(prefix=f"ddp{n}-")
        env = {**os.environ, **EXPANDABLE, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                                                     os.environ.get("PYTHONPATH")]))}
        if n == 1:
            env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        cmd = ddp_command(n, model, folder, steps, batch)
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=env)
        record = Path(folder) / "04_run.json"
        row: dict[str, Any] = {"gpus": n, "command": " ".join(cmd[1:]), "exit": proc.returncode,
                               "wall_seconds": round(time.perf_counter() - start, 1)}
        if proc.returncode == 0 and record.exists():
            training = json.loads(record.read_text())["training"]
            row.update({k: training.get(k) for k in ("steady_tokens_per_second", "tokens_per_second", "world_size",
                                                     "global_step", "tokens_trained", "peak_memory_gib",
                                                     "first_train_loss", "last_train_loss")})
        else:
            row["error"] = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        print(f"[ddp] {n} GPU(s): " + (f"{row.get('steady_tokens_per_second')} tokens/s (steady), "
              f"{row.get('tokens_per_second')} overall" if "error" not in row else row["error"]), flush=True)
        report["runs"].append(row)
        save_json(report, out)
    one, many = report["runs"][0].get("steady_tokens_per_second"), report["runs"][-1].get("steady_tokens_per_second")
    if one and many:
        report["speedup"] = round(many / one, 2)
        print(f"[ddp] speed-up {gpus} GPUs / 1 GPU: {report['speedup']}x", flush=True)
    save_json(report, out)
    return report


# --------------------------------------------------------------------------------------------
# Figures (from the saved JSON)
# --------------------------------------------------------------------------------------------

GROUP_STYLE = {
    "original": ("#d62728", "o", "Configuración original"),
    "recipe": ("#ff7f0e", "s", "Receta original (2 secuencias/paso), acelerada"),
    "throughput": ("#2ca02c", "D", "Camino rápido, micro-lote grande"),
    "ablation": ("#7f7f7f", "v", "Ablaciones"),
    "corpus": ("#1f77b4", "^", "Ejemplos reales del corpus"),
    "peer": ("#9467bd", "P", "Unsloth (referencia)"),
}


def plot_benchmark(report: dict):
    """Tokens/s against peak reserved memory, one numbered point per configuration, the 8 GiB line drawn."""
    import matplotlib.pyplot as plt

    rows = [r for r in merged_rows(report["rows"]) if r.get("peak_reserved_gib") is not None]
    fig, (ax, key) = plt.subplots(1, 2, figsize=(11.5, 5.4), gridspec_kw={"width_ratios": [2.1, 1]})
    seen, lines = set(), []
    for n, row in enumerate(rows, 1):
        known = CONFIGS_BY_NAME.get(row["name"])  # today's grouping of a known row
        group = known.group if known else row.get("group") or "ablation"
        color, marker, label = GROUP_STYLE.get(group, GROUP_STYLE["ablation"])
        filled = row["dtype"] == "bf16"
        ax.scatter(row["peak_reserved_gib"], row["tokens_per_second"], s=48, marker=marker,
                   facecolors=color if filled else "white", edgecolors=color, linewidths=1.4,
                   label=label if label not in seen else None, zorder=3)
        seen.add(label)
        ax.annotate(str(n), (row["peak_reserved_gib"], row["tokens_per_second"]), fontsize=7, xytext=(4, 2),
                    textcoords="offset points", color="#222222")
        lines.append(f"{n:>2}  {row['name']}  {row['tokens_per_second']:,.0f} tok/s")
    ax.axvline(CARD_GIB, color="#d62728", linestyle="--", linewidth=1.2, label="RTX 2070 SUPER (8 GiB)")
    ax.axvline(BUDGET_GIB, color="#d62728", linestyle=":", linewidth=1.0, label="Presupuesto útil (7,5 GiB)")
    original = next((r for r in rows if r["name"] == "original_fp16"), None)
    if original:
        goal = 28 * original["tokens_per_second"]
        ax.axhline(goal, color="#555555", linestyle="-.", linewidth=0.9, label="Objetivo: 28 × original (fp16)")
    ax.set_yscale("log")
    ax.set_xlabel("Memoria reservada máxima (GiB)")
    ax.set_ylabel("Tokens reales por segundo (escala log.)")
    ax.set_title(f"Velocidad de entrenamiento QLoRA, gemelo de Llama-3.2-3B\n{report.get('device', '')}, "
                 f"{report.get('date', '')[:10]} (relleno: bf16; vacío: fp16)"
                 + (f"; asignador limitado a {report['memory_cap_gib']:g} GiB".replace(".", ",") if report.get("memory_cap_gib") else ""),
                 fontsize=10)
    ax.legend(fontsize=7.5, loc="lower right")
    key.axis("off")
    key.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=7.2,
             transform=key.transAxes)
    fig.tight_layout()
    return fig


def plot_correctness(report: dict):
    """Per-step loss of the original and the fast path on the embedded model; their differences below."""
    import matplotlib.pyplot as plt

    runs = {r["name"]: r["losses"] for r in report["runs"] if r.get("ok")}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 6.0), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    styles = {"original": ("#d62728", "-"), "fast": ("#2ca02c", "--")}
    names = {"original": "Camino original", "fast": "Camino rápido"}
    for name, losses in runs.items():
        path, seed = name.split("_seed")
        color, line = styles[path]
        top.plot(range(1, len(losses) + 1), losses, color=color, linestyle=line, alpha=1.0 if seed == "0" else 0.45,
                 linewidth=1.3, label=f"{names[path]}, semilla {seed}")
    top.set_ylabel("Pérdida por paso")
    top.set_title(f"Camino rápido vs. original: misma pérdida ({report.get('model')}, {report.get('dtype')}, "
                  f"{report.get('device', '')})", fontsize=10)
    top.legend(fontsize=8)
    seeds = sorted({n.split("_seed")[1] for n in runs})
    for seed in seeds:
        a, b = runs.get(f"original_seed{seed}"), runs.get(f"fast_seed{seed}")
        if a and b:
            bottom.plot(range(1, len(a) + 1), [y - x for x, y in zip(a, b)], color="#2ca02c",
                        alpha=1.0 if seed == seeds[0] else 0.5, label=f"rápido − original, semilla {seed}")
    if len(seeds) >= 2 and all(f"original_seed{s}" in runs for s in seeds[:2]):
        a, b = runs[f"original_seed{seeds[0]}"], runs[f"original_seed{seeds[1]}"]
        bottom.plot(range(1, len(a) + 1), [y - x for x, y in zip(a, b)], color="#7f7f7f", linestyle=":",
                    label=f"original semilla {seeds[1]} − semilla {seeds[0]} (ruido)")
    bottom.axhline(0, color="black", linewidth=0.6)
    bottom.set_xlabel("Paso de optimización")
    bottom.set_ylabel("Diferencia de pérdida")
    bottom.legend(fontsize=7.5)
    fig.tight_layout()
    return fig


def load_report(path: str | Path) -> dict:
    """A saved benchmark, correctness or DDP JSON (a relative path is read from the repository root)."""
    return json.loads(resolve_path(path).read_text())


def speed_table(report: dict):
    """The measured rows as a table (Spanish headers, for the notebook and the thesis)."""
    import pandas as pd

    rows = [{
        "configuración": r["name"], "tipo": r["dtype"], "carga": r["workload"],
        "micro-lote × acum.": f"{r['micro_batch']}×{r['accumulation']}",
        "tokens/s": round(r["tokens_per_second"]), "s/paso": r["seconds_per_step"],
        "GiB asignados (pico)": r.get("peak_allocated_gib"), "GiB reservados (pico)": r.get("peak_reserved_gib"),
        "reintentos del asignador": (r.get("allocator") or {}).get("num_alloc_retries"),
    } for r in merged_rows(report["rows"])]
    return pd.DataFrame(rows).set_index("configuración")


def describe_speed(speed: dict, correctness: dict, ddp: dict, corpus: dict | None = None) -> str:
    """What the committed GPU measurements show, with every number read from them (Markdown, Spanish).

    ``corpus``: a run of the corpus rows (real examples) when the speed run has none.
    """
    s = speed["summary"]
    rows = {r["name"]: r for r in merged_rows(speed["rows"])}
    orig = rows["original_fp16"]
    lines = [f"Medido en {speed['device']} el {speed['date'][:10]} sobre el gemelo de Llama-3.2-3B "
             "(pesos aleatorios: la velocidad y la memoria no dependen de los valores)."]
    if speed.get("memory_cap_gib"):
        cap = f"{speed['memory_cap_gib']:g}".replace(".", ",")
        lines[0] += (f" Cada fila corrió con el asignador de PyTorch limitado a {cap} GiB, como en "
                     "una tarjeta de 8 GB: al llegar al límite devuelve bloques en caché y reintenta (columna "
                     "«reintentos del asignador»).")
    for dtype in ("bf16", "fp16"):
        best = s.get(f"fast_best_{dtype}")
        if best:
            lines.append(f"- Mejor configuración rápida en {dtype} dentro de {BUDGET_GIB} GiB reservados: "
                         f"`{best['name']}`, {best['tokens_per_second']:,.0f} tokens/s con "
                         f"{best['peak_reserved_gib']} GiB, **{best['x_original_fp16']}×** la configuración "
                         f"original ({orig['tokens_per_second']:,.0f} tokens/s, fp16).")
    for dtype in ("bf16", "fp16"):
        best, peer = s.get(f"fast_best_{dtype}"), s.get(f"unsloth_best_{dtype}")
        if best and peer:
            lines.append(f"- Unsloth en la misma corrida ({dtype}, dentro del mismo presupuesto): `{peer['name']}`, "
                         f"{peer['tokens_per_second']:,.0f} tokens/s; el camino rápido hace "
                         f"**{best['x_unsloth_best']}×** eso (objetivo del proyecto: 1,1×).")
    recipe = s.get("recipe_fp16")
    if recipe:
        lines.append(f"- La receta original (2 secuencias por paso, fp16): {recipe['original_seconds_per_step']} → "
                     f"{recipe['fast_seconds_per_step']} s por paso (**{recipe['x_fewer_seconds']}×** menos; objetivo "
                     f"del proyecto: 3×, {'alcanzado' if recipe['x_fewer_seconds'] >= 3 else '**no alcanzado**'} en "
                     f"esta corrida), pico asignado {recipe['original_peak_allocated_gib']} → "
                     f"{recipe['fast_peak_allocated_gib']} GiB. Los dos pasos de 2 secuencias están limitados por la "
                     "CPU de la máquina, compartida: su cociente varía de una corrida a otra (ver "
                     "`results/04_speed_notes.md`).")
        torch_ops = rows.get("fast_2x1_torch_kernels_fp16")
        if torch_ops:
            from utils.fastpath import FastPathOptions

            lines[-1] += (f" Con las operaciones de PyTorch en lugar de los núcleos de Liger (lo que el camino rápido "
                          f"elige hoy para pasadas de menos de {FastPathOptions().small_pass_tokens} tokens): "
                          f"{torch_ops['seconds_per_step']} s por "
                          f"paso, **{recipe['original_seconds_per_step'] / torch_ops['seconds_per_step']:.2f}×** "
                          "menos.")
    corpus_run = corpus if corpus is not None else speed
    best = corpus_run["summary"].get("corpus_fast_best_bf16")
    if best:
        where = "" if corpus is None else f"; {corpus_run['device']}, {corpus_run['date'][:10]}"
        lines.append(f"- Con los ejemplos reales del corpus (sin relleno{where}): `{best['name']}`, "
                     f"{best['tokens_per_second']:,.0f} tokens reales/s")
        if best.get("x_original_corpus_fp16"):
            lines[-1] += (f", **{best['x_original_corpus_fp16']}×** la configuración original con los mismos "
                          "ejemplos (cortos: el original procesa uno por micro-lote)")
        lines[-1] += "."
    comp = correctness.get("comparison", {})
    if "fast_vs_original_seed0" in comp:
        noise = comp.get("original_seed_vs_seed")
        word = "menor" if noise is not None and comp["fast_vs_original_seed0"] <= noise else "mayor"
        lines.append(f"- Corrección ({correctness['model']}, {correctness['steps']} pasos, {correctness['dtype']}; "
                     f"{correctness.get('device', 'GPU')}, {str(correctness.get('date', ''))[:10]}): "
                     f"diferencia media por paso rápido–original {comp['fast_vs_original_seed0']}, {word} que la "
                     f"diferencia entre dos semillas del original ({noise}).")
        if str(correctness.get("date", "")) < str(speed.get("date", "")):
            lines[-1] += (" Se midió antes que esta corrida de velocidad; los cambios posteriores del camino rápido, "
                          "si los hay, están cubiertos por pruebas que comparan pérdida y gradientes con PEFT.")
    if ddp.get("speedup"):
        lines.append(f"- Con `accelerate launch` en {ddp['runs'][-1]['gpus']} GPU ({ddp.get('device', 'GPU')}, "
                     f"{str(ddp.get('date', ''))[:10]}): **{ddp['speedup']}×** los tokens/s de una GPU con la misma "
                     "configuración por GPU.")
    goal = 28 * orig["tokens_per_second"]
    best = max((s.get(f"fast_best_{d}", {}).get("tokens_per_second", 0) for d in ("bf16", "fp16")), default=0)
    lines.append(f"- Objetivo de velocidad del proyecto: 28× el original = {goal:,.0f} tokens/s. "
                 + ("Alcanzado en esta corrida." if best >= goal else f"**No alcanzado**: el mejor llega a "
                    f"{best / goal:.0%} del objetivo.")
                 + " El original está limitado por la CPU de la máquina, que varía de una corrida a otra, y el "
                   "cociente con él: en corridas de otro día u otra máquina puede quedar por encima o por debajo "
                   "(todas las corridas, en `results/04_speed_notes.md`).")
    return "\n".join(lines)


def draw_figures(path: Path) -> list[Path]:
    """Redraw the figure of a benchmark or correctness JSON into ``figures/`` (a tiny test run: next to it)."""
    from utils.plotting import save_figure, set_style

    set_style()
    report = json.loads(path.read_text())
    if "tiny" in report.get("label", "") or report.get("model") not in (None, "embedded"):
        os.environ["QLORA_FIGURES_DIR"] = str(path.parent)
    if "runs" in report:
        return [save_figure(plot_correctness(report), CORRECTNESS_FIGURE, show=False)]
    return [save_figure(plot_benchmark(report), FIGURE, show=False)]


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _names(text: str | None) -> list[str] | None:
    """A comma-separated command-line list of configuration names (None when not given)."""
    return [name.strip() for name in text.split(",")] if text else None


def main(argv: list[str] | None = None) -> int:
    """``run``, ``correctness``, ``figure``, ``list`` (and the internal ``child``)."""
    parser = argparse.ArgumentParser(prog="python -m utils.benchmark", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="measure the configurations on this machine's GPU")
    run.add_argument("--out", default=DEFAULT_OUT, help=f"JSON to write (default {DEFAULT_OUT})")
    run.add_argument("--only", help="comma-separated configuration names (default: all; see `list`)")
    run.add_argument("--steps", type=int, default=8, help="measured optimizer steps per configuration")
    run.add_argument("--warmup", type=int, default=3, help="warm-up optimizer steps per configuration")
    run.add_argument("--twin-folder", help="where the bf16 twin is saved (reused if present)")
    run.add_argument("--tiny", action="store_true", help="a 2-layer twin on the CPU: tests the logic")
    run.add_argument("--no-figure", action="store_true", help="write the JSON only")
    run.add_argument("--repeat", type=int, default=1, help="run the list this many times, round robin; the "
                     "summary takes each configuration's median (default 1)")
    run.add_argument("--repeat-only", help="comma-separated: only these configurations run again after the first "
                     "round (default: all)")
    run.add_argument("--memory-cap-gib", type=float, help="cap the GPU allocator of every row (e.g. 7.5: an 8 GB "
                     "card less its CUDA context)")
    cor = sub.add_parser("correctness", help="fast vs original loss on the embedded model")
    cor.add_argument("--out", default=DEFAULT_CORRECTNESS_OUT)
    cor.add_argument("--model", default="embedded")
    cor.add_argument("--steps", type=int, default=50)
    cor.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"))
    cor.add_argument("--no-figure", action="store_true")
    ddp = sub.add_parser("ddp", help="training tokens/s on 1 GPU and on N GPUs (accelerate launch, DDP)")
    ddp.add_argument("--model", required=True, help="model folder or name (e.g. the saved twin)")
    ddp.add_argument("--gpus", type=int, default=2)
    ddp.add_argument("--steps", type=int, default=30)
    ddp.add_argument("--batch", type=int, default=64, help="examples per GPU per optimizer step")
    ddp.add_argument("--out", default="results/04_ddp_scaling.json")
    fig = sub.add_parser("figure", help="redraw the figure of a saved JSON")
    fig.add_argument("json")
    sub.add_parser("list", help="list the configurations")
    prof = sub.add_parser("profile", help="profile one optimizer step of configurations (GPU kernels table)")
    prof.add_argument("names", help="comma-separated configuration names")
    prof.add_argument("--model", required=True, help="model folder (e.g. the saved twin) or name")
    prof.add_argument("--shapes", action="store_true", help="group the ops by input shape")
    prof.add_argument("--rows", type=int, default=30, help="table rows")
    prof.add_argument("--sort", choices=("gpu", "cpu"), default="gpu",
                      help="ops by GPU time, or by CPU time followed by a cProfile of Python functions")
    child = sub.add_parser("child", help="internal: measure one configuration given as JSON")
    child.add_argument("task")
    args = parser.parse_args(argv)
    if args.command == "child":
        from utils.memory import RESULT_MARK

        print(RESULT_MARK + json.dumps(_child(json.loads(args.task)), default=str), flush=True)
        return 0
    if args.command == "list":
        for c in CONFIGS:
            print(f"{c.name:32} {c.impl:8} {c.dtype} {c.micro_batch}x{c.accumulation}x{c.seq_len} {c.workload}")
        return 0
    if args.command == "profile":
        if not torch.cuda.is_available():
            print("error: the profile times GPU kernels and needs a CUDA GPU (torch.cuda.is_available() is False "
                  "here).", file=sys.stderr)
            return 1
        for name in _names(args.names):
            config = config_by_name(name)
            env = {**os.environ, **(EXPANDABLE if config.expandable_segments else {})}
            code = (f"import json,sys; from utils.benchmark import *; r=profile_step(config_by_name({name!r}), "
                    f"{args.model!r}, rows={args.rows}, shapes={args.shapes}, sort={args.sort!r}); print(r['table']); print('STEP', r['seconds_per_step'], 'GPU busy ms', "
                    "r['gpu_busy_ms'])")
            subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, check=False)
        return 0
    if args.command == "ddp":
        run_ddp(resolve_path(args.out), args.model, args.gpus, args.steps, args.batch)
        return 0
    if args.command == "figure":
        for path in draw_figures(resolve_path(args.json)):
            print(f"wrote {path}")
        return 0
    if args.command == "run":
        if not torch.cuda.is_available() and not args.tiny:
            print("error: the benchmark needs a CUDA GPU (torch.cuda.is_available() is False here). Run it on a "
                  "GPU machine, or pass --tiny to test the logic on this CPU.", file=sys.stderr)
            return 1
        out = resolve_path(args.out)
        names = _names(args.only)
        run_benchmark(out, names, args.steps, args.warmup, args.tiny, args.twin_folder,
                      memory_cap_gib=args.memory_cap_gib, repeat=args.repeat,
                      repeat_only=_names(args.repeat_only))
    else:
        out = resolve_path(args.out)
        run_correctness(out, args.model, args.steps, dtype=args.dtype)
    if not args.no_figure:
        for path in draw_figures(out):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
