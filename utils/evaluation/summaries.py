"""Scores per record and model, and their summaries with seeded percentile-bootstrap intervals.

Every metric is averaged per record and gets a seeded percentile-bootstrap confidence interval; base and
tuned share the resamples, so their difference is a paired bootstrap.
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

from utils.evaluation.metrics import (
    DECLINE_PATTERN, METRICS, MODEL_LABELS, MODELS, POINTER_PATTERN, score_answer,
)
from utils.files import read_json, save_json
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
# Scores per record
# --------------------------------------------------------------------------------------------


def score_predictions(predictions: Sequence[dict]) -> pd.DataFrame:
    """Per record and model (base, tuned, and the reference answer as a calibration row): every metric.

    The reference row checks the rules themselves: its keyword recall should be 1, its refusal
    accuracy 1; ROUGE-L, chrF, stop rate and loss do not apply to it (NaN).
    """
    rows = []
    for p in predictions:
        meta = {"id": p["id"], "topic": p["topic"], "kind": p["kind"]}
        for name in (*MODELS, "reference"):
            answer = p["reference"] if name == "reference" else p[f"answer_{name}"]
            scores = score_answer(answer, p["reference"], p["keywords"], p["kind"])
            if name == "reference":
                scores.update(rouge_l=math.nan, chrf=math.nan, stop_rate=math.nan,
                              length_tokens=p["reference_tokens"], nll=math.nan, loss_tokens=math.nan)
            else:
                scores.update(stop_rate=float(p[f"stopped_{name}"]), length_tokens=p[f"tokens_{name}"],
                              nll=p.get(f"nll_{name}", math.nan), loss_tokens=p.get("loss_tokens", math.nan))
            rows.append({**meta, "model": name, **scores})
    return pd.DataFrame(rows)


def loss_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Test loss per model: scored tokens, loss (nats/token, token-weighted) and perplexity."""
    data = scores[scores["model"].isin(MODELS)].groupby("model")[["nll", "loss_tokens"]].sum()
    data["perdida_nats_por_token"] = data["nll"] / data["loss_tokens"]
    data["perplejidad"] = np.exp(data["perdida_nats_por_token"])
    data.index = [MODEL_LABELS[m] for m in data.index]
    return data.rename(columns={"nll": "nll_total", "loss_tokens": "tokens_con_perdida"})


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


def _metric_statistics(scores: pd.DataFrame, metric: str, ids: Sequence[str],
                       idx: np.ndarray) -> dict[str, tuple[float, np.ndarray, int]]:
    """(point, bootstrap distribution, n) of one metric per model, plus the paired tuned − base "delta"."""
    stats = {}
    for model in scores["model"].unique():
        point, boot, n = _statistic(_metric_parts(scores, model, metric, ids), idx)
        if n == 0:
            continue
        if metric == "perplexity":
            point, boot = math.exp(point), np.exp(boot)
        stats[model] = (point, boot, n)
    if all(m in stats for m in MODELS):
        (p_t, b_t, n_t), (p_b, b_b, _) = stats["tuned"], stats["base"]
        stats["delta"] = (p_t - p_b, b_t - b_b, n_t)
    return stats


def summarize_scores(scores: pd.DataFrame, n_boot: int = 1000, seed: int = 0,
                     confidence: float = 0.95) -> pd.DataFrame:
    """Tidy table: one row per (model, metric) with mean, CI bounds and n, plus tuned − base rows.

    All models use the same resampled record indices, so ``model == "delta"`` rows (tuned − base) are a
    paired bootstrap. Loss is token-weighted (total NLL / total tokens); perplexity = exp(loss).
    """
    ids = sorted(scores["id"].unique())
    idx = bootstrap_indices(len(ids), n_boot, seed)
    alpha = (1 - confidence) / 2
    rows = []
    for metric in METRICS:
        for model, (point, boot, n) in _metric_statistics(scores, metric, ids, idx).items():
            low, high = np.nanpercentile(boot, [100 * alpha, 100 * (1 - alpha)])
            rows.append({"model": model, "metric": metric, "label": METRICS[metric][0], "value": point,
                         "low": float(low), "high": float(high), "n": n})
    return pd.DataFrame(rows)


def summarize_by_group(scores: pd.DataFrame, by: str, metrics: Sequence[str], n_boot: int = 1000, seed: int = 0,
                       confidence: float = 0.95) -> pd.DataFrame:
    """``summarize_scores`` within each value of ``by`` ("kind" or "topic"), base and tuned only."""
    parts = []
    for group, data in scores[scores["model"].isin(MODELS)].groupby(by, sort=True):
        summary = summarize_scores(data, n_boot, seed, confidence)
        summary = summary[summary["metric"].isin(metrics) & summary["model"].isin(MODELS)]
        parts.append(summary.assign(group_by=by, group=group))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def metrics_table(summary: pd.DataFrame, models: Sequence[str] = (*MODELS, "delta", "reference")) -> pd.DataFrame:
    """Wide, readable table: one row per metric, "value [low, high]" per model (Spanish headers)."""

    def cell(row) -> str:
        digits = 1 if row["metric"] in {"chrf", "length_tokens", "perplexity"} else 3
        return f"{row['value']:.{digits}f} [{row['low']:.{digits}f}, {row['high']:.{digits}f}]"

    data = summary[summary["model"].isin(models)].copy()
    data["cell"] = data.apply(cell, axis=1)
    table = data.pivot(index="metric", columns="model", values="cell")
    table = table.reindex([m for m in METRICS if m in table.index])
    table = table[[m for m in models if m in table.columns]]
    table.index = [METRICS[m][0] for m in table.index]
    labels = {**MODEL_LABELS, "delta": "Diferencia (ajustado − base)"}
    table.columns = [labels[c] for c in table.columns]
    return table.fillna("—").rename_axis("Métrica")


# --------------------------------------------------------------------------------------------
# 05_metrics.json
# --------------------------------------------------------------------------------------------


def read_metrics(path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary, by_group) tables back from a ``05_metrics.json`` (figures are drawn from these)."""
    data = read_json(path)
    return pd.DataFrame(data["metrics"]), pd.DataFrame(data["by_group"])


def write_metrics(summary: pd.DataFrame, by_group: pd.DataFrame, path: Path, parameters: dict[str, Any]) -> Path:
    """``05_metrics.json``: the tidy summary, the per-group summary, how they were computed and provenance."""
    payload = {
        "parameters": parameters,
        "definitions": {m: {"label": label, "higher_is_better": hib} for m, (label, hib) in METRICS.items()},
        "refusal_rule": {"decline": DECLINE_PATTERN.pattern, "pointer": POINTER_PATTERN.pattern},
        "metrics": json.loads(summary.to_json(orient="records")),
        "by_group": json.loads(by_group.to_json(orient="records")) if len(by_group) else [],
        **result_provenance(),
    }
    return save_json(payload, path)
