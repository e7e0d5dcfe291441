"""Figures of notebook 01: token lengths per tokenizer and split, and examples per topic.

Each function draws from a saved table (``01_longitudes_tokens.csv``, ``01_conteos_por_tema.csv``) and
returns the figure; ``utils.plotting.save_figure`` writes it.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from utils.plotting import COLORS


def plot_token_lengths(lengths: pd.DataFrame, max_seq_length: int = 512) -> plt.Figure:
    """Histograms of prompt, answer and total tokens (one row per tokenizer) with the length limit drawn."""
    tokenizers = list(dict.fromkeys(lengths["tokenizador"]))
    parts = [("prompt", "Prompt (enmascarado)"), ("respuesta", "Respuesta + fin de turno (entrenada)"),
             ("total", "Ejemplo completo")]
    upper = 1.08 * max(max_seq_length, int(lengths[["prompt", "respuesta", "total"]].to_numpy().max()))
    bins = np.linspace(0, upper, 109)  # the same bins in every panel, so heights compare
    fig, axes = plt.subplots(len(tokenizers), 3, figsize=(11, 3.2 * len(tokenizers)), squeeze=False,
                             sharex=True)
    for row, name in zip(axes, tokenizers):
        data = lengths[lengths["tokenizador"] == name]
        for ax, (column, title) in zip(row, parts):
            for split in dict.fromkeys(data["split"]):
                values = data.loc[data["split"] == split, column]
                ax.hist(values, bins=bins, alpha=0.7, label=f"{split} (n={len(values)})",
                        color=COLORS.get("train" if split == "train" else "eval"))
            over = int((data[column] > max_seq_length).sum())
            ax.axvline(max_seq_length, color=COLORS["budget"], linestyle="--", linewidth=1.2,
                       label=f"max_seq_length = {max_seq_length} ({over} por encima)")
            ax.set_title(f"{title}\n{name}", fontsize=10)
            ax.set_xlim(0, upper)
            ax.set_ylabel("Ejemplos")
        row[2].legend(fontsize=8, loc="upper right")
    for ax in axes[-1]:
        ax.set_xlabel("Longitud (tokens)")
    fig.tight_layout()
    return fig


def plot_counts(table: pd.DataFrame, by: str = "topic") -> plt.Figure:
    """Horizontal bars of examples per topic (or kind) and split, from a ``count_table`` without totals."""
    table = table.drop(index="total", columns="total", errors="ignore").iloc[::-1]
    fig, ax = plt.subplots(figsize=(7.0, 0.35 * len(table) + 1.5))
    left = None
    for split in table.columns:
        ax.barh(table.index, table[split], left=left, label=split,
                color=COLORS.get("train" if split == "train" else "eval"))
        left = table[split] if left is None else left + table[split]
    ax.set_xlabel("Ejemplos")
    ax.set_ylabel("Tema" if by == "topic" else "Tipo")
    ax.legend()
    fig.tight_layout()
    return fig

