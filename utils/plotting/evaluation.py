"""Figures of notebook 05, drawn from the saved summaries (``05_metrics.json``, the runs' curves)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from utils.evaluation import KIND_LABELS, METRICS, MODEL_LABELS, MODELS
from utils.plotting import COLORS

# Metrics bounded to 0-1 (their panels share the 0-1.05 axis).
UNIT_METRICS = ("keyword_recall", "rouge_l", "refusal_accuracy", "refusal_oos", "wrongful_refusal", "stop_rate")


def _bars(ax: plt.Axes, labels: Sequence[str], summary: pd.DataFrame, metric: str,
          models: Sequence[str] = MODELS, horizontal: bool = False, annotate: bool = False) -> None:
    """Grouped bars with CI whiskers for ``models`` over ``labels`` (the ``group`` column or one bar)."""
    width = 0.8 / len(models)
    positions = np.arange(len(labels))
    ticks, names = [], []
    for k, model in enumerate(models):
        rows = summary[(summary["model"] == model) & (summary["metric"] == metric)]
        if "group" in rows:
            rows = rows.set_index("group").reindex(labels)
        value = rows["value"].to_numpy(dtype=float)
        err = np.vstack([value - rows["low"].to_numpy(dtype=float), rows["high"].to_numpy(dtype=float) - value])
        offset = positions + (k - (len(models) - 1) / 2) * width
        kwargs = dict(color=COLORS.get(model), label=MODEL_LABELS.get(model, model), capsize=3)
        if horizontal:
            ax.barh(offset, value, height=width, xerr=err, **kwargs)
        else:
            ax.bar(offset, value, width=width, yerr=err, **kwargs)
            digits = 1 if metric in {"chrf", "length_tokens", "perplexity"} else 2
            ticks.extend(offset)
            names.extend(f"{v:.{digits}f}" for v in value)
    if annotate:  # the values under the bars: readable even when a bar has height 0
        ax.set_xticks(ticks, names, fontsize=8)
        ax.tick_params(axis="x", length=0)
        ax.grid(axis="x", visible=False)


def _metric_panel(ax: plt.Axes, summary: pd.DataFrame, metric: str) -> None:
    """One metric, base vs tuned: title with the better direction, the reference line where it applies."""
    _bars(ax, [""], summary, metric, annotate=True)
    label, higher = METRICS[metric]
    hint = "↑ mejor" if higher else "↓ mejor" if higher is False else "-- referencia"
    ax.set_title(f"{label}\n({hint})", fontsize=9)
    reference = summary[(summary["model"] == "reference") & (summary["metric"] == metric)]
    if higher is None and len(reference):
        ax.axhline(float(reference["value"].iloc[0]), color="black", linestyle="--", linewidth=1)
    if metric in UNIT_METRICS:
        ax.set_ylim(0, 1.05)


def plot_metric_comparison(summary: pd.DataFrame, confidence: float = 0.95) -> plt.Figure:
    """One panel per metric: base vs tuned, with the bootstrap CI as whiskers."""
    metrics = [m for m in METRICS if set(MODELS) <= set(summary.loc[summary["metric"] == m, "model"])]
    ncols = 5 if len(metrics) > 8 else 4
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.5 * ncols, 2.7 * nrows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        _metric_panel(ax, summary, metric)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(f"Modelo base vs ajustado en test (barras: IC bootstrap {confidence:.0%})", fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def plot_metrics_by_group(by_group: pd.DataFrame,
                          metrics: Sequence[str] = ("keyword_recall", "chrf")) -> plt.Figure:
    """Rows = metrics, columns = by kind / by topic: horizontal base vs tuned bars with CIs."""
    groupings = [g for g in ("kind", "topic") if g in set(by_group["group_by"])]
    sizes = {g: by_group.loc[by_group["group_by"] == g, "group"].nunique() for g in groupings}
    height = 0.32 * max(sizes.values()) + 1.4
    fig, axes = plt.subplots(len(metrics), len(groupings), squeeze=False,
                             figsize=(5.2 * len(groupings), height * len(metrics)),
                             gridspec_kw={"height_ratios": [1] * len(metrics)})
    titles = {"kind": "Por tipo de pregunta", "topic": "Por tema"}
    for row, metric in enumerate(metrics):
        for col, grouping in enumerate(groupings):
            ax = axes[row, col]
            data = by_group[by_group["group_by"] == grouping]
            labels = sorted(data["group"].unique())
            _bars(ax, labels, data, metric, horizontal=True)
            ax.set_yticks(np.arange(len(labels)), [KIND_LABELS.get(x, x) for x in labels], fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel(METRICS[metric][0])
            ax.set_title(titles[grouping], fontsize=10)
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=2, bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def _draw_loss_curves(ax: plt.Axes, curves: pd.DataFrame, colors: dict[str, str]) -> None:
    """Training (solid) and evaluation (dashed, dots) loss of every run."""
    for (run, split), data in (curves.groupby(["run", "split"]) if len(curves) else []):
        ax.plot(data["step"], data["loss"], color=colors[run], linestyle="-" if split == "train" else "--",
                marker=None if split == "train" else "o", markersize=3,
                label=f"{run} ({'entrenamiento' if split == 'train' else 'evaluación'})")
    ax.set_xlabel("Paso de optimización")
    ax.set_ylabel("Pérdida (nats/token)")
    ax.set_title("Curvas de pérdida por corrida")
    if len(curves):
        ax.legend(fontsize=7)


def _draw_run_metrics(ax: plt.Axes, metrics: pd.DataFrame, runs: Sequence[str], colors: dict[str, str],
                      bounded: Sequence[str]) -> None:
    """Tuned-model metrics (0-1) per run, grouped by metric, with CI whiskers."""
    tuned = metrics[(metrics["model"] == "tuned") & metrics["metric"].isin(bounded)] if len(metrics) else metrics
    width = 0.8 / max(len(runs), 1)
    positions = np.arange(len(bounded))
    for k, run in enumerate(runs):
        rows = tuned[tuned["run"] == run].set_index("metric").reindex(list(bounded)) if len(tuned) else None
        if rows is None or rows["value"].isna().all():
            continue
        value = rows["value"].to_numpy(dtype=float)
        err = np.vstack([value - rows["low"].to_numpy(dtype=float), rows["high"].to_numpy(dtype=float) - value])
        ax.bar(positions + (k - (len(runs) - 1) / 2) * width, value, width=width, yerr=err, capsize=3,
               color=colors[run], label=run)
    ax.set_xticks(positions, [METRICS[m][0] for m in bounded], rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("Valor (modelo ajustado)")
    ax.set_title("Métricas del modelo ajustado por corrida")
    ax.legend(fontsize=8)


def plot_run_comparison(metrics: pd.DataFrame, curves: pd.DataFrame, bounded: Sequence[str] = (
        "keyword_recall", "rouge_l", "refusal_accuracy", "stop_rate")) -> plt.Figure:
    """Left: training/eval loss curves of every run; right: tuned-model metrics (0-1) per run with CIs."""
    runs = sorted(set(metrics.get("run", [])) | set(curves.get("run", [])))
    colors = dict(zip(runs, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    _draw_loss_curves(left, curves, colors)
    _draw_run_metrics(right, metrics, runs, colors, bounded)
    fig.tight_layout()
    return fig
