"""Notebook 04's figures, drawn from a run's log history (``04_log_history.csv``): loss, learning rate, gradient norm.

``draw_training`` draws the same curves on a given figure; the live plot of the training loop redraws with it.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

from utils.plotting import COLORS

STEP_LABEL = "Paso de optimización"
LOSS_LABEL = "Pérdida (entropía cruzada, nats/token)"
LR_LABEL = "Tasa de aprendizaje"


def _logged(history: pd.DataFrame, column: str) -> pd.DataFrame:
    """The rows of ``history`` that logged ``column`` (none when the column is absent)."""
    return history.dropna(subset=[column]) if column in history else history.iloc[:0]


def plot_loss_curve(history: pd.DataFrame, max_steps: int | None = None) -> plt.Figure:
    """Train and eval loss against the optimisation step (``04_loss_curve``)."""
    fig, ax = plt.subplots()
    train, ev = _logged(history, "loss"), _logged(history, "eval_loss")
    ax.plot(train["step"], train["loss"], color=COLORS["train"], linewidth=1.2, label="Entrenamiento")
    ax.plot(ev["step"], ev["eval_loss"], color=COLORS["eval"], marker="o", label="Evaluación (test)")
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel(LOSS_LABEL)
    if max_steps:
        ax.set_xlim(0, max_steps)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_learning_rate(history: pd.DataFrame) -> plt.Figure:
    """Learning rate against the step: warm-up then cosine decay (``04_learning_rate``)."""
    fig, ax = plt.subplots()
    lr = history.dropna(subset=["learning_rate"])
    ax.plot(lr["step"], lr["learning_rate"], color=COLORS["tuned"])
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel(LR_LABEL)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    fig.tight_layout()
    return fig


def plot_grad_norm(history: pd.DataFrame, max_grad_norm: float | None = None) -> plt.Figure:
    """Gradient norm before clipping against the step, with the clipping threshold (``04_grad_norm``)."""
    fig, ax = plt.subplots()
    gn = history.dropna(subset=["grad_norm"])
    ax.plot(gn["step"], gn["grad_norm"], color=COLORS["base"], linewidth=1.2, label="Norma del gradiente")
    if max_grad_norm:
        ax.axhline(max_grad_norm, color=COLORS["budget"], linestyle="--", label=f"max_grad_norm = {max_grad_norm:g}")
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel("Norma L2 del gradiente (antes del recorte)")
    ax.legend()
    fig.tight_layout()
    return fig


def draw_training(fig: Figure, history: pd.DataFrame, max_steps: int | None = None,
                  grad_norm: bool = False) -> Figure:
    """Draw loss (train and eval) and learning rate on ``fig`` from a log-history table (the live plot)."""
    fig.clear()
    axes = fig.subplots(1, 3 if grad_norm else 2)
    ax_loss, ax_lr = axes[0], axes[1]
    if "loss" in history:
        train = history.dropna(subset=["loss"])
        ax_loss.plot(train["step"], train["loss"], color=COLORS["train"], label="entrenamiento", linewidth=1.2)
    if "eval_loss" in history:
        ev = history.dropna(subset=["eval_loss"])
        ax_loss.plot(ev["step"], ev["eval_loss"], color=COLORS["eval"], marker="o", label="evaluación")
    ax_loss.set_xlabel(STEP_LABEL)
    ax_loss.set_ylabel(LOSS_LABEL)
    ax_loss.legend()
    if "learning_rate" in history:
        lr = history.dropna(subset=["learning_rate"])
        ax_lr.plot(lr["step"], lr["learning_rate"], color=COLORS["tuned"])
    ax_lr.set_xlabel(STEP_LABEL)
    ax_lr.set_ylabel(LR_LABEL)
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    if grad_norm and "grad_norm" in history:
        gn = history.dropna(subset=["grad_norm"])
        axes[2].plot(gn["step"], gn["grad_norm"], color=COLORS["base"])
        axes[2].set_xlabel(STEP_LABEL)
        axes[2].set_ylabel("Norma del gradiente (antes del recorte)")
    if max_steps:
        for ax in axes:
            ax.set_xlim(0, max_steps)
    fig.tight_layout()
    return fig
