"""One configuration, measured in its own process: load the model its way, train it, time the steps, read the peaks.

``measure`` runs in a fresh ``python -m utils.speed.benchmark child`` process (``run_child`` starts it): a manual
loop (``utils.train_step.run_optimizer_steps``: autocast for the Hugging Face path, GradScaler for fp16, clip 0.5,
the configuration's optimizer), ``warmup`` steps, then the median of ``steps`` optimizer steps.
"""

from __future__ import annotations

import cProfile
import importlib.metadata
import io
import pstats
import statistics
import subprocess
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict
from typing import Any, Callable

import torch
from peft import get_peft_model, prepare_model_for_kbit_training
from torch.profiler import ProfilerActivity, profile
from transformers import get_cosine_schedule_with_warmup

from utils.childproc import ChildProcessFailed, run_module_child
from utils.config import THESIS
from utils.device import DTYPES, default_device
from utils.memory.budget import (
    OutsideAllocatorTracker,
    PinnedMemoryOverBudget,
    cap_gpu_memory,
    host_memory_stats,
    paged_state_bytes,
    pinned_host_bytes,
    strict_budget_use,
)
from utils.modeling import build_lora_config, load_model
from utils.speed.benchmark.configs import BenchConfig
from utils.speed.benchmark.strict import effective_alloc_conf
from utils.speed.benchmark.workloads import corpus_examples, corpus_steps, synthetic_batches
from utils.speed.fastpath import FastPathError, causal_lm_loss, enable_fast_path
from utils.speed.graphs import GraphedStep
from utils.train_step import Batch, StepLog, build_optimizer, run_optimizer_steps
from utils.units import GIB

MODULE = "utils.speed.benchmark"  # the child processes run ``python -m utils.speed.benchmark child <task>``
LossFn = Callable[[Batch, int], torch.Tensor]


def _fast_loss(peft_model, fused: bool = True) -> LossFn:
    """The loss of the fast path: the backbone's last hidden state, then the loss over the label positions only
    (``fused``: Liger's fused linear cross-entropy where it runs)."""
    backbone_forward = peft_model.get_base_model().model

    def loss_fn(batch: Batch, num_items: int) -> torch.Tensor:
        hidden = backbone_forward(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  position_ids=batch.position_ids).last_hidden_state
        return causal_lm_loss(peft_model, hidden, batch.labels, num_items, fused=fused)

    return loss_fn


def _hf_loss(peft_model, dtype: torch.dtype, autocast_device: str | None) -> LossFn:
    """The loss of the Hugging Face path: the model's own forward, normalised over ``num_items``, under autocast to
    ``dtype`` on ``autocast_device`` (None: no autocast, as in fp32 and in the CPU's check)."""
    def hf_loss(batch: Batch, num_items: int) -> torch.Tensor:
        with (torch.autocast(autocast_device, dtype=dtype) if autocast_device else nullcontext()):
            out = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             position_ids=batch.position_ids, labels=batch.labels,
                             num_items_in_batch=torch.tensor(num_items, device=batch.input_ids.device))
        return out.loss

    return hf_loss


def load_model_for(config: BenchConfig, model: str, device: str):
    """Load ``model`` (a folder or name) the way ``config`` trains it; returns (peft model, loss function, details)."""
    dtype = DTYPES[config.dtype]
    cuda = device.startswith("cuda")
    quantization = "nf4_dq" if cuda else None
    if config.impl == "hf" and config.liger:
        # Liger: optional (CUDA installs), imported only for the rows that use it
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
        enable_fast_path(peft_model, dtype if cuda else torch.float32, config.fast)
        # measure() adds the fast path's resolved choices after the first step (some are settled there)
        alloc_conf = effective_alloc_conf(torch.__version__)
        return peft_model, _fast_loss(peft_model, config.fused_loss), {"alloc_conf": alloc_conf}
    autocast_device = "cuda" if cuda and dtype != torch.float32 else None
    return peft_model, _hf_loss(peft_model, dtype, autocast_device), {"prepare": config.prepare, "liger": config.liger}


def load_unsloth_for(config: BenchConfig, model: str):
    """Unsloth's FastLanguageModel on the same weights, LoRA and loop (the peer row)."""
    # Unsloth: optional (the peer row only). It must come before transformers, peft and trl, which it patches as
    # it loads: ``python -m utils.speed.benchmark`` imports it first in the child processes that measure it
    import unsloth  # noqa: F401
    from unsloth import FastLanguageModel

    dtype = DTYPES[config.dtype]
    base, _ = FastLanguageModel.from_pretrained(model, max_seq_length=config.max_seq_length, dtype=dtype,
                                                load_in_4bit=True)
    peft_model = FastLanguageModel.get_peft_model(
        base, r=THESIS.lora_r, lora_alpha=THESIS.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=list(THESIS.target_modules), bias="none", use_gradient_checkpointing="unsloth")

    def loss_fn(batch: Batch, num_items: int) -> torch.Tensor:
        with torch.autocast("cuda", dtype=dtype):
            return peft_model(input_ids=batch.input_ids, labels=batch.labels).loss

    return peft_model, loss_fn, {"unsloth": importlib.metadata.version("unsloth")}


def _cap_gpu_memory(device: str, memory_cap_gib: float | None) -> None:
    """Start CUDA and cap what PyTorch's caching allocator may reserve (``memory_cap_gib``; None: no cap)."""
    torch.cuda.init()
    if memory_cap_gib:
        total_memory = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, memory_cap_gib * GIB / total_memory), device)


def _step_plan(config: BenchConfig, vocab: int, total: int, seed: int,
               examples: list[dict] | None) -> list[list[Batch]]:
    """The micro-batches of each of ``total`` optimizer steps: the corpus in one seeded order, or fixed rows."""
    if config.workload == "corpus":
        examples = examples if examples is not None else corpus_examples(
            "llama-3.2" if vocab >= 128000 else "embedded", seed=0, vocab=vocab if vocab < 49152 else None)
        return corpus_steps(config, examples, total)
    fixed = synthetic_batches(config, vocab, seed)
    return [fixed] * total


def _graphed(config: BenchConfig, peft_model, loss_fn: LossFn, params: list, scaler,
             plan: list[list[Batch]]) -> LossFn:
    """The fast path's step replayed from CUDA graphs where the configuration asks for it (``fast.cuda_graphs``),
    every shape the plan needs captured now, before the timed steps; else ``loss_fn`` itself."""
    if config.impl != "fast" or not config.fast.cuda_graphs:
        return loss_fn
    step = GraphedStep(peft_model, params, scaler, max_tokens=config.micro_batch * config.max_seq_length)
    step.prepare([batch for micro in plan for batch in micro])
    return step


def _fast_details(peft_model, loss_fn: LossFn) -> dict[str, Any]:
    """The fast path's resolved choices and, for a graphed step, its graphs (shapes, capture time, pool memory)."""
    details = {"fast_path": peft_model.get_base_model().model._fast_path.describe()}
    if hasattr(loss_fn, "describe"):
        details["cuda_graphs"] = loss_fn.describe()
    return details


def _gpu_peaks() -> dict[str, Any]:
    """The allocator's counters and the peaks of allocated and reserved memory since the last reset."""
    stats = torch.cuda.memory_stats()
    return {
        "allocator": {k: stats.get(k) for k in ("num_alloc_retries", "inactive_split_bytes.all.peak",
                                                "active_bytes.all.peak", "reserved_bytes.all.peak")},
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3),
    }


def _measured_row(config: BenchConfig, device: str, details: dict, load_seconds: float, log: StepLog,
                  steps: int, params: list) -> dict[str, Any]:
    """The row of one measured configuration: its fields, then times, tokens and losses of the steps."""
    measured_tokens = log.tokens[log.warmup:]
    return {
        **asdict(config), "ok": True, "device": device, "details": details,
        "load_seconds": round(load_seconds, 1), "steps": steps, "warmup_steps": log.warmup,
        "seconds_per_step": round(log.seconds_per_step, 5),
        "seconds_per_step_all": [round(t, 4) for t in log.seconds],
        # real tokens over real time: sum of tokens / sum of seconds of the measured steps
        "tokens_per_second": round(log.tokens_per_second, 1),
        "tokens_per_step": round(statistics.mean(measured_tokens), 1),
        "losses": log.losses, "first_loss": log.losses[0], "last_loss": log.losses[-1],
        "label_tokens_per_step": log.label_tokens,
        "lora_parameters": sum(p.numel() for p in params),
    }


def _start_budget(device: str, budget: dict | None, memory_cap_gib: float | None) -> tuple[Any, Any]:
    """Cap the allocator before the model loads: the strict budget's first-step cap and its outside-allocator
    tracker (baseline: CUDA started, no model yet), or the plain ``memory_cap_gib``; ``(limits, tracker)``."""
    if not budget:
        _cap_gpu_memory(device, memory_cap_gib)
        return None, None
    limits = cap_gpu_memory(budget["card_gib"], budget["display_reserve_gib"], device=device)
    limits["first_step_cap_gib"] = limits["allocator_budget_gib"]
    return limits, OutsideAllocatorTracker(device)


def measure(config: BenchConfig, model: str, steps: int, warmup: int, device: str | None = None,
            lr_schedule: bool = False, seed: int = 0, examples: list[dict] | None = None,
            step_hook: Any = None, memory_cap_gib: float | None = None,
            budget: dict | None = None) -> dict[str, Any]:
    """Train ``config`` for ``warmup + steps`` optimizer steps; times, peaks and losses.

    ``seed`` sets the LoRA initialisation and dropout; the data (fixed random rows, or the corpus in one
    seeded order) is the same for every seed, so two seeds measure run-to-run noise. ``memory_cap_gib`` caps
    what PyTorch's caching allocator may reserve on the GPU, as a smaller card would: past it the allocator
    returns cached blocks to the driver and retries (counted in ``allocator.num_alloc_retries``), or the row
    fails out of memory.

    ``budget`` (the strict budget, ``strict.STRICT8``: card, display reserve, pinned limit): the first step's cap
    is the card less this process's CUDA context (measured) and the display reserve
    (``utils.memory.budget.cap_gpu_memory``); after it, the cap also leaves out the GPU memory found outside the
    allocator (``tightened_cap_gib``) and the peaks restart. The row records each part of its use (``budget``);
    one that pins more host memory than allowed stops after its first step (``ok`` False, its use so far).
    """
    device = device or str(default_device())
    cuda = device.startswith("cuda")
    _prefer_blas(config, cuda)
    torch.manual_seed(seed)
    limits, tracker = _start_budget(device, budget, memory_cap_gib) if cuda else (None, None)
    started = time.perf_counter()
    if config.impl == "unsloth":
        peft_model, loss_fn, details = load_unsloth_for(config, model)
    else:
        peft_model, loss_fn, details = load_model_for(config, model, device)
    load_seconds = time.perf_counter() - started
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, config.optim)
    total = warmup + steps
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, total // 10), total) if lr_schedule else None
    scaler = torch.amp.GradScaler("cuda") if (cuda and config.dtype == "fp16") else None
    plan = _step_plan(config, peft_model.config.vocab_size, total, seed, examples)
    peft_model.train()
    loss_fn = _graphed(config, peft_model, loss_fn, params, scaler, plan)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        # pinned memory that loading staged is not training's
        getattr(torch.cuda, "reset_peak_host_memory_stats", lambda: None)()
    use = (lambda: _budget_use(budget, limits, tracker, optimizer, peft_model, config)) if limits else None
    hook = _budget_hook(use, step_hook, lambda current: _tighten_cap(limits, current, device)) if use else step_hook
    try:
        log = run_optimizer_steps(plan, loss_fn, params, optimizer, device, scaler=scaler, scheduler=scheduler,
                                  warmup=warmup, step_hook=hook)
    except PinnedMemoryOverBudget as exc:
        return {**asdict(config), "ok": False, "error": f"out of budget: {exc}", "budget": use(),
                "alloc_conf": effective_alloc_conf(torch.__version__), **_gpu_peaks()}
    out = _measured_row(config, device, details, load_seconds, log, steps, params)
    out["alloc_conf"] = effective_alloc_conf(torch.__version__)
    if config.impl == "fast":
        out["details"].update(_fast_details(peft_model, loss_fn))
    if cuda:
        out.update(_gpu_peaks())
    if use:
        out["budget"] = use()
    return out


BLAS_CHOICES = ("", "cublas", "cublaslt")


def _prefer_blas(config: BenchConfig, cuda: bool) -> None:
    """Set the row's BLAS library for its process (each row runs in its own); on a CPU there is none to choose."""
    if config.blas not in BLAS_CHOICES:
        raise ValueError(f"{config.name}: blas={config.blas!r}: use one of {BLAS_CHOICES} ('' = PyTorch's default)")
    if config.blas and cuda:
        torch.backends.cuda.preferred_blas_library(config.blas)


def _pinned_buffers(peft_model, config: BenchConfig) -> list[torch.Tensor]:
    """The fast path's pinned checkpoint buffers (``CheckpointStore.buffers``); none for the other paths."""
    if config.impl != "fast":
        return []
    return list(peft_model.get_base_model().model._fast_path.store.buffers.values())


def _budget_use(budget: dict, limits: dict, tracker: OutsideAllocatorTracker, optimizer, peft_model,
                config: BenchConfig) -> dict[str, Any]:
    """The row's use of the strict budget so far (``utils.memory.budget.strict_budget_use``) and how it was read."""
    tracker.sample()
    pinned = pinned_host_bytes(_pinned_buffers(peft_model, config), host_memory_stats())
    use = strict_budget_use(
        peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB, outside_allocator_gib=tracker.peak / GIB,
        cuda_context_gib=limits["cuda_context_gib"], pinned_host_gib=pinned / GIB,
        paged_optimizer_gib=paged_state_bytes(optimizer) / GIB, card_gib=budget["card_gib"],
        display_reserve_gib=budget["display_reserve_gib"], pinned_limit_gib=budget["pinned_limit_gib"])
    return {**use, "allocator_budget_gib": limits["allocator_budget_gib"],
            "allocator_budget_first_step_gib": limits["first_step_cap_gib"],
            "first_step_peak_reserved_gib": limits.get("first_step_peak_reserved_gib"),
            "cuda_context_method": limits["cuda_context_method"]}


def _tighten_cap(limits: dict, current: dict, device: str) -> None:
    """After the first step: lower the allocator's cap by the memory found outside it (paged optimizer states,
    kernels loaded since), as the small card would, and restart the peaks (they now cover the later steps)."""
    cap_gib = tightened_cap_gib(current)
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(max(0.0, min(1.0, cap_gib * GIB / total)), device)
    limits["first_step_peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 3)
    limits["allocator_budget_gib"] = round(cap_gib, 3)
    torch.cuda.reset_peak_memory_stats()


def tightened_cap_gib(current: dict) -> float:
    """What the allocator may reserve once the memory outside it is known: the card's usable memory less the
    context and that memory (at least the paged optimizer states counted)."""
    outside = max(current["outside_allocator_gib"], current["paged_optimizer_gib"])
    return current["device_limit_gib"] - current["cuda_context_gib"] - outside


def _budget_hook(use: Callable[[], dict], step_hook: Any = None,
                 tighten: Callable[[dict], None] | None = None) -> Callable[[int], None]:
    """Before each step (and after the last): sample the memory outside the allocator. After the first step, stop
    a row whose pinned host memory is over the limit (its checkpoint buffers exist by then), else ``tighten``."""
    def hook(step: int) -> None:
        current = use()  # samples the tracker
        if step == 1:
            if current["pinned_host_gib"] > current["pinned_limit_gib"]:
                raise PinnedMemoryOverBudget(f"{current['pinned_host_gib']:.2f} GiB of pinned host memory after the "
                                             f"first step, over the {current['pinned_limit_gib']:g} GiB limit")
            if tighten is not None:
                tighten(current)
        if step_hook is not None:
            step_hook(step)

    return hook


def profile_step(config: BenchConfig, model: str, warmup: int = 2, rows: int = 30,
                 shapes: bool = False, sort: str = "gpu") -> dict[str, Any]:
    """One optimizer step of ``config`` under torch.profiler: the kernels (or, ``shapes``, ops by shape) by GPU time.

    ``sort="cpu"``: ops by their own CPU time, then (a second step under cProfile) Python functions by their own
    time: where a launch-bound step spends its CPU.
    """
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


def child(task: dict) -> dict:
    """The ``child`` command: one measurement (or, ``task["profile"]``, one profiled step); a failure is its row."""
    config = BenchConfig.from_dict(task["config"])
    if task.get("profile"):
        return profile_step(config, task["model"], **task["profile"])
    try:
        return measure(config, task["model"], task["steps"], task["warmup"], lr_schedule=task.get("lr_schedule", False),
                       memory_cap_gib=task.get("memory_cap_gib"), budget=task.get("budget"),
                       seed=task.get("seed", 0))
    except torch.cuda.OutOfMemoryError as exc:
        return {**asdict(config), "ok": False, "error": f"out of memory: {str(exc).splitlines()[0]}"}
    except FastPathError as exc:  # a setting this machine cannot run (e.g. CUDA graphs on a CPU): the row's error
        return {**asdict(config), "ok": False, "error": f"fast path: {exc}"}
    except ImportError as exc:
        if config.impl == "unsloth":
            return {**asdict(config), "ok": False, "skipped": True, "error": f"unsloth not installed ({exc})"}
        raise


def run_child(task: dict, timeout: float = 900, env: dict | None = None) -> dict:
    """Run one measurement in a fresh ``python -m utils.speed.benchmark child`` process; a failure becomes its row."""
    config = task["config"]
    try:
        return run_module_child(MODULE, task, timeout, env)
    except subprocess.TimeoutExpired:
        return {**config, "ok": False, "error": f"stopped after {timeout:.0f} s"}
    except ChildProcessFailed as exc:
        return {**config, "ok": False, "error": f"child process failed ({exc}"}
