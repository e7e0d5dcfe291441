"""Comparing runs: every run folder's metrics (``05_metrics.json``) and loss curves (``04_log_history.csv``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from utils.evaluation.metrics import METRICS
from utils.evaluation.summaries import METRICS_FILE
from utils.files import read_json
from utils.paths import HISTORY_FILE, RUNS_DIR

def read_log_history(path: Path) -> pd.DataFrame:
    """Loss curves of one ``04_log_history.csv``: rows (step, split, loss) for train and eval."""
    history = pd.read_csv(path)
    parts = []
    for column, split in (("loss", "train"), ("eval_loss", "eval")):
        if column in history and "step" in history:
            data = history[["step", column]].dropna()
            parts.append(pd.DataFrame({"step": data["step"], "split": split, "loss": data[column]}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["step", "split", "loss"])


def collect_runs(root: Path = RUNS_DIR, only: Sequence[str] = ()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every run under ``root`` (or the folders named in ``only``): (metrics of each ``05_metrics.json``,
    loss curves of each ``04_log_history.csv``)."""
    metrics, curves = [], []
    folders = sorted(p for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []
    for folder in [f for f in folders if not only or f.name in only]:
        if (folder / METRICS_FILE).is_file():
            data = read_json(folder / METRICS_FILE)
            metrics.append(pd.DataFrame(data["metrics"]).assign(run=folder.name))
        if (folder / HISTORY_FILE).is_file():
            curves.append(read_log_history(folder / HISTORY_FILE).assign(run=folder.name))
    metrics_df = pd.concat(metrics, ignore_index=True) if metrics else pd.DataFrame()
    curves_df = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame()
    return metrics_df, curves_df


def runs_table(metrics: pd.DataFrame, model: str = "tuned") -> pd.DataFrame:
    """Runs side by side: rows = metrics, columns = runs, cells = value [low, high] of ``model``."""
    data = metrics[metrics["model"] == model].copy()
    data["cell"] = data.apply(lambda r: f"{r['value']:.3f} [{r['low']:.3f}, {r['high']:.3f}]", axis=1)
    table = data.pivot(index="metric", columns="run", values="cell")
    table = table.reindex([m for m in METRICS if m in table.index])
    table.index = [METRICS[m][0] for m in table.index]
    return table.fillna("—").rename_axis("Métrica")
