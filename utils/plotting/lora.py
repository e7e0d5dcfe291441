"""Notebook 03's figure: LoRA parameters and adapter size against the rank r (from ``utils.lora.lora_sweep``)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from utils.config import THESIS

MODULE_SET_LABELS = {"attention": "solo atención (q, k, v, o)", "mlp": "solo MLP (gate, up, down)",
                     "all": "los siete (original)"}


def plot_sweep(sweep: pd.DataFrame) -> plt.Figure:
    """Two panels: trainable parameters and adapter MB vs r, one line per model and module set (log axes).

    Crosses mark the sizes measured by saving; a ring marks the original configuration (r = 32, seven modules).
    """
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 5.0))
    for (model, key), group in sweep.groupby(["modelo", "módulos"], sort=False):
        style = "-" if "3B" in model else "--"
        label = f"{model}: {MODULE_SET_LABELS[key]}"
        ax1.plot(group["r"], group["entrenables (PEFT)"], style, marker="o", markersize=3, label=label)
        ax2.plot(group["r"], group["MB analítico (fp32)"], style, marker="o", markersize=3)
        saved = group.dropna(subset=["MB guardado"])
        ax2.scatter(saved["r"], saved["MB guardado"], marker="x", color="black", zorder=3)
        original = group[(group["r"] == THESIS.lora_r) & (key == "all")]
        for ax, column in ((ax1, "entrenables (PEFT)"), (ax2, "MB analítico (fp32)")):
            ax.scatter(original["r"], original[column], s=90, facecolors="none", edgecolors="black", zorder=4)
    ax2.scatter([], [], marker="x", color="black", label="medido: archivo safetensors guardado")
    ax2.scatter([], [], s=90, facecolors="none", edgecolors="black", label="configuración original (r = 32, siete)")
    ranks = sorted(sweep["r"].unique())
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("rango r")
        ax.set_xticks(ranks)
        ax.set_xticklabels(ranks)
    ax1.set_ylabel("parámetros entrenables")
    ax1.set_title("Parámetros LoRA según r", fontsize=10)
    ax2.set_ylabel("tamaño del adaptador (MB = 10⁶ bytes)")
    ax2.set_title("Tamaño en disco según r (fp32)", fontsize=10)
    handles = ax1.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax1.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7.5)
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    return fig
