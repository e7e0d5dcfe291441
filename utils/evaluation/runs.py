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
from utils.evaluation.summaries import model_label
from utils.paths import HISTORY_FILE, RESULTS_DIR, RUNS_DIR

EXCLUDED_PROFILES = ("smoke",)  # runs that exercise the code, not the method
PROVENANCE_FILE = "PROVENANCE.json"  # marks a published run folder results/<run>/ (written by the runner)
TRAINING_RECORD = "04_run.json"  # notebook 04's record: its settings and training results


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
    """What makes two runs comparable, from a ``05_metrics.json``: model, test file, number of test questions and,
    where recorded, which ones (``test_ids``; ``all_test``: the run evaluated the whole file)."""
    parameters = data.get("parameters") or {}
    limit = parameters.get("max_test_records")
    return {"model_name": parameters.get("model_name"), "test_file": parameters.get("test_file"),
            "n_test_records": data.get("n_test_records"), "profile": parameters.get("profile"),
            "test_ids": data.get("test_ids"), "all_test": isinstance(limit, int) and limit <= 0}


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
    ours, theirs = identity.get("test_ids"), reference.get("test_ids")
    if ours is not None and theirs is not None and sorted(ours) != sorted(theirs):
        return "otras preguntas de test: la misma cantidad, elegidas de otra forma"
    if (ours is None) != (theirs is None) and not (identity.get("all_test") and reference.get("all_test")):
        return ("su 05_metrics.json no registra qué preguntas de test evaluó, y una parte del archivo elegida por "
                "una versión anterior de la notebook 05 puede ser otra")
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
    return table.fillna("—").rename_axis("Métrica").rename_axis(columns="Corrida")


def _gpu_run(folder: Path) -> dict:
    """One published run folder (``results/<run>/``) as ``collect_gpu_results`` returns it."""
    provenance = read_json(folder / PROVENANCE_FILE)
    metrics = read_json(folder / METRICS_FILE) if (folder / METRICS_FILE).is_file() else None
    if metrics is not None and "metrics" not in metrics:
        raise ValueError(f"{folder / METRICS_FILE}: no 'metrics' list. A published run holds notebook 05's "
                         "05_metrics.json as the runner copied it (python -m utils.runner ... --publish).")
    training = read_json(folder / TRAINING_RECORD) if (folder / TRAINING_RECORD).is_file() else {}
    history = folder / HISTORY_FILE
    return {
        "summary": pd.DataFrame(metrics["metrics"]) if metrics else pd.DataFrame(),
        "identity": run_identity(metrics) if metrics else {},
        "provenance": {k: provenance.get(k) for k in ("run", "profile", "date", "commit", "device", "command",
                                                      "overrides", "wall_time_s", "notebooks")},
        "parameters": training.get("parameters") or {},
        "training": training.get("training") or {},
        "history": read_log_history(history) if history.is_file() else pd.DataFrame(columns=["step", "split", "loss"]),
    }


def collect_gpu_results(folder: Path = RESULTS_DIR, names: Sequence[str] = ()) -> dict[str, dict]:
    """The committed GPU runs: every ``results/<run>/`` with a ``PROVENANCE.json`` (``python -m utils.runner ...
    --publish``), sorted by name, or only ``names`` (those present).

    Each is ``{"summary": 05 metrics (empty without notebook 05), "identity": run_identity, "provenance": run,
    profile, date, commit, device, command, overrides, wall time, "parameters" and "training": notebook 04's
    settings and results (``04_run.json``), "history": its loss curves (``read_log_history``)}``.
    """
    folders = sorted(p.parent for p in Path(folder).glob(f"*/{PROVENANCE_FILE}"))
    return {f.name: _gpu_run(f) for f in folders if not names or f.name in names}


def gpu_source(result: dict, notebook: str | None = None) -> str:
    """Where and when a committed run was measured, in Spanish: "medido en NVIDIA H200, 2026-12-02, commit abc1234".

    ``notebook`` ("04", "05"): that notebook's own record, for a run whose notebooks ran in different sessions (the
    whole run's when the publication has no record of it)."""
    origin = result["provenance"]
    origin = {**origin, **((origin.get("notebooks") or {}).get(notebook) or {})} if notebook else origin
    origin = {**origin, "date": origin.get("started_at") or origin.get("date")}
    commit = str(origin.get("commit") or "no registrado")
    commit = commit if "+" in commit or " " in commit or len(commit) < 12 else commit[:7]
    device, date = origin.get("device") or "GPU no registrada", str(origin.get("date") or "")[:10]
    return f"medido en {device}, {date}, commit {commit}"


# The runs of the fast-path comparison (notebooks 04 + 05 of the gpu profile): fast_path auto and off, seeds 42 and
# 43; "gpu" itself is auto with seed 42 (python -m utils.runner --profile gpu --only 04 05 --run-name gpu-off-s42
# --set 04.fast_path=off --publish, and so on).
FAST_PATH_RUNS = ("gpu", "gpu-auto-s43", "gpu-off-s42", "gpu-off-s43")
# The published runs notebooks 04 and 05 show beside their own: the thesis recipe and the recipe chosen on validation.
GPU_RUNS = ("gpu", "gpu-tuned")

# The test metrics a GPU run is judged on (issue #17's targets and the stop rate), in this order.
GPU_METRICS = ("keyword_recall", "citation_accuracy", "refusal_oos", "wrongful_refusal", "stop_rate")


def gpu_runs_table(summaries: dict[str, pd.DataFrame], metrics: Sequence[str] = GPU_METRICS,
                   models: Sequence[str] | None = None) -> pd.DataFrame:
    """Runs side by side on the test metrics: rows (system, metric), one column per run, "value [low; high]".

    ``summaries``: run name -> its ``05_metrics.json`` summary (this run's included under its own name).
    ``models`` picks the systems (default: every system any run evaluated, differences left out).
    """
    frames = [s.assign(run=name) for name, s in summaries.items() if len(s)]
    if not frames:
        return pd.DataFrame()
    data = pd.concat(frames, ignore_index=True)
    data = data[data["metric"].isin(metrics)]
    present = list(dict.fromkeys(m for m in data["model"] if not str(m).startswith("delta")))
    models = [m for m in (models or present) if m in present]
    data = data[data["model"].isin(models)].copy()
    data["cell"] = [format_interval(r.value, r.low, r.high, metric_digits(r.metric)) for r in data.itertuples()]
    table = data.pivot_table(index=["model", "metric"], columns="run", values="cell", aggfunc="first")
    order = [(m, k) for m in models for k in metrics if (m, k) in table.index]
    table = table.reindex(order)[[n for n in summaries if n in table.columns]]
    table.index = pd.MultiIndex.from_tuples([(model_label(m), METRICS[k][0]) for m, k in order],
                                            names=["Sistema", "Métrica"])
    return table.fillna("—").rename_axis(columns="Corrida")


def final_eval_loss(result: dict) -> float:
    """The last validation loss of a committed run's training (``04_run.json``, else its history); NaN if none."""
    value = result.get("training", {}).get("last_eval_loss")
    if value is not None:
        return float(value)
    history = result.get("history")
    evals = history[history["split"] == "eval"] if history is not None and len(history) else pd.DataFrame()
    return float(evals.sort_values("step")["loss"].iloc[-1]) if len(evals) else float("nan")


def _tuned(summary: pd.DataFrame, metric: str) -> float:
    rows = summary[(summary["model"] == "tuned") & (summary["metric"] == metric)] if len(summary) else summary
    return float(rows["value"].iloc[0]) if len(rows) else float("nan")


def fast_path_runs(results: dict[str, dict], metrics: Sequence[str] = ("keyword_recall", "refusal_oos",
                                                                          "wrongful_refusal")) -> pd.DataFrame:
    """One row per committed run of notebook 04 that recorded its ``fast_path`` and ``seed``: the run, both
    settings, the final validation loss and the tuned system's test ``metrics`` (NaN where 05 did not run).

    Only runs whose other training settings equal those of the first such run are kept (same recipe), so the
    rows differ in the fast path and the seed alone.
    """
    rows, recipe = [], None
    for name, result in results.items():
        params = result.get("parameters") or {}
        if "fast_path" not in params or "seed" not in params:
            continue
        same = {k: v for k, v in params.items() if k not in VARYING_SETTINGS}
        recipe = same if recipe is None else recipe
        if same != recipe:
            continue
        row = {"run": name, "fast_path": params["fast_path"], "seed": params["seed"],
               "final_eval_loss": final_eval_loss(result)}
        row.update({m: _tuned(result["summary"], m) for m in metrics})
        rows.append(row)
    return pd.DataFrame(rows, columns=["run", "fast_path", "seed", "final_eval_loss", *metrics])


# Settings two runs of the same recipe may differ in: the two compared, and where each run writes.
VARYING_SETTINGS = ("fast_path", "fast_path_kernels", "seed", "profile", "output_dir", "resume")


def seed_noise_check(runs: pd.DataFrame, column: str) -> dict | None:
    """Do fast_path "off" and "auto" agree within seed noise on ``column``? None without two seeds of each.

    Path difference: the mean over shared seeds of |off − auto|. Seed noise: the mean over the two paths of
    |seed a − seed b| (the first two seeds both paths ran). They agree when the path difference is at most the
    seed noise.
    """
    data = runs.dropna(subset=[column])
    by_path = {path: dict(zip(part["seed"], part[column])) for path, part in data.groupby("fast_path")}
    if not {"off", "auto"} <= set(by_path):
        return None
    seeds = sorted(set(by_path["off"]) & set(by_path["auto"]))
    if len(seeds) < 2:
        return None
    path_gap = sum(abs(by_path["off"][s] - by_path["auto"][s]) for s in seeds) / len(seeds)
    noise = sum(abs(by_path[p][seeds[0]] - by_path[p][seeds[1]]) for p in ("off", "auto")) / 2
    return {"metric": column, "seeds": seeds, "path_gap": path_gap, "seed_noise": noise, "agree": path_gap <= noise}
