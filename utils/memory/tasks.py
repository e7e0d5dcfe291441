"""The child side of the measurements: one task per ``python -m utils.memory child <task as JSON>`` process.

Tasks: ``weights`` (load one format, measure what it holds, optionally the completion loss), ``train_step``
(LoRA optimizer steps on random tokens through ``utils.train_step``; peak memory), ``save_twin``,
``quantize_cache`` and ``quant_errors``. On a GPU the measure is the caching allocator's view
(``torch.cuda.memory_allocated`` / ``max_memory_allocated`` / ``max_memory_reserved``, without the CUDA
context); on a CPU the process's resident set and its high-water mark (``utils.memory.process``).
"""

from __future__ import annotations

import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

# What loading would import lazily is imported here, before any measurement, so that the modules' own memory is
# in each measurement's baseline and not counted as weights.
import bitsandbytes  # noqa: F401
import torch
import transformers.integrations.bitsandbytes  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401
import transformers.quantizers.quantizer_bnb_4bit  # noqa: F401
import transformers.quantizers.quantizer_bnb_8bit  # noqa: F401
from peft import get_peft_model, prepare_model_for_kbit_training

from utils.config import THESIS
from utils.data import load_records
from utils.device import default_device, dtype_name, torch_dtype
from utils.memory.analytic import QUANTIZED, TRAIN_VARIANTS
from utils.memory.budget import apply_gpu_memory_cap_from_env
from utils.memory.loading import (
    cache_is_fresh,
    load_for_measurement,
    load_quantized_cached,
    quantized_cache_folder,
    reference_model,
    save_quantized_cache,
)
from utils.memory.measure import task_id
from utils.memory.process import peak_rss_bytes, release_free_memory, reset_peak_rss, rss_bytes, touch_parameters
from utils.memory.quality import completion_loss, quantization_errors
from utils.memory.tensors import quant_state_bytes, unpacked_numel
from utils.modeling import build_lora_config, build_tiny_twin, build_twin, load_tokenizer
from utils.train_step import Batch, StepLog, build_optimizer, run_optimizer_steps, tensor_bytes


def _device_of(task: dict) -> str:
    return task.get("device") or str(default_device())


def _gpu_snapshot() -> dict[str, int]:
    return {
        "allocated": torch.cuda.memory_allocated(),
        "reserved": torch.cuda.memory_reserved(),
        "peak_allocated": torch.cuda.max_memory_allocated(),
        "peak_reserved": torch.cuda.max_memory_reserved(),
    }


# --------------------------------------------------------------------------------------------
# weights: one format loaded, what it holds
# --------------------------------------------------------------------------------------------


def _load_and_measure(task: dict, device: str) -> tuple[Any, dict[str, Any]]:
    """Load the task's format and measure what the load added (allocator on a GPU, resident set on a CPU)."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
        before = _gpu_snapshot()
    else:
        release_free_memory()
        reset_peak_rss()
        before = rss_bytes()
    start = time.perf_counter()
    model = load_for_measurement(task["model"], task["format"], device, task.get("compute_dtype"))
    out: dict[str, Any] = {"load_seconds": round(time.perf_counter() - start, 2)}
    if cuda:
        torch.cuda.synchronize()
        after = _gpu_snapshot()
        out.update(measure="torch.cuda.memory_allocated", before=before["allocated"], after=after["allocated"],
                   weights_bytes=after["allocated"] - before["allocated"],
                   peak_load_bytes=after["peak_allocated"] - before["allocated"], reserved_bytes=after["reserved"])
        return model, out
    hwm = peak_rss_bytes()
    touch_parameters(model)
    release_free_memory()
    after = rss_bytes()
    out.update(measure="RSS del proceso (VmRSS)", before=before["rss"], after=after["rss"],
               weights_bytes=after["rss"] - before["rss"], weights_anon_bytes=after["anon"] - before["anon"],
               weights_file_bytes=after["file"] - before["file"],
               peak_load_bytes=max(hwm, after["rss"]) - before["rss"])
    return model, out


def _held_by(model) -> dict[str, Any]:
    """What the loaded tensors hold by the library's own counts (footprint, bitsandbytes constants, numel)."""
    return {
        "footprint_bytes": model.get_memory_footprint(),
        "quant_state_bytes": quant_state_bytes(model),
        "parameters": sum(unpacked_numel(p) for p in model.parameters()),
        "parameters_raw_numel": sum(p.numel() for p in model.parameters()),
        "other_dtype": dtype_name(model.model.embed_tokens.weight.dtype),
    }


def _evaluate(model, task: dict) -> dict:
    """Completion loss on the first ``eval_examples`` records of ``eval_file`` (-1: all), with its time."""
    records = load_records(task["eval_file"])
    n = task["eval_examples"]
    records = records if n < 0 else records[:n]
    tokenizer = load_tokenizer(task["tokenizer"])
    start = time.perf_counter()
    result = completion_loss(model, tokenizer, [r["messages"] for r in records],
                             task.get("max_seq_length", THESIS.max_seq_length))
    return {**result, "seconds": round(time.perf_counter() - start, 2)}


def _task_weights(task: dict) -> dict:
    """Load one format, measure what the weights hold, optionally evaluate the completion loss."""
    device = _device_of(task)
    fmt = task["format"]
    model, measured = _load_and_measure(task, device)
    out: dict[str, Any] = {"format": fmt, "device": device, **measured, **_held_by(model)}
    if task.get("eval_file") and task.get("eval_examples", 0) != 0:
        out["eval"] = _evaluate(model, task)
    if task.get("save_cache") and not device.startswith("cuda") and fmt in QUANTIZED:
        save_quantized_cache(model, task["model"], fmt)  # after measuring: later CPU steps reload it
    return out


# --------------------------------------------------------------------------------------------
# train_step: LoRA optimizer steps on random tokens, peak memory
# --------------------------------------------------------------------------------------------


def _memory_now(cuda: bool) -> int:
    """Bytes held now: allocated on the GPU, resident (after giving free heap pages back) on a CPU."""
    if cuda:
        return torch.cuda.memory_allocated()
    release_free_memory()
    return rss_bytes()["rss"]


def _prepare_variant(model, variant: str):
    """Apply the variant's preparation: ``prepare_model_for_kbit_training``, checkpointing only, or nothing."""
    if variant == "prepare":
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    if variant == "no_prepare_gc":
        # prepare_model_for_kbit_training without its fp32 upcast: the same checkpointing call
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={})
        model.enable_input_require_grads()
        return model
    if variant != "no_prepare":
        raise ValueError(f"variant={variant!r}: use one of {sorted(TRAIN_VARIANTS)}")
    return model


def _load_trainable(task: dict, device: str):
    """The task's model in its format, prepared as its variant says, with the original LoRA attached."""
    fmt, amp = task["format"], task.get("amp_dtype")
    if not device.startswith("cuda") and fmt in QUANTIZED and task.get("use_cache", True):
        model = load_quantized_cached(task["model"], fmt)
    else:
        model = load_for_measurement(task["model"], fmt, device, amp if fmt in QUANTIZED else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _prepare_variant(model, task["variant"])
        model.config.use_cache = False
        return get_peft_model(model, build_lora_config(
            r=task.get("lora_r", THESIS.lora_r), target_modules=task.get("target_modules", THESIS.target_modules)))


def _static_bytes(model, params: list, base: int, cuda: bool) -> dict[str, Any]:
    """Bytes the step starts from: frozen weights and LoRA parameters (after the load settles)."""
    if cuda:
        torch.cuda.synchronize()
    else:
        touch_parameters(model)
        release_free_memory()
    weights_now = (torch.cuda.memory_allocated() if cuda else rss_bytes()["rss"]) - base
    lora_bytes = tensor_bytes(params)
    return {"lora_parameters": sum(p.numel() for p in params), "lora_param_bytes": lora_bytes,
            "weights_bytes": weights_now - lora_bytes,
            "frozen_other_dtype": dtype_name(model.get_input_embeddings().weight.dtype)}


def _random_plan(vocab: int, batch: int, max_seq_length: int, grad_accum: int, steps: int) -> list[list[Batch]]:
    """``steps`` optimizer steps of ``grad_accum`` micro-batches of random ids (labels = ids, no padding)."""
    gen = torch.Generator().manual_seed(0)
    plan = []
    for _ in range(steps):
        micro = []
        for _ in range(grad_accum):
            ids = torch.randint(0, vocab, (batch, max_seq_length), generator=gen)
            micro.append(Batch(ids, ids, tokens=ids.numel()))
        plan.append(micro)
    return plan


def _causal_lm_loss(model, grad_accum: int, amp: str | None, cuda: bool, losses: list) -> Callable:
    """``loss_fn`` for ``run_optimizer_steps``: the mean token loss / ``grad_accum``, under autocast on a GPU."""
    def loss_fn(batch: Batch, num_items: int) -> torch.Tensor:
        ctx = torch.autocast(device_type="cuda", dtype=torch_dtype(amp)) if (cuda and amp) else nullcontext()
        with ctx:
            loss = model(input_ids=batch.input_ids, labels=batch.labels).loss / grad_accum
        losses.append(loss.detach())
        return loss

    return loss_fn


def _run_steps(model, params: list, optimizer, task: dict, device: str) -> tuple[StepLog, list[float]]:
    """Warm-up and measured optimizer steps; the peak counters are reset just before the first."""
    cuda = device.startswith("cuda")
    amp, accum = task.get("amp_dtype"), task["grad_accum"]
    warmup = task.get("warmup_steps", 0)
    plan = _random_plan(model.config.vocab_size, task["batch_size"], task["max_seq_length"], accum,
                        task.get("steps", 1) + warmup)
    scaler = torch.amp.GradScaler(device="cuda") if (cuda and amp == "fp16") else None
    losses: list[torch.Tensor] = []
    model.train()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    log = run_optimizer_steps(plan, _causal_lm_loss(model, accum, amp, cuda, losses), params, optimizer, device,
                              scaler=scaler, warmup=warmup)
    return log, [round(float(loss) * accum, 4) for loss in losses]


def _step_results(log: StepLog, losses: list[float], optimizer, task: dict) -> dict[str, Any]:
    """Gradient and optimizer-state bytes, seconds per step (median), tokens per second, every micro-batch loss."""
    states = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    seconds = log.seconds_per_step
    tokens = task["batch_size"] * task["grad_accum"] * task["max_seq_length"]
    return {
        "grad_bytes": log.grad_bytes,
        "optimizer_state_bytes": tensor_bytes(states),
        "optimizer_paged_bytes": tensor_bytes(t for t in states if getattr(t, "is_paged", False)),
        "seconds_per_step": seconds,
        "tokens_per_second": tokens / seconds if seconds else None,
        "losses": losses,
    }


def _peak(cuda: bool, base: int) -> dict[str, Any]:
    """Peak of the steps over the memory before loading (allocated and reserved on a GPU, resident on a CPU)."""
    if cuda:
        snap = _gpu_snapshot()
        return {"measure": "torch.cuda.max_memory_allocated / max_memory_reserved",
                "peak_bytes": snap["peak_allocated"] - base, "peak_reserved_bytes": snap["peak_reserved"]}
    return {"measure": "pico de RSS del proceso (VmHWM) menos RSS antes de cargar",
            "peak_bytes": peak_rss_bytes() - base, "peak_reserved_bytes": None}


def _task_train_step(task: dict) -> dict:
    """Load, prepare, attach LoRA and run optimizer steps on random tokens; measure peak memory."""
    device = _device_of(task)
    cuda = device.startswith("cuda")
    out: dict[str, Any] = {k: task.get(k) for k in ("name", "format", "variant", "amp_dtype", "optim")}
    out.update(device=device, max_seq_length=task["max_seq_length"], batch_size=task["batch_size"],
               grad_accum=task["grad_accum"])
    if cuda:
        torch.cuda.init()
    base = _memory_now(cuda)
    model = _load_trainable(task, device)
    params = [p for p in model.parameters() if p.requires_grad]
    out.update(_static_bytes(model, params, base, cuda))
    optimizer = build_optimizer(params, task["optim"])
    log, losses = _run_steps(model, params, optimizer, task, device)
    out.update(_step_results(log, losses, optimizer, task))
    out.update(_peak(cuda, base))
    return out


# --------------------------------------------------------------------------------------------
# Preparation tasks and the dispatcher
# --------------------------------------------------------------------------------------------


def _task_save_twin(task: dict) -> dict:
    """Build the random-weight twin (bf16; ``tiny``: the 2-layer one) and save it as safetensors."""
    device = _device_of(task)
    start = time.perf_counter()
    model = build_tiny_twin(device) if task.get("tiny") else build_twin(device=device, dtype=torch.bfloat16)
    model.save_pretrained(task["folder"], safe_serialization=True)
    size = sum(f.stat().st_size for f in Path(task["folder"]).glob("*.safetensors"))
    return {"folder": task["folder"], "safetensors_bytes": size, "seconds": round(time.perf_counter() - start, 1),
            "parameters": sum(p.numel() for p in model.parameters())}


def _task_quantize_cache(task: dict) -> dict:
    """Build the CPU cache of a quantised model (see ``load_quantized_cached``) if it is missing."""
    folder = quantized_cache_folder(task["model"], task["format"])
    existed = cache_is_fresh(task["model"], task["format"])
    start = time.perf_counter()
    load_quantized_cached(task["model"], task["format"])
    return {"folder": str(folder), "existed": existed, "seconds": round(time.perf_counter() - start, 1)}


def _task_quant_errors(task: dict) -> dict:
    """Reconstruction errors of the reference model's linear weights (see ``quantization_errors``)."""
    model = reference_model(task["model"])
    table = quantization_errors(model, task.get("quant_types", ("nf4", "fp4", "nf4_dq")), task.get("layers", 0))
    return {"rows": table.to_dict(orient="records")}


TASKS = {
    "quant_errors": _task_quant_errors,
    "weights": _task_weights,
    "train_step": _task_train_step,
    "save_twin": _task_save_twin,
    "quantize_cache": _task_quantize_cache,
}


def _out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def run_task(task: dict) -> dict:
    """Run one task in this process; an out-of-memory error becomes a result, not a crash.

    A GPU cap set by the parent (``utils.memory.cap_gpu_memory``, e.g. an 8 GB card) applies here too.
    """
    apply_gpu_memory_cap_from_env()
    try:
        return {"ok": True, **TASKS[task["task"]](task)}
    except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
        if _out_of_memory(exc):
            return {"ok": False, "error": f"sin memoria: {str(exc).splitlines()[0]}", **task_id(task)}
        raise
