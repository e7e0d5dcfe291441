"""Comparing runs: every run folder's metrics (``05_metrics.json``) and loss curves (``04_log_history.csv``).

Only comparable runs are put side by side: the same model, the same test file and the same number of test
questions as the run being evaluated; the smoke profile (a handful of questions, a few steps) never. Every run
left out is listed with its reason, in Spanish.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from utils.evaluation.metrics import METRICS
from utils.evaluation.summaries import METRICS_FILE, format_interval, metric_digits
from utils.files import read_json
from utils.paths import HISTORY_FILE, RESULTS_DIR, RUNS_DIR

EXCLUDED_PROFILES = ("smoke",)  # runs that exercise the code, not the method
GPU_RESULTS_GLOB = "05_gpu_*.json"  # copies of a GPU run's 05_metrics.json, committed under results/


def read_log_history(path: Path) -> pd.DataFrame:
    """Loss curves of one ``04_log_history.csv``: rows (step, split, loss) for train and eval."""
    history = pd.read_csv(path)
    parts = []
    for column, split in (("loss", "train"), ("eval_loss", "eval")):
        if column in history and "step" in history:
            data = history[["step", column]].dropna()
            parts.append(pd.DataFrame({"step": data["step"], "split": split, "loss": data[column]}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["step", "split", "loss"])


def run_identity(data: dict) -> dict[str, object]:
    """What makes two runs comparable, from a ``05_metrics.json``: model, test file, number of test questions."""
    parameters = data.get("parameters") or {}
    return {"model_name": parameters.get("model_name"), "test_file": parameters.get("test_file"),
            "n_test_records": data.get("n_test_records"), "profile": parameters.get("profile")}


def exclusion_reason(run: str, identity: dict[str, object], reference: dict[str, object]) -> str | None:
    """Why ``run`` cannot stand beside the reference run (Spanish), or None when it can."""
    if run in EXCLUDED_PROFILES or identity.get("profile") in EXCLUDED_PROFILES:
        return "es una corrida de prueba rápida (smoke): pocas preguntas y pocos pasos, no mide el método"
    for key, what, other in (("model_name", "el modelo", "otro modelo"),
                             ("test_file", "el archivo de test", "otro archivo de test"),
                             ("n_test_records", "la cantidad de preguntas de test",
                              "otra cantidad de preguntas de test")):
        if identity.get(key) is None:
            return f"su 05_metrics.json no registra {what} (corrida anterior a esta versión de la notebook 05)"
        if identity[key] != reference.get(key):
            return f"{other}: {identity[key]} en vez de {reference.get(key)}"
    return None


def _run_folders(root: Path, only: Sequence[str]) -> list[Path]:
    folders = sorted(p for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []
    return [f for f in folders if not only or f.name in only]


def collect_runs(reference: dict[str, object], root: Path = RUNS_DIR, only: Sequence[str] = ()
                 ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The runs under ``root`` comparable with ``reference`` (``run_identity`` of the evaluated run).

    Returns (metrics of each comparable ``05_metrics.json``, loss curves of their ``04_log_history.csv``, the
    runs left out with their reason in Spanish: columns ``corrida`` and ``motivo``).
    """
    metrics, curves, excluded = [], [], []
    for folder in _run_folders(root, only):
        if not (folder / METRICS_FILE).is_file():
            if (folder / HISTORY_FILE).is_file():
                excluded.append({"corrida": folder.name, "motivo": "no tiene 05_metrics.json (falta evaluarla)"})
            continue
        data = read_json(folder / METRICS_FILE)
        reason = exclusion_reason(folder.name, run_identity(data), reference)
        if reason:
            excluded.append({"corrida": folder.name, "motivo": reason})
            continue
        metrics.append(pd.DataFrame(data["metrics"]).assign(run=folder.name))
        if (folder / HISTORY_FILE).is_file():
            curves.append(read_log_history(folder / HISTORY_FILE).assign(run=folder.name))
    metrics_df = pd.concat(metrics, ignore_index=True) if metrics else pd.DataFrame()
    curves_df = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame()
    return metrics_df, curves_df, pd.DataFrame(excluded, columns=["corrida", "motivo"])


def runs_table(metrics: pd.DataFrame, model: str = "tuned") -> pd.DataFrame:
    """Runs side by side: rows = metrics, columns = runs, cells = value [low; high] of ``model`` (es-AR)."""
    data = metrics[metrics["model"] == model].copy()
    data["cell"] = [format_interval(r.value, r.low, r.high, metric_digits(r.metric)) for r in data.itertuples()]
    table = data.pivot(index="metric", columns="run", values="cell")
    table = table.reindex([m for m in METRICS if m in table.index])
    table.index = [METRICS[m][0] for m in table.index]
    return table.fillna("—").rename_axis("Métrica")


def collect_gpu_results(folder: Path = RESULTS_DIR, pattern: str = GPU_RESULTS_GLOB) -> dict[str, dict]:
    """The committed GPU results (``results/05_gpu_<name>.json``, each a copy of a run's ``05_metrics.json``):
    ``{name: {"summary": DataFrame, "identity": run_identity, "provenance": {...}}}``, sorted by name."""
    results = {}
    for path in sorted(Path(folder).glob(pattern)):
        data = read_json(path)
        if "metrics" not in data:
            raise ValueError(f"{path}: no 'metrics' list. A GPU result is a copy of the run's 05_metrics.json "
                             "(runs/<profile>/05_metrics.json after notebook 05 ran on the GPU).")
        provenance = {k: data[k] for k in ("date", "commit", "device", "device_name") if k in data}
        results[path.stem.removeprefix("05_gpu_")] = {
            "summary": pd.DataFrame(data["metrics"]), "identity": run_identity(data), "provenance": provenance}
    return results
