"""One print standard for every figure of the series, the one helper that saves figures, and each chapter's plots.

A figure is drawn at the size it is printed (16 cm, the thesis's text width, or half of it), so the fonts set
here are the printed ones (8–9 pt). ``save_figure`` refuses a figure that breaks the standard (wider than the
text, a text under 8 pt, a legend on the data) and records model, run, date and data source in the PDF and in
``figuras.tex``, the LaTeX a thesis ``\\input``s. The chapter modules (``utils.plotting.data``, ``.memory``,
``.lora``, ``.training``, ``.evaluation``, ``.speed``) draw from saved tables and return the figure.
"""

from __future__ import annotations

import datetime as dt
import math
import os
from pathlib import Path
from typing import Any, Sequence

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.legend import Legend
from matplotlib.text import Text
from matplotlib.ticker import Formatter, LogFormatter, ScalarFormatter

from utils.files import atomic_write_text, read_json, save_json
from utils.latex import latex_escape
from utils.numbers import fmt_num, tick_formatter
from utils.paths import REPO_ROOT, figures_dir, resolve_path
from utils.plotting.labels import LABELS, label
from utils.units import CARD_GIB

__all__ = [
    "COLORS", "LABELS", "MIN_FONT_PT", "PALETTE", "WIDTH_FULL_IN", "WIDTH_HALF_IN", "check_print_standard",
    "draw_budget", "figure_context", "label", "legend_outside", "localize_ticks", "new_figure", "save_figure",
    "set_figure_context", "set_style",
]

WIDTH_FULL_IN = 16 / 2.54  # the thesis's text width (A4, 2,5 cm margins): 16 cm
WIDTH_HALF_IN = 7.5 / 2.54  # half the text width, two figures side by side
WIDTHS = {"full": WIDTH_FULL_IN, "half": WIDTH_HALF_IN}
MIN_FONT_PT = 8.0  # the smallest printed text (the thesis body is 11–12 pt)
_TOLERANCE_IN = 0.01

# Okabe & Ito (2008), "Color Universal Design": distinguishable with every common colour-vision deficiency.
# In their order: black, orange, sky blue, bluish green, yellow, blue, vermillion, reddish purple.
PALETTE = ["#000000", "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7"]
COLORS = {
    "base": "#E69F00",  # orange
    "tuned": "#0072B2",  # blue
    "original": "#D55E00",  # vermillion: the original configuration
    "fixed": "#56B4E9",  # sky blue: its fixes (never green against the vermillion)
    "train": "#0072B2",
    "eval": "#E69F00",
    "budget": "#000000",  # reference lines (the card's memory) in black, dashed
    "reference": "#CC79A7",
}
# Lines and bars cycle through the palette without black (kept for reference lines) and yellow (faint on white).
CYCLE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000"]

STYLE = {
    "figure.figsize": (WIDTH_FULL_IN, WIDTH_FULL_IN * 0.62),
    "figure.dpi": 110,
    "figure.constrained_layout.use": True,
    "savefig.dpi": 300,
    "savefig.bbox": "standard",  # the saved size is the drawn size: the fonts print at the size set here
    "axes.prop_cycle": mpl.cycler(color=CYCLE),
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.linewidth": 0.6,
    "lines.linewidth": 1.2,
    "lines.markersize": 4,
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "legend.title_fontsize": 8,
    "figure.titlesize": 9,
    "legend.frameon": False,
    "axes.formatter.use_mathtext": False,
    "pdf.fonttype": 42,  # TrueType in PDFs, so LaTeX documents keep selectable text
}

_CONTEXT: dict[str, str] = {}


def set_style() -> None:
    """Apply the series' print style (called by each notebook's setup cell)."""
    mpl.rcParams.update(STYLE)


def set_figure_context(model: str, profile: str, run_date: str | None = None) -> None:
    """Say which model, profile and date (of the data, default today) the figures that follow come from."""
    _CONTEXT.update(model=model, profile=profile, date=run_date or dt.date.today().isoformat())
    set_style()


def figure_context() -> dict[str, str]:
    """The model, profile and date set by ``set_figure_context`` (a clear error when no notebook set them)."""
    if not _CONTEXT:
        raise RuntimeError("save_figure: no figure context. Call utils.plotting.set_figure_context(model_name, "
                           "profile) in the notebook's setup cell, so the figure says which model and run drew it.")
    return dict(_CONTEXT)


def new_figure(width: str = "full", aspect: float = 0.62, nrows: int = 1, ncols: int = 1,
               **subplots_kw: Any) -> tuple[plt.Figure, Any]:
    """A figure at print size: ``width`` "full" (16 cm) or "half" (7,5 cm); height = width × aspect, grown with rows.

    Constrained layout, es-AR tick labels on every axes. Returns ``(fig, axes)`` as ``plt.subplots``.
    """
    if width not in WIDTHS:
        raise ValueError(f"new_figure: width={width!r}; use 'full' (16 cm) or 'half' (7,5 cm).")
    set_style()
    inches = WIDTHS[width]
    height = inches * aspect * (1 + 0.75 * (nrows - 1))
    fig, axes = plt.subplots(nrows, ncols, figsize=(inches, height), layout="constrained", **subplots_kw)
    for ax in np.atleast_1d(axes).ravel():
        ax.xaxis.set_major_formatter(tick_formatter())
        ax.yaxis.set_major_formatter(tick_formatter())
    return fig, axes


def legend_outside(ax_or_fig: plt.Axes | plt.Figure, where: str = "below", ncol: int | None = None,
                   handles: Sequence[Any] | None = None, **legend_kw: Any) -> Legend | None:
    """One legend for the figure, outside every axes: ``where`` "below", "above" or "right".

    Collects the labelled artists of the given axes (or of every axes of the figure, each label once), or takes
    ``handles`` (artists with labels, e.g. ``matplotlib.patches.Patch``). Needs a constrained-layout figure
    (``new_figure``), which makes room for it.
    """
    fig = ax_or_fig if isinstance(ax_or_fig, plt.Figure) else ax_or_fig.figure
    axes = fig.axes if isinstance(ax_or_fig, plt.Figure) else [ax_or_fig]
    found: dict[str, Any] = {}
    for ax in axes:
        if ax.get_legend() is not None:
            ax.get_legend().remove()
        for handle, text in zip(*ax.get_legend_handles_labels()):
            found.setdefault(text, handle)
    if handles is not None:
        found = {h.get_label(): h for h in handles}
    if not found:
        return None
    loc = {"below": "outside lower center", "above": "outside upper center", "right": "outside right upper"}
    if where not in loc:
        raise ValueError(f"legend_outside: where={where!r}; use 'below', 'above' or 'right'.")
    if ncol is None:
        longest = max(len(t) for t in found)
        fits = max(1, int(fig.get_figwidth() * 72 / (longest * 4.4 + 24)))  # ~4.4 pt per character at 8 pt
        ncol = 1 if where == "right" else min(len(found), fits)
    return fig.legend(list(found.values()), list(found), loc=loc[where], ncol=ncol, **legend_kw)


class _EsArLogFormatter(Formatter):
    """A log axis's labels in es-AR: the original formatter decides which ticks get a label, this one writes it."""

    def __init__(self, original: LogFormatter):
        self.original = original

    def set_axis(self, axis: Any) -> None:
        super().set_axis(axis)
        self.original.set_axis(axis)

    def set_locs(self, locs: Sequence[float]) -> None:
        self.original.set_locs(locs)

    def __call__(self, value: float, pos: int | None = None) -> str:
        if not self.original(value, pos) or value <= 0:
            return ""
        places = max(0, min(3, -math.floor(math.log10(value) + 1e-9)))
        return fmt_num(value, places)


def localize_ticks(fig: plt.Figure) -> None:
    """Turn every default (English) numeric tick formatter of ``fig`` into es-AR; set formatters stay."""
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            major, minor = axis.get_major_formatter(), axis.get_minor_formatter()
            if isinstance(major, LogFormatter):
                axis.set_major_formatter(_EsArLogFormatter(major))
            elif isinstance(major, ScalarFormatter):
                axis.set_major_formatter(tick_formatter())
            if isinstance(minor, LogFormatter):
                axis.set_minor_formatter(_EsArLogFormatter(minor))


def _fmt_pt(size: float) -> str:
    return fmt_num(size, 0 if float(size).is_integer() else 1)


def _visible_texts(fig: plt.Figure) -> list[Text]:
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip() and t.figure is not None]


def check_print_standard(fig: plt.Figure, name: str) -> float:
    """Raise ``ValueError`` naming ``name`` and the fault where ``fig`` breaks the print standard.

    Width ≤ 16 cm; every visible text ≥ 8 pt and inside the figure; no legend over an axes' data area.
    Returns the smallest font size (pt).
    """
    width = fig.get_figwidth()
    if width > WIDTH_FULL_IN + _TOLERANCE_IN:
        raise ValueError(f"Figura {name}: mide {fmt_num(width * 2.54, 1)} cm de ancho, más que el ancho de texto "
                         f"(16 cm). Dibujala con utils.plotting.new_figure().")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox.padded(2)
    texts = _visible_texts(fig)
    all_axes = [a for ax in fig.axes for a in (ax, *ax.child_axes)]  # secondary axes (epochs on top) are children
    tick_labels = {id(t) for ax in all_axes for axis in (ax.xaxis, ax.yaxis) for t in axis.get_ticklabels(which="both")}
    for text in texts:
        if text.get_fontsize() < MIN_FONT_PT - 1e-6:
            raise ValueError(f"Figura {name}: el texto {text.get_text()!r} mide {_fmt_pt(text.get_fontsize())} pt "
                             f"impreso; el mínimo es {fmt_num(MIN_FONT_PT)} pt.")
        if id(text) in tick_labels:
            continue  # stale labels of ticks outside the view are never drawn; constrained layout places the rest
        extent = text.get_window_extent(renderer)
        if not (box.contains(extent.x0, extent.y0) and box.contains(extent.x1, extent.y1)):
            raise ValueError(f"Figura {name}: el texto {text.get_text()!r} queda fuera de la figura (se recorta).")
    for legend in fig.findobj(Legend):
        extent = legend.get_window_extent(renderer)
        for ax in fig.axes:
            if ax.get_visible() and ax.axison and ax.bbox.overlaps(extent):
                raise ValueError(f"Figura {name}: la leyenda tapa los datos de un panel; "
                                 "usá utils.plotting.legend_outside().")
    return min((t.get_fontsize() for t in texts), default=MIN_FONT_PT)


def _relative(path: str | os.PathLike) -> str:
    absolute = resolve_path(path)
    try:
        return absolute.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return absolute.name  # a student's file outside the repository: its name only, no home folder


def provenance_line(context: dict[str, str], sources: Sequence[str]) -> str:
    """``Modelo: …; perfil: …; fecha: …; datos: …`` (the PDF's Subject)."""
    return (f"Modelo: {label(context['model'])}; perfil: {label(context['profile'])}; fecha: {context['date']}; "
            f"datos: {', '.join(sources)}")


def save_figure(fig: plt.Figure, name: str, *, caption: str | None = None, source: str | Sequence[str] | None = None,
                show: bool = True, model: str | None = None) -> Path:
    """Check the print standard, write ``<name>.pdf`` (vector) + ``.png`` and regenerate the folder's ``figuras.tex``.

    ``caption``: one or two Spanish sentences (the model, profile, date and ``source`` files are appended).
    ``model``: the model the data come from when it is not the notebook's (committed measurements of the
    Llama-3.2-3B twin). Returns the PDF path. ``name`` starts with the notebook's number, e.g. ``"04_loss_curve"``.
    """
    if not caption or not source:
        raise TypeError(f"save_figure(fig, {name!r}) needs caption='<one or two Spanish sentences>' and "
                        "source=<the data file(s) it is drawn from>: every thesis figure says what it shows and "
                        "what produced it (print standard, issue #16).")
    context = figure_context() | ({"model": model} if model else {})
    sources = [_relative(s) for s in ([source] if isinstance(source, (str, os.PathLike)) else source)]
    localize_ticks(fig)
    smallest = check_print_standard(fig, name)
    folder = figures_dir()
    folder.mkdir(parents=True, exist_ok=True)
    pdf = folder / f"{name}.pdf"
    subject = provenance_line(context, sources)
    # No creation date or software version in the files: the same data gives the same bytes, so re-running a
    # notebook on unchanged code changes no committed figure.
    author = f"{label(context['model'])} · {label(context['profile'])}"
    fig.savefig(pdf, metadata={"Title": caption, "Author": author, "Subject": subject, "CreationDate": None,
                               "Producer": None, "Creator": None})
    fig.savefig(folder / f"{name}.png", metadata={"Title": caption, "Description": subject, "Software": None})
    record_figure(folder, name, {"caption": caption, "sources": sources, **context,
                                 "width_cm": round(fig.get_figwidth() * 2.54, 2), "min_font_pt": round(smallest, 2)})
    if show:
        try:
            from IPython.display import display

            display(fig)
        except ImportError:  # plain Python: nothing to show inline
            pass
    plt.close(fig)
    return pdf


def record_figure(folder: Path, name: str, entry: dict[str, Any]) -> Path:
    """Add ``name`` to ``folder/figuras.json`` and rewrite ``figuras.tex`` from it; returns the ``.tex`` path."""
    index_path = folder / "figuras.json"
    index = read_json(index_path) if index_path.exists() else {}
    index[name] = entry
    return write_figure_index(folder, index)


def write_figure_index(folder: Path, index: dict[str, dict[str, Any]]) -> Path:
    """Write ``folder/figuras.json`` (sorted by name) and the ``figuras.tex`` made from it; returns the ``.tex``."""
    save_json(dict(sorted(index.items())), folder / "figuras.json")
    return atomic_write_text(folder / "figuras.tex", figures_tex(index))


def figures_tex(index: dict[str, dict[str, Any]]) -> str:
    """The ``figuras.tex`` of a folder: one ``figure`` environment per recorded figure, by name."""
    lines = ["% Generado por utils.plotting.save_figure desde figuras.json: no editar a mano.",
             "% Necesita graphicx y url. Las figuras se buscan en \\figurasdir (por defecto, la carpeta actual):",
             "% \\newcommand{\\figurasdir}{figures/thesis} antes de \\input{figures/thesis/figuras.tex}.",
             "\\providecommand{\\figurasdir}{.}", ""]
    for name, entry in sorted(index.items()):
        width = r"\linewidth" if entry["width_cm"] > WIDTH_HALF_IN * 2.54 + 0.05 else r"0.5\linewidth"
        caption = latex_escape(entry["caption"].strip())
        sources = ", ".join(f"\\path{{{s}}}" for s in entry["sources"])
        model, profile = latex_escape(label(entry["model"])), latex_escape(label(entry["profile"]))
        provenance = f"Modelo: {model}; perfil: {profile}; datos: {sources}; fecha: {entry['date']}."
        lines += ["\\begin{figure}[htbp]", "  \\centering",
                  f"  \\includegraphics[width={width}]{{\\figurasdir/{name}.pdf}}",
                  f"  \\caption[{{{caption}}}]{{{caption} {provenance}}}",
                  f"  \\label{{fig:{name}}}", "\\end{figure}", ""]
    return "\n".join(lines)


def draw_budget(ax: plt.Axes, gib: float = CARD_GIB, axis: str = "y") -> None:
    """Draw the 8 GiB line of the thesis GPU (RTX 2070 SUPER) on a memory axis."""
    text = f"memoria de la RTX 2070 SUPER ({fmt_num(gib, 0 if float(gib).is_integer() else 1)}\u00a0GiB)"
    line = ax.axhline if axis == "y" else ax.axvline
    line(gib, color=COLORS["budget"], linestyle="--", linewidth=1.0, label=text)
