"""Notebook 02's findings in Spanish, every number taken from the tables the notebook computed."""

from __future__ import annotations

import pandas as pd

from utils.memory import FORMAT_LABELS, KIND_LABELS
from utils.numbers import fmt_num, fmt_ratio, fmt_unit
from utils.plotting.memory import training_label
from utils.memory.budget import WINDOWS_DISPLAY_RESERVE_GIB
from utils.units import CARD_GIB, CUDA_CONTEXT_GIB, GB, GIB


def _row(table: pd.DataFrame, column: str, value):
    """The first row of ``table`` whose ``column`` equals ``value`` (None when there is none)."""
    match = table[table[column] == value] if len(table) and column in table else table.iloc[0:0]
    return None if match.empty else match.iloc[0]


def _analytic_lines(analytic: pd.DataFrame, live_label: str) -> list[str]:
    """The architecture's sizes when nothing was measured (section 2's table)."""
    sizes = ", ".join(f"{FORMAT_LABELS.get(r['formato'], r['formato'])} {fmt_unit(r['total_gib'], 'GiB', 3)}"
                      for _, r in analytic.iterrows())
    lines = [f"- **{live_label}**, tamaño analítico de los pesos (calculado aquí, sin cargarlos): {sizes}."]
    hi, lo = _row(analytic, "formato", "fp32"), _row(analytic, "formato", "nf4_dq")
    if hi is not None and lo is not None:
        ratio = hi["total_gib"] / lo["total_gib"]
        lines.append(f"- fp32 → NF4 + doble cuantización reduce los pesos {fmt_ratio(ratio, 1)} "
                     f"(analítico), no 8×: embeddings y normas no se cuantizan y cada bloque de 64 pesos suma "
                     f"sus constantes ({fmt_num(lo['bits_por_parametro'], 2)} bits por parámetro en NF4 + DQ).")
    return lines


def _measured_weight_lines(ok: pd.DataFrame, live_label: str) -> list[str]:
    """The weights measured here against their analytic sizes."""
    gap = ok["brecha_mib"].abs().max()
    lines = [f"- **{live_label}**: pesos medidos entre {fmt_num(ok['medido_gib'].min(), 3)} y "
             f"{fmt_unit(ok['medido_gib'].max(), 'GiB', 3)} según el formato; la mayor diferencia con el tamaño "
             f"analítico es {fmt_unit(gap, 'MiB', 1)} ({ok.iloc[0]['medida']})."]
    hi, lo = _row(ok, "formato", "fp32"), _row(ok, "formato", "nf4_dq")
    if hi is not None and lo is not None:
        ratio = hi["analitico_gib"] / lo["analitico_gib"]
        lines.append(f"- fp32 → NF4 + doble cuantización reduce los pesos {fmt_ratio(ratio, 1)} (analítico) en este "
                     f"modelo, no 8×: embeddings y normas no se cuantizan y cada bloque de 64 pesos suma sus "
                     f"constantes.")
    return lines


def error_scope(errors: pd.DataFrame, num_layers: int | None) -> str:
    """Which matrices the error was measured on: all linear ones, or those of the layers a profile sampled."""
    measured = errors["capa"].nunique()
    if num_layers is None or measured >= num_layers:
        return "las matrices lineales"
    return f"las matrices lineales de {fmt_num(measured)} de las {fmt_num(num_layers)} capas (una muestra repartida)"


def _error_lines(errors: pd.DataFrame, num_layers: int | None = None) -> list[str]:
    """Mean reconstruction error of NF4, FP4 and NF4 + DQ."""
    mean = errors.groupby("formato")["error_relativo"].mean()
    if not {"nf4", "fp4"} <= set(mean.index):
        return []
    return [f"- Error relativo medio de reconstrucción de {error_scope(errors, num_layers)}: NF4 {fmt_num(mean['nf4'], 4)}, "
            f"FP4 {fmt_num(mean['fp4'], 4)} ({fmt_ratio(mean['fp4'] / mean['nf4'])} el de NF4)"
            + (f", NF4 + DQ {fmt_num(mean['nf4_dq'], 4)}." if "nf4_dq" in mean else ".")]


def _quality_lines(quality: pd.DataFrame) -> list[str]:
    """Completion loss per format and what double quantisation and FP4 change."""
    parts = ", ".join(
        f"{FORMAT_LABELS.get(r['formato'], r['formato'])} {fmt_num(r['pérdida'], 4)} (perplejidad {fmt_num(r['perplejidad'], 2)})"
        for _, r in quality.iterrows()
    )
    lines = [f"- Pérdida de las respuestas del conjunto de validación ({fmt_num(quality['ejemplos'].iloc[0])} ejemplos, "
             f"{fmt_num(quality['tokens'].iloc[0])} tokens): {parts}."]
    loss = quality.set_index("formato")["pérdida"]
    if {"nf4", "nf4_dq"} <= set(loss.index):
        lines.append(f"  - La doble cuantización cambia la pérdida en {fmt_num(loss['nf4_dq'] - loss['nf4'], 4, signed=True)} nats "
                     f"respecto de NF4; NF4 frente a FP4: {fmt_num(loss['nf4'] - loss.get('fp4', float('nan')), 4, signed=True)}.")
    return lines


def _twin_weight_lines(twin_weights: pd.DataFrame) -> list[str]:
    """The twin's bf16 and NF4 + DQ weights measured on the GPU, and the seed's "~6 GB" whole model."""
    bf16, dq = _row(twin_weights, "formato", "bf16"), _row(twin_weights, "formato", "nf4_dq")
    if bf16 is None or dq is None:
        return []
    gb = bf16["medido_gib"] * GIB / GB
    return [f"- Llama-3.2-3B (gemelo, medido en GPU): pesos bf16 {fmt_unit(bf16['medido_gib'], 'GiB', 3)}, NF4 + DQ "
            f"{fmt_unit(dq['medido_gib'], 'GiB', 3)} ({fmt_ratio(bf16['medido_gib'] / dq['medido_gib'])} menos); "
            f"la mayor brecha analítico–medido es {fmt_unit(twin_weights['brecha_mib'].abs().max(), 'MiB', 2)}.",
            f"  - El «modelo completo (~6 GB)» del análisis original son estos pesos de 16 bits: "
            f"{fmt_num(bf16['parametros'])} parámetros × 2 bytes = {fmt_unit(gb, 'GB', 2)} = "
            f"{fmt_unit(bf16['medido_gib'], 'GiB', 2)}; la cifra vale leída en GiB (en GB decimales es "
            f"{fmt_num(gb, 1)})."]


def _twin_train_lines(twin_train: pd.DataFrame, card_gib: float) -> list[str]:
    """Whether the original configuration and each variant fit the card: its memory less the CUDA context and, under
    Windows with the card also driving the display, less the display's reserve (the strict budget's rule)."""
    usable = card_gib - CUDA_CONTEXT_GIB
    windows = usable - WINDOWS_DISPLAY_RESERVE_GIB

    def fits(reserved: float) -> str:
        if reserved <= windows:
            return "cabe"
        return "cabe solo si la tarjeta no maneja además la pantalla" if reserved <= usable else "no cabe"

    def turing(row: pd.Series) -> str:
        return "; la RTX 2070 SUPER (Turing) no calcula en bf16 de forma nativa" if row.get("cómputo") == "bf16" else ""

    thesis = twin_train.iloc[0]
    reserved = thesis["pico_reservado_gib"]
    name = training_label(thesis).removesuffix(" (original)")  # the line says it is the original already
    lines = [f"- La configuración original en el gemelo ({name}): pico "
             f"{fmt_unit(thesis['pico_gib'], 'GiB', 3)} asignados y {fmt_unit(reserved, 'GiB', 3)} reservados: "
             f"{fits(reserved)} en {fmt_unit(card_gib, 'GiB')} con ~{fmt_unit(CUDA_CONTEXT_GIB, 'GiB', 1)} de contexto "
             f"CUDA (margen {fmt_unit(usable - reserved, 'GiB', 2)}; bajo Windows, con la pantalla en la misma "
             f"tarjeta, {fmt_unit(WINDOWS_DISPLAY_RESERVE_GIB, 'GiB', 1)} menos: "
             f"{fmt_unit(windows - reserved, 'GiB', 2)}){turing(thesis)}."]
    for _, r in twin_train.iloc[1:].iterrows():
        if r.get("pico_reservado_gib") is not None and r["pico_reservado_gib"] == r["pico_reservado_gib"]:
            lines.append(f"  - {training_label(r)}: {fmt_unit(r['pico_reservado_gib'], 'GiB', 3)} reservados "
                         f"({fits(r['pico_reservado_gib'])}{turing(r)}).")
    return lines


def error_summary(errors: pd.DataFrame) -> pd.DataFrame:
    """Mean and largest relative error per kind of matrix (rows) and format (columns), Spanish names."""
    table = errors.assign(tipo=errors["tipo"].map(lambda k: KIND_LABELS.get(k, k)),
                          formato=errors["formato"].map(lambda f: FORMAT_LABELS.get(f, f)))
    summary = table.pivot_table(index="tipo", columns="formato", values="error_relativo", aggfunc=["mean", "max"])
    return summary.rename(columns={"mean": "media", "max": "máximo"}, level=0)


def describe_findings(weights, quality, errors, train, twin_weights, twin_train, live_label: str,
                      card_gib: float = CARD_GIB, analytic=None, skipped_steps: dict[str, str] | None = None,
                      num_layers: int | None = None) -> str:
    """Markdown bullets (Spanish) stating what this run's tables show, every number taken from them.

    A table that was not measured (the profile's weights missing) is ``None``; ``analytic`` (the section 2
    table) then gives the architecture's sizes, and ``skipped_steps`` the steps this run left out and why.
    ``card_gib`` is the thesis card's memory (a configuration fits when its peak reserved plus the CUDA
    context does, and the Windows display's reserve for a card that also drives the screen). ``num_layers``: the
    model's decoder layers, so that an error measured on a sample of them says so.
    """
    lines = []
    ok = weights.dropna(subset=["medido_gib"]) if weights is not None and "medido_gib" in weights else None
    if ok is None and analytic is not None and len(analytic):
        lines += _analytic_lines(analytic, live_label)
    if ok is not None and len(ok):
        lines += _measured_weight_lines(ok, live_label)
    if errors is not None and len(errors):
        lines += _error_lines(errors, num_layers)
    if quality is not None and len(quality):
        lines += _quality_lines(quality)
    if train is not None and len(train) and "pico_gib" in train:
        peaks = train.dropna(subset=["pico_gib"])
        parts = "; ".join(f"{training_label(r)}: {fmt_unit(r['pico_gib'], 'GiB', 3)}" for _, r in peaks.iterrows())
        lines.append(f"- Pico de un paso de entrenamiento ({train.iloc[0]['lote×acum×secuencia']}, "
                     f"{live_label}): {parts}.")
    if twin_weights is not None and len(twin_weights):
        lines += _twin_weight_lines(twin_weights)
    if twin_train is not None and len(twin_train):
        lines += _twin_train_lines(twin_train, card_gib)
    if skipped_steps:
        lines.append(f"- **No medido en esta corrida**: {'; '.join(skipped_steps)} (motivo: "
                     f"{next(iter(skipped_steps.values()))}).")
    return "\n".join(lines)
