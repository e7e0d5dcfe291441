"""Memory of a causal LM by storage format and of one QLoRA training step: analytic and measured.

Analytic sizes come from the architecture alone (``config.json``): parameter counts per tensor kind and
the exact bytes of each storage format, bitsandbytes' quantisation constants included. Measurements run
each configuration in a fresh child process, so that one format's allocations never pollute another's:

- on a GPU: ``torch.cuda.memory_allocated`` before/after loading and ``max_memory_allocated`` /
  ``max_memory_reserved`` (the caching allocator's view, without the CUDA context);
- on a CPU: the process's resident set (``VmRSS``) before/after and its high-water mark (``VmHWM``, reset
  through ``/proc/self/clear_refs``), split into anonymous memory and file-backed pages (safetensors are
  memory-mapped, so fp32 weights loaded without conversion stay file-backed).

Command line (the H100 measurements of the Llama-3.2-3B twin committed under ``results/``)::

    python -m utils.memory gpu-report --out results/02_twin_gpu_memory.json
    python -m utils.memory gpu-report --out /tmp/x.json --tiny     # the same logic on a tiny twin (CPU)
"""

from __future__ import annotations

import argparse
import datetime as dt
from contextlib import nullcontext
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from utils.config import THESIS
from utils.paths import MODELS_CACHE_DIR, REPO_ROOT, resolve_path

GIB = 1024**3
MIB = 1024**2
GB = 1e9

FORMATS = ("fp32", "fp16", "bf16", "int8", "fp4", "nf4", "nf4_dq")
QUANTIZED = ("int8", "fp4", "nf4", "nf4_dq")
FORMAT_LABELS = {
    "fp32": "fp32",
    "fp16": "fp16",
    "bf16": "bf16",
    "int8": "int8 (LLM.int8)",
    "fp4": "FP4",
    "nf4": "NF4",
    "nf4_dq": "NF4 + doble cuant.",
}
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "float32": 4, "float16": 2, "bfloat16": 2}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

BLOCKSIZE_4BIT = 64  # bitsandbytes' default 4-bit block (one absmax constant per 64 weights)
BLOCKSIZE_DQ = 256  # second level of double quantisation: one fp32 constant per 256 absmax values
BLOCKSIZE_ADAM8 = 256  # bitsandbytes' blockwise 8-bit optimizer states
CODE_4BIT_BYTES = 16 * 4  # the 16-value NF4/FP4 lookup table each QuantState carries (fp32)
CODE_8BIT_BYTES = 256 * 4  # double quantisation's 8-bit dynamic code, one copy per tensor (fp32)
ADAM8_MIN_SIZE = 4096  # smaller tensors keep 32-bit optimizer states (bitsandbytes' min_8bit_size)
PAGED_MIN_SIZE = 100_000  # a paged optimizer pages the two 8-bit states of tensors this large or larger

TENSOR_KINDS = ("embedding", "attention", "mlp", "norms", "lm_head")
KIND_LABELS = {
    "embedding": "embeddings",
    "attention": "atención (q, k, v, o)",
    "mlp": "MLP (gate, up, down)",
    "norms": "normas RMS",
    "lm_head": "lm_head (sin atar)",
}
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LINEAR_MODULES = ATTENTION_MODULES + MLP_MODULES

TRAIN_VARIANTS = {
    "prepare": "con prepare_model_for_kbit_training (activa gradient checkpointing, sube a fp32 lo no cuantizado)",
    "no_prepare_gc": "sin prepare, gradient checkpointing activado a mano",
    "no_prepare": "sin prepare ni gradient checkpointing (la línea quitada del script)",
}
TWIN_LABEL = "llama-3.2-3b-twin (random weights)"
# What a real card holds besides PyTorch's allocations (CUDA context, cuBLAS workspaces): an upper estimate
# of 0.3-0.5 GiB, not measured on the RTX 2070 SUPER. A configuration fits an 8 GiB card when its peak
# *reserved* memory plus this stays within 8 GiB.
CUDA_CONTEXT_GIB = 0.5


class MeasurementError(RuntimeError):
    """A measurement child process failed; the message carries its stderr tail."""


# --------------------------------------------------------------------------------------------
# Architecture: parameter counts per tensor kind
# --------------------------------------------------------------------------------------------


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def linear_shapes(config) -> dict[str, tuple[int, int]]:
    """``(out_features, in_features)`` of each of the seven linear layers of one decoder layer."""
    h, i, hd = config.hidden_size, config.intermediate_size, _head_dim(config)
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    return {
        "q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
        "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i),
    }


def _module_kind(module: str) -> str:
    return "attention" if module in ATTENTION_MODULES else "mlp"


def analytic_parameter_counts(config) -> dict[str, int]:
    """Parameters per tensor kind from the architecture alone (tied embeddings counted once)."""
    layers, h = config.num_hidden_layers, config.hidden_size
    counts = dict.fromkeys(TENSOR_KINDS, 0)
    counts["embedding"] = config.vocab_size * h
    if not getattr(config, "tie_word_embeddings", False):
        counts["lm_head"] = config.vocab_size * h
    bias = {"attention": getattr(config, "attention_bias", False), "mlp": getattr(config, "mlp_bias", False)}
    for module, (out_f, in_f) in linear_shapes(config).items():
        kind = _module_kind(module)
        # o_proj carries a bias too when attention_bias is set (Llama's convention)
        counts[kind] += layers * (out_f * in_f + (out_f if bias[kind] else 0))
    counts["norms"] = (2 * layers + 1) * h
    return counts


def tensor_kind(name: str) -> str:
    """Kind of a parameter from its name: embedding, attention, mlp, norms, lm_head, lora or other."""
    if "lora_" in name:
        return "lora"
    if "embed_tokens" in name:
        return "embedding"
    if "lm_head" in name:
        return "lm_head"
    if "self_attn" in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    if "norm" in name:
        return "norms"
    return "other"


def unpacked_numel(param: torch.Tensor) -> int:
    """Number of weights a parameter holds: a 4-bit ``Params4bit`` packs two per byte of storage."""
    if param.__class__.__name__ == "Params4bit":
        return param.numel() * 2 * param.element_size()
    return param.numel()


def measured_parameter_counts(model, unpack_4bit: bool = True) -> dict[str, int]:
    """Parameters per kind from a model's tensors (``unpack_4bit=False`` gives the raw, packed numel)."""
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        kind = tensor_kind(name)
        counts[kind] = counts.get(kind, 0) + (unpacked_numel(param) if unpack_4bit else param.numel())
    return counts


def parameter_count_table(config, model=None):
    """DataFrame: parameters per tensor kind, analytic and (when a model is given) counted on its tensors."""
    import pandas as pd

    analytic = analytic_parameter_counts(config)
    rows = []
    measured = measured_parameter_counts(model) if model is not None else {}
    for kind in TENSOR_KINDS:
        if analytic[kind] == 0 and measured.get(kind, 0) == 0:
            continue
        row = {"tipo de tensor": KIND_LABELS[kind], "analítico": analytic[kind]}
        if model is not None:
            row["contado en el modelo"] = measured.get(kind, 0)
        rows.append(row)
    table = pd.DataFrame(rows)
    total = {"tipo de tensor": "total", "analítico": int(table["analítico"].sum())}
    if model is not None:
        total["contado en el modelo"] = int(table["contado en el modelo"].sum())
        table = pd.concat([table, pd.DataFrame([total])], ignore_index=True)
        table["coincide"] = table["analítico"] == table["contado en el modelo"]
    else:
        table = pd.concat([table, pd.DataFrame([total])], ignore_index=True)
    return table


# --------------------------------------------------------------------------------------------
# Analytic bytes per storage format
# --------------------------------------------------------------------------------------------


def four_bit_constant_bytes(numel: int, double_quant: bool) -> int:
    """Bytes of the quantisation constants of one 4-bit tensor (bitsandbytes' QuantState).

    One fp32 absmax per block of 64 weights; with double quantisation the absmax values are stored as
    uint8 plus, per 256 of them, one fp32 second-level absmax, one fp32 offset and the 256-entry fp32
    table of the 8-bit code. Each tensor also carries the 16-entry fp32 table of its 4-bit code.
    """
    blocks = math.ceil(numel / BLOCKSIZE_4BIT)
    if not double_quant:
        return blocks * 4 + CODE_4BIT_BYTES
    return blocks * 1 + math.ceil(blocks / BLOCKSIZE_DQ) * 4 + 4 + CODE_8BIT_BYTES + CODE_4BIT_BYTES


def analytic_weight_bytes(config, fmt: str, other_dtype: str = "bfloat16") -> dict[str, int]:
    """Exact bytes of the weights of a Llama-architecture model stored in ``fmt``.

    ``other_dtype`` is the dtype of what bitsandbytes does not quantise (embeddings, norms, an untied
    ``lm_head``) in the int8/4-bit formats: the ``dtype`` the model is loaded with. Returns the parts
    ``linear_data``, ``linear_constants``, ``embedding``, ``norms``, ``lm_head``, ``buffers`` and ``total``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r}: use one of {FORMATS}")
    counts = analytic_parameter_counts(config)
    plain = DTYPE_BYTES[fmt] if fmt in DTYPE_BYTES else DTYPE_BYTES[other_dtype]
    parts = {
        "linear_data": 0,
        "linear_constants": 0,
        "embedding": counts["embedding"] * plain,
        "norms": counts["norms"] * plain,
        "lm_head": counts["lm_head"] * plain,
        # the rotary buffers inv_freq and original_inv_freq (fp32, head_dim / 2 values each)
        "buffers": 2 * (_head_dim(config) // 2) * 4,
    }
    for _module, (out_f, in_f) in linear_shapes(config).items():
        numel = out_f * in_f
        for _ in range(config.num_hidden_layers):
            if fmt in DTYPE_BYTES:
                parts["linear_data"] += numel * DTYPE_BYTES[fmt]
            elif fmt == "int8":
                parts["linear_data"] += numel
                parts["linear_constants"] += out_f * 4  # one fp32 scale per output row (SCB)
            else:
                parts["linear_data"] += math.ceil(numel / 2)
                parts["linear_constants"] += four_bit_constant_bytes(numel, fmt == "nf4_dq")
    # biases (none in Llama-3.2) stay in the plain dtype
    bias = (counts["attention"] + counts["mlp"]) - config.num_hidden_layers * sum(
        o * i for o, i in linear_shapes(config).values()
    )
    parts["linear_data"] += bias * plain
    parts["total"] = sum(parts.values())
    return parts


def analytic_weight_table(config, formats: Sequence[str] = FORMATS, other_dtype: str = "bfloat16"):
    """DataFrame: one row per format with its analytic parts and total (bytes, GiB, bits per weight)."""
    import pandas as pd

    n = sum(analytic_parameter_counts(config).values())
    rows = []
    for fmt in formats:
        parts = analytic_weight_bytes(config, fmt, other_dtype)
        rows.append({"formato": fmt, **parts, "total_gib": parts["total"] / GIB,
                     "bits_por_parametro": 8 * parts["total"] / n})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# Process memory (CPU) helpers
# --------------------------------------------------------------------------------------------


def _proc_status() -> dict[str, int]:
    """``/proc/self/status`` memory fields in bytes (empty off Linux)."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0]) * 1024
    return out


def rss_bytes() -> dict[str, int]:
    """Resident memory of this process: ``rss``, ``anon`` (heap, tensors) and ``file`` (mapped files)."""
    status = _proc_status()
    if "VmRSS" in status:
        return {"rss": status["VmRSS"], "anon": status.get("RssAnon", 0), "file": status.get("RssFile", 0)}
    import psutil

    rss = psutil.Process().memory_info().rss
    return {"rss": rss, "anon": rss, "file": 0}


def reset_peak_rss() -> bool:
    """Reset the resident high-water mark (Linux ``clear_refs``); False where it cannot be reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Resident high-water mark since the last ``reset_peak_rss`` (or since the process started)."""
    status = _proc_status()
    if "VmHWM" in status:
        return status["VmHWM"]
    import resource

    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc ``malloc_trim``), so RSS counts live data only."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS then also holds freed-but-kept heap pages
        pass


def touch_parameters(model) -> None:
    """Read every parameter once, so memory-mapped weights become resident before RSS is read."""
    with torch.no_grad():
        for param in model.parameters():
            if param.device.type == "cpu" and param.numel():
                param.detach().view(-1)[:: 1024].sum()  # one element per 4 KiB page of fp32


def quant_state_bytes(model) -> int:
    """Bytes bitsandbytes keeps outside ``parameters()``: 4-bit absmax/code/offset and int8 row scales."""
    total, seen = 0, set()

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        if state is not None:
            add(state.absmax)
            add(state.code)
            add(state.offset)
            if state.state2 is not None:
                add(state.state2.absmax)
                add(state.state2.code)
        add(getattr(param, "SCB", None))
    return total


# --------------------------------------------------------------------------------------------
# The profile's model: configuration, reference weights, formats this device can load
# --------------------------------------------------------------------------------------------


def load_model_config(name: str):
    """``config`` of a named model (embedded, hub id, folder or the twin) without loading its weights."""
    from transformers import AutoConfig

    from utils.modeling import model_folder, resolve_model, twin_config

    if resolve_model(name).is_twin:
        return twin_config()
    return AutoConfig.from_pretrained(model_folder(name))


def meta_model(config):
    """The model transformers builds from ``config`` on the ``meta`` device: every tensor's shape, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


# --------------------------------------------------------------------------------------------
# What a notebook can measure live here (the profile's weights may be missing)
# --------------------------------------------------------------------------------------------

DEFAULT_GPU_RESULTS = "results/02_twin_gpu_memory.json"
# Repository names with the Llama-3.2-3B architecture (unsloth's pre-quantised uploads included): when their
# weights are missing, the twin (utils/assets/llama-3.2-3b-config.json) gives the same architecture.
TWIN_NAME_PATTERN = r"llama-3\.2-3b(-instruct)?(-unsloth)?(-bnb-4bit)?"
EMBEDDED_STAND_IN = "embedded"

# Per notebook: what runs without weights on the twin, what comes from the committed GPU report, what needs the
# real weights and is skipped, and the one cheap step that runs on the embedded model as a labelled stand-in.
FALLBACK_PLANS: dict[str, dict[str, Any]] = {
    "02": {
        "live": ["los parámetros por tipo de tensor (sección 1)",
                 "el tamaño analítico exacto de los pesos en cada formato (sección 2)",
                 "el desglose analítico de un paso de entrenamiento (sección 7)"],
        "committed": "la memoria de los pesos cargados en cada formato y el pico de un paso de entrenamiento "
                     "(sección 7 y la figura)",
        "skipped": ["la memoria medida al cargar cada formato (sección 3)",
                    "el error de cuantización de los pesos reales (sección 4)",
                    "la pérdida y la perplejidad en el split de prueba (sección 5)",
                    "el paso de entrenamiento medido en este dispositivo (sección 6)"],
        "stand_in": None,
    },
    "03": {
        "live": ["LoRA enganchada al gemelo con la configuración del perfil: conteos por módulo, por capa y "
                 "totales (secciones 1 y 3)", "el árbol de módulos de una capa (sección 2)",
                 "el barrido de r y de módulos, con el tamaño del adaptador medido materializando solo los "
                 "tensores LoRA (sección 4)", "las afirmaciones del análisis original (sección 5)"],
        "committed": "la memoria de un paso de entrenamiento que usa la tabla de afirmaciones (sección 5)",
        "skipped": ["la carga del modelo en 4 bits (sección 1): el gemelo en `meta` está en bf16, así que no hay "
                    "tensores de 4 bits y la suma de `numel()` coincide con la de PEFT"],
        "stand_in": "la comprobación de que el adaptador arranca siendo la identidad (B = 0, logits iguales; "
                    "sección 2) corre sobre SmolLM2-135M-Instruct (embebido), cargado y adaptado como el original: "
                    "es una propiedad de la inicialización de PEFT, no de los valores de los pesos",
    },
}


@dataclass
class LiveModel:
    """What this machine can measure of the profile's model (see ``resolve_live_model``)."""

    model_name: str
    available: bool  # its weights load here: every step runs on them
    config: Any  # its architecture (the Llama-3.2-3B twin's when the weights are missing)
    label: str  # how tables and figures name the model the architecture steps ran on
    reason: str | None = None  # ModelNotAvailableError's message, which says how to get the weights
    note: str = ""  # Spanish markdown the notebook shows once when the weights are missing
    stand_in: str | None = None  # model a cheap weight-needing step runs on instead, when the plan names one
    skipped_steps: dict[str, str] = field(default_factory=dict)

    @property
    def weights_name(self) -> str | None:
        """Model whose weights the weight-needing steps use: the profile's, the stand-in, or None (skip)."""
        return self.model_name if self.available else self.stand_in

    def unquantized_dtype(self, device: str) -> tuple[str, str]:
        """dtype bitsandbytes leaves embeddings and norms in, and why: the load dtype here, or the thesis GPU's."""
        from utils.modeling import pick_compute_dtype

        if self.available:
            return dtype_name(pick_compute_dtype(device)), f"el dtype de carga en {device}"
        return THESIS.bnb_4bit_compute_dtype, ("el dtype de cómputo del script original en la RTX 2070 SUPER; "
                                               "aquí no se carga nada")

    def skip(self, step: str, out_dir: Path | None = None, outputs: Sequence[str] = ()) -> str:
        """Record that ``step`` did not run, delete its outputs left by an earlier run, return the line to print."""
        reason = f"no hay pesos reales de {self.model_name} en esta máquina; ver la nota del principio"
        self.skipped_steps[step] = reason
        stale = [name for name in outputs if out_dir is not None and (Path(out_dir) / name).exists()]
        for name in stale:
            (Path(out_dir) / name).unlink()
        return f"Se omite {step}: {reason}." + (f" Se borró lo que dejó una corrida anterior: {', '.join(stale)}."
                                                if stale else "")

    def as_record(self) -> dict[str, Any]:
        """What the run record keeps: whether the weights were live, why not, what was skipped or stood in."""
        return {"model_name": self.model_name, "available": self.available, "label": self.label,
                "reason": self.reason, "stand_in": self.stand_in, "skipped_steps": dict(self.skipped_steps)}


def has_twin_architecture(name: str) -> bool:
    """Whether ``name`` is Llama-3.2-3B: a folder whose ``config.json`` equals the twin's, or a hub id named so."""
    import re

    from utils.modeling import twin_config

    path = resolve_path(name)
    if (path / "config.json").is_file():
        from transformers import AutoConfig

        return _config_dict(AutoConfig.from_pretrained(path)) == _config_dict(twin_config())
    return re.fullmatch(TWIN_NAME_PATTERN, name.rstrip("/").split("/")[-1].lower()) is not None


def resolve_live_model(model_name: str, notebook: str, gpu_results_file: str | Path = DEFAULT_GPU_RESULTS
                       ) -> LiveModel:
    """Whether the profile's weights load here; if not, what notebook ``notebook`` shows instead.

    Loads no weights: it finds the weights folder (``utils.modeling.model_folder``, offline-aware) and reads
    the config. When that raises ``ModelNotAvailableError`` for a Llama-3.2-3B name, the notebook falls back to
    the twin's architecture on the ``meta`` device plus the committed GPU report, and ``note`` says so (with the
    error's advice on getting the weights). A name that is not a model at all, or a missing model of another
    architecture, still raises: nothing else can stand in for it honestly.
    """
    from utils.modeling import ModelNotAvailableError, model_folder, resolve_model, twin_config

    if notebook not in FALLBACK_PLANS:
        raise ValueError(f"notebook={notebook!r}: the fallback plans cover {sorted(FALLBACK_PLANS)}")
    spec = resolve_model(model_name)  # a malformed name is the user's error, not a missing model
    try:
        if not spec.is_twin:
            folder = model_folder(model_name)
            if not any(folder.glob("*.safetensors")):
                raise ModelNotAvailableError(
                    f"{folder} holds no *.safetensors weights. Download them with `hf download <repo> "
                    f"--local-dir {folder}`, or set model_name='embedded'."
                )
        return LiveModel(model_name, True, load_model_config(model_name), spec.label)
    except ModelNotAvailableError as exc:
        reason = str(exc)
    if not has_twin_architecture(model_name):
        raise ModelNotAvailableError(
            f"{reason} (Only Llama-3.2-3B has a weightless stand-in here, its twin; {model_name!r} is another "
            "architecture, so notebooks 02 and 03 need its weights.)"
        )
    plan = FALLBACK_PLANS[notebook]
    gpu = load_gpu_report(gpu_results_file)
    live = LiveModel(model_name, False, twin_config(), "Llama-3.2-3B (gemelo en meta, sin pesos)", reason,
                     stand_in=EMBEDDED_STAND_IN if plan["stand_in"] else None)
    live.note = _fallback_note(live, plan, gpu, gpu_results_file)
    return live


def _fallback_note(live: LiveModel, plan: dict, gpu: dict, gpu_results_file: str | Path) -> str:
    """The one Spanish note a notebook shows when the profile's weights are missing."""
    from utils.paths import TWIN_CONFIG_FILE

    lines = [
        f"**Los pesos reales de `{live.model_name}` no están disponibles en esta máquina.** Motivo y cómo "
        "conseguirlos:",
        "",
        f"> {live.reason}",
        "",
        "Qué muestra este cuaderno en su lugar (cada tabla y figura dice sobre qué modelo se calculó):",
        "",
        f"- **Calculado aquí, sin pesos**, sobre el gemelo de Llama-3.2-3B (la arquitectura exacta, "
        f"`{TWIN_CONFIG_FILE.relative_to(REPO_ROOT)}`) construido en el dispositivo `meta` (solo formas): "
        + "; ".join(plan["live"]) + ".",
        f"- **Medido en GPU, no aquí**: {plan['committed']}, de `{gpu_results_file}`: {gpu.get('label')}, "
        f"medido en {gpu.get('device')} el {str(gpu.get('date', ''))[:10]}.",
        "- **Se omite** (necesita los pesos reales): " + "; ".join(plan["skipped"]) + ". Con el modelo incluido "
        "estos pasos corren en los perfiles `smoke` y `demo` (`runs/demo/`).",
    ]
    if plan["stand_in"]:
        lines.append(f"- **Sustituto, rotulado como tal**: {plan['stand_in']}.")
    return "\n".join(lines)


def reference_model(name: str):
    """The model in full precision for error measurements: fp32 on a CPU, its 16-bit dtype on a GPU."""
    from utils.modeling import default_device, load_model

    device = default_device()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(name, quantization="fp32" if device.type == "cpu" else None, device=device)


def supported_formats(formats: Sequence[str], device: str | None = None) -> tuple[list[str], dict[str, str]]:
    """Split ``formats`` into those this device can hold and ``{format: reason}`` for the others."""
    from utils.modeling import gpu_supports_bf16

    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"formats {unknown} are unknown: the 'formats' parameter takes values from {FORMATS}.")
    device = device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    keep, skipped = [], {}
    for fmt in formats:
        if device.startswith("cuda") and fmt == "bf16" and not gpu_supports_bf16():
            skipped[fmt] = "la GPU no tiene bf16 nativo (capacidad de cómputo < 8.0, p. ej. la RTX 2070 SUPER)"
        else:
            keep.append(fmt)
    return keep, skipped


# --------------------------------------------------------------------------------------------
# Loading for measurement
# --------------------------------------------------------------------------------------------


def dtype_name(dtype: torch.dtype | None) -> str | None:
    """``torch.bfloat16`` → ``"bfloat16"`` (None stays None)."""
    return None if dtype is None else str(dtype).replace("torch.", "")


def load_for_measurement(model: str, fmt: str, device: str, compute_dtype: str | None = None):
    """Load ``model`` (a name or folder) in ``fmt`` on ``device``, the way the measurements need it.

    On a GPU this is ``utils.modeling.load_model``. On a CPU the safetensors are read into memory instead of
    memory-mapped (``disable_mmap``): a mapped fp32 file would otherwise stay resident behind the tensors
    that still point into it (the unquantised embeddings of a 4-bit model), and the process's resident memory
    would no longer say what the weights hold.
    """
    from utils.modeling import load_model, resolve_model

    dtype = TORCH_DTYPES[compute_dtype] if compute_dtype else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if device.startswith("cuda") or resolve_model(model).is_twin:
            return load_model(model, quantization=fmt, device=device, compute_dtype=dtype)
        from transformers import AutoModelForCausalLM

        from utils.modeling import build_bnb_config, model_folder

        kwargs: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": False, "device_map": {"": "cpu"},
                                  "disable_mmap": True}
        if fmt in QUANTIZED:
            kwargs["dtype"] = dtype or torch.float32
            kwargs["quantization_config"] = build_bnb_config(fmt, kwargs["dtype"])
        else:
            kwargs["dtype"] = TORCH_DTYPES[{"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[fmt]]
        return AutoModelForCausalLM.from_pretrained(model_folder(model), **kwargs)


def quantized_cache_folder(model: str, fmt: str) -> Path:
    """Folder where a pre-quantised copy of ``model`` in ``fmt`` is cached (``.cache/models``)."""
    from utils.modeling import resolve_model

    spec = resolve_model(model)
    base = Path(spec.location).name if spec.kind in {"embedded", "local"} else spec.location.replace("/", "--")
    return MODELS_CACHE_DIR / f"{base}-{fmt}-cpu"


def _source_stamp(model: str) -> dict:
    """Size and modification time of a model's weight files (a cache made from other weights is stale)."""
    from utils.modeling import model_folder

    files = sorted(model_folder(model).glob("*.safetensors"))
    return {f.name: [f.stat().st_size, int(f.stat().st_mtime)] for f in files}


def _cache_is_fresh(model: str, fmt: str) -> bool:
    folder = quantized_cache_folder(model, fmt)
    stamp = folder / "source.json"
    return stamp.is_file() and json.loads(stamp.read_text()) == _source_stamp(model)


def _save_quantized_cache(quantized, model: str, fmt: str) -> Path:
    folder = quantized_cache_folder(model, fmt)
    if _cache_is_fresh(model, fmt):
        return folder
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    quantized.save_pretrained(tmp, safe_serialization=True)
    (tmp / "source.json").write_text(json.dumps(_source_stamp(model)))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def load_quantized_cached(model: str, fmt: str):
    """CPU copy of ``model`` quantised to ``fmt``, quantised once and then reloaded from a saved copy.

    Quantising on a CPU takes tens of seconds; reloading the saved bitsandbytes tensors takes about one.
    The saved copy holds exactly the tensors the quantisation produced (same bytes, same outputs).
    """
    from transformers import AutoModelForCausalLM

    if fmt not in QUANTIZED:
        raise ValueError(f"fmt={fmt!r} is not a bitsandbytes format ({QUANTIZED})")
    folder = quantized_cache_folder(model, fmt)
    if not _cache_is_fresh(model, fmt):
        quantized = load_for_measurement(model, fmt, "cpu")
        _save_quantized_cache(quantized, model, fmt)
        return quantized
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(
            folder, device_map={"": "cpu"}, dtype=torch.float32, use_safetensors=True, disable_mmap=True
        )


# --------------------------------------------------------------------------------------------
# Quality: completion loss on the test split
# --------------------------------------------------------------------------------------------


def completion_loss(model, tokenizer, conversations: Sequence[Sequence[dict]], max_length: int = 512) -> dict:
    """Mean negative log-likelihood of the answers (completion tokens only) and its perplexity.

    The loss mask is TRL's prompt–completion mask (``utils.data.completion_mask``); examples are cut to
    ``max_length`` tokens like in training. Returns ``loss``, ``perplexity``, ``tokens`` and ``examples``.
    """
    from utils.data import completion_mask

    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for messages in conversations:
            ids, mask = completion_mask(tokenizer, messages)
            ids, mask = ids[:max_length], mask[:max_length]
            labels = [t if m else -100 for t, m in zip(ids, mask)]
            n = sum(1 for t in labels[1:] if t != -100)  # predicted tokens after the shift
            if n == 0:
                continue
            out = model(
                input_ids=torch.tensor([ids], device=device), labels=torch.tensor([labels], device=device)
            )
            total_nll += float(out.loss) * n
            total_tokens += n
    loss = total_nll / max(total_tokens, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": total_tokens, "examples": len(conversations)}


# --------------------------------------------------------------------------------------------
# Quantisation error of the linear weights
# --------------------------------------------------------------------------------------------


def linear_weights(model, layers: int = 0) -> Iterable[tuple[int, str, torch.Tensor]]:
    """``(layer, module, weight)`` of the seven linear layers; ``layers > 0`` samples that many layers evenly."""
    decoder = model.model.layers
    n = len(decoder)
    if layers <= 0 or layers >= n:
        chosen = list(range(n))
    elif layers == 1:
        chosen = [0]
    else:  # evenly spaced, first and last included
        chosen = sorted({round(i * (n - 1) / (layers - 1)) for i in range(layers)})
    for idx in chosen:
        layer = decoder[idx]
        for module in LINEAR_MODULES:
            parent = layer.self_attn if module in ATTENTION_MODULES else layer.mlp
            yield idx, module, getattr(parent, module).weight.detach()


def measure_quantization_errors(model: str, layers: int = 0, quant_types: Sequence[str] = ("nf4", "fp4", "nf4_dq"),
                                timeout: float = 1800):
    """``quantization_errors`` of a named model, computed in a child process (a clean, unshared CPU setup)."""
    import pandas as pd

    result = run_child({"task": "quant_errors", "model": model, "layers": layers, "quant_types": list(quant_types)},
                       timeout)
    return pd.DataFrame(result["rows"])


def quantization_errors(model, quant_types: Sequence[str] = ("nf4", "fp4", "nf4_dq"), layers: int = 0):
    """DataFrame: relative reconstruction error ‖W − deq(quant(W))‖ / ‖W‖ per linear weight and 4-bit type.

    Uses bitsandbytes' own ``quantize_4bit`` / ``dequantize_4bit`` (blocks of 64; ``nf4_dq`` also
    quantises the absmax constants), on fp32 copies of the model's weights.
    """
    import bitsandbytes.functional as bnbf
    import pandas as pd

    rows = []
    for layer, module, weight in linear_weights(model, layers):
        w = weight.float()
        norm = w.norm().item()
        for qt in quant_types:
            packed, state = bnbf.quantize_4bit(
                w, blocksize=BLOCKSIZE_4BIT, quant_type=qt.replace("_dq", ""), compress_statistics=qt.endswith("_dq")
            )
            rec = bnbf.dequantize_4bit(packed, state).float()
            rows.append({
                "capa": layer, "módulo": module, "tipo": _module_kind(module), "formato": qt,
                "error_relativo": (rec - w).norm().item() / norm, "parametros": w.numel(),
            })
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# Training step: analytic breakdown
# --------------------------------------------------------------------------------------------


def lora_tensor_shapes(config, r: int = THESIS.lora_r, target_modules: Sequence[str] = THESIS.target_modules):
    """Shapes of every LoRA tensor (A: r × in, B: out × r) of a Llama config, one entry per tensor."""
    shapes = []
    for module, (out_f, in_f) in linear_shapes(config).items():
        if module in target_modules:
            shapes += [(r, in_f), (out_f, r)] * config.num_hidden_layers
    return shapes


def optimizer_state_bytes(shapes: Sequence[tuple[int, int]], optim: str) -> int:
    """Bytes of the optimizer states for trainable tensors of these shapes.

    ``adamw_torch``: two fp32 moments (8 bytes per parameter). ``paged_adamw_8bit`` / ``adamw_8bit``:
    two uint8 moments, each with one fp32 absmax per 256 values and its own 256-entry fp32 code table
    (tensors under 4096 values stay 32-bit).
    """
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        if optim in {"paged_adamw_8bit", "adamw_8bit"} and n >= ADAM8_MIN_SIZE:
            total += 2 * (n + 4 * math.ceil(n / BLOCKSIZE_ADAM8) + CODE_8BIT_BYTES)
        else:
            total += 8 * n
    return total


def analytic_training_breakdown(
    config,
    fmt: str = "nf4_dq",
    variant: str = "prepare",
    compute_dtype: str = "float16",
    autocast: bool = True,
    seq_len: int = THESIS.max_seq_length,
    batch_size: int = THESIS.per_device_train_batch_size,
    r: int = THESIS.lora_r,
    target_modules: Sequence[str] = THESIS.target_modules,
    optim: str = THESIS.optim,
    cuda: bool = True,
) -> dict[str, float]:
    """Bytes of one LoRA training step by component (an estimate where the component is an activation).

    Exact: weights (storage format; ``prepare`` stores what is not quantised in fp32), LoRA parameters and
    gradients (fp32, as PEFT keeps adapters), optimizer states. Estimated: the fp16/bf16 copy autocast makes
    of fp32-stored embeddings for the tied ``lm_head`` (kept for backward), the checkpointed layer inputs,
    one decoder layer's saved activations (×L without checkpointing), and the logits (compute dtype, the
    fp32 upcast of the loss and its log-softmax/gradient). ``optimizer_paged`` is the part of the optimizer
    states a paged optimizer keeps in CUDA unified memory (tensors of 10⁵ values or more), which
    ``torch.cuda.memory_allocated`` does not count: ``total`` leaves it out.
    """
    layers, h, i = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * _head_dim(config)
    tokens = seq_len * batch_size
    cbytes = DTYPE_BYTES[compute_dtype] if autocast else 4
    quantized = fmt in QUANTIZED
    other = "float32" if (variant == "prepare" and quantized) else (compute_dtype if quantized else fmt)
    weights = analytic_weight_bytes(config, fmt, other)["total"]
    shapes = lora_tensor_shapes(config, r, target_modules)
    n_lora = sum(math.prod(s) for s in shapes)
    storage_bytes = DTYPE_BYTES[other] if quantized else DTYPE_BYTES[fmt]
    residual_bytes = max(storage_bytes, cbytes)
    checkpointing = variant in {"prepare", "no_prepare_gc"}
    # One layer's saved tensors: ~16 hidden-sized and 5 intermediate-sized tensors (norm inputs/outputs,
    # q/k/v/o and their LoRA dropout copies, attention output; gate, up, act, product, down's dropout copy),
    # plus 1-byte dropout masks.
    per_layer = tokens * ((16 * h + 2 * kv + 5 * i) * cbytes + (6 * h + i))
    parts = {
        "weights": weights,
        "lora_params": 4 * n_lora,
        "lora_grads": 4 * n_lora,
        "optimizer_states": optimizer_state_bytes(shapes, optim),
        "lm_head_cast": config.vocab_size * h * cbytes if (autocast and storage_bytes != cbytes) else 0,
        "checkpoints": layers * tokens * h * residual_bytes if checkpointing else 0,
        "layer_activations": per_layer if checkpointing else per_layer * layers,
        "logits": tokens * config.vocab_size * (cbytes + 4 + 4),
    }
    paged = optim.startswith("paged") and cuda
    parts["optimizer_paged"] = sum(2 * math.prod(s) for s in shapes if math.prod(s) >= PAGED_MIN_SIZE) if paged else 0
    parts["total"] = sum(v for k, v in parts.items() if k != "optimizer_paged") - parts["optimizer_paged"]
    return parts


BREAKDOWN_LABELS = {
    "weights": "pesos",
    "lora_params": "parámetros LoRA (fp32)",
    "lora_grads": "gradientes LoRA (fp32)",
    "optimizer_states": "estados del optimizador",
    "optimizer_paged": "  de ellos, paginados (memoria unificada: fuera del pico)",
    "lm_head_cast": "copia 16-bit de lm_head (autocast)",
    "checkpoints": "entradas de capa guardadas (checkpointing)",
    "layer_activations": "activaciones de capa",
    "logits": "logits y pérdida",
    "activations": "activaciones + logits + temporales (medido = pico − estático)",
    "total": "total (pico)",
}


# --------------------------------------------------------------------------------------------
# Child-process tasks
# --------------------------------------------------------------------------------------------


def _device_of(task: dict) -> str:
    return task.get("device") or ("cuda:0" if torch.cuda.is_available() else "cpu")


def _gpu_snapshot() -> dict[str, int]:
    return {
        "allocated": torch.cuda.memory_allocated(),
        "reserved": torch.cuda.memory_reserved(),
        "peak_allocated": torch.cuda.max_memory_allocated(),
        "peak_reserved": torch.cuda.max_memory_reserved(),
    }


def _preimport() -> None:
    """Import what loading imports lazily, so that the modules' memory is in the baseline, not the weights."""
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import transformers.integrations.bitsandbytes  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    import transformers.quantizers.quantizer_bnb_4bit  # noqa: F401
    import transformers.quantizers.quantizer_bnb_8bit  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    import utils.modeling  # noqa: F401


def _task_weights(task: dict) -> dict:
    """Load one format, measure what the weights hold, optionally evaluate the completion loss."""
    _preimport()
    device = _device_of(task)
    cuda = device.startswith("cuda")
    fmt = task["format"]
    out: dict[str, Any] = {"format": fmt, "device": device}
    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
        before = _gpu_snapshot()
    else:
        release_free_memory()
        reset_peak_rss()
        before = rss_bytes()
    start = time.perf_counter()
    model = load_for_measurement(task["model"], fmt, device, task.get("compute_dtype"))
    out["load_seconds"] = round(time.perf_counter() - start, 2)
    if cuda:
        torch.cuda.synchronize()
        after = _gpu_snapshot()
        out.update(
            measure="torch.cuda.memory_allocated",
            before=before["allocated"], after=after["allocated"],
            weights_bytes=after["allocated"] - before["allocated"],
            peak_load_bytes=after["peak_allocated"] - before["allocated"],
            reserved_bytes=after["reserved"],
        )
    else:
        hwm = peak_rss_bytes()
        touch_parameters(model)
        release_free_memory()
        after = rss_bytes()
        out.update(
            measure="RSS del proceso (VmRSS)",
            before=before["rss"], after=after["rss"],
            weights_bytes=after["rss"] - before["rss"],
            weights_anon_bytes=after["anon"] - before["anon"],
            weights_file_bytes=after["file"] - before["file"],
            peak_load_bytes=max(hwm, after["rss"]) - before["rss"],
        )
    out["footprint_bytes"] = model.get_memory_footprint()
    out["quant_state_bytes"] = quant_state_bytes(model)
    out["parameters"] = sum(unpacked_numel(p) for p in model.parameters())
    out["parameters_raw_numel"] = sum(p.numel() for p in model.parameters())
    out["other_dtype"] = dtype_name(model.model.embed_tokens.weight.dtype)
    if task.get("eval_file") and task.get("eval_examples", 0) != 0:
        from utils.data import load_records
        from utils.modeling import load_tokenizer

        records = load_records(task["eval_file"])
        n = task["eval_examples"]
        records = records if n < 0 else records[:n]
        tokenizer = load_tokenizer(task["tokenizer"])
        start = time.perf_counter()
        out["eval"] = completion_loss(model, tokenizer, [r["messages"] for r in records], task.get("max_length", 512))
        out["eval"]["seconds"] = round(time.perf_counter() - start, 2)
    if task.get("save_cache") and not cuda and fmt in QUANTIZED:
        _save_quantized_cache(model, task["model"], fmt)  # after measuring: later CPU steps reload it
    return out


def _tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _build_optimizer(params: list, optim: str):
    if optim in {"paged_adamw_8bit", "adamw_8bit"}:
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if optim == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "paged optimizers are not supported on CPU": a fallback
            return cls(params, lr=THESIS.learning_rate, weight_decay=THESIS.weight_decay)
    if optim == "adamw_torch":
        return torch.optim.AdamW(params, lr=THESIS.learning_rate, weight_decay=THESIS.weight_decay)
    raise ValueError(f"optim={optim!r}: use paged_adamw_8bit, adamw_8bit or adamw_torch")


def clip_and_step(params: list, optimizer, scaler=None, max_grad_norm: float = THESIS.max_grad_norm) -> None:
    """One optimizer step as the trainer does it: unscale (fp16), clip the norm, step, clear the gradients."""
    if scaler:
        scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _task_train_step(task: dict) -> dict:
    """Load, prepare, attach LoRA and run optimizer steps on random tokens; measure peak memory."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    from utils.modeling import build_lora_config

    _preimport()
    device = _device_of(task)
    cuda = device.startswith("cuda")
    fmt, variant = task["format"], task["variant"]
    amp = task.get("amp_dtype")  # "float16" | "bfloat16" | None (fp32 compute, CPU)
    seq, batch, accum = task["seq_len"], task["batch_size"], task["grad_accum"]
    out: dict[str, Any] = {k: task.get(k) for k in ("name", "format", "variant", "amp_dtype", "optim")}
    out.update(device=device, seq_len=seq, batch_size=batch, grad_accum=accum)
    if cuda:
        torch.cuda.init()
        base = torch.cuda.memory_allocated()
    else:
        release_free_memory()
        base = rss_bytes()["rss"]
    if not cuda and fmt in QUANTIZED and task.get("use_cache", True):
        model = load_quantized_cached(task["model"], fmt)
    else:
        model = load_for_measurement(task["model"], fmt, device, amp if fmt in QUANTIZED else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if variant == "prepare":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        elif variant == "no_prepare_gc":
            # prepare_model_for_kbit_training without its fp32 upcast: the same checkpointing call
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={})
            model.enable_input_require_grads()
        elif variant != "no_prepare":
            raise ValueError(f"variant={variant!r}: use one of {sorted(TRAIN_VARIANTS)}")
        model.config.use_cache = False
        model = get_peft_model(model, build_lora_config(
            r=task.get("lora_r", THESIS.lora_r), target_modules=task.get("target_modules", THESIS.target_modules)))
    if cuda:
        torch.cuda.synchronize()
    else:
        touch_parameters(model)
        release_free_memory()
    weights_now = (torch.cuda.memory_allocated() if cuda else rss_bytes()["rss"]) - base
    params = [p for p in model.parameters() if p.requires_grad]
    out["lora_parameters"] = sum(p.numel() for p in params)
    out["lora_param_bytes"] = _tensor_bytes(params)
    out["weights_bytes"] = weights_now - out["lora_param_bytes"]
    out["frozen_other_dtype"] = dtype_name(model.get_input_embeddings().weight.dtype)
    optimizer = _build_optimizer(params, task["optim"])
    scaler = torch.amp.GradScaler(device="cuda") if (cuda and amp == "float16") else None
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    model.train()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    times, losses, grad_bytes = [], [], 0
    steps = task.get("steps", 1) + task.get("warmup_steps", 0)
    for step in range(steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(accum):
            ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
            ctx = torch.autocast(device_type="cuda", dtype=TORCH_DTYPES[amp]) if (cuda and amp) else nullcontext()
            with ctx:
                loss = model(input_ids=ids, labels=ids).loss / accum
            (scaler.scale(loss) if scaler else loss).backward()
            losses.append(float(loss) * accum)
        grad_bytes = _tensor_bytes(p.grad for p in params)
        clip_and_step(params, optimizer, scaler)
        if cuda:
            torch.cuda.synchronize()
        if step >= task.get("warmup_steps", 0):
            times.append(time.perf_counter() - start)
    states = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    out["grad_bytes"] = grad_bytes
    out["optimizer_state_bytes"] = _tensor_bytes(states)
    out["optimizer_paged_bytes"] = _tensor_bytes(t for t in states if getattr(t, "is_paged", False))
    out["seconds_per_step"] = statistics.median(times) if times else None
    out["tokens_per_second"] = batch * accum * seq / out["seconds_per_step"] if times else None
    out["losses"] = [round(x, 4) for x in losses]
    if cuda:
        snap = _gpu_snapshot()
        out.update(measure="torch.cuda.max_memory_allocated / max_memory_reserved",
                   peak_bytes=snap["peak_allocated"] - base, peak_reserved_bytes=snap["peak_reserved"])
    else:
        out.update(measure="pico de RSS del proceso (VmHWM) menos RSS antes de cargar",
                   peak_bytes=peak_rss_bytes() - base, peak_reserved_bytes=None)
    return out


def _task_save_twin(task: dict) -> dict:
    """Build the random-weight twin (bf16) and save it as safetensors, for quantised reloads."""
    from utils.modeling import build_twin

    device = _device_of(task)
    start = time.perf_counter()
    model = build_twin(device=device, dtype=torch.bfloat16) if not task.get("tiny") else _tiny_twin(device)
    model.save_pretrained(task["folder"], safe_serialization=True)
    size = sum(f.stat().st_size for f in Path(task["folder"]).glob("*.safetensors"))
    return {"folder": task["folder"], "safetensors_bytes": size, "seconds": round(time.perf_counter() - start, 1),
            "parameters": sum(p.numel() for p in model.parameters())}


def _task_quantize_cache(task: dict) -> dict:
    """Build the CPU cache of a quantised model (see ``load_quantized_cached``) if it is missing."""
    folder = quantized_cache_folder(task["model"], task["format"])
    existed = _cache_is_fresh(task["model"], task["format"])
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


def _run_task(task: dict) -> dict:
    """Run one task in this process; an out-of-memory error becomes a result, not a crash."""
    try:
        return {"ok": True, **TASKS[task["task"]](task)}
    except torch.cuda.OutOfMemoryError as exc:
        return {"ok": False, "error": f"sin memoria: {str(exc).splitlines()[0]}", **_task_id(task)}
    except RuntimeError as exc:
        if "out of memory" in str(exc).lower() or "can't allocate memory" in str(exc).lower():
            return {"ok": False, "error": f"sin memoria: {str(exc).splitlines()[0]}", **_task_id(task)}
        raise


def _task_id(task: dict) -> dict:
    return {k: task[k] for k in ("name", "format", "variant") if k in task}


RESULT_MARK = "@@RESULT@@"


class ChildProcessFailed(RuntimeError):
    """A ``python -m <module> child`` process ended without printing its result line."""

    def __init__(self, returncode: int, tail: str):
        super().__init__(f"exit {returncode}):\n{tail}")
        self.returncode, self.tail = returncode, tail


def run_module_child(module: str, task: dict, timeout: float, env: dict | None = None) -> dict:
    """Run ``python -m <module> child <task as JSON>`` and return the JSON it prints after ``RESULT_MARK``.

    Raises ``subprocess.TimeoutExpired`` past ``timeout`` and ``ChildProcessFailed`` (exit code and the last lines
    of its output) when no result line comes back.
    """
    cmd = [sys.executable, "-m", module, "child", json.dumps(task)]
    # OMP_WAIT_POLICY=PASSIVE: OpenMP threads that spin while waiting make a CPU shared with other
    # processes several times slower (measured here: a forward pass 4-6x slower with 2 spinning threads).
    child_env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "TRANSFORMERS_VERBOSITY": "error",
                 "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), child_env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=child_env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    raise ChildProcessFailed(proc.returncode, "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:]))


def run_child(task: dict, timeout: float = 1800, env: dict | None = None) -> dict:
    """Run ``task`` in a fresh ``python -m utils.memory child`` process and return its JSON result."""
    try:
        return run_module_child("utils.memory", task, timeout, env)
    except subprocess.TimeoutExpired:
        raise MeasurementError(
            f"measurement {_task_id(task) or task['task']} took over {timeout:.0f} s and was stopped; raise the "
            "notebook's measure_timeout_s parameter or measure fewer formats."
        ) from None
    except ChildProcessFailed as exc:
        raise MeasurementError(
            f"measurement {_task_id(task) or task['task']} failed in its child process ({exc}"
        ) from None


def measure_formats(model: str, formats: Sequence[str], tokenizer: str | None = None, eval_file: str | None = None,
                    eval_formats: Sequence[str] = (), eval_examples: int = 0, max_length: int = 512,
                    device: str | None = None, compute_dtype: str | None = None, timeout: float = 1800,
                    cache_formats: Sequence[str] = ("nf4_dq",), verbose: bool = True) -> list[dict]:
    """Load ``model`` in each format in its own child process; return one result dict per format.

    Formats in ``eval_formats`` also get the completion loss on ``eval_examples`` records of ``eval_file``.
    A format that fails to load is kept as ``{"ok": False, "error": ...}`` (the reason, for the table).
    """
    results = []
    for fmt in formats:
        task = {"task": "weights", "model": model, "format": fmt, "device": device, "compute_dtype": compute_dtype,
                "eval_file": eval_file if fmt in eval_formats else None, "eval_examples": eval_examples,
                "tokenizer": tokenizer or model, "max_length": max_length, "save_cache": fmt in cache_formats}
        start = time.perf_counter()
        try:
            result = run_child(task, timeout)
        except MeasurementError as exc:  # a format this machine cannot load: keep the reason, go on
            result = {"ok": False, "format": fmt, "error": str(exc).splitlines()[-1][:300]}
        if verbose:
            print(f"{fmt:>7}: {'ok' if result['ok'] else result['error']} ({time.perf_counter() - start:.0f} s)")
        results.append(result)
    return results


def measure_training_steps(model: str, variants: Sequence[str], fmt: str = "nf4_dq", amp_dtype: str | None = None,
                           seq_len: int = THESIS.max_seq_length, batch_size: int = THESIS.per_device_train_batch_size,
                           grad_accum: int = THESIS.gradient_accumulation_steps, optim: str = THESIS.optim,
                           steps: int = 1, warmup_steps: int = 0, device: str | None = None, timeout: float = 1800,
                           verbose: bool = True) -> list[dict]:
    """One child process per variant: peak memory of ``steps`` optimizer steps of LoRA training.

    On a CPU a quantised model is quantised once into a cache (its own child process) and each variant
    reloads it, so no variant's measurement carries the quantisation's transient memory.
    """
    results = []
    on_cpu = (device or ("cuda:0" if torch.cuda.is_available() else "cpu")) == "cpu"
    if on_cpu and fmt in QUANTIZED and not _cache_is_fresh(model, fmt):
        run_child({"task": "quantize_cache", "model": model, "format": fmt}, timeout)
    for variant in variants:
        task = {"task": "train_step", "name": f"{fmt}_{variant}", "model": model, "format": fmt, "variant": variant,
                "amp_dtype": amp_dtype, "seq_len": seq_len, "batch_size": batch_size, "grad_accum": grad_accum,
                "optim": optim, "steps": steps, "warmup_steps": warmup_steps, "device": device}
        start = time.perf_counter()
        result = run_child(task, timeout)
        if verbose:
            print(f"{variant:>14}: {'ok' if result['ok'] else result['error']} ({time.perf_counter() - start:.0f} s)")
        results.append(result)
    return results


# --------------------------------------------------------------------------------------------
# Tables from measurements
# --------------------------------------------------------------------------------------------


def weights_table(results: Sequence[dict], config, other_dtype: str | None = None):
    """DataFrame: per format, measured bytes (with the measure named), footprint, analytic, and the gap."""
    import pandas as pd

    rows = []
    for res in results:
        fmt = res["format"]
        if not res.get("ok", True):
            rows.append({"formato": fmt, "medida": res.get("error")})
            continue
        analytic = analytic_weight_bytes(config, fmt, other_dtype or res.get("other_dtype") or "bfloat16")
        row = {
            "formato": fmt,
            "medida": res["measure"],
            "medido_gib": res["weights_bytes"] / GIB,
            "pico_carga_gib": res["peak_load_bytes"] / GIB,
            "get_memory_footprint_gib": res["footprint_bytes"] / GIB,
            "constantes_bnb_mib": res["quant_state_bytes"] / MIB,
            "parametros": res["parameters"],
            "numel_crudo": res["parameters_raw_numel"],
            "analitico_gib": analytic["total"] / GIB,
            "brecha_mib": (res["weights_bytes"] - analytic["total"]) / MIB,
            "brecha_footprint_mib": (res["footprint_bytes"] - analytic["total"]) / MIB,
        }
        if "weights_anon_bytes" in res:
            row["anon_gib"] = res["weights_anon_bytes"] / GIB
            row["file_gib"] = res["weights_file_bytes"] / GIB
        rows.append(row)
    return pd.DataFrame(rows)


def quality_table(results: Sequence[dict]):
    """DataFrame: completion loss and perplexity per format (those that were evaluated)."""
    import pandas as pd

    rows = [{"formato": r["format"], "pérdida": r["eval"]["loss"], "perplejidad": r["eval"]["perplexity"],
             "tokens": r["eval"]["tokens"], "ejemplos": r["eval"]["examples"]}
            for r in results if r.get("ok", True) and "eval" in r]
    table = pd.DataFrame(rows)
    if len(table):
        ref = table["pérdida"].iloc[0]
        table["Δ pérdida vs " + table["formato"].iloc[0]] = table["pérdida"] - ref
    return table


def training_breakdown_table(result: dict, config, compute_dtype: str | None = None):
    """DataFrame: one training step's components, analytic vs measured (bytes → GiB), for one variant."""
    import pandas as pd

    amp = result.get("amp_dtype")
    cuda = str(result.get("device", "")).startswith("cuda")
    analytic = analytic_training_breakdown(
        config, fmt=result["format"], variant=result["variant"], compute_dtype=amp or compute_dtype or "float32",
        autocast=amp is not None, seq_len=result["seq_len"], batch_size=result["batch_size"], optim=result["optim"],
        cuda=cuda,
    )
    static = {k: result[m] for k, m in (("weights", "weights_bytes"), ("lora_params", "lora_param_bytes"),
                                        ("lora_grads", "grad_bytes"), ("optimizer_states", "optimizer_state_bytes"),
                                        ("optimizer_paged", "optimizer_paged_bytes"))}
    counted = sum(v for k, v in static.items() if k != "optimizer_paged") - static["optimizer_paged"]
    rows = [{"componente": BREAKDOWN_LABELS[k], "analítico_gib": analytic[k] / GIB, "medido_gib": static[k] / GIB}
            for k in static]
    act_keys = ("lm_head_cast", "checkpoints", "layer_activations", "logits")
    for k in act_keys:
        rows.append({"componente": BREAKDOWN_LABELS[k], "analítico_gib": analytic[k] / GIB, "medido_gib": None})
    rows.append({"componente": BREAKDOWN_LABELS["activations"],
                 "analítico_gib": sum(analytic[k] for k in act_keys) / GIB,
                 "medido_gib": (result["peak_bytes"] - counted) / GIB})
    rows.append({"componente": BREAKDOWN_LABELS["total"], "analítico_gib": analytic["total"] / GIB,
                 "medido_gib": result["peak_bytes"] / GIB})
    return pd.DataFrame(rows)


def training_table(results: Sequence[dict]):
    """DataFrame: one row per training configuration (peak allocated/reserved or peak RSS, speed)."""
    import pandas as pd

    rows = []
    for r in results:
        row = {"configuración": r.get("name"), "formato": r.get("format"), "variante": r.get("variant"),
               "cómputo": r.get("amp_dtype") or "float32"}
        if not r.get("ok", True):
            row["error"] = r.get("error")
        else:
            row.update({
                "lote×acum×secuencia": f"{r['batch_size']}×{r['grad_accum']}×{r['seq_len']}",
                "pico_gib": r["peak_bytes"] / GIB,
                "pico_reservado_gib": (r["peak_reserved_bytes"] / GIB) if r.get("peak_reserved_bytes") else None,
                "pesos_gib": r["weights_bytes"] / GIB,
                "s_por_paso": r["seconds_per_step"],
                "tokens_por_s": r["tokens_per_second"],
            })
        rows.append(row)
    return pd.DataFrame(rows)


def save_json(data: Any, path: str | Path) -> Path:
    """Write JSON (UTF-8, indented) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    return path


def load_gpu_report(path: str | Path) -> dict:
    """Read a committed ``gpu-report`` JSON, or raise one clear error saying how to produce it."""
    path = resolve_path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist. Produce it on a CUDA GPU with "
            f"`python -m utils.memory gpu-report --out {path}` (it is committed with the repository)."
        )
    return json.loads(path.read_text(encoding="utf-8"))


def report_metadata(report: dict):
    """DataFrame (one column) with what a GPU report says about itself: model, GPU, versions, date."""
    import pandas as pd

    versions = report.get("versions", {})
    rows = {
        "modelo": report.get("label"),
        "GPU": report.get("device"),
        "capacidad de cómputo": report.get("compute_capability"),
        "memoria de la GPU (GiB)": report.get("gpu_memory_gib"),
        "fecha (UTC)": report.get("date"),
        "comando": report.get("command"),
        **{f"versión {k}": v for k, v in versions.items() if v != "absent"},
        "duración (s)": report.get("wall_seconds"),
    }
    return pd.DataFrame({"valor": rows})


def side_by_side(live, twin, live_label: str, twin_label: str):
    """DataFrame: measured and analytic GiB per format, the live model next to the committed twin."""
    import pandas as pd

    def part(table, label):
        t = table.dropna(subset=["medido_gib"]).set_index("formato")[["medido_gib", "analitico_gib"]]
        return t.rename(columns={"medido_gib": f"{label}: medido (GiB)", "analitico_gib": f"{label}: analítico (GiB)"})

    return pd.concat([part(live, live_label), part(twin, twin_label)], axis=1)


def _row(table, column: str, value):
    match = table[table[column] == value] if len(table) and column in table else table.iloc[0:0]
    return None if match.empty else match.iloc[0]


def describe_findings(weights, quality, errors, train, twin_weights, twin_train, live_label: str,
                      budget_gib: float = 8.0, analytic=None, skipped_steps: dict[str, str] | None = None) -> str:
    """Markdown bullets (Spanish) stating what this run's tables show, every number taken from them.

    A table that was not measured (the profile's weights missing) is ``None``; ``analytic`` (the section 2
    table) then gives the architecture's sizes, and ``skipped_steps`` the steps this run left out and why.
    """
    lines = []
    ok = weights.dropna(subset=["medido_gib"]) if weights is not None and "medido_gib" in weights else None
    if ok is None and analytic is not None and len(analytic):
        sizes = ", ".join(f"{FORMAT_LABELS.get(r['formato'], r['formato'])} {r['total_gib']:.3f} GiB"
                          for _, r in analytic.iterrows())
        lines.append(f"- **{live_label}**, tamaño analítico de los pesos (calculado aquí, sin cargarlos): {sizes}.")
        hi, lo = _row(analytic, "formato", "fp32"), _row(analytic, "formato", "nf4_dq")
        if hi is not None and lo is not None:
            ratio = hi["total_gib"] / lo["total_gib"]
            lines.append(f"- fp32 → NF4 + doble cuantización reduce los pesos {ratio:.1f}× "
                         f"(analítico), no 8×: embeddings y normas no se cuantizan y cada bloque de 64 pesos suma "
                         f"sus constantes ({lo['bits_por_parametro']:.2f} bits por parámetro en NF4 + DQ).")
    if ok is not None and len(ok):
        gap = ok["brecha_mib"].abs().max()
        lines.append(f"- **{live_label}**: pesos medidos entre {ok['medido_gib'].min():.3f} y "
                     f"{ok['medido_gib'].max():.3f} GiB según el formato; la mayor diferencia con el tamaño "
                     f"analítico es {gap:.1f} MiB ({ok.iloc[0]['medida']}).")
        hi, lo = _row(ok, "formato", "fp32"), _row(ok, "formato", "nf4_dq")
        if hi is not None and lo is not None:
            ratio = hi["analitico_gib"] / lo["analitico_gib"]
            lines.append(f"- fp32 → NF4 + doble cuantización reduce los pesos {ratio:.1f}× (analítico) en este "
                         f"modelo, no 8×: embeddings y normas no se cuantizan y cada bloque de 64 pesos suma sus "
                         f"constantes.")
    if errors is not None and len(errors):
        mean = errors.groupby("formato")["error_relativo"].mean()
        if {"nf4", "fp4"} <= set(mean.index):
            lines.append(f"- Error relativo medio de reconstrucción de las matrices lineales: NF4 {mean['nf4']:.4f}, "
                         f"FP4 {mean['fp4']:.4f} ({mean['fp4'] / mean['nf4']:.2f}× el de NF4)"
                         + (f", NF4 + DQ {mean['nf4_dq']:.4f}." if "nf4_dq" in mean else "."))
    if quality is not None and len(quality):
        parts = ", ".join(
            f"{FORMAT_LABELS.get(r['formato'], r['formato'])} {r['pérdida']:.4f} (ppl {r['perplejidad']:.2f})"
            for _, r in quality.iterrows()
        )
        lines.append(f"- Pérdida de las respuestas del split de prueba ({int(quality['ejemplos'].iloc[0])} ejemplos, "
                     f"{int(quality['tokens'].iloc[0])} tokens): {parts}.")
        loss = quality.set_index("formato")["pérdida"]
        if {"nf4", "nf4_dq"} <= set(loss.index):
            lines.append(f"  - La doble cuantización cambia la pérdida en {loss['nf4_dq'] - loss['nf4']:+.4f} nats "
                         f"respecto de NF4; NF4 frente a FP4: {loss['nf4'] - loss.get('fp4', float('nan')):+.4f}.")
    if train is not None and len(train) and "pico_gib" in train:
        peaks = train.dropna(subset=["pico_gib"])
        parts = ", ".join(f"{r['variante']} {r['pico_gib']:.3f} GiB" for _, r in peaks.iterrows())
        lines.append(f"- Pico de un paso de entrenamiento ({train.iloc[0]['lote×acum×secuencia']}, "
                     f"{live_label}): {parts}.")
    if twin_weights is not None and len(twin_weights):
        bf16, dq = _row(twin_weights, "formato", "bf16"), _row(twin_weights, "formato", "nf4_dq")
        if bf16 is not None and dq is not None:
            lines.append(f"- Llama-3.2-3B (gemelo, H100): pesos bf16 {bf16['medido_gib']:.3f} GiB, NF4 + DQ "
                         f"{dq['medido_gib']:.3f} GiB ({bf16['medido_gib'] / dq['medido_gib']:.2f}× menos); "
                         f"la mayor brecha analítico–medido es {twin_weights['brecha_mib'].abs().max():.2f} MiB.")
    if twin_train is not None and len(twin_train):
        usable = budget_gib - CUDA_CONTEXT_GIB

        def fits(reserved: float) -> str:
            return "cabe" if reserved <= usable else "no cabe"

        thesis = twin_train.iloc[0]
        lines.append(f"- La configuración original ({thesis['configuración']}) en el gemelo: pico "
                     f"{thesis['pico_gib']:.3f} GiB asignados y {thesis['pico_reservado_gib']:.3f} GiB reservados: "
                     f"{fits(thesis['pico_reservado_gib'])} en {budget_gib:g} GiB con ~{CUDA_CONTEXT_GIB:g} GiB de "
                     f"contexto CUDA (margen {usable - thesis['pico_reservado_gib']:.2f} GiB).")
        for _, r in twin_train.iloc[1:].iterrows():
            if r.get("pico_reservado_gib") is not None and r["pico_reservado_gib"] == r["pico_reservado_gib"]:
                lines.append(f"  - {r['configuración']}: {r['pico_reservado_gib']:.3f} GiB reservados "
                             f"({fits(r['pico_reservado_gib'])}).")
    if skipped_steps:
        lines.append(f"- **No medido en esta corrida**: {'; '.join(skipped_steps)} (motivo: "
                     f"{next(iter(skipped_steps.values()))}).")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def plot_memory_by_format(panels: Sequence[tuple[str, Any, Any, float | None]]):
    """Bar chart per panel: weights per format (measured vs analytic) and the training peaks, in GiB.

    ``panels`` holds ``(title, weights_table, training_table, budget_gib)``; a training bar shows the peak
    *reserved* where the table has it (what a card must hold), else the peak measured. The budget line
    (the RTX 2070 SUPER's 8 GiB) is drawn where ``budget_gib`` is given.
    """
    import matplotlib.pyplot as plt

    from utils.plotting import COLORS, draw_budget

    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), squeeze=False)
    for ax, (title, weights, train, budget) in zip(axes[0], panels):
        w = weights.dropna(subset=["medido_gib"])
        names = [FORMAT_LABELS.get(f, f) for f in w["formato"]]
        x = list(range(len(w)))
        ax.bar([i - 0.2 for i in x], w["medido_gib"], width=0.4, color=COLORS["tuned"], label="pesos, medido")
        ax.bar([i + 0.2 for i in x], w["analitico_gib"], width=0.4, color=COLORS["base"], label="pesos, analítico")
        if train is not None and len(train):
            t = train.dropna(subset=["pico_gib"]).reset_index(drop=True)
            for j, row in t.iterrows():
                reserved = row.get("pico_reservado_gib")
                peak = reserved if reserved is not None and reserved == reserved else row["pico_gib"]
                ax.bar(len(w) + j, peak, width=0.6, color=COLORS["original"] if j == 0 else COLORS["eval"],
                       label={0: "pico de un paso: configuración original",
                              1: "pico de un paso: variantes"}.get(j))
                ax.annotate(f"{peak:.2f}", (len(w) + j, peak), ha="center", va="bottom", fontsize=7)
                names.append(str(row["configuración"]).replace("_", " "))
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=40, ha="right", fontsize=8)
        ax.set_ylabel("memoria (GiB)")
        ax.set_title(title, fontsize=10)
        if budget:
            draw_budget(ax, budget)
            ax.axhline(budget - CUDA_CONTEXT_GIB, color=COLORS["budget"], linestyle=":", linewidth=1.0,
                       label=f"8 GiB − contexto CUDA (~{CUDA_CONTEXT_GIB:g} GiB)")
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def plot_quantization_error(errors):
    """Two panels: relative error per layer (mean over the seven linear layers) and its histogram."""
    import matplotlib.pyplot as plt

    import numpy as np

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.0))
    bins = np.histogram_bin_edges(errors["error_relativo"], bins=40)
    for fmt, group in errors.groupby("formato", sort=False):
        per_layer = group.groupby("capa")["error_relativo"].mean()
        ax1.plot(per_layer.index, per_layer.values, marker="o", markersize=3, label=FORMAT_LABELS.get(fmt, fmt))
        ax2.hist(group["error_relativo"], bins=bins, alpha=0.55, label=FORMAT_LABELS.get(fmt, fmt))
    ax1.set_xlabel("capa del decodificador")
    ax1.set_ylabel("error relativo ‖W − Ŵ‖ / ‖W‖")
    ax1.set_title("Error de reconstrucción por capa (media de 7 lineales)", fontsize=10)
    ax1.legend()
    ax2.set_xlabel("error relativo por matriz")
    ax2.set_ylabel("matrices")
    ax2.set_title("Distribución sobre todas las matrices lineales", fontsize=10)
    ax2.legend()
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# GPU report (the H100 measurements of the twin)
# --------------------------------------------------------------------------------------------

GPU_WEIGHT_FORMATS = ("fp32", "bf16", "fp16", "int8", "fp4", "nf4", "nf4_dq")
# (name, storage format, variant, autocast dtype); all at 1 × 2 × 512, paged AdamW 8-bit, LoRA r=32 × 7
GPU_TRAIN_CONFIGS = (
    ("qlora_fp16_prepare", "nf4_dq", "prepare", "float16"),  # the original script
    ("qlora_bf16_prepare", "nf4_dq", "prepare", "bfloat16"),
    ("qlora_fp16_no_prepare_gc", "nf4_dq", "no_prepare_gc", "float16"),
    ("qlora_bf16_no_prepare_gc", "nf4_dq", "no_prepare_gc", "bfloat16"),
    ("qlora_fp16_no_prepare", "nf4_dq", "no_prepare", "float16"),
    ("lora_fp16_weights_gc", "fp16", "no_prepare_gc", "float16"),
    ("lora_fp32_weights_gc", "fp32", "no_prepare_gc", "float16"),
)


def _tiny_config():
    """A 2-layer Llama with the twin's proportions, for testing the report logic on a CPU."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True)


def _tiny_twin(device: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(_tiny_config(), dtype=torch.bfloat16)


def _config_dict(config) -> dict:
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "tie_word_embeddings")
    return {k: getattr(config, k) for k in keys} | {"head_dim": _head_dim(config)}


def gpu_report(out: Path, tiny: bool = False, folder: str | None = None, formats: Sequence[str] = GPU_WEIGHT_FORMATS,
               train_configs: Sequence[tuple] = GPU_TRAIN_CONFIGS, steps: int = 3, warmup_steps: int = 1,
               jobs: int = 1, timeout: float = 900) -> dict:
    """Measure the twin's weights per format and its training-step peaks; write the JSON to ``out``.

    The JSON is rewritten after every training configuration, so a run stopped by a time limit keeps
    what it measured.
    """
    from concurrent.futures import ThreadPoolExecutor

    from utils.modeling import twin_config
    from utils.provenance import device_info, library_versions

    started = time.perf_counter()
    config = _tiny_config() if tiny else twin_config()
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    work = Path(folder or tempfile.mkdtemp(prefix="twin-"))
    log = print
    log(f"[gpu-report] device {device}; twin folder {work}; tiny={tiny}")
    saved = run_child({"task": "save_twin", "folder": str(work), "tiny": tiny, "device": device}, timeout)
    log(f"[gpu-report] saved twin: {saved.get('safetensors_bytes', 0) / GB:.2f} GB in {saved.get('seconds')} s")
    report = {
        "label": TWIN_LABEL if not tiny else "tiny twin (logic test, not a result)",
        "model_config": _config_dict(config),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m utils.memory gpu-report" + (" --tiny" if tiny else ""),
        **device_info(),
        "versions": library_versions(),
        "notes": ("Random weights: memory does not depend on weight values. Weights: each format loaded in a fresh "
                  "process from the bf16 safetensors of the twin (quantised formats with compute dtype bf16); "
                  "measure = torch.cuda.memory_allocated after - before, peak = max_memory_allocated during loading. "
                  "Training: manual loop, random token ids without padding, autocast, GradScaler for fp16, clip 0.5, "
                  f"paged AdamW 8-bit, LoRA r={THESIS.lora_r} alpha={THESIS.lora_alpha} on the seven projections; "
                  f"{warmup_steps} warm-up + {steps} measured optimizer steps; peak over all of them."),
        "twin_save": saved,
        "weights": [],
        "train": [],
    }

    def weights_task(fmt: str) -> dict:
        return run_child({"task": "weights", "model": str(work), "format": fmt, "device": device,
                          "compute_dtype": "bfloat16" if device != "cpu" else None}, timeout)

    # Weight measurements read each process's own allocator counters, so they may run side by side.
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for fmt, res in zip(formats, pool.map(weights_task, formats)):
            log(f"[gpu-report] weights {fmt:>7}: " + (f"{res['weights_bytes'] / GIB:.3f} GiB (peak load "
                f"{res['peak_load_bytes'] / GIB:.3f} GiB, {res['load_seconds']} s)" if res["ok"] else res["error"]))
            report["weights"].append(res)
    save_json(report, out)
    # Training steps one at a time, so that no other process shares their timings.
    for name, fmt, variant, amp in train_configs:
        res = run_child({"task": "train_step", "name": name, "model": str(work), "format": fmt, "variant": variant,
                         "amp_dtype": amp if device != "cpu" else None,
                         "seq_len": THESIS.max_seq_length if not tiny else 64,
                         "batch_size": THESIS.per_device_train_batch_size,
                         "grad_accum": THESIS.gradient_accumulation_steps, "optim": THESIS.optim,
                         "steps": steps, "warmup_steps": warmup_steps, "device": device, "use_cache": False}, timeout)
        if res["ok"]:
            log(f"[gpu-report] train {name:>26}: peak {res['peak_bytes'] / GIB:.3f} GiB allocated, "
                f"{(res['peak_reserved_bytes'] or 0) / GIB:.3f} GiB reserved, {res['seconds_per_step']:.3f} s/step, "
                f"losses {res['losses'][-2:]}")
        else:
            log(f"[gpu-report] train {name:>26}: {res['error']}")
        report["train"].append(res)
        report["wall_seconds"] = round(time.perf_counter() - started, 1)
        save_json(report, out)
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    save_json(report, out)
    log(f"[gpu-report] wrote {out} in {report['wall_seconds']} s")
    if folder is None:
        shutil.rmtree(work, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    """Command line: ``gpu-report`` (measure the twin) and ``child`` (internal: one measurement task)."""
    parser = argparse.ArgumentParser(prog="python -m utils.memory", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("gpu-report", help="measure the Llama-3.2-3B twin on this machine's GPU")
    rep.add_argument("--out", required=True, help="JSON file to write, e.g. results/02_twin_gpu_memory.json")
    rep.add_argument("--tiny", action="store_true", help="a 2-layer twin: tests the logic in a minute on a CPU")
    rep.add_argument("--folder", help="where to save the bf16 twin (default: a temporary folder)")
    rep.add_argument("--steps", type=int, default=3, help="measured optimizer steps per training configuration")
    rep.add_argument("--jobs", type=int, default=3, help="weight measurements run side by side (own processes)")
    child = sub.add_parser("child", help="internal: run one measurement task given as JSON")
    child.add_argument("task")
    args = parser.parse_args(argv)
    if args.command == "child":
        result = _run_task(json.loads(args.task))
        print(RESULT_MARK + json.dumps(result, default=str), flush=True)
        return 0
    if not torch.cuda.is_available() and not args.tiny:
        print("error: gpu-report needs a CUDA GPU (torch.cuda.is_available() is False here). "
              "Run it on a GPU machine, or pass --tiny to test the logic on this CPU.", file=sys.stderr)
        return 1
    gpu_report(resolve_path(args.out), tiny=args.tiny, folder=args.folder, steps=args.steps, jobs=args.jobs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
