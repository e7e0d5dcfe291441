"""Figures of notebook 02: memory by storage format and training-step peaks, and the 4-bit quantisation error.

Each figure shows one model (the profile's, measured here, or the Llama-3.2-3B twin measured on a GPU), at print
size, with Spanish labels from ``utils.plotting.labels`` and es-AR numbers.
"""

from __future__ import annotations

import textwrap

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from utils.numbers import fmt_num, fmt_pct, tick_formatter
from utils.plotting import COLORS, PALETTE, draw_budget, label, legend_outside, new_figure
from utils.plotting.labels import LABELS
from utils.units import CUDA_CONTEXT_GIB

WRAP = 44  # characters per line of a bar's label (8 pt: about 6,5 cm; the labels of the map fit on one)
FORMAT_STYLE = {"nf4": (PALETTE[5], "-", "o"), "nf4_dq": (PALETTE[1], "--", "s"), "fp4": (PALETTE[0], ":", "^")}


def training_label(row: pd.Series) -> str:
    """A training configuration in words: its own name when the label map has it, else format and variant."""
    name = str(row.get("configuración", ""))
    return label(name) if name in LABELS else f"{label(str(row['formato']))}, {label(str(row['variante']))}"


def _wrapped(texts: list[str]) -> list[str]:
    return ["\n".join(textwrap.wrap(t, WRAP)) for t in texts]


def _annotate_bars(ax: plt.Axes, values: np.ndarray, positions: np.ndarray) -> None:
    """The value at the end of each horizontal bar, in es-AR."""
    for y, x in zip(positions, values):
        ax.annotate(fmt_num(x, 2), (x, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8,
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.4}, zorder=4)  # above the 8 GiB lines


def _draw_weights(ax: plt.Axes, weights: pd.DataFrame) -> None:
    """Horizontal bars of the measured weights per format, the analytic size as a black tick on each."""
    w = weights.dropna(subset=["medido_gib"]).reset_index(drop=True)
    y = np.arange(len(w))
    ax.barh(y, w["medido_gib"], height=0.6, color=COLORS["tuned"], label="pesos, medido")
    ax.scatter(w["analitico_gib"], y, marker="|", s=110, linewidths=1.4, color="black", zorder=3,
               label="pesos, analítico")
    _annotate_bars(ax, w["medido_gib"].to_numpy(), y)
    ax.set_yticks(y, _wrapped([label(f) for f in w["formato"]]))
    ax.invert_yaxis()
    ax.set_title("Pesos cargados, por formato", loc="left")


def _draw_training(ax: plt.Axes, train: pd.DataFrame) -> bool:
    """Horizontal bars of one training step's peak: reserved where measured (GPU), else the peak measured.

    The first row is the original configuration (vermillion); returns whether the peaks are reserved memory.
    """
    t = train.dropna(subset=["pico_gib"]).reset_index(drop=True)
    reserved = "pico_reservado_gib" in t and t["pico_reservado_gib"].notna().all()
    peaks = (t["pico_reservado_gib"] if reserved else t["pico_gib"]).to_numpy(dtype=float)
    y = np.arange(len(t))
    ax.barh(y[:1], peaks[:1], height=0.6, color=COLORS["original"], label="paso: configuración original")
    if len(t) > 1:
        ax.barh(y[1:], peaks[1:], height=0.6, color=COLORS["fixed"], label="paso: variantes")
    _annotate_bars(ax, peaks, y)
    ax.set_yticks(y, _wrapped([training_label(r) for _, r in t.iterrows()]))
    ax.invert_yaxis()
    shape = t["lote×acum×secuencia"].iloc[0] if "lote×acum×secuencia" in t else ""
    what = "Pico reservado" if reserved else "Pico de memoria"
    ax.set_title(f"{what} de un paso ({shape.replace('×', ' × ')} tokens)", loc="left")
    return reserved


def plot_memory_by_format(weights: pd.DataFrame, train: pd.DataFrame | None = None,
                          card_gib: float | None = None) -> plt.Figure:
    """Memory of one model in GiB: weights per format (measured bars, analytic ticks) above, step peaks below.

    ``card_gib`` draws the thesis card's memory (the RTX 2070 SUPER's 8 GiB) and, dotted, what is left after the
    CUDA context; leave it out for a CPU measurement, which no card limits.
    """
    n_weights = int(weights["medido_gib"].notna().sum())
    n_train = 0 if train is None else int(train["pico_gib"].notna().sum())
    rows = [n for n in (n_weights, n_train) if n]
    heights = [max(n, 2) + 1.5 for n in rows]
    fig, axes = new_figure(nrows=len(rows), sharex=True, gridspec_kw={"height_ratios": heights})
    fig.set_figheight((0.5 * sum(heights) + 2.2) / 2.54)  # about 0,5 cm a bar, 2,2 cm for axis and legend
    axes = np.atleast_1d(axes)
    if n_weights:
        _draw_weights(axes[0], weights)
    if n_train:
        _draw_training(axes[-1], train)
    for ax in axes:
        ax.grid(axis="y", visible=False)
        ax.xaxis.set_major_formatter(tick_formatter())
        if card_gib:
            draw_budget(ax, card_gib, axis="x")
            ax.axvline(card_gib - CUDA_CONTEXT_GIB, color=COLORS["budget"], linestyle=":", linewidth=1.0,
                       label=f"{fmt_num(card_gib)} GiB menos el contexto CUDA (~{fmt_num(CUDA_CONTEXT_GIB, 1)} GiB)")
    axes[-1].set_xlabel("memoria (GiB = 1024³ bytes)")
    axes[-1].set_xlim(0, axes[-1].get_xlim()[1] * 1.08)  # room for the values at the bars' ends
    legend_outside(fig, ncol=2)
    return fig


def plot_quantization_error(errors: pd.DataFrame) -> plt.Figure:
    """Two panels: relative error per layer (mean over the seven linear layers) and its distribution per format."""
    fig, (ax1, ax2) = new_figure(ncols=2, aspect=0.5)
    bins = np.histogram_bin_edges(errors["error_relativo"], bins=30)
    for fmt, group in errors.groupby("formato", sort=False):
        color, line, marker = FORMAT_STYLE.get(fmt, (PALETTE[0], "-.", "D"))
        per_layer = group.groupby("capa")["error_relativo"].mean()
        ax1.plot(per_layer.index, per_layer.to_numpy(), linestyle=line, marker=marker, color=color,
                 label=f"{label(fmt)} (mediana {fmt_pct(group['error_relativo'].median(), 1)})")
        ax2.hist(group["error_relativo"], bins=bins, histtype="step", linestyle=line, linewidth=1.4, color=color)
    ax1.set_xlabel("capa del decodificador")
    ax1.set_ylabel("error relativo ‖W − Ŵ‖ / ‖W‖")
    ax1.set_title("Por capa (media de las 7 lineales)", loc="left")
    if errors["capa"].nunique() <= 12:
        ax1.set_xticks(sorted(errors["capa"].unique()))
    ax2.set_xlabel("error relativo por matriz")
    ax2.set_ylabel("matrices")
    ax2.set_title("Distribución sobre todas las matrices", loc="left")
    ax1.yaxis.set_major_formatter(tick_formatter(percent=True))
    ax2.xaxis.set_major_formatter(tick_formatter(percent=True))
    legend_outside(fig)
    return fig
