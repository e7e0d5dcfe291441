"""Notebook 03's presentation: the findings in Spanish and the claims table as LaTeX for the thesis."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from utils.files import atomic_write_text
from utils.paths import figures_dir


def save_claims_latex(table: pd.DataFrame, name: str = "03_claims") -> Path:
    """Write the claims table as ``figures/<name>.tex``: a booktabs ``table`` with wrapping columns.

    Columns: claim, claimed, measured, on what, verdict (the reasons stay in the notebook and the CSV).
    """
    columns = ["afirmación", "declarado", "medido", "sobre qué", "veredicto"]
    latex = table[columns].to_latex(
        index=False, escape=True, column_format="p{2.6cm}p{1.9cm}p{3.6cm}p{4.2cm}p{1.5cm}",
        caption=r"Afirmaciones del análisis original de train\_peft\_v3.py frente a lo medido.",
        label=f"tab:{name}", position="htbp",
    )
    return atomic_write_text(figures_dir() / f"{name}.tex", latex)


def describe_findings(model_label: str, model_counts: dict, twin_counts: dict, claims: pd.DataFrame, zero: dict,
                      sweep: pd.DataFrame) -> str:
    """Markdown bullets (Spanish) stating what this run's tables show, every number taken from them."""
    wrong = claims[claims["veredicto"] == "incorrecto"]["afirmación"].tolist()
    right = claims[claims["veredicto"] == "correcto"]["afirmación"].tolist()
    same = all(model_counts[k] == twin_counts[k] for k in ("peft_trainable", "peft_all"))
    if model_counts["packed_4bit_tensors"]:
        numel = (f"la suma ingenua de `numel()` da {model_counts['numel_all']:,} en lugar de "
                 f"{model_counts['peft_all']:,} cuando el modelo está en 4 bits "
                 f"({model_counts['packed_4bit_tensors']} tensores empaquetados).")
    else:
        numel = (f"{model_label} no tiene tensores de 4 bits, así que aquí la suma de `numel()` coincide con PEFT "
                 f"({model_counts['numel_all']:,}); en 4 bits contaría la mitad de los pesos de las capas lineales.")
    lines = [
        f"- Con la configuración del script (r=32, alpha=64, siete módulos), Llama-3.2-3B entrena "
        f"**{twin_counts['peft_trainable']:,}** parámetros de {twin_counts['peft_all']:,} "
        f"({100 * twin_counts['peft_trainable'] / twin_counts['peft_all']:.3f} %); {model_label} entrena "
        + ("exactamente lo mismo." if same else
           f"{model_counts['peft_trainable']:,} de {model_counts['peft_all']:,}."),
        f"- PEFT y la fórmula r × (in + out) coinciden en cada módulo y en el total; {numel}",
        f"- Al paso 0 el modelo adaptado es el modelo base: B = 0 en todas las capas "
        f"({'sí' if zero['todas las B son cero'] else 'NO'}) y los logits difieren como máximo en "
        f"{zero['máx |logits adaptado − logits base|']:g}"
        + (f" (comprobado sobre {zero['modelo']})." if zero.get("modelo") else "."),
        f"- En el barrido, PEFT y la fórmula coinciden en {int(sweep['coincide'].sum())} de {len(sweep)} "
        f"configuraciones; el tamaño guardado excede al analítico solo por el encabezado de safetensors "
        f"(a lo sumo {sweep['encabezado (bytes)'].max():,.0f} bytes)." if "encabezado (bytes)" in sweep else "",
        f"- Afirmaciones del análisis original que la medición contradice: {', '.join(wrong) or 'ninguna'}; "
        f"que confirma: {', '.join(right) or 'ninguna'}.",
    ]
    return "\n".join(line for line in lines if line)
