"""Figures of notebook 01, at print size: token lengths per tokenizer and split, and examples per topic and split.

Each function draws from a saved table (``01_longitudes_tokens.csv``, ``01_conteos_por_tema.csv``) and
returns the figure; ``utils.plotting.save_figure`` checks the print standard and writes it.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from utils.numbers import fmt_num, use_es_ar_ticks
from utils.plotting import COLORS, WIDTH_FULL_IN, label, legend_outside, new_figure

# One colour and one line style per split, so the three stay apart in grey print too (Okabe–Ito).
SPLIT_STYLE = {
    "train": {"color": COLORS["train"], "linestyle": "-"},
    "validation": {"color": COLORS["eval"], "linestyle": "--"},
    "test": {"color": COLORS["reference"], "linestyle": ":"},
}
PARTS = (("prompt", "Prompt (sin pérdida)"), ("respuesta", "Respuesta (con pérdida)"), ("total", "Ejemplo completo"))


def _split_style(split: str, k: int) -> dict:
    """The colour and line style of a split (a student's own split name gets the next palette colour)."""
    fallback = {"color": plt.rcParams["axes.prop_cycle"].by_key()["color"][k % 7], "linestyle": "-."}
    return SPLIT_STYLE.get(split, fallback)


def plot_token_lengths(lengths: pd.DataFrame, max_seq_length: int = 512) -> plt.Figure:
    """Share of examples by length of prompt, answer and whole example (one row per tokenizer), limit drawn.

    Each split is a step histogram normalised to its own size, so a small validation or test split reads on the
    same scale as train; the dashed line is ``max_seq_length``, labelled as the training length limit.
    """
    tokenizers = list(dict.fromkeys(lengths["tokenizador"]))
    upper = 1.08 * max(max_seq_length, int(lengths[["prompt", "respuesta", "total"]].to_numpy().max()))
    bins = np.linspace(0, upper, 55)  # the same bins in every panel, so heights compare
    fig, axes = new_figure("full", aspect=0.36, nrows=len(tokenizers), ncols=3, sharex=True, squeeze=False)
    for row, name in zip(axes, tokenizers):
        data = lengths[lengths["tokenizador"] == name]
        for ax, (column, _) in zip(row, PARTS):
            for k, split in enumerate(dict.fromkeys(data["split"])):
                values = data.loc[data["split"] == split, column]
                ax.hist(values, bins=bins, weights=np.full(len(values), 1 / len(values)), histtype="step",
                        linewidth=1.1, label=f"{label(split)} (n = {fmt_num(len(values))})",
                        **_split_style(split, k))
            ax.axvline(max_seq_length, color=COLORS["budget"], linestyle="--", linewidth=0.9,
                       label=f"longitud máxima de entrenamiento ({fmt_num(max_seq_length)} tokens)")
            ax.set_xlim(0, upper)
            use_es_ar_ticks(ax, "y", percent=True)
        row[0].set_ylabel(name.replace(" (", "\n("))  # the tokenizer of the row; the y axis is a share
    for ax, (_, title) in zip(axes[0], PARTS):
        ax.set_title(title)
    for ax in axes[-1]:
        ax.set_xlabel("Longitud (tokens)")
    legend_outside(fig, "below")
    return fig


def plot_counts(table: pd.DataFrame, by: str = "topic") -> plt.Figure:
    """Horizontal stacked bars of examples per topic (or kind) and split, from a ``count_table`` (totals dropped)."""
    table = table.drop(index="total", columns="total", errors="ignore").iloc[::-1]
    height_in = 0.2 * len(table) + 0.9
    fig, ax = new_figure("full", aspect=height_in / WIDTH_FULL_IN)
    positions = np.arange(len(table))
    left = np.zeros(len(table))
    for k, split in enumerate(table.columns):
        style = _split_style(split, k)
        ax.barh(positions, table[split].to_numpy(), left=left, height=0.7, color=style["color"],
                label=label(split), edgecolor="white", linewidth=0.4)
        left += table[split].to_numpy()
    ax.set_yticks(positions, [label(str(index)) for index in table.index])  # names, not the es-AR number ticks
    ax.set_xlabel("Ejemplos")
    ax.grid(axis="y", visible=False)
    legend_outside(fig, "below")
    return fig
