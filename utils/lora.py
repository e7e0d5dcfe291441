"""LoRA adapters: where they sit, how many parameters they add, their size on disk, and the original claims.

Counts come three ways and are compared: analytically from the architecture (r × (in + out) per adapted
linear layer), from PEFT's own helper (``get_nb_trainable_parameters``, which unpacks 4-bit tensors), and
from a plain ``numel()`` sum (which does not: a 4-bit ``Params4bit`` stores two weights per ``uint8``).
Sizes on disk are measured by writing safetensors files: the real adapter for the profile's model, and for
the Llama-3.2-3B twin (built on the ``meta`` device, without weights) the LoRA tensors alone, created with
the right shapes and dtype.

This module computes and returns tables; notebook 03's figure is drawn by ``utils.plotting.lora`` and its
Spanish findings and LaTeX claims table are written by ``utils.reports.lora``.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
from peft import get_peft_model, get_peft_model_state_dict, prepare_model_for_kbit_training
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig

from utils.config import THESIS
from utils.device import default_device
from utils.memory import (ATTENTION_MODULES, LINEAR_MODULES, MLP_MODULES, QUANTIZED, analytic_parameter_counts,
                          analytic_weight_bytes, linear_shapes, load_quantized_cached, unpacked_numel)
from utils.modeling import build_lora_config, load_model, twin_config
from utils.numbers import fmt_num, fmt_pct, fmt_ratio, fmt_unit
from utils.units import CUDA_CONTEXT_GIB, GB, GIB, MB, MIB

MODULE_SETS = {"attention": ATTENTION_MODULES, "mlp": MLP_MODULES, "all": LINEAR_MODULES}
RANKS = (4, 8, 16, 32, 64, 128)


# --------------------------------------------------------------------------------------------
# Analytic counts
# --------------------------------------------------------------------------------------------


def analytic_lora_counts(config, r: int = THESIS.lora_r,
                         target_modules: Sequence[str] = THESIS.target_modules) -> dict[str, int]:
    """LoRA parameters per adapted module over all layers: r × (in + out) for A (r × in) and B (out × r)."""
    layers = config.num_hidden_layers
    return {module: layers * r * (in_f + out_f)
            for module, (out_f, in_f) in linear_shapes(config).items() if module in target_modules}


def analytic_lora_parameters(config, r: int = THESIS.lora_r,
                             target_modules: Sequence[str] = THESIS.target_modules) -> int:
    """Total LoRA parameters of a Llama-architecture config."""
    return sum(analytic_lora_counts(config, r, target_modules).values())


def analytic_adapter_bytes(config, r: int = THESIS.lora_r, target_modules: Sequence[str] = THESIS.target_modules,
                           bytes_per_param: int = 4) -> int:
    """Bytes of the adapter's tensors (fp32 by default, as PEFT keeps and saves them); no file header."""
    return analytic_lora_parameters(config, r, target_modules) * bytes_per_param


# --------------------------------------------------------------------------------------------
# Attaching LoRA and counting on the model
# --------------------------------------------------------------------------------------------


def load_base_model(name: str, quantization: str | None = "nf4_dq", prepare: bool = True):
    """The base model as the original script loads it (4-bit NF4 + DQ), then ``prepare_model_for_kbit_training``.

    On a CPU a quantised model comes from the cache that notebook 02 fills (``utils.memory.load_quantized_cached``:
    quantised once, then reloaded in about a second).
    """
    device = default_device()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if device.type == "cpu" and quantization in QUANTIZED:
            model = load_quantized_cached(name, quantization)
        else:
            model = load_model(name, quantization=quantization, device=device)
        if prepare and quantization in QUANTIZED:
            model = prepare_model_for_kbit_training(model)
    return model


def attach_lora(model, r: int = THESIS.lora_r, lora_alpha: int = THESIS.lora_alpha,
                lora_dropout: float = THESIS.lora_dropout, target_modules: Sequence[str] = THESIS.target_modules):
    """``get_peft_model`` with the original script's ``LoraConfig`` (values overridable)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, build_lora_config(r, lora_alpha, lora_dropout, target_modules))


def lora_tensors(peft_model) -> list[dict[str, Any]]:
    """One row per LoRA matrix: layer, module, A or B, shape, parameters, dtype."""
    rows = []
    for name, param in peft_model.named_parameters():
        if "lora_" not in name:
            continue
        parts = name.split(".")
        layer = int(parts[parts.index("layers") + 1]) if "layers" in parts else -1
        module = next(p for p in parts if p in LINEAR_MODULES)
        rows.append({"capa": layer, "módulo": module, "matriz": "A" if "lora_A" in name else "B",
                     "forma": tuple(param.shape), "parametros": param.numel(), "dtype": str(param.dtype)})
    return rows


def per_module_table(peft_model, config, r: int = THESIS.lora_r,
                     target_modules: Sequence[str] = THESIS.target_modules):
    """DataFrame: LoRA parameters per module kind, counted on the model vs r × (in + out) × layers."""
    rows = pd.DataFrame(lora_tensors(peft_model))
    counted = rows.groupby("módulo")["parametros"].sum()
    analytic = analytic_lora_counts(config, r, target_modules)
    shapes = linear_shapes(config)
    table = pd.DataFrame([
        {"módulo": m, "tipo": "atención" if m in ATTENTION_MODULES else "MLP",
         "entrada × salida": f"{fmt_num(shapes[m][1])} × {fmt_num(shapes[m][0])}",
         "A": f"{r} × {fmt_num(shapes[m][1])}", "B": f"{fmt_num(shapes[m][0])} × {r}",
         "contado": int(counted.get(m, 0)), "analítico": analytic[m]}
        for m in LINEAR_MODULES if m in analytic
    ])
    total = {"módulo": "total", "contado": int(table["contado"].sum()), "analítico": int(table["analítico"].sum())}
    table = pd.concat([table, pd.DataFrame([total])], ignore_index=True)
    table["coincide"] = table["contado"] == table["analítico"]
    return table


def per_layer_table(peft_model):
    """DataFrame: LoRA parameters per decoder layer (rows) and module (columns), with totals."""
    rows = pd.DataFrame(lora_tensors(peft_model))
    table = rows.pivot_table(index="capa", columns="módulo", values="parametros", aggfunc="sum")
    table = table[[m for m in LINEAR_MODULES if m in table.columns]]
    table["total de la capa"] = table.sum(axis=1)
    return table


def count_parameters(peft_model) -> dict[str, int]:
    """Trainable and total parameters three ways: PEFT's helper, plain ``numel()``, unpacked 4-bit."""
    trainable, total = peft_model.get_nb_trainable_parameters()
    params = list(peft_model.parameters())
    return {
        "peft_trainable": trainable,
        "peft_all": total,
        "numel_trainable": sum(p.numel() for p in params if p.requires_grad),
        "numel_all": sum(p.numel() for p in params),
        "unpacked_all": sum(unpacked_numel(p) for p in params),
        "packed_4bit_tensors": sum(1 for p in params if p.__class__.__name__ == "Params4bit"),
    }


def count_table(counts: dict[str, int], config, r: int = THESIS.lora_r,
                target_modules: Sequence[str] = THESIS.target_modules):
    """DataFrame comparing PEFT's counts, a plain ``numel`` sum and the analytic count, with the reason."""
    base = sum(analytic_parameter_counts(config).values())
    lora = analytic_lora_parameters(config, r, target_modules)
    packed = counts["packed_4bit_tensors"] > 0
    pct = lambda a, b: fmt_pct(a / b, 4)  # noqa: E731
    return pd.DataFrame([
        {"cuenta": "entrenables", "PEFT (get_nb_trainable_parameters)": fmt_num(counts["peft_trainable"]),
         "suma de numel()": fmt_num(counts["numel_trainable"]), "analítica": fmt_num(lora),
         "por qué difieren": "no difieren: los adaptadores LoRA no se cuantizan"},
        {"cuenta": "todos", "PEFT (get_nb_trainable_parameters)": fmt_num(counts["peft_all"]),
         "suma de numel()": fmt_num(counts["numel_all"]), "analítica": fmt_num(base + lora),
         "por qué difieren": ("numel() cuenta elementos uint8 de los tensores de 4 bits, y cada uno guarda dos "
                              "pesos; PEFT multiplica esos tensores por 2" if packed
                              else "no difieren: no hay tensores de 4 bits")},
        {"cuenta": "% entrenable",
         "PEFT (get_nb_trainable_parameters)": pct(counts["peft_trainable"], counts["peft_all"]),
         "suma de numel()": pct(counts["numel_trainable"], counts["numel_all"]),
         "analítica": pct(lora, base + lora), "por qué difieren": "sigue de la fila anterior"},
    ])


# --------------------------------------------------------------------------------------------
# Size on disk
# --------------------------------------------------------------------------------------------


def saved_adapter_size(peft_model, folder: str | os.PathLike | None = None) -> dict[str, int]:
    """Save the adapter with ``save_pretrained`` (safetensors) and return the file's bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(folder or tmp)
        peft_model.save_pretrained(target, safe_serialization=True)
        path = target / "adapter_model.safetensors"
        return {"file_bytes": path.stat().st_size, "tensor_bytes": _tensor_bytes_of_file(path)}


def materialized_adapter_size(peft_model, dtype: torch.dtype | None = None) -> dict[str, int]:
    """Size of the adapter file of a model built on ``meta``: only the LoRA tensors are created and saved.

    ``get_peft_model_state_dict`` gives the names and shapes ``save_pretrained`` would write; each becomes an
    uninitialised CPU tensor of that shape (in its own dtype, or ``dtype``) and the dict is written with
    ``safetensors.torch.save_file`` with PEFT's metadata. The file's size depends on names, shapes and dtypes
    only, and equals what ``save_pretrained`` writes for the same adapter.
    """
    state = get_peft_model_state_dict(peft_model)
    tensors = {k: torch.empty(tuple(v.shape), dtype=dtype or v.dtype) for k, v in state.items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "adapter_model.safetensors"
        save_file(tensors, str(path), metadata={"format": "pt"})  # the metadata PEFT's save_pretrained writes
        return {"file_bytes": path.stat().st_size, "tensor_bytes": _tensor_bytes_of_file(path)}


def _tensor_bytes_of_file(path: Path) -> int:
    """Bytes of the tensors in a safetensors file (its size without the JSON header)."""
    total = 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            shape = f.get_slice(key).get_shape()
            total += math.prod(shape) * torch.empty(0, dtype=_dtype_of(f.get_slice(key).get_dtype())).element_size()
    return total


def _dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name."""
    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[name]


# --------------------------------------------------------------------------------------------
# Sweep over r and target modules
# --------------------------------------------------------------------------------------------


def lora_sweep(model, config, label: str, ranks: Sequence[int] = RANKS, module_sets: Sequence[str] = tuple(MODULE_SETS),
               save_ranks: Sequence[int] = (), meta: bool = False):
    """DataFrame: for each r and module set, PEFT's count vs analytic, and the adapter size saved vs analytic.

    ``model`` is the base model (restored after each configuration with ``unload``). Sizes are measured for
    ranks in ``save_ranks``: by ``save_pretrained`` on a real model, by materialising the LoRA tensors when
    ``meta`` is true.
    """
    rows = []
    for key in module_sets:
        if key not in MODULE_SETS:
            raise ValueError(f"module set {key!r} is unknown: use one of {sorted(MODULE_SETS)}")
        for r in ranks:
            peft_model = attach_lora(model, r=r, target_modules=MODULE_SETS[key])
            trainable, _ = peft_model.get_nb_trainable_parameters()
            row = {"modelo": label, "módulos": key, "r": r, "entrenables (PEFT)": trainable,
                   "entrenables (analítico)": analytic_lora_parameters(config, r, MODULE_SETS[key]),
                   "MB analítico (fp32)": analytic_adapter_bytes(config, r, MODULE_SETS[key]) / MB,
                   "MB guardado": None, "medición del tamaño": None}
            if r in save_ranks:
                size = materialized_adapter_size(peft_model) if meta else saved_adapter_size(peft_model)
                row["MB guardado"] = size["file_bytes"] / MB
                row["encabezado (bytes)"] = size["file_bytes"] - size["tensor_bytes"]
                row["medición del tamaño"] = ("tensores LoRA materializados + save_file" if meta
                                              else "save_pretrained (safetensors)")
            rows.append(row)
            model = peft_model.unload()
    table = pd.DataFrame(rows)
    table["coincide"] = table["entrenables (PEFT)"] == table["entrenables (analítico)"]
    return table


# --------------------------------------------------------------------------------------------
# Where the adapters sit, and their initialisation
# --------------------------------------------------------------------------------------------


def decoder_layer_tree(peft_model, layer: int = 0) -> str:
    """The printed module tree of one decoder layer of a PEFT model (the rest of the model cut away)."""
    return f"model.layers[{layer}] = " + str(peft_model.base_model.model.model.layers[layer])


def check_zero_init(peft_model, input_ids: torch.Tensor) -> dict[str, Any]:
    """B = 0 at step 0: every ``lora_B`` is zero and the logits equal the base model's (adapter disabled)."""
    b_zero = all(bool((p == 0).all()) for n, p in peft_model.named_parameters() if "lora_B" in n)
    a_nonzero = all(bool((p != 0).any()) for n, p in peft_model.named_parameters() if "lora_A" in n)
    was_training = peft_model.training
    peft_model.eval()  # no dropout: the comparison is exact
    with torch.no_grad():
        adapted = peft_model(input_ids=input_ids).logits.float()
        with peft_model.disable_adapter():
            base = peft_model(input_ids=input_ids).logits.float()
    peft_model.train(was_training)
    return {"todas las B son cero": b_zero, "todas las A son distintas de cero": a_nonzero,
            "máx |logits adaptado − logits base|": float((adapted - base).abs().max()),
            "logits idénticos": bool(torch.equal(adapted, base)), "tokens comparados": int(input_ids.numel())}


# --------------------------------------------------------------------------------------------
# The original analysis' claims
# --------------------------------------------------------------------------------------------

# Each claim as the original analysis (train_peft_v3.py, seed document) states it, its numbers written es-AR;
# "tolerance" is the relative difference still called correct ("~" figures); 0 means the figure is exact (a count);
# "unit": a size in MB or GB, judged by ``_verdict`` in decimal and binary units (``CLAIM_RULE``).
ORIGINAL_CLAIMS = (
    {"key": "params_3b", "claim": "parámetros del modelo base", "text": "3 billones", "value": 3e12,
     "tolerance": 0.10, "source": "sección 2, modelo base"},
    {"key": "trainable", "claim": "parámetros entrenables", "text": "83.886.080", "value": 83_886_080,
     "tolerance": 0.0, "source": "sección 6, salida de print_trainable_parameters"},
    {"key": "all", "claim": "parámetros totales", "text": "3.213.004.800", "value": 3_213_004_800,
     "tolerance": 0.0, "source": "sección 6"},
    {"key": "trainable_pct", "claim": "% entrenable", "text": "2,61 %", "value": 2.61, "tolerance": 0.005,
     "source": "sección 6"},
    {"key": "adapter_mb", "claim": "tamaño del adaptador", "text": "~185 MB", "value": 185.0, "tolerance": 0.10,
     "unit": "MB",
     "source": "sección 11"},
    {"key": "model_gb", "claim": "tamaño del modelo completo", "text": "~6 GB", "value": 6.0, "tolerance": 0.10,
     "unit": "GB",
     "source": "sección 11"},
    {"key": "vram_no_quant_gb", "claim": "VRAM sin cuantización", "text": "~12 GB", "value": 12.0,
     "tolerance": 0.10, "unit": "GB",
     "source": "sección 3, impacto en recursos"},
    {"key": "vram_qlora_gb", "claim": "VRAM con QLoRA", "text": "5–6 GB", "value": (5.0, 6.0), "tolerance": 0.0,
     "unit": "GB",
     "source": "sección 3, impacto en recursos"},
    {"key": "saving_4bit", "claim": "ahorro de memoria de 4 bits", "text": "~8×", "value": 8.0, "tolerance": 0.10,
     "source": "sección 3"},
    {"key": "prepare", "claim": "qué hace prepare_model_for_kbit_training",
     "text": "congela los pesos; habilita gradientes solo para los adaptadores; ajusta las normas",
     "value": None, "tolerance": 0.0, "source": "sección 5"},
)

# Public architectures searched for the claimed counts (values of each model's config.json on the Hub).
KNOWN_ARCHITECTURES = {
    "Llama-3.2-1B": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "Llama-3.2-3B": None,  # the committed twin config (utils/assets/llama-3.2-3b-config.json)
    "Llama-3.1-8B": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}
SEARCH_MODULE_SETS = {**MODULE_SETS, "q_v": ("q_proj", "v_proj")}


def known_config(name: str):
    """``LlamaConfig`` of a public Llama architecture of ``KNOWN_ARCHITECTURES``."""
    values = KNOWN_ARCHITECTURES[name]
    return twin_config() if values is None else LlamaConfig(**values)


def search_lora_counts(target: int, ranks: Sequence[int] = (4, 8, 16, 32, 64, 128, 256)):
    """DataFrame of (architecture, r, module set) whose LoRA count is exactly ``target``, with the formula."""
    rows = []
    for arch in KNOWN_ARCHITECTURES:
        config = known_config(arch)
        for key, modules in SEARCH_MODULE_SETS.items():
            for r in ranks:
                n = analytic_lora_parameters(config, r, modules)
                if n == target:
                    per_layer = sum(i + o for m, (o, i) in linear_shapes(config).items() if m in modules)
                    rows.append({"arquitectura": arch, "r": r, "módulos": key, "capas": config.num_hidden_layers,
                                 "Σ (in + out) por capa": per_layer,
                                 "fórmula": f"{config.num_hidden_layers} × {r} × {fmt_num(per_layer)} = "
                                            f"{fmt_num(n)}"})
    return pd.DataFrame(rows)


def search_total_counts(target: int, ranks: Sequence[int] = (4, 8, 16, 32, 64, 128, 256)):
    """DataFrame: the base and base + LoRA totals of the known architectures closest to ``target``."""
    rows = []
    for arch in KNOWN_ARCHITECTURES:
        config = known_config(arch)
        base = sum(analytic_parameter_counts(config).values())
        rows.append({"arquitectura": arch, "configuración": "modelo base", "total": base})
        for key, modules in SEARCH_MODULE_SETS.items():
            for r in ranks:
                rows.append({"arquitectura": arch, "configuración": f"base + LoRA r={r} ({key})",
                             "total": base + analytic_lora_parameters(config, r, modules)})
    table = pd.DataFrame(rows)
    table["diferencia con lo declarado"] = table["total"] - target
    return table.reindex(table["diferencia con lo declarado"].abs().sort_values().index).head(5)


# The written unit of a size claim, and the two readings of it: as written (10**6, 10**9 bytes) and binary.
UNIT_READINGS = {"MB": ((MB, "MB"), (MIB, "MiB")), "GB": ((GB, "GB"), (GIB, "GiB"))}

# The one rule every row of the claims table is judged by (shown with the table and in its LaTeX notes).
CLAIM_RULE = (
    "Regla del veredicto, la misma para todas las filas: un conteo tiene que coincidir exactamente, un rango tiene "
    "que contener lo medido y una cifra aproximada puede diferir hasta su tolerancia (10 % para las que llevan «~»). "
    "Las cifras en MB o GB se leen de dos maneras, en unidades decimales (10⁶ y 10⁹ bytes) y binarias (MiB y GiB, que "
    "Windows muestra como «GB»), y cuentan como correctas si alguna de las dos lecturas cumple. La VRAM es la que "
    f"ocupa la tarjeta: el pico reservado de un paso más el contexto CUDA ({fmt_unit(CUDA_CONTEXT_GIB, 'GiB', 1)}, "
    "la misma cota que usa el capítulo 02)."
)


def _fits(claim: dict, measured: float) -> bool:
    """Whether one reading of the measurement is within the claim's range or tolerance."""
    value = claim["value"]
    if isinstance(value, tuple):
        return value[0] <= measured <= value[1]
    if claim["tolerance"] == 0:
        return measured == value
    return abs(measured - value) <= claim["tolerance"] * abs(value)


def _verdict(claim: dict, measured: float | bool) -> str:
    """"correcto" when the measured value is within the claim's range or tolerance, else "incorrecto" (``CLAIM_RULE``).

    A claim without a number (``value`` None) is measured as a truth value: ``measured`` says whether it holds. A
    claim with a ``unit`` (MB, GB) gets ``measured`` in bytes and is correct when either reading fits: in the unit as
    written or in its binary twin (MiB, GiB).
    """
    if claim["value"] is None:
        return "correcto" if measured else "incorrecto"
    readings = [measured / size for size, _ in UNIT_READINGS[claim["unit"]]] if claim.get("unit") else [measured]
    return "correcto" if any(_fits(claim, reading) for reading in readings) else "incorrecto"


def _readings(claim: dict, n_bytes: float, decimals: int = 2) -> str:
    """``en GB son 6,27 (no cumple); en GiB, 5,84 (cumple)``: a size read both ways and whether each reading fits."""
    (first, first_unit), (second, second_unit) = UNIT_READINGS[claim["unit"]]

    def verdict(reading: float) -> str:
        return "cumple" if _fits(claim, reading) else "no cumple"

    return (f"en {first_unit} son {fmt_num(n_bytes / first, decimals)} ({verdict(n_bytes / first)}); en "
            f"{second_unit}, {fmt_num(n_bytes / second, decimals)} ({verdict(n_bytes / second)})")


# "On what" each claim was measured: the twin's counts come from the meta-device model (no weights).
TWIN_ON = "gemelo de Llama-3.2-3B (meta, sin pesos)"
ClaimRow = tuple[str, Any, str, str, str]  # (claim key, measured value, measured as shown, on what, why)


def _gpu_on(gpu: dict) -> str:
    return f"gemelo de Llama-3.2-3B en una {gpu['device']}"


def _parameter_claim_rows(measured: dict[str, Any], claimed: dict[str, dict]) -> list[ClaimRow]:
    """Rows of the model's size in words, the trainable count, the total count and the trainable share."""
    counts = measured["twin_counts"]
    base = counts["peft_all"] - counts["peft_trainable"]
    matches = [f"{r['arquitectura']} con r = {r['r']} en {r['módulos']}: {r['fórmula']}"
               for _, r in measured["trainable_search"].iterrows()]
    match_text = "; ".join(matches) or "ninguna arquitectura conocida da esa cifra"
    nearest = measured["total_search"].iloc[0]
    twin = known_config("Llama-3.2-3B")
    per_layer = sum(i + o for m, (o, i) in linear_shapes(twin).items() if m in THESIS.target_modules)
    share = counts["peft_trainable"] / counts["peft_all"]
    claimed_share = claimed["trainable"]["value"] / claimed["all"]["value"]
    return [
        ("params_3b", base, f"{fmt_num(base)} = {fmt_num(base / 1e9, 2)} mil millones", TWIN_ON,
         f"En español un billón es 10¹² (un millón de millones): 3 billones serían mil veces más. Tiene "
         f"{fmt_num(base / 1e9, 2)} × 10⁹ parámetros: «3B» es el billion inglés (10⁹). Debe decir «3 mil "
         f"millones» o «3,2 × 10⁹ parámetros»."),
        ("trainable", counts["peft_trainable"], fmt_num(counts["peft_trainable"]), TWIN_ON,
         f"La cifra declarada es la de otra arquitectura ({match_text}). En Llama-3.2-3B, "
         f"{twin.num_hidden_layers} capas × r = {THESIS.lora_r} × {fmt_num(per_layer)} = "
         f"{fmt_num(counts['peft_trainable'])}."),
        ("all", counts["peft_all"], fmt_num(counts["peft_all"]), TWIN_ON,
         f"PEFT suma base ({fmt_num(base)}) + LoRA ({fmt_num(counts['peft_trainable'])}). Lo declarado no es la "
         f"base más los {claimed['trainable']['text']} declarados; lo más cercano es {nearest['arquitectura']} "
         f"{nearest['configuración']} ({fmt_num(nearest['total'])}, diferencia "
         f"{fmt_num(nearest['diferencia con lo declarado'])})."),
        ("trainable_pct", 100 * share, fmt_pct(share, 3), TWIN_ON,
         f"Sale de las dos cifras anteriores: {claimed['trainable']['text']} / {claimed['all']['text']} = "
         f"{fmt_pct(claimed_share, 2)} es coherente con ellas, pero ambas están mal."),
    ]


def _adapter_claim_row(measured: dict[str, Any], claimed: dict[str, dict]) -> ClaimRow:
    """Row of the adapter's size on disk: the twin's materialised adapter file."""
    counts, adapter = measured["twin_counts"], measured["twin_adapter"]
    size_mb = adapter["file_bytes"] / MB
    return ("adapter_mb", adapter["file_bytes"],
            f"{fmt_unit(size_mb, 'MB', 1)} = {fmt_unit(adapter['file_bytes'] / MIB, 'MiB', 1)}",
            TWIN_ON + ", safetensors",
            f"{fmt_num(counts['peft_trainable'])} parámetros × 4 bytes (PEFT guarda los adaptadores en fp32) + "
            f"{fmt_num(adapter['file_bytes'] - adapter['tensor_bytes'])} bytes de encabezado. Con los "
            f"{claimed['trainable']['text']} declarados serían "
            f"{fmt_unit(claimed['trainable']['value'] * 4 / MB, 'MB', 1)}"
            f": la cifra de tamaño no es coherente con la de parámetros. Con la cuenta real, "
            f"{_readings(claimed['adapter_mb'], adapter['file_bytes'], 1)}.")


def _model_size_claim_row(gpu: dict, claim: dict) -> ClaimRow:
    """Row of the whole model's size: the twin's 16-bit weights, analytic and as measured on the GPU."""
    weights = {r["format"]: r for r in gpu["weights"] if r.get("ok")}
    analytic = analytic_weight_bytes(known_config("Llama-3.2-3B"), "bf16")["total"]
    measured = weights["bf16"]["weights_bytes"]
    return ("model_gb", measured,
            f"{fmt_unit(measured / GB, 'GB', 2)} = {fmt_unit(measured / GIB, 'GiB', 2)} (bf16)",
            _gpu_on(gpu) + ", pesos bf16",
            f"Analítico: {fmt_num(analytic_parameter_count())} parámetros × 2 bytes (bf16 o fp16, como se publica) "
            f"= {fmt_unit(analytic / GB, 'GB', 2)}; medido al cargar: {fmt_unit(measured / GB, 'GB', 2)} "
            f"(el asignador redondea cada tensor). «~6 GB»: {_readings(claim, measured)}. En fp32 serían "
            f"{fmt_unit(2 * analytic / GB, 'GB', 1)}.")


def analytic_parameter_count() -> int:
    """Parameters of Llama-3.2-3B from its architecture (embeddings tied to lm_head, counted once)."""
    return sum(analytic_parameter_counts(known_config("Llama-3.2-3B")).values())


def _vram_claim_rows(gpu: dict, claimed: dict[str, dict]) -> list[ClaimRow]:
    """Rows of the VRAM without quantisation and with QLoRA: what the card holds in one measured step, its peak
    reserved memory plus the CUDA context (``CLAIM_RULE``)."""
    train = {r["name"]: r for r in gpu["train"] if r.get("ok")}
    weights = {r["format"]: r for r in gpu["weights"] if r.get("ok")}
    qlora, fp16, fp32 = train["qlora_fp16_prepare"], train["lora_fp16_weights_gc"], train["lora_fp32_weights_gc"]
    context = CUDA_CONTEXT_GIB * GIB

    def on_card(r: dict) -> float:
        return r["peak_reserved_bytes"] + context

    def both(n_bytes: float) -> str:
        return f"{fmt_unit(n_bytes / GIB, 'GiB', 2)} ({fmt_unit(n_bytes / GB, 'GB', 2)})"

    fp32_weights = weights["fp32"]["weights_bytes"]
    no_quant, qlora_claim = claimed["vram_no_quant_gb"], claimed["vram_qlora_gb"]
    return [
        ("vram_no_quant_gb", on_card(fp32),
         f"{both(on_card(fp32))} con pesos fp32; {both(on_card(fp16))} con pesos fp16",
         _gpu_on(gpu) + ", pico reservado de un paso más el contexto CUDA",
         f"Sin quantization_config, transformers 4.x cargaba en fp32: la tarjeta ocupa "
         f"{fmt_unit(fp32['peak_reserved_bytes'] / GIB, 'GiB', 2)} reservados + {fmt_unit(CUDA_CONTEXT_GIB, 'GiB', 1)} "
         f"de contexto; {_readings(no_quant, on_card(fp32))}. En fp16, {both(on_card(fp16))}. Los ~12 GB son los "
         f"pesos fp32 solos ({fmt_unit(fp32_weights / GB, 'GB', 2)} = {fmt_unit(fp32_weights / GIB, 'GiB', 2)}), sin "
         "gradientes, estados del optimizador, activaciones ni contexto: no la VRAM del paso. La conclusión «no "
         "cabe en 8 GB» se sostiene en ambos casos."),
        ("vram_qlora_gb", on_card(qlora),
         f"{both(on_card(qlora))}: {fmt_unit(qlora['peak_reserved_bytes'] / GIB, 'GiB', 2)} reservados + "
         f"{fmt_unit(CUDA_CONTEXT_GIB, 'GiB', 1)} de contexto CUDA; {fmt_unit(qlora['peak_bytes'] / GIB, 'GiB', 2)} "
         "asignados",
         _gpu_on(gpu) + ", configuración original (fp16, prepare)",
         "Pico de un paso con la configuración original (1 × 2 × 512 tokens, NF4 + DQ, "
         "prepare_model_for_kbit_training, paged_adamw_8bit) más el contexto CUDA, frente al rango de 5–6: "
         f"{_readings(qlora_claim, on_card(qlora))}."),
    ]


def _saving_claim_row(gpu: dict) -> ClaimRow:
    """Row of the 4-bit memory saving: measured weight bytes, explained by the twin's analytic bytes."""
    weights = {r["format"]: r for r in gpu["weights"] if r.get("ok")}
    twin = known_config("Llama-3.2-3B")
    kinds = analytic_parameter_counts(twin)
    embed_share = kinds["embedding"] / sum(kinds.values())
    dq_bits = 8 * analytic_weight_bytes(twin, "nf4_dq")["linear_constants"] / (kinds["attention"] + kinds["mlp"])
    ratio32 = weights["fp32"]["weights_bytes"] / weights["nf4_dq"]["weights_bytes"]
    ratio16 = weights["bf16"]["weights_bytes"] / weights["nf4_dq"]["weights_bytes"]
    return ("saving_4bit", ratio32, f"{fmt_ratio(ratio32)} frente a fp32; {fmt_ratio(ratio16)} frente a bf16",
            _gpu_on(gpu) + ", pesos cargados",
            f"8× es la razón de 32 a 4 bits en los datos de las matrices lineales; NF4 + DQ suma "
            f"{fmt_num(dq_bits, 3)} bit de constantes por peso y los embeddings (atados a lm_head, "
            f"{fmt_pct(embed_share, 1)} del modelo) no se cuantizan. El modelo se publica en bf16: frente a eso el "
            f"ahorro es {fmt_ratio(ratio16)}.")


def _prepare_claim_row(effects: dict[str, Any], on: str, gpu: dict) -> ClaimRow:
    """Row of what prepare_model_for_kbit_training does, from ``utils.memory.prepare.inspect_prepare``."""
    train = {r["name"]: r for r in gpu["train"] if r.get("ok")}
    twin_added = train["qlora_fp16_prepare"]["weights_bytes"] - train["qlora_fp16_no_prepare_gc"]["weights_bytes"]
    # the claim holds only if prepare left gradients on adapters alone and cast nothing but norms
    holds = bool(effects["lora_tensors"]) and set(effects["upcast_kinds"]) <= {"norms"}
    kinds = " y ".join({"embedding": "embeddings", "norms": "normas", "lm_head": "lm_head"}.get(k, k)
                       for k in effects["upcast_kinds"]) or "nada"
    return ("prepare", holds,
            f"congela todo ({fmt_num(effects['trainable_before'])} → {fmt_num(effects['trainable_after'])} tensores "
            f"con gradiente); {kinds} a fp32 (+{fmt_unit(effects['added_bytes'] / MIB, 'MiB', 1)} aquí, "
            f"+{fmt_unit(twin_added / GIB, 'GiB', 2)} en el gemelo); activa el checkpointing",
            f"{on}; gemelo en GPU",
            f"Cuando prepare corre todavía no hay adaptadores ({fmt_num(effects['lora_tensors'])} tensores LoRA): "
            "congela todos los parámetros, pasa a fp32 todo tensor de 16 bits que no es de 4 bits (no solo las "
            "normas), instala un gancho para que la salida de los embeddings lleve gradiente (enable_input_require_"
            "grads: sin él, el checkpointing reentrante no tiene grafo que recomputar) y activa gradient "
            "checkpointing. Es get_peft_model quien agrega los adaptadores, ya entrenables.")


def claims_table(measured: dict[str, Any]) -> pd.DataFrame:
    """DataFrame: one row per original claim with claimed, measured, on what, verdict and why (``CLAIM_RULE``).

    ``measured`` holds, computed elsewhere: ``twin_counts`` (``count_parameters`` of the twin with the original
    LoRA), ``twin_adapter`` (``materialized_adapter_size``), ``gpu`` (the committed ``gpu-report`` dict),
    ``trainable_search`` (``search_lora_counts`` of the claimed trainable count), ``total_search``, and
    optionally ``prepare`` (``utils.memory.prepare.inspect_prepare``) with ``prepare_on`` (the model it ran on).
    """
    claimed = {c["key"]: c for c in ORIGINAL_CLAIMS}
    gpu = measured["gpu"]
    rows = (_parameter_claim_rows(measured, claimed) + [_adapter_claim_row(measured, claimed),
                                                        _model_size_claim_row(gpu, claimed["model_gb"])]
            + _vram_claim_rows(gpu, claimed) + [_saving_claim_row(gpu)])
    if measured.get("prepare"):
        rows.append(_prepare_claim_row(measured["prepare"], measured.get("prepare_on", ""), gpu))
    table = []
    for key, value, shown, on, why in rows:
        claim = claimed[key]
        table.append({"afirmación": claim["claim"], "declarado": claim["text"], "medido": shown, "sobre qué": on,
                      "veredicto": _verdict(claim, value), "por qué": why, "fuente": claim["source"],
                      # in the claim's unit as written (a size claim's row carries bytes)
                      "valor medido": float(value) / UNIT_READINGS[claim["unit"]][0][0] if claim.get("unit")
                      else float(value)})
    return pd.DataFrame(table)
