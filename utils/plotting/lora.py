"""Notebook 03's figures: the LoRA/QLoRA diagram of one adapted layer, and parameters and adapter size against r.

``plot_lora_diagram`` draws the frozen 4-bit weight and the trainable low-rank path with the original script's
values (r, α/r, dropout, dtypes); ``plot_sweep`` draws ``utils.lora.lora_sweep``'s table.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch, Polygon

from utils.config import THESIS
from utils.numbers import fmt_num, tick_formatter
from utils.plotting import PALETTE, label, legend_outside, new_figure

FROZEN = "#D9E8F5"  # a light tint of the palette's blue: the frozen base weight
TRAINABLE = "#F9DDA6"  # a light tint of the palette's orange: what trains
RING = dict(s=80, facecolors="none", edgecolors="black", zorder=4)  # the original configuration
MODULE_COLORS = {"attention": PALETTE[5], "mlp": PALETTE[1], "all": PALETTE[3], "q_v": PALETTE[7]}


def _box(ax: plt.Axes, x: float, y: float, w: float, h: float, text: str, color: str) -> None:
    """A rounded box centred on (x, y) with its text."""
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.15",
                                facecolor=color, edgecolor="black", linewidth=0.8))
    ax.text(x, y, text, ha="center", va="center", fontsize=8, linespacing=1.25)


def _trapezoid(ax: plt.Axes, x: float, y: float, wide: float, narrow: float, h: float, text: str,
               widens_up: bool) -> None:
    """A trapezoid centred on (x, y): A narrows from d_in to r (up), B widens from r to d_out."""
    bottom, top = (narrow, wide) if widens_up else (wide, narrow)
    ax.add_patch(Polygon([(x - bottom / 2, y - h / 2), (x + bottom / 2, y - h / 2), (x + top / 2, y + h / 2),
                          (x - top / 2, y + h / 2)], closed=True, facecolor=TRAINABLE, edgecolor="black",
                         linewidth=0.8))
    ax.text(x, y, text, ha="center", va="center", fontsize=8, linespacing=1.25)


def _arrow(ax: plt.Axes, start: tuple[float, float], end: tuple[float, float], style: str = "-|>") -> None:
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=9, linewidth=0.9, color="black",
                                 shrinkA=0, shrinkB=0))


def plot_lora_diagram(r: int = THESIS.lora_r, alpha: int = THESIS.lora_alpha, dropout: float = THESIS.lora_dropout,
                      d_in: int = 3072, d_out: int = 3072, compute_dtype: str = THESIS.bnb_4bit_compute_dtype,
                      module: str = "q_proj") -> plt.Figure:
    """One linear layer under QLoRA: frozen NF4 weight W and the trainable path B·A on dropout(x), scaled by α/r.

    The defaults are the original script's configuration on Llama-3.2-3B's ``q_proj`` (3072 × 3072).
    """
    fig, ax = new_figure(aspect=0.66)
    ax.set_xlim(0, 16)
    ax.set_ylim(0, 10.6)
    ax.set_axis_off()
    scale = alpha / r
    ax.text(8, 0.45, f"entrada x: {fmt_num(d_in)} valores por token, en {compute_dtype}", ha="center", fontsize=8)
    _arrow(ax, (8, 0.8), (8, 1.35), style="-")
    _arrow(ax, (4, 1.35), (12, 1.35), style="-")
    _arrow(ax, (4, 1.35), (4, 2.9))
    _box(ax, 4, 4.6, 6.6, 3.4, f"W congelada ({module}): {fmt_num(d_out)} × {fmt_num(d_in)}\n"
         f"guardada en NF4 + doble cuant.\n(4 bits por peso); se descuantiza\na {compute_dtype} en cada producto;"
         "\nsin gradiente", FROZEN)
    _arrow(ax, (4, 6.3), (4, 8.45))
    _arrow(ax, (12, 1.35), (12, 1.85))
    _box(ax, 12, 2.3, 4.2, 0.9, f"dropout (p = {fmt_num(dropout, 2)})", "white")
    _arrow(ax, (12, 2.75), (12, 3.15))
    _trapezoid(ax, 12, 3.95, 5.6, 3.2, 1.6, f"A: {r} × {fmt_num(d_in)}, fp32\nentrenable, inicio aleatorio",
               widens_up=False)
    _arrow(ax, (12, 4.75), (12, 5.25))
    _trapezoid(ax, 12, 6.05, 5.6, 3.2, 1.6, f"B: {fmt_num(d_out)} × {r}, fp32\nentrenable, inicio en cero",
               widens_up=True)
    ax.text(14.0, 5.0, f"rango r = {r}", fontsize=8, va="center")
    _arrow(ax, (12, 6.85), (12, 7.3))
    _box(ax, 12, 7.75, 4.2, 0.9, f"× α/r = {alpha}/{r} = {fmt_num(scale, 0 if scale.is_integer() else 2)}",
         "white")
    _arrow(ax, (12, 8.2), (12, 8.9), style="-")
    _arrow(ax, (12, 8.9), (8.35, 8.9))
    ax.add_patch(plt.Circle((8, 8.9), 0.35, facecolor="white", edgecolor="black", linewidth=0.9))
    ax.text(8, 8.9, "+", ha="center", va="center", fontsize=11)
    _arrow(ax, (4, 8.45), (4, 8.9), style="-")
    _arrow(ax, (4, 8.9), (7.65, 8.9))
    _arrow(ax, (8, 9.25), (8, 9.75))
    ax.text(8, 10.1, "h = W x + (α/r) · B A dropout(x)", ha="center", va="center", fontsize=9)
    legend_outside(fig, handles=[
        Patch(facecolor=FROZEN, edgecolor="black", label="congelado (modelo base)"),
        Patch(facecolor=TRAINABLE, edgecolor="black", label="entrenable (adaptador LoRA)")])
    return fig


def plot_sweep(sweep: pd.DataFrame) -> plt.Figure:
    """Two panels: trainable parameters (millions) and adapter MB vs r, one line per module set (log axes).

    Colour: the module set; line style: the model. Crosses mark the sizes measured by saving; a ring marks the
    original configuration (r = 32, seven modules).
    """
    fig, (ax1, ax2) = new_figure(ncols=2, aspect=0.66)
    models = list(dict.fromkeys(sweep["modelo"]))
    styles = {model: ["-", "--", ":"][i % 3] for i, model in enumerate(models)}
    for (model, key), group in sweep.groupby(["modelo", "módulos"], sort=False):
        color = MODULE_COLORS.get(key, PALETTE[0])
        ax1.plot(group["r"], group["entrenables (PEFT)"] / 1e6, styles[model], marker="o", color=color)
        ax2.plot(group["r"], group["MB analítico (fp32)"], styles[model], marker="o", color=color)
        saved = group.dropna(subset=["MB guardado"])
        ax2.scatter(saved["r"], saved["MB guardado"], marker="x", s=30, color="black", zorder=3)
        original = group[(group["r"] == THESIS.lora_r) & (key == "all")]
        ax1.scatter(original["r"], original["entrenables (PEFT)"] / 1e6, **RING)
        ax2.scatter(original["r"], original["MB analítico (fp32)"], **RING)
    keys = list(dict.fromkeys(sweep["módulos"]))
    handles = ([Line2D([], [], color=MODULE_COLORS.get(k, PALETTE[0]), marker="o", label=label("modules:" + k))
                for k in keys]
               + [Line2D([], [], color="black", linestyle=styles[m], label=m) for m in models]
               + [Line2D([], [], color="black", marker="x", linestyle="none", label="medido: safetensors guardado"),
                  Line2D([], [], marker="o", markersize=9, markerfacecolor="none", markeredgecolor="black",
                         linestyle="none", label=f"configuración original (r = {THESIS.lora_r}, siete módulos)")])
    ranks = sorted(sweep["r"].unique())
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("rango r")
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax1.set_ylabel("entrenables (millones)")
    ax1.set_title("Parámetros LoRA según r", loc="left")
    ax2.set_ylabel("adaptador (MB = 10⁶ bytes)")
    ax2.set_title("Tamaño en disco según r (fp32)", loc="left")
    ax1.yaxis.set_major_formatter(tick_formatter())
    ax2.yaxis.set_major_formatter(tick_formatter())
    legend_outside(fig, ncol=2, handles=handles)
    return fig

