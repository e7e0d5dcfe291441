"""Summaries of the per-record scores with seeded percentile-bootstrap intervals (Efron and Tibshirani, 1993).

Every metric is averaged per record and gets a seeded percentile-bootstrap confidence interval; every system
shares the resamples, so a difference between two systems (``CONTRASTS``) is a paired bootstrap.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from utils.evaluation.baselines import CONTRASTS, SYSTEM_LABELS
from utils.evaluation.metrics import DECLINE_PATTERN, METRICS, MODEL_LABELS, MODELS, POINTER_PATTERN
from utils.files import read_json, save_json
from utils.numbers import fmt_num
from utils.provenance import result_provenance

METRICS_FILE = "05_metrics.json"  # in each run folder; notebook 05 writes it, the run comparison reads it


# --------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """``(n_boot, n)`` record indices drawn with replacement from a seeded numpy Generator."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _weighted_means(values: np.ndarray, weights: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Weighted mean of each resample (NaN where a resample has no weight)."""
    v = np.nan_to_num(values)[idx]
    w = weights[idx]
    total = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (v * w).sum(axis=1) / total, np.nan)


def _weights_for(values: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """The weights of ``values`` (1 each unless given), 0 where a value is NaN (not applicable)."""
    base = np.ones_like(values, dtype=float) if weights is None else np.asarray(weights, dtype=float)
    return np.where(np.isnan(values), 0.0, base)


def bootstrap_ci(
    values: Sequence[float],
    weights: Sequence[float] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """(mean, low, high): weighted mean of ``values`` (NaN = not applicable) and its percentile CI."""
    values = np.asarray(values, dtype=float)
    w = _weights_for(values, weights)
    if w.sum() == 0:
        return math.nan, math.nan, math.nan
    point = float((np.nan_to_num(values) * w).sum() / w.sum())
    stats = _weighted_means(values, w, bootstrap_indices(len(values), n_boot, seed))
    alpha = (1 - confidence) / 2
    low, high = np.nanpercentile(stats, [100 * alpha, 100 * (1 - alpha)])
    return point, float(low), float(high)


# --------------------------------------------------------------------------------------------
# Test loss
# --------------------------------------------------------------------------------------------


def loss_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Test loss per model (base, tuned): scored tokens, loss (nats/token, token-weighted) and perplexity."""
    data = scores[scores["model"].isin(MODELS)].groupby("model")[["nll", "loss_tokens"]].sum()
    table = pd.DataFrame({
        "tokens con pérdida": data["loss_tokens"].map(lambda x: fmt_num(x)),
        "pérdida (nats/token)": (data["nll"] / data["loss_tokens"]).map(lambda x: fmt_num(x, 3)),
        "perplejidad": np.exp(data["nll"] / data["loss_tokens"]).map(lambda x: fmt_num(x, 2)),
    })
    table.index = [MODEL_LABELS[m] for m in table.index]
    return table.rename_axis("Modelo")


# --------------------------------------------------------------------------------------------
# Summaries with confidence intervals
# --------------------------------------------------------------------------------------------


def _metric_parts(scores: pd.DataFrame, model: str, metric: str,
                  ids: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(values, weights) of one metric for one model, aligned on ``ids``; the metric is the mean of the
    parts' weighted means (one part, except the balanced refusal accuracy: out-of-scope and answerable)."""
    data = scores[scores["model"] == model].set_index("id").reindex(ids)
    if metric in {"loss", "perplexity"}:
        tokens = data["loss_tokens"].to_numpy(dtype=float)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_token = data["nll"].to_numpy(dtype=float) / tokens
        parts = [(per_token, np.nan_to_num(tokens))]
    elif metric == "refusal_accuracy":
        parts = [(data["refusal_oos"].to_numpy(dtype=float), None),
                 (1.0 - data["wrongful_refusal"].to_numpy(dtype=float), None)]
    else:
        parts = [(data[metric].to_numpy(dtype=float), None)]
    return [(values, _weights_for(values, weights)) for values, weights in parts]


def _statistic(parts: list[tuple[np.ndarray, np.ndarray]], idx: np.ndarray) -> tuple[float, np.ndarray, int]:
    """Point estimate, bootstrap distribution and n of a metric; parts without data are left out."""
    points, boots, n = [], [], 0
    for values, w in parts:
        if w.sum() == 0:
            continue
        points.append(float((np.nan_to_num(values) * w).sum() / w.sum()))
        boots.append(_weighted_means(values, w, idx))
        n += int((w > 0).sum())
    if not points:
        return math.nan, np.full(len(idx), np.nan), 0
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample without one part: NaN, skipped
        return float(np.mean(points)), np.nanmean(np.vstack(boots), axis=0), n


# Columns of the scores table a metric is computed from (itself, unless named here)
_METRIC_COLUMNS = {"loss": ("nll", "loss_tokens"), "perplexity": ("nll", "loss_tokens"),
                   "refusal_accuracy": ("refusal_oos", "wrongful_refusal")}


def contrast_name(first: str, second: str) -> str:
    """The ``model`` value of a paired difference: "delta" for tuned − base, "delta:<a>:<b>" for the others."""
    return "delta" if (first, second) == ("tuned", "base") else f"delta:{first}:{second}"


def _metric_statistics(scores: pd.DataFrame, metric: str, ids: Sequence[str], idx: np.ndarray,
                       contrasts: Sequence[tuple[str, str]]) -> dict[str, tuple[float, np.ndarray, int]]:
    """(point, bootstrap distribution, n) of one metric per system, plus each paired difference of ``contrasts``."""
    needed = _METRIC_COLUMNS.get(metric, (metric,))
    if not all(column in scores for column in needed):
        return {}
    stats = {}
    for model in scores["model"].unique():
        point, boot, n = _statistic(_metric_parts(scores, model, metric, ids), idx)
        if n == 0:
            continue
        if metric == "perplexity":
            point, boot = math.exp(point), np.exp(boot)
        stats[model] = (point, boot, n)
    for first, second in contrasts:
        if first in stats and second in stats:
            (p_a, b_a, n_a), (p_b, b_b, _) = stats[first], stats[second]
            stats[contrast_name(first, second)] = (p_a - p_b, b_a - b_b, n_a)
    return stats


def summarize_scores(scores: pd.DataFrame, n_boot: int = 1000, seed: int = 0, confidence: float = 0.95,
                     metrics: Sequence[str] = tuple(METRICS),
                     contrasts: Sequence[tuple[str, str]] = CONTRASTS) -> pd.DataFrame:
    """Tidy table: one row per (system, metric) with mean, CI bounds and n, plus the paired differences.

    Every system uses the same resampled record indices, so the difference rows (``model`` = "delta" for
    tuned − base, "delta:<a>:<b>" for a − b) are a paired bootstrap. Loss is token-weighted (total NLL /
    total tokens); perplexity = exp(loss). A metric no system has (NaN everywhere) gets no row.
    """
    ids = sorted(scores["id"].unique())
    idx = bootstrap_indices(len(ids), n_boot, seed)
    alpha = (1 - confidence) / 2
    rows = []
    for metric in metrics:
        for model, (point, boot, n) in _metric_statistics(scores, metric, ids, idx, contrasts).items():
            low, high = np.nanpercentile(boot, [100 * alpha, 100 * (1 - alpha)])
            rows.append({"model": model, "metric": metric, "label": METRICS[metric][0], "value": point,
                         "low": float(low), "high": float(high), "n": n})
    return pd.DataFrame(rows)


def summarize_by_group(scores: pd.DataFrame, by: str, metrics: Sequence[str], n_boot: int = 1000, seed: int = 0,
                       confidence: float = 0.95) -> pd.DataFrame:
    """``summarize_scores`` within each value of ``by`` ("kind" or "topic"), systems only (no differences)."""
    parts = []
    for group, data in scores[scores["model"] != "reference"].groupby(by, sort=True):
        summary = summarize_scores(data, n_boot, seed, confidence, metrics=metrics, contrasts=())
        parts.append(summary.assign(group_by=by, group=group))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def model_label(model: str) -> str:
    """Spanish name of a system, of the reference or of a paired difference ("Ajustado (LoRA) − Base")."""
    if model.startswith("delta"):
        first, second = ("tuned", "base") if model == "delta" else model.split(":")[1:]
        return f"{SYSTEM_LABELS.get(first, first)} − {SYSTEM_LABELS.get(second, second)}"
    return {**MODEL_LABELS, **SYSTEM_LABELS}.get(model, model)


def format_interval(value: float, low: float, high: float, digits: int, signed: bool = False) -> str:
    """``0,123 [0,100; 0,150]`` in es-AR (a semicolon between the bounds: the comma is the decimal mark)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{fmt_num(value, digits, signed=signed)} [{fmt_num(low, digits, signed=signed)}; " \
           f"{fmt_num(high, digits, signed=signed)}]"


def metric_digits(metric: str) -> int:
    """Decimals a metric is shown with: 1 for chrF++, lengths and perplexity, 2 for the rest."""
    return 1 if metric in {"chrf", "length_tokens", "perplexity"} else 2


def metrics_table(summary: pd.DataFrame, models: Sequence[str] | None = None) -> pd.DataFrame:
    """Wide, readable table: one row per metric, "value [low; high]" per system or difference (Spanish, es-AR).

    ``models`` picks and orders the columns (default: every system, then the reference calibration row).
    """
    present = list(dict.fromkeys(summary["model"]))
    models = list(models) if models is not None else [m for m in present if not m.startswith("delta")]
    data = summary[summary["model"].isin(models)].copy()
    data["cell"] = [format_interval(r.value, r.low, r.high, metric_digits(r.metric), r.model.startswith("delta"))
                    for r in data.itertuples()]
    table = data.pivot(index="metric", columns="model", values="cell")
    table = table.reindex([m for m in METRICS if m in table.index])
    table = table[[m for m in models if m in table.columns]]
    table.index = [METRICS[m][0] for m in table.index]
    table.columns = [model_label(c) for c in table.columns]
    return table.fillna("—").rename_axis("Métrica")


def contrasts_table(summary: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """The paired differences of ``metrics`` with their intervals, and whether the interval excludes 0."""
    data = summary[summary["model"].str.startswith("delta") & summary["metric"].isin(metrics)].copy()
    data["order"] = data["metric"].map({m: k for k, m in enumerate(metrics)})
    data["group"] = data["model"].map({m: k for k, m in enumerate(dict.fromkeys(data["model"]))})
    rows = []
    for r in data.sort_values(["group", "order"], kind="stable").itertuples():
        sure = r.low > 0 or r.high < 0
        rows.append({"Diferencia": model_label(r.model), "Métrica": METRICS[r.metric][0],
                     "Valor [IC]": format_interval(r.value, r.low, r.high, metric_digits(r.metric), signed=True),
                     "¿Excluye el 0?": "sí" if sure else "no"})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# 05_metrics.json
# --------------------------------------------------------------------------------------------


def read_metrics(path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary, by_group) tables back from a ``05_metrics.json`` (figures are drawn from these)."""
    data = read_json(path)
    return pd.DataFrame(data["metrics"]), pd.DataFrame(data["by_group"])


def write_metrics(summary: pd.DataFrame, by_group: pd.DataFrame, path: Path, parameters: dict[str, Any],
                  **extra: Any) -> Path:
    """``05_metrics.json``: the tidy summary, the per-group summary, how they were computed and provenance.

    ``extra`` (e.g. ``n_test_records``, ``error_tags``) is stored as is; the run comparison reads
    ``parameters`` and ``n_test_records`` to tell comparable runs apart.
    """
    payload = {
        "parameters": parameters,
        "definitions": {m: {"label": label, "higher_is_better": hib} for m, (label, hib) in METRICS.items()},
        "refusal_rule": {"decline": DECLINE_PATTERN.pattern, "pointer": POINTER_PATTERN.pattern},
        "metrics": json.loads(summary.to_json(orient="records")),
        "by_group": json.loads(by_group.to_json(orient="records")) if len(by_group) else [],
        **extra,
        **result_provenance(),
    }
    return save_json(payload, path)
