"""What ``prepare_model_for_kbit_training`` does to a loaded 4-bit model, measured on its tensors and modules.

PEFT's function (peft/utils/other.py) freezes every parameter, casts every 16-bit parameter that is not a
4-bit ``Params4bit`` to fp32 (embeddings, norms, an untied ``lm_head``), makes the embeddings' output require
gradients (``enable_input_require_grads``, so reentrant checkpointing has a graph to recompute) and turns on
gradient checkpointing. No LoRA adapter exists yet when it runs: ``get_peft_model`` adds them, trainable.
``inspect_prepare`` records each of these effects before and after the call.
"""

from __future__ import annotations

import warnings
from typing import Any

import pandas as pd
import torch
from peft import prepare_model_for_kbit_training

from utils.memory.tensors import tensor_kind
from utils.numbers import MISSING, fmt_num

HALF = (torch.float16, torch.bfloat16)
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _snapshot(model) -> dict[str, tuple[torch.dtype, bool, int, str]]:
    """Each parameter's dtype, requires_grad, bytes and kind."""
    return {name: (p.dtype, p.requires_grad, p.numel() * p.element_size(), tensor_kind(name))
            for name, p in model.named_parameters()}


def cast_unquantized(model, dtype: torch.dtype) -> int:
    """Cast the floating parameters that are not 4-bit to ``dtype`` (as a GPU load in that compute dtype keeps them).

    On a CPU the quantised model keeps them in fp32; casting them to fp16 reproduces the original script's GPU
    load, so that what ``prepare`` casts back can be measured here. Returns the number of tensors cast.
    """
    cast = 0
    for param in model.parameters():
        if param.is_floating_point() and param.__class__.__name__ != "Params4bit" and param.dtype != dtype:
            param.data = param.data.to(dtype)
            cast += 1
    return cast


def _checkpointing_on(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def _embedding_output_requires_grad(model) -> bool | None:
    """Whether the input embeddings' output requires grad in a forward of four tokens (None on ``meta``)."""
    embeddings = model.get_input_embeddings()
    if embeddings.weight.device.type == "meta":
        return None
    seen: list[bool] = []
    hook = embeddings.register_forward_hook(lambda _m, _i, out: seen.append(bool(out.requires_grad)))
    try:
        ids = torch.zeros((1, 4), dtype=torch.long, device=embeddings.weight.device)
        with torch.enable_grad():
            model(input_ids=ids)
    finally:
        hook.remove()
    return seen[0] if seen else None


def inspect_prepare(model) -> dict[str, Any]:
    """Run ``prepare_model_for_kbit_training`` on ``model`` and return what changed (counts, bytes, flags)."""
    before = _snapshot(model)
    checkpointing_before = _checkpointing_on(model)
    hook_before = bool(getattr(model, "_require_grads_hooks", None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renamed gradient_checkpointing_enable
        prepare_model_for_kbit_training(model)
    after = _snapshot(model)
    upcast = {n: before[n] for n in after if before[n][0] in HALF and after[n][0] == torch.float32}
    kinds = sorted({kind for _, _, _, kind in upcast.values()})
    return {
        "trainable_before": sum(1 for v in before.values() if v[1]),
        "trainable_params_before": sum(p.numel() for n, p in model.named_parameters() if before[n][1]),
        "trainable_after": sum(1 for v in after.values() if v[1]),
        "upcast_tensors": len(upcast),
        "upcast_kinds": kinds,
        "upcast_params": sum(p.numel() for n, p in model.named_parameters() if n in upcast),
        "added_bytes": sum(after[n][2] - before[n][2] for n in upcast),
        "four_bit_tensors": sum(1 for p in model.parameters() if p.__class__.__name__ == "Params4bit"),
        "checkpointing_before": checkpointing_before,
        "checkpointing_after": _checkpointing_on(model),
        "input_hook_before": hook_before,
        "input_hook_after": bool(getattr(model, "_require_grads_hooks", None)),
        "input_grads_after": _embedding_output_requires_grad(model),  # every parameter frozen by now
        "lora_tensors": sum(1 for n in after if "lora_" in n),
    }


def prepare_table(effects: dict[str, Any], trainable_after_peft: int | None = None) -> pd.DataFrame:
    """The effects of ``inspect_prepare`` as a Spanish table: what changes, before, after."""
    def yes(flag: bool | None) -> str:
        return MISSING if flag is None else ("sí" if flag else "no")

    rows = [
        ("tensores que reciben gradiente", fmt_num(effects["trainable_before"]), fmt_num(effects["trainable_after"])),
        ("tensores 16 bits pasados a fp32", MISSING, fmt_num(effects["upcast_tensors"])),
        ("parámetros pasados a fp32", MISSING, fmt_num(effects["upcast_params"])),
        ("memoria agregada por la subida a fp32", MISSING, f"{fmt_num(effects['added_bytes'] / 2**20, 1)} MiB"),
        ("gancho enable_input_require_grads en los embeddings", yes(effects["input_hook_before"]),
         yes(effects["input_hook_after"])),
        ("salida de los embeddings con gradiente, todo congelado", MISSING, yes(effects["input_grads_after"])),
        ("gradient checkpointing", yes(effects["checkpointing_before"]), yes(effects["checkpointing_after"])),
        ("adaptadores LoRA en el modelo", fmt_num(effects["lora_tensors"]), fmt_num(effects["lora_tensors"])),
    ]
    if trainable_after_peft is not None:
        rows.append(("tras get_peft_model: parámetros entrenables", MISSING, fmt_num(trainable_after_peft)))
    return pd.DataFrame(rows, columns=["efecto", "antes de prepare", "después"])


def measure_prepare(model, compute_dtype: torch.dtype = torch.float16) -> dict[str, Any]:
    """``inspect_prepare`` on a model as the original script loads it on a GPU (unquantised tensors in 16 bits).

    A 4-bit model loaded on a CPU keeps its unquantised tensors in fp32, where prepare would cast nothing; they
    are first cast to ``compute_dtype`` (``cast_first`` says how many), so the upcast is measured as on the GPU.
    """
    kept_fp32 = [p for p in model.parameters() if p.dtype == torch.float32 and p.__class__.__name__ != "Params4bit"]
    cast_first = cast_unquantized(model, compute_dtype) if kept_fp32 else 0
    return {**inspect_prepare(model), "cast_first": cast_first, "compute_dtype": DTYPE_NAMES[compute_dtype]}
