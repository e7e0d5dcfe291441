"""One figure style for the whole series, the one helper that saves figures, and each chapter's plots.

The chapter modules (``utils.plotting.data``, ``.memory``, ``.lora``, ``.training``, ``.evaluation``,
``.speed``) draw from saved tables and return the figure; ``save_figure`` writes it.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib as mpl
import matplotlib.pyplot as plt

from utils.paths import figures_dir
from utils.units import CARD_GIB
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
    # No creation date or software version in the files: the same data gives the same bytes, so
    # re-running a notebook on unchanged code changes no committed figure.
    fig.savefig(pdf, metadata={"CreationDate": None, "Producer": None, "Creator": None})
    fig.savefig(folder / f"{name}.png", metadata={"Software": None})
    if show:
        try:
            from IPython.display import display

            display(fig)
        except ImportError:  # plain Python: nothing to show inline
            pass
    plt.close(fig)
    return pdf


def draw_budget(ax: plt.Axes, gib: float = CARD_GIB, axis: str = "y") -> None:
    """Draw the 8 GiB line of the thesis GPU (RTX 2070 SUPER) on a memory axis."""
    label = f"Presupuesto RTX 2070 SUPER ({gib:g} GiB)"
    if axis == "y":
        ax.axhline(gib, color=COLORS["budget"], linestyle="--", linewidth=1.2, label=label)
    else:
        ax.axvline(gib, color=COLORS["budget"], linestyle="--", linewidth=1.2, label=label)
