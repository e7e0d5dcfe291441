"""Figures of notebook 02: memory by storage format and training-step peaks, and the 4-bit quantisation error."""

from __future__ import annotations

from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from utils.memory import FORMAT_LABELS
from utils.plotting import COLORS, draw_budget
from utils.units import CUDA_CONTEXT_GIB


def _draw_training_peaks(ax: plt.Axes, train: pd.DataFrame, start: int, names: list[str]) -> None:
    """One bar per training configuration after the weight bars: the peak reserved where known, else the peak."""
    t = train.dropna(subset=["pico_gib"]).reset_index(drop=True)
    for j, row in t.iterrows():
        reserved = row.get("pico_reservado_gib")
        peak = reserved if reserved is not None and reserved == reserved else row["pico_gib"]
        ax.bar(start + j, peak, width=0.6, color=COLORS["original"] if j == 0 else COLORS["eval"],
               label={0: "pico de un paso: configuración original", 1: "pico de un paso: variantes"}.get(j))
        ax.annotate(f"{peak:.2f}", (start + j, peak), ha="center", va="bottom", fontsize=7)
        names.append(str(row["configuración"]).replace("_", " "))


def plot_memory_by_format(panels: Sequence[tuple[str, Any, Any, float | None]]) -> plt.Figure:
    """Bar chart per panel: weights per format (measured vs analytic) and the training peaks, in GiB.

    ``panels`` holds ``(title, weights_table, training_table, card_gib)``; a training bar shows the peak
    *reserved* where the table has it (what a card must hold), else the peak measured. The card's line
    (the RTX 2070 SUPER's 8 GiB, ``utils.units.CARD_GIB``) and, dotted, what is left after the CUDA context
    are drawn where ``card_gib`` is given.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), squeeze=False)
    for ax, (title, weights, train, card_gib) in zip(axes[0], panels):
        w = weights.dropna(subset=["medido_gib"])
        names = [FORMAT_LABELS.get(f, f) for f in w["formato"]]
        x = list(range(len(w)))
        ax.bar([i - 0.2 for i in x], w["medido_gib"], width=0.4, color=COLORS["tuned"], label="pesos, medido")
        ax.bar([i + 0.2 for i in x], w["analitico_gib"], width=0.4, color=COLORS["base"], label="pesos, analítico")
        if train is not None and len(train):
            _draw_training_peaks(ax, train, len(w), names)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=40, ha="right", fontsize=8)
        ax.set_ylabel("memoria (GiB)")
        ax.set_title(title, fontsize=10)
        if card_gib:
            draw_budget(ax, card_gib)
            ax.axhline(card_gib - CUDA_CONTEXT_GIB, color=COLORS["budget"], linestyle=":", linewidth=1.0,
                       label=f"8 GiB − contexto CUDA (~{CUDA_CONTEXT_GIB:g} GiB)")
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def plot_quantization_error(errors: pd.DataFrame) -> plt.Figure:
    """Two panels: relative error per layer (mean over the seven linear layers) and its histogram."""
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
