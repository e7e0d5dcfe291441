"""Notebook 03's presentation: the findings in Spanish and the claims table as LaTeX for the thesis."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from utils.latex import write_table
from utils.lora import CLAIM_RULE
from utils.numbers import fmt_num, fmt_pct

CLAIM_COLUMNS = ["afirmación", "declarado", "medido", "sobre qué", "veredicto"]
# Fractions of \linewidth (padding included), summing to 1: the measured value and "on what" get the room.
CLAIM_WIDTHS = [0.17, 0.17, 0.26, 0.27, 0.13]


def save_claims_latex(table: pd.DataFrame, name: str = "03_claims") -> Path:
    """Write the claims table as ``<figures>/<name>.tex`` (``utils.latex.write_table``: fits the text width).

    Columns: claim, claimed, measured, on what, verdict (the reasons stay in the notebook and the CSV); the notes
    state the units and the verdict rule (``utils.lora.CLAIM_RULE``).
    """
    return write_table(
        table[CLAIM_COLUMNS], name, widths=CLAIM_WIDTHS,
        caption="Afirmaciones del análisis original de train_peft_v3.py frente a lo medido: conteos sobre el gemelo "
                "de Llama-3.2-3B (sin pesos) y memoria medida en GPU (results/02_twin_gpu_memory.json).",
        notes="Declarado: la cifra del documento de análisis, con los números escritos en formato es-AR. "
              "Unidades: MB = 10⁶ bytes, GB = 10⁹ bytes, MiB = 1024² bytes, GiB = 1024³ bytes. " + CLAIM_RULE,
    )


def _fmt_difference(x: float) -> str:
    """A logit difference: exactly 0, or its size in es-AR with six decimals."""
    return "0 (idénticos)" if x == 0 else fmt_num(x, 6)


def _numel_line(model_label: str, model_counts: dict) -> str:
    if model_counts["packed_4bit_tensors"]:
        return (f"la suma ingenua de `numel()` da {fmt_num(model_counts['numel_all'])} en lugar de "
                f"{fmt_num(model_counts['peft_all'])} cuando el modelo está en 4 bits "
                f"({fmt_num(model_counts['packed_4bit_tensors'])} tensores empaquetados).")
    return (f"{model_label} no tiene tensores de 4 bits, así que aquí la suma de `numel()` coincide con PEFT "
            f"({fmt_num(model_counts['numel_all'])}); en 4 bits contaría la mitad de los pesos de las capas lineales.")


def describe_findings(model_label: str, model_counts: dict, twin_counts: dict, claims: pd.DataFrame, zero: dict,
                      sweep: pd.DataFrame) -> str:
    """Markdown bullets (Spanish) stating what this run's tables show, every number taken from them."""
    wrong = claims[claims["veredicto"] == "incorrecto"]["afirmación"].tolist()
    right = claims[claims["veredicto"] == "correcto"]["afirmación"].tolist()
    same = all(model_counts[k] == twin_counts[k] for k in ("peft_trainable", "peft_all"))
    share = twin_counts["peft_trainable"] / twin_counts["peft_all"]
    lines = [
        f"- Con la configuración del script (r = 32, alpha = 64, siete módulos), Llama-3.2-3B entrena "
        f"**{fmt_num(twin_counts['peft_trainable'])}** parámetros de {fmt_num(twin_counts['peft_all'])} "
        f"({fmt_pct(share, 3)}); {model_label} entrena "
        + ("exactamente lo mismo." if same else
           f"{fmt_num(model_counts['peft_trainable'])} de {fmt_num(model_counts['peft_all'])}."),
        f"- PEFT y la fórmula r × (entrada + salida) coinciden en cada módulo y en el total; "
        f"{_numel_line(model_label, model_counts)}",
        f"- Al paso 0 el modelo adaptado es el modelo base: B = 0 en todas las capas "
        f"({'sí' if zero['todas las B son cero'] else 'NO'}) y los logits difieren como máximo en "
        f"{_fmt_difference(zero['máx |logits adaptado − logits base|'])}"
        + (f" (comprobado sobre {zero['modelo']})." if zero.get("modelo") else "."),
    ]
    if "encabezado (bytes)" in sweep:
        lines.append(f"- En el barrido, PEFT y la fórmula coinciden en {int(sweep['coincide'].sum())} de {len(sweep)} "
                     f"configuraciones; el tamaño guardado excede al analítico solo por el encabezado de safetensors "
                     f"(a lo sumo {fmt_num(sweep['encabezado (bytes)'].max())} bytes).")
    lines.append(f"- Afirmaciones del análisis original que la medición contradice: {', '.join(wrong) or 'ninguna'}; "
                 f"que confirma: {', '.join(right) or 'ninguna'}.")
    return "\n".join(lines)
