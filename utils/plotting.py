"""One figure style for the whole series and the one helper that saves figures."""

from __future__ import annotations

from pathlib import Path

import matplotlib as mpl
import matplotlib.pyplot as plt

from utils.paths import figures_dir

# RTX 2070 SUPER: 8 GB of GDDR6 = 8 GiB as the card reports it (8192 MiB).
GPU_BUDGET_GIB = 8.0
COLORS = {
    "base": "#7f7f7f",
    "tuned": "#1f77b4",
    "original": "#d62728",
    "fixed": "#2ca02c",
    "train": "#1f77b4",
    "eval": "#ff7f0e",
    "budget": "#d62728",
}

STYLE = {
    "figure.figsize": (7.0, 4.2),
    "figure.dpi": 110,
    "savefig.dpi": 200,
    "savefig.bbox": "tight",
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "legend.frameon": False,
    "font.size": 10,
    "pdf.fonttype": 42,  # TrueType in PDFs, so LaTeX documents keep selectable text
}


def set_style() -> None:
    """Apply the series' matplotlib style (called by each notebook's setup cell)."""
    mpl.rcParams.update(STYLE)


def save_figure(fig: plt.Figure, name: str, show: bool = True) -> Path:
    """Write ``figures/<name>.pdf`` (vector, for LaTeX) and ``.png`` (preview); show it inline.

    Returns the PDF path. ``name`` starts with the notebook's number, e.g. ``"04_loss_curve"``.
    """
    folder = figures_dir()
    folder.mkdir(parents=True, exist_ok=True)
    pdf = folder / f"{name}.pdf"
    fig.savefig(pdf)
    fig.savefig(folder / f"{name}.png")
    if show:
        try:
            from IPython.display import display

            display(fig)
        except ImportError:  # plain Python: nothing to show inline
            pass
    plt.close(fig)
    return pdf


def draw_budget(ax: plt.Axes, gib: float = GPU_BUDGET_GIB, axis: str = "y") -> None:
    """Draw the 8 GiB line of the thesis GPU (RTX 2070 SUPER) on a memory axis."""
    label = f"Presupuesto RTX 2070 SUPER ({gib:g} GiB)"
    if axis == "y":
        ax.axhline(gib, color=COLORS["budget"], linestyle="--", linewidth=1.2, label=label)
    else:
        ax.axvline(gib, color=COLORS["budget"], linestyle="--", linewidth=1.2, label=label)
