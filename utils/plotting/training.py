"""Notebook 04's figures, drawn from a run's log history (``04_log_history.csv``) or the GPU campaign's JSON.

Training loss against validation loss, learning rate, gradient norm; the live plot of the training loop
(``draw_training``); and the two campaign figures: whether and where validation loss stops falling over the
thesis recipe's steps, and the loss with and without ``group_by_length``. Every figure is drawn at print size
(``utils.plotting.new_figure``) with Spanish labels and es-AR numbers.
"""

from __future__ import annotations

import math
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from utils.numbers import fmt_num, tick_formatter
from utils.plotting import COLORS, LABELS, WIDTH_FULL_IN, label, legend_outside, new_figure

STEP_LABEL = "Paso de optimización"
EPOCH_LABEL = "Época"
LOSS_LABEL = "Pérdida (nats/token)"
LR_LABEL = "Tasa de aprendizaje"
LIVE_SIZE_IN = (WIDTH_FULL_IN * 1.5, WIDTH_FULL_IN * 0.5)  # the live plot is a screen image, never printed

# Ids this chapter shows (sent to H-fig for utils/plotting/labels.py; used until they are there)
TRAINING_LABELS = {
    "sampler:random": "orden aleatorio (corregido)",
    "sampler:group_by_length": "agrupado por longitud (original)",
    "curve:train": "entrenamiento",
    "curve:validation": "validación",
    "curve:best": "mínimo de validación",
}


def training_label(key: str) -> str:
    """The Spanish name of an id of this chapter: the shared label map first, then ``TRAINING_LABELS``."""
    return LABELS.get(key) or TRAINING_LABELS.get(key) or label(key)


def _logged(history: pd.DataFrame, column: str) -> pd.DataFrame:
    """The rows of ``history`` that logged ``column`` (an empty table with ``step`` and ``column`` when none did)."""
    if column not in history or "step" not in history:
        return pd.DataFrame({"step": [], column: []})
    return history.dropna(subset=[column])


def best_validation_point(history: pd.DataFrame) -> tuple[int, float] | None:
    """(step, loss) of the lowest validation loss, or None when nothing was evaluated."""
    ev = _logged(history, "eval_loss")
    if ev.empty:
        return None
    row = ev.loc[ev["eval_loss"].idxmin()]
    return int(row["step"]), float(row["eval_loss"])


def marked_minimum(history: pd.DataFrame) -> tuple[int, float] | None:
    """(step, loss) of the lowest validation loss when the loss figures mark it with a dotted line: more than two
    evaluations and the minimum before the last one (a minimum at the end is where the curve stops, not a turn)."""
    ev, best = _logged(history, "eval_loss"), best_validation_point(history)
    if best is None or len(ev) <= 2 or best[0] >= ev["step"].max():
        return None
    return best


def minimum_caption(history: pd.DataFrame) -> str:
    """The caption's clause on the dotted line, true for this history: where it marks the minimum, or why there is
    none (Spanish, starts lower-case, no final period)."""
    best = marked_minimum(history)
    if best is not None:
        return (f"la línea punteada marca el mínimo de la pérdida de validación (paso {fmt_num(best[0])}), antes de "
                "la última evaluación")
    if len(_logged(history, "eval_loss")) <= 2:
        return "sin línea del mínimo de validación: hay dos evaluaciones o menos"
    return "sin línea del mínimo de validación: la pérdida de validación es mínima en la última evaluación"


def _draw_losses(ax: plt.Axes, history: pd.DataFrame, mark_best: bool = True) -> None:
    """Training loss as a line, validation loss as points joined by a line, the minimum of validation marked
    (``marked_minimum``: only when it comes before the last evaluation)."""
    train, ev = _logged(history, "loss"), _logged(history, "eval_loss")
    ax.plot(train["step"], train["loss"], color=COLORS["train"], linewidth=1.0, label=training_label("curve:train"))
    ax.plot(ev["step"], ev["eval_loss"], color=COLORS["eval"], marker="o", linestyle="--",
            label=training_label("curve:validation"))
    best = marked_minimum(history) if mark_best else None
    if best is not None:
        ax.axvline(best[0], color=COLORS["budget"], linestyle=":", linewidth=1.0,
                   label=f"{training_label('curve:best')} (paso {fmt_num(best[0])}: {fmt_num(best[1], 3)})")
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel(LOSS_LABEL)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _add_epoch_axis(ax: plt.Axes, history: pd.DataFrame) -> None:
    """A second x axis on top in epochs, when the history logged them (epoch grows linearly with the step)."""
    rows = history.dropna(subset=["epoch"]) if "epoch" in history else history.iloc[:0]
    rows = rows[rows["step"] > 0]
    if rows.empty:
        return
    per_step = float((rows["epoch"] / rows["step"]).median())
    top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda e: e / per_step))
    top.set_xlabel(EPOCH_LABEL)
    top.xaxis.set_major_formatter(tick_formatter())


def plot_loss_curve(history: pd.DataFrame, max_steps: int | None = None) -> plt.Figure:
    """Training and validation loss against the step, the lowest validation loss marked when it comes before the
    last evaluation (``marked_minimum``; ``04_loss_curve``)."""
    fig, ax = new_figure(aspect=0.5)
    _draw_losses(ax, history)
    _add_epoch_axis(ax, history)
    if max_steps:
        ax.set_xlim(0, max_steps)
    legend_outside(ax)
    return fig


SUPERSCRIPTS = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def _draw_learning_rate(ax: plt.Axes, history: pd.DataFrame) -> None:
    """The learning rate against the step, its axis in units of a power of ten (``× 10⁻⁴``), es-AR ticks."""
    lr = _logged(history, "learning_rate")
    ax.plot(lr["step"], lr["learning_rate"], color=COLORS["tuned"])
    ax.set_xlabel(STEP_LABEL)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    top = float(lr["learning_rate"].abs().max()) if len(lr) else 0.0
    exponent = math.floor(math.log10(top)) if top > 0 else 0
    scale = 10.0 ** exponent
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: tick_formatter()(v / scale)))
    unit = f" (× 10{str(exponent).translate(SUPERSCRIPTS)})" if exponent else ""
    ax.set_ylabel(LR_LABEL + unit)


def plot_learning_rate(history: pd.DataFrame) -> plt.Figure:
    """Learning rate against the step: warm-up then cosine decay (``04_learning_rate``)."""
    fig, ax = new_figure(aspect=0.4)
    _draw_learning_rate(ax, history)
    return fig


def plot_grad_norm(history: pd.DataFrame, max_grad_norm: float | None = None) -> plt.Figure:
    """Gradient norm before clipping against the step, with the clipping threshold (``04_grad_norm``)."""
    fig, ax = new_figure(aspect=0.45)
    gn = _logged(history, "grad_norm")
    ax.plot(gn["step"], gn["grad_norm"], color=COLORS["tuned"], linewidth=1.0, label="norma del gradiente")
    if max_grad_norm:
        ax.axhline(max_grad_norm, color=COLORS["budget"], linestyle="--", linewidth=1.0,
                   label=f"umbral de recorte ({tick_formatter()(max_grad_norm)})")
    ax.set_xlabel(STEP_LABEL)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("Norma L2 del gradiente")
    legend_outside(ax)
    return fig


def live_title(step: int, max_steps: int, elapsed_s: float, steps_done: int) -> str:
    """``Paso 12 de 40 · 1 min 20 s · quedan ≈ 3 min``: the live plot's progress line."""
    text = f"Paso {fmt_num(step)} de {fmt_num(max_steps)} · {_duration(elapsed_s)}"
    if steps_done > 0 and step < max_steps:
        text += f" · quedan ≈ {_duration(elapsed_s / steps_done * (max_steps - step))}"
    return text


def _duration(seconds: float) -> str:
    """Seconds as ``45 s``, ``3 min 05 s`` or ``1 h 02 min``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def draw_training(fig: Figure, history: pd.DataFrame, max_steps: int | None = None) -> Figure:
    """Draw the losses (training and validation) and the learning rate on ``fig`` (the live plot)."""
    fig.clear()
    ax_loss, ax_lr = fig.subplots(1, 2)
    if not history.empty:
        _draw_losses(ax_loss, history, mark_best=False)
        _draw_learning_rate(ax_lr, history)
    ax_loss.set_xlabel(STEP_LABEL)
    ax_loss.set_ylabel(LOSS_LABEL)
    ax_loss.yaxis.set_major_formatter(tick_formatter())
    for ax in (ax_loss, ax_lr):
        ax.xaxis.set_major_formatter(tick_formatter())
        if max_steps:
            ax.set_xlim(0, max_steps)
    if ax_loss.get_legend_handles_labels()[0]:
        ax_loss.legend(loc="upper right")
    return fig


# --------------------------------------------------------------------------------------------
# The GPU campaign (results/04_gpu_campaign.json, utils.training.campaign)
# --------------------------------------------------------------------------------------------


def plot_campaign_validation(run: dict[str, Any]) -> plt.Figure:
    """The thesis recipe over its steps: training vs validation loss, epochs on top, the minimum marked when it
    comes before the last evaluation (``marked_minimum``)."""
    history = pd.DataFrame(run["history"])
    fig, ax = new_figure(aspect=0.5)
    _draw_losses(ax, history)
    _add_epoch_axis(ax, history)
    ax.set_xlim(0, run["settings"]["max_steps"])
    legend_outside(ax)
    return fig


def plot_campaign_sampler(runs: dict[str, dict[str, Any]]) -> plt.Figure:
    """Training loss at every step with and without ``group_by_length``, one panel each, the same axes."""
    order = [k for k in ("random", "group_by_length") if k in runs]
    fig, axes = new_figure(aspect=0.4, nrows=len(order), sharex=True, sharey=True, squeeze=False)
    styles = {"random": (COLORS["fixed"], "-"), "group_by_length": (COLORS["original"], "-")}
    for ax, key in zip(axes[:, 0], order):
        train = _logged(pd.DataFrame(runs[key]["history"]), "loss")
        color, style = styles[key]
        ax.plot(train["step"], train["loss"], color=color, linestyle=style, linewidth=0.8,
                label=training_label(f"sampler:{key}"))
        ax.set_ylabel(LOSS_LABEL)
        ax.set_title(training_label(f"sampler:{key}"), loc="left")
    axes[-1, 0].set_xlabel(STEP_LABEL)
    return fig
