"""Figures of notebook 05, drawn from the saved summaries (``05_metrics.json``, the runs' curves) at print size.

Every value is a dot with its bootstrap interval as a line, one row per system: a value of 0 is a visible dot
at 0, never an invisible bar. Systems differ by colour (Okabe–Ito) and by marker.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from utils.evaluation import ERROR_TAGS, METRICS, SYSTEM_LABELS
from utils.numbers import fmt_num
from utils.plotting import COLORS, PALETTE, label, legend_outside, new_figure

SYSTEM_STYLE = {  # colour, marker
    "base": (COLORS["base"], "o"),
    "tuned": (COLORS["tuned"], "s"),
    "base_rag": (PALETTE[3], "^"),
    "few_shot": (PALETTE[7], "D"),
    "tuned_rag": (PALETTE[0], "v"),
}
# Metrics bounded to 0-1 (their panels share the 0-1 axis).
UNIT_METRICS = ("keyword_recall", "citation_accuracy", "number_match", "invented_citation", "strict_correct",
                "rouge_l", "refusal_accuracy", "refusal_oos", "wrongful_refusal", "stop_rate")
KIND_ORDER = ["fact", "combined", "out_of_scope"]
MAIN_METRICS = ("keyword_recall", "citation_accuracy", "number_match", "strict_correct", "invented_citation",
                "refusal_oos", "wrongful_refusal", "stop_rate", "chrf")
# The x axis of a metric's panel: what its values count
AXIS_UNITS = {"chrf": "puntos (0–100)", "length_tokens": "tokens", "loss": "nats por token",
              "perplexity": "perplejidad", **dict.fromkeys(UNIT_METRICS, "proporción de preguntas (0–1)")}


def _dots(ax: plt.Axes, rows: Sequence[str], data: pd.DataFrame, key: str, systems: Sequence[str]) -> None:
    """For each row (a value of ``data[key]``) and system: a dot at ``value`` and a line from ``low`` to ``high``."""
    span = 0.7
    for k, system in enumerate(systems):
        color, marker = SYSTEM_STYLE.get(system, (PALETTE[k % len(PALETTE)], "o"))
        part = data[data["model"] == system].set_index(key).reindex(list(rows))
        y = np.arange(len(rows)) + (k - (len(systems) - 1) / 2) * span / max(len(systems), 1)
        value = part["value"].to_numpy(dtype=float)
        ax.hlines(y, part["low"].to_numpy(dtype=float), part["high"].to_numpy(dtype=float), color=color,
                  linewidth=1.0)
        ax.plot(value, y, linestyle="none", marker=marker, color=color, markersize=4,
                label=SYSTEM_LABELS.get(system, system))
    ax.set_yticks(np.arange(len(rows)))
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.grid(axis="y", visible=False)


def plot_system_metrics(summary: pd.DataFrame, systems: Sequence[str], metrics: Sequence[str] = MAIN_METRICS,
                        confidence: float = 0.95) -> plt.Figure:
    """One panel per metric: every system's value (dot) and bootstrap interval (line)."""
    metrics = [m for m in metrics if set(systems) & set(summary.loc[summary["metric"] == m, "model"])]
    ncols = 3
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = new_figure("full", aspect=0.34, nrows=nrows, ncols=ncols, squeeze=False, sharey=True)
    data = summary.assign(row="")
    for ax, metric in zip(axes.flat, metrics):
        _dots(ax, [""], data[data["metric"] == metric], "row", systems)
        name, higher = METRICS[metric]
        hint = " (↑\u00a0mejor)" if higher else " (↓\u00a0mejor)" if higher is False else ""  # kept on one line
        ax.set_title(textwrap.fill(name + hint, 30))
        ax.set_xlabel(AXIS_UNITS.get(metric, ""))
        ax.set_yticks([])
        if metric in UNIT_METRICS:
            ax.set_xlim(-0.04, 1.04)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    legend_outside(fig, "below", ncol=min(len(systems), 3))
    fig.suptitle(f"Métricas en el conjunto de prueba por sistema (línea: IC bootstrap del {fmt_num(100 * confidence)} %)")
    return fig


def plot_metrics_by_group(by_group: pd.DataFrame, systems: Sequence[str],
                          metrics: Sequence[str] = ("keyword_recall", "citation_accuracy"),
                          groupings: Sequence[str] = ("kind", "topic")) -> plt.Figure:
    """Rows = kind / topic, columns = metrics: each group's value per system with its interval."""
    groupings = [g for g in groupings if g in set(by_group.get("group_by", []))]
    sizes = [by_group.loc[by_group["group_by"] == g, "group"].nunique() for g in groupings]
    # Each group holds one dot per system: about 0,12 in per system keeps the markers apart at print size; a row
    # is at least 1,1 in tall so that its (wrapped) title fits beside it with few systems or groups.
    heights = [max(0.12 * max(len(systems), 2) * size, 1.1) for size in sizes]
    fig, axes = new_figure("full", nrows=len(groupings), ncols=len(metrics), squeeze=False, sharex="col",
                           gridspec_kw={"height_ratios": heights})
    fig.set_figheight(sum(heights) + 1.3)
    titles = {"kind": "Por tipo\nde pregunta", "topic": "Por tema"}
    for row, grouping in enumerate(groupings):
        data = by_group[by_group["group_by"] == grouping]
        groups = sorted(data["group"].unique(), key=lambda g: (KIND_ORDER.index(g) if g in KIND_ORDER else 99, str(g)))
        for col, metric in enumerate(metrics):
            ax = axes[row, col]
            _dots(ax, groups, data[data["metric"] == metric], "group", systems)
            ax.set_yticklabels([textwrap.fill(label(str(g)), 24) for g in groups] if col == 0 else [])
            ax.set_xlim(-0.04, 1.04)
            if row == 0:
                ax.set_title(METRICS[metric][0])
            if col == 0:
                ax.set_ylabel(titles[grouping])
    legend_outside(fig, "below", ncol=min(len(systems), 3))
    return fig


def plot_error_tags(counts: pd.DataFrame, systems: Sequence[str]) -> plt.Figure:
    """Share of answers with each error tag, per system (the count over the answers it applies to, as text)."""
    data = counts.assign(value=counts["share"], low=counts["share"], high=counts["share"])
    tags = [t for t in ERROR_TAGS if t in set(data["tag"])]
    fig, ax = new_figure("full", aspect=0.12 * max(len(systems), 2) * len(tags) / 6.3 + 0.15)
    _dots(ax, tags, data, "tag", systems)
    ax.set_yticklabels([ERROR_TAGS[t] for t in tags])
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel("Proporción de respuestas con la etiqueta")
    legend_outside(ax, "below", ncol=min(len(systems), 3))
    return fig


def plot_forgetting(per_question: pd.DataFrame) -> plt.Figure:
    """Half width: each general question's loss, base (x) against tuned (y); above the diagonal = forgetting."""
    fig, ax = new_figure("half", aspect=1.0)
    ax.plot(per_question["base"], per_question["tuned"], linestyle="none", marker="o", color=COLORS["tuned"],
            markersize=3.5)
    low = float(np.nanmin(per_question[["base", "tuned"]].to_numpy()))
    high = float(np.nanmax(per_question[["base", "tuned"]].to_numpy()))
    pad = 0.05 * (high - low or 1.0)
    ax.plot([low - pad, high + pad], [low - pad, high + pad], color=COLORS["budget"], linestyle="--", linewidth=0.8)
    ax.set_xlim(low - pad, high + pad)
    ax.set_ylim(low - pad, high + pad)
    ax.set_xlabel("Pérdida del base (nats/token)")
    ax.set_ylabel("Pérdida del ajustado (nats/token)")
    return fig


def _draw_loss_curves(ax: plt.Axes, curves: pd.DataFrame, colors: dict[str, str]) -> None:
    """Training (solid) and validation (dashed, dots) loss of every run."""
    for (run, split), data in curves.groupby(["run", "split"]):
        ax.plot(data["step"], data["loss"], color=colors[run], linestyle="-" if split == "train" else "--",
                marker=None if split == "train" else "o", markersize=3,
                label=f"{label(run)} ({'entrenamiento' if split == 'train' else 'validación'})")
    ax.set_xlabel("Paso de optimización")
    ax.set_ylabel("Pérdida (nats/token)")


def _draw_run_metrics(ax: plt.Axes, metrics: pd.DataFrame, runs: Sequence[str], colors: dict[str, str],
                      bounded: Sequence[str]) -> None:
    """Tuned-model metrics (0-1) per run: dots with interval lines."""
    tuned = metrics[(metrics["model"] == "tuned") & metrics["metric"].isin(bounded)]
    for k, run in enumerate(runs):
        rows = tuned[tuned["run"] == run].set_index("metric").reindex(list(bounded))
        y = np.arange(len(bounded)) + (k - (len(runs) - 1) / 2) * 0.7 / max(len(runs), 1)
        ax.hlines(y, rows["low"], rows["high"], color=colors[run], linewidth=1.0)
        ax.plot(rows["value"], y, linestyle="none", marker="os^Dv"[k % 5], color=colors[run],
                label=f"{label(run)} (métricas)")
    ax.set_yticks(np.arange(len(bounded)), [textwrap.fill(METRICS[m][0], 22) for m in bounded])
    ax.set_ylim(len(bounded) - 0.5, -0.5)
    ax.set_xlim(-0.04, 1.04)
    ax.set_xlabel("Valor del modelo ajustado")


def plot_run_comparison(metrics: pd.DataFrame, curves: pd.DataFrame, bounded: Sequence[str] = (
        "keyword_recall", "citation_accuracy", "strict_correct", "refusal_accuracy", "stop_rate")) -> plt.Figure:
    """Comparable runs only (``utils.evaluation.collect_runs``): loss curves (left) and tuned metrics (right)."""
    runs = sorted(set(metrics.get("run", [])) | set(curves.get("run", [])))
    colors = dict(zip(runs, [c for c in PALETTE if c not in ("#F0E442",)] * 3))
    fig, (left, right) = new_figure("full", aspect=0.5, ncols=2)
    if len(curves):
        _draw_loss_curves(left, curves, colors)
    _draw_run_metrics(right, metrics, runs, colors, bounded)
    legend_outside(fig, "below", ncol=2)
    return fig
