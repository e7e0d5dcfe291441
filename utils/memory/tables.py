"""Tables of notebook 02 (Spanish column names): analytic sizes, measurements, and the committed GPU report."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from utils.files import read_json
from utils.memory.analytic import (
    FORMATS,
    TENSOR_KINDS,
    analytic_parameter_counts,
    analytic_training_breakdown,
    analytic_weight_bytes,
)
from utils.memory.tensors import measured_parameter_counts
from utils.paths import resolve_path
from utils.plotting.labels import FORMATS as FORMATS_ES
from utils.plotting.labels import label
from utils.units import GIB, MIB

FORMAT_LABELS = FORMATS_ES  # the one label map (utils.plotting.labels)
KIND_LABELS = {kind: label(f"tensor:{kind}") for kind in TENSOR_KINDS}
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
# Reports written before the one dtype vocabulary (``utils.device``) and the one sequence-length name.
LEGACY_DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
DTYPE_FIELDS = ("amp_dtype", "other_dtype", "frozen_other_dtype", "compute_dtype")


# --------------------------------------------------------------------------------------------
# Analytic
# --------------------------------------------------------------------------------------------


def parameter_count_table(config, model=None) -> pd.DataFrame:
    """DataFrame: parameters per tensor kind, analytic and (when a model is given) counted on its tensors."""
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
    if model is not None:
        table["coincide"] = table["analítico"] == table["contado en el modelo"]
    return table


def analytic_weight_table(config, formats: Sequence[str] = FORMATS, other_dtype: str = "bf16") -> pd.DataFrame:
    """DataFrame: one row per format with its analytic parts and total (bytes, GiB, bits per weight)."""
    n = sum(analytic_parameter_counts(config).values())
    rows = []
    for fmt in formats:
        parts = analytic_weight_bytes(config, fmt, other_dtype)
        rows.append({"formato": fmt, **parts, "total_gib": parts["total"] / GIB,
                     "bits_por_parametro": 8 * parts["total"] / n})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# Measured
# --------------------------------------------------------------------------------------------


def _weights_row(res: dict, config, other_dtype: str | None) -> dict[str, Any]:
    """One format's measured bytes next to its analytic size."""
    analytic = analytic_weight_bytes(config, res["format"], other_dtype or res.get("other_dtype") or "bf16")
    row = {
        "formato": res["format"],
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
    return row


def weights_table(results: Sequence[dict], config, other_dtype: str | None = None) -> pd.DataFrame:
    """DataFrame: per format, measured bytes (with the measure named), footprint, analytic, and the gap."""
    rows = [_weights_row(res, config, other_dtype) if res.get("ok", True)
            else {"formato": res["format"], "medida": res.get("error")} for res in results]
    return pd.DataFrame(rows)


def quality_table(results: Sequence[dict]) -> pd.DataFrame:
    """DataFrame: completion loss and perplexity per format (those that were evaluated)."""
    rows = [{"formato": r["format"], "pérdida": r["eval"]["loss"], "perplejidad": r["eval"]["perplexity"],
             "tokens": r["eval"]["tokens"], "ejemplos": r["eval"]["examples"]}
            for r in results if r.get("ok", True) and "eval" in r]
    table = pd.DataFrame(rows)
    if len(table):
        ref = table["pérdida"].iloc[0]
        table["Δ pérdida vs " + table["formato"].iloc[0]] = table["pérdida"] - ref
    return table


def training_breakdown_table(result: dict, config, compute_dtype: str | None = None) -> pd.DataFrame:
    """DataFrame: one training step's components, analytic vs measured (bytes → GiB), for one variant."""
    amp = result.get("amp_dtype")
    analytic = analytic_training_breakdown(
        config, fmt=result["format"], variant=result["variant"], compute_dtype=amp or compute_dtype or "fp32",
        autocast=amp is not None, max_seq_length=result["max_seq_length"], batch_size=result["batch_size"],
        optim=result["optim"], cuda=str(result.get("device", "")).startswith("cuda"),
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


def training_table(results: Sequence[dict]) -> pd.DataFrame:
    """DataFrame: one row per training configuration (peak allocated/reserved or peak RSS, speed)."""
    rows = []
    for r in results:
        row = {"configuración": r.get("name"), "formato": r.get("format"), "variante": r.get("variant"),
               "cómputo": r.get("amp_dtype") or "fp32"}
        if not r.get("ok", True):
            row["error"] = r.get("error")
        else:
            row.update({
                "lote×acum×secuencia": f"{r['batch_size']}×{r['grad_accum']}×{r['max_seq_length']}",
                "pico_gib": r["peak_bytes"] / GIB,
                "pico_reservado_gib": (r["peak_reserved_bytes"] / GIB) if r.get("peak_reserved_bytes") else None,
                "pesos_gib": r["weights_bytes"] / GIB,
                "s_por_paso": r["seconds_per_step"],
                "tokens_por_s": r["tokens_per_second"],
            })
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# The committed GPU report
# --------------------------------------------------------------------------------------------


def _current_names(entry: dict) -> dict:
    """One measurement with today's names: ``max_seq_length`` for ``seq_len``, ``fp16`` for ``float16``."""
    entry = dict(entry)
    if "seq_len" in entry:
        entry["max_seq_length"] = entry.pop("seq_len")
    for key in DTYPE_FIELDS:
        if entry.get(key) in LEGACY_DTYPE_NAMES:
            entry[key] = LEGACY_DTYPE_NAMES[entry[key]]
    return entry


def load_gpu_report(path: str | Path) -> dict:
    """Read a ``gpu-report`` JSON, or raise one clear error saying how to produce it.

    A report written before the renaming (``seq_len``, ``"float16"``) is read with today's names.
    """
    path = resolve_path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist. Produce it on a CUDA GPU with "
            f"`python -m utils.memory gpu-report --out {path}` (it is committed with the repository)."
        )
    report = read_json(path)
    for section in ("weights", "train"):
        report[section] = [_current_names(entry) for entry in report.get(section, [])]
    return report


def _spanish_model_label(text: str) -> str:
    """A GPU report's model label ("llama-3.2-3b-twin (random weights)") in Spanish."""
    return label("tiny_twin") if "tiny" in text else label("twin") if "twin" in text else text


def report_metadata(report: dict) -> pd.DataFrame:
    """DataFrame (one column) with what a GPU report says about itself: model, GPU, versions, date."""
    versions = report.get("versions", {})
    rows = {
        "modelo": _spanish_model_label(report.get("label") or ""),
        "GPU": report.get("device"),
        "capacidad de cómputo": report.get("compute_capability"),
        "memoria de la GPU (GiB)": report.get("gpu_memory_gib"),
        "fecha (UTC)": report.get("date"),
        **({"commit": report["commit"]} if report.get("commit") else {}),  # reports written since it is recorded
        "comando": report.get("command"),
        **{f"versión {k}": v for k, v in versions.items() if v != "absent"},
        "duración (s)": report.get("wall_seconds"),
    }
    return pd.DataFrame({"valor": rows})


def side_by_side(live: pd.DataFrame, twin: pd.DataFrame, live_label: str, twin_label: str) -> pd.DataFrame:
    """DataFrame: measured and analytic GiB per format, the live model next to the committed twin."""
    def part(table, label):
        t = table.dropna(subset=["medido_gib"]).set_index("formato")[["medido_gib", "analitico_gib"]]
        return t.rename(columns={"medido_gib": f"{label}: medido (GiB)", "analitico_gib": f"{label}: analítico (GiB)"})

    return pd.concat([part(live, live_label), part(twin, twin_label)], axis=1)
