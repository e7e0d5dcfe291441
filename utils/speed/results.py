"""The speed benchmark's saved reports: read them, merge repeated rows, compute their ratios, tabulate them.

A report is the JSON that ``python -m utils.speed.benchmark run`` (rows of configurations), ``correctness`` (runs
of the two paths) or ``ddp`` (runs on 1 and N GPUs) writes. Everything here reads data; nothing measures or draws.
``original_spread`` gathers, from every committed report, the original configuration's speed per invocation: the
spread of the host-bound original, and with it of every ratio taken against it.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from utils.files import read_json
from utils.paths import REPO_ROOT, RESULTS_DIR, resolve_path
from utils.units import BUDGET_GIB

# The committed reports that can hold the original configuration and the fast path measured in one invocation
# (relative to results/; a pattern may match none, e.g. before the strict run is committed)
STRICT8_REPORT = "results/04_speed_strict8.json"  # the strict 8 GB run (``run --budget strict8``), once committed
SPREAD_SOURCES = ("04_speed_benchmark.json", "04_speed_runs_h200.json", "04_renovation_check_h200.json",
                  Path(STRICT8_REPORT).name, "history/04_speed_*.json")
# The strict runs after the first two (issue #20's goal 1 against Unsloth alone), which notebook 04 shows one by one
LATER_STRICT_SOURCES = ("04_speed_strict8_exact_pin*.json", "04_speed_strict8_goal1*.json")

# Rows written before ``BenchConfig`` nested ``FastPathOptions``: their flat fast-path knobs and the option each named.
OLD_FAST_KEYS = {
    "checkpoint": "checkpoint",
    "offload": "offload_checkpoints",
    "skip_down": "skip_down_recompute",
    "checkpoint_keep": "checkpoint_keep",
    "kernels": "kernels",
    "mlp_chunk_tokens": "mlp_chunk_tokens",
}


def upgrade_row(row: dict) -> dict:
    """A row in today's layout: ``seq_len`` → ``max_seq_length``, the flat fast-path knobs → ``fast`` (a dict).

    Rows of the committed reports (written before the renovation) name ``seq_len`` and the knobs ``offload``,
    ``skip_down``, ``checkpoint_keep``, ``checkpoint``, ``kernels``, ``mlp_chunk_tokens``; ``fast`` then holds
    only the options the row named. A row already in today's layout, or any other dict, comes back unchanged.
    """
    if "fast" in row or not ({"seq_len", *OLD_FAST_KEYS} & row.keys()):
        return row
    out: dict[str, Any] = {}
    fast: dict[str, Any] = {}
    for key, value in row.items():
        if key in OLD_FAST_KEYS:
            fast[OLD_FAST_KEYS[key]] = value
            continue
        if key == "lora_dropout":  # the knobs sat after lora_dropout; today's fast field sits there
            out[key] = value
            out["fast"] = fast
            continue
        out["max_seq_length" if key == "seq_len" else key] = value
    out.setdefault("fast", fast)
    return out


def _upgrade_report(report: dict) -> dict:
    """The report with every row (``rows``, ``runs``, ``invocations[].rows``) in today's layout."""
    report = dict(report)
    for key in ("rows", "runs"):
        if isinstance(report.get(key), list):
            report[key] = [upgrade_row(r) for r in report[key]]
    if isinstance(report.get("invocations"), list):
        report["invocations"] = [_upgrade_report(run) for run in report["invocations"]]
    return report


def load_report(path: str | Path) -> dict:
    """A saved benchmark, correctness or DDP JSON (a relative path is read from the repository root).

    Rows written before the renovation are read in today's layout (``upgrade_row``); the numbers are untouched.
    """
    return _upgrade_report(read_json(resolve_path(path)))


def merged_rows(rows: Sequence[dict]) -> list[dict]:
    """One row per configuration that ran: with repeats (``run --repeat``), the median tokens/s and s/step over
    them and the largest peaks; the first repeat's other fields. Rows without repeats come back as they are."""
    by_name: dict[str, list[dict]] = {}
    for row in rows:
        if row.get("ok"):
            by_name.setdefault(row["name"], []).append(row)
    merged = []
    for name, group in by_name.items():
        if len(group) == 1:
            merged.append(group[0])
            continue
        row = dict(group[0])
        for key in ("tokens_per_second", "seconds_per_step"):
            row[key] = round(statistics.median(r[key] for r in group), 5)
            row[f"{key}_repeats"] = [r[key] for r in group]
        for key in ("peak_allocated_gib", "peak_reserved_gib"):
            values = [r[key] for r in group if r.get(key) is not None]
            row[key] = max(values) if values else None
        row["repeats"] = len(group)
        merged.append(row)
    return merged


def _best_within_budget(ok: dict[str, dict], impl: str, dtype: str, workload: str = "synthetic") -> dict | None:
    """The fastest row of ``impl`` in ``dtype`` on ``workload`` whose peak reserved memory fits ``BUDGET_GIB``."""
    fits = [r for r in ok.values() if r["impl"] == impl and r["dtype"] == dtype and r["workload"] == workload
            and r.get("peak_reserved_gib") is not None and r["peak_reserved_gib"] <= BUDGET_GIB]
    return max(fits, key=lambda r: r["tokens_per_second"], default=None)


def _throughput_ratios(ok: dict[str, dict], summary: dict[str, Any]) -> None:
    """The best fast row of each dtype against the original (fp16) and against the best Unsloth row."""
    original = ok.get("original_fp16")
    for dtype in ("bf16", "fp16"):
        fast = _best_within_budget(ok, "fast", dtype)
        if fast:
            summary[f"fast_best_{dtype}"] = {
                "name": fast["name"], "tokens_per_second": fast["tokens_per_second"],
                "peak_reserved_gib": fast["peak_reserved_gib"]}
            if original:
                summary[f"fast_best_{dtype}"]["x_original_fp16"] = round(
                    fast["tokens_per_second"] / original["tokens_per_second"], 2)
        peer = _best_within_budget(ok, "unsloth", dtype)
        if fast and peer:
            summary[f"fast_best_{dtype}"]["x_unsloth_best"] = round(fast["tokens_per_second"] /
                                                                    peer["tokens_per_second"], 2)
            summary[f"unsloth_best_{dtype}"] = {"name": peer["name"], "tokens_per_second": peer["tokens_per_second"],
                                                "peak_reserved_gib": peer["peak_reserved_gib"]}


def _recipe_and_corpus_ratios(ok: dict[str, dict], summary: dict[str, Any]) -> None:
    """The original recipe (2 sequences per step) on both paths, and the best fast row on the corpus."""
    for dtype in ("fp16", "bf16"):
        recipe, orig = ok.get(f"fast_2x1_{dtype}"), ok.get(f"original_{dtype}")
        if recipe and orig:
            summary[f"recipe_{dtype}"] = {
                "original_seconds_per_step": orig["seconds_per_step"], "fast_seconds_per_step":
                recipe["seconds_per_step"], "x_fewer_seconds": round(orig["seconds_per_step"] /
                                                                     recipe["seconds_per_step"], 2),
                "fast_peak_allocated_gib": recipe.get("peak_allocated_gib"),
                "original_peak_allocated_gib": orig.get("peak_allocated_gib")}
    corpus_orig = ok.get("original_corpus_fp16")
    for dtype in ("bf16", "fp16"):
        fast = _best_within_budget(ok, "fast", dtype, "corpus")
        if fast and corpus_orig:
            summary[f"corpus_fast_best_{dtype}"] = {
                "name": fast["name"], "tokens_per_second": fast["tokens_per_second"],
                "x_original_corpus_fp16": round(fast["tokens_per_second"] / corpus_orig["tokens_per_second"], 2)}


def summarize(rows: Sequence[dict]) -> dict[str, Any]:
    """The ratios the issue asks for, from rows of one run (None where a row is missing; repeats merged)."""
    ok = {r["name"]: r for r in merged_rows(rows)}
    summary: dict[str, Any] = {"budget_reserved_gib": BUDGET_GIB}
    _throughput_ratios(ok, summary)
    _recipe_and_corpus_ratios(ok, summary)
    return summary


def mean_gap(a: Sequence[float], b: Sequence[float], digits: int = 4) -> float:
    """Mean over the steps of |a − b| (two runs' per-step losses), rounded to ``digits``."""
    return round(statistics.mean(abs(x - y) for x, y in zip(a, b)), digits)


def compare_losses(runs: Sequence[dict], tail: int = 10) -> dict[str, Any]:
    """Mean |difference| of per-step losses: fast vs original (same seed) and original vs original (seeds)."""
    ok = {r["name"]: r["losses"] for r in runs if r.get("ok")}
    seeds = sorted({n.split("seed")[1] for n in ok})
    out: dict[str, Any] = {}
    for s in seeds:
        if f"original_seed{s}" in ok and f"fast_seed{s}" in ok:
            out[f"fast_vs_original_seed{s}"] = mean_gap(ok[f"original_seed{s}"], ok[f"fast_seed{s}"])
            out[f"final_mean_last{tail}_original_seed{s}"] = round(statistics.mean(ok[f"original_seed{s}"][-tail:]), 4)
            out[f"final_mean_last{tail}_fast_seed{s}"] = round(statistics.mean(ok[f"fast_seed{s}"][-tail:]), 4)
    if len(seeds) >= 2 and all(f"original_seed{s}" in ok for s in seeds[:2]):
        out["original_seed_vs_seed"] = mean_gap(ok[f"original_seed{seeds[0]}"], ok[f"original_seed{seeds[1]}"])
    return out


def speed_table(report: dict) -> pd.DataFrame:
    """The measured rows as a table (Spanish headers, for the notebook and the thesis)."""
    rows = [{
        "configuración": r["name"], "tipo": r["dtype"], "carga": r["workload"],
        "micro-lote × acum.": f"{r['micro_batch']}×{r['accumulation']}",
        "tokens/s": round(r["tokens_per_second"]), "s/paso": r["seconds_per_step"],
        "GiB asignados (pico)": r.get("peak_allocated_gib"), "GiB reservados (pico)": r.get("peak_reserved_gib"),
        "reintentos del asignador": (r.get("allocator") or {}).get("num_alloc_retries"),
    } for r in merged_rows(report["rows"])]
    return pd.DataFrame(rows).set_index("configuración")


def _invocations(report: dict, source: str) -> list[dict]:
    """A report's invocations, each ``{"source", "invocation", "device", "date", "rows"}``.

    A report either is one invocation, or lists several under ``invocations`` (each with its own rows), or carries
    rows of several invocations marked by the rows' own ``invocation`` field (its ``invocations`` then list their
    dates and commands only).
    """
    if not report.get("rows") and isinstance(report.get("invocations"), list):
        return [inv for run in report["invocations"] for inv in _invocations(run, source)]
    meta = {run.get("invocation"): run for run in report.get("invocations") or [] if isinstance(run, dict)}
    groups: dict[Any, list[dict]] = {}
    for row in report.get("rows") or []:
        groups.setdefault(row.get("invocation", report.get("invocation")), []).append(row)
    return [{"source": source, "invocation": key, "device": report.get("device"),
             "date": (meta.get(key) or {}).get("date") or report.get("date"), "rows": rows}
            for key, rows in groups.items()]


def _best_large_fast(ok: dict[str, dict]) -> dict | None:
    """The invocation's fastest fast-path row of a large pass (micro-batch > 2, synthetic, bf16) within
    ``BUDGET_GIB`` reserved: the row each headline ratio to the original is taken from."""
    fits = [r for r in ok.values() if r["impl"] == "fast" and r["dtype"] == "bf16" and r["workload"] == "synthetic"
            and r["micro_batch"] > 2 and r.get("peak_reserved_gib") is not None
            and r["peak_reserved_gib"] <= BUDGET_GIB]
    return max(fits, key=lambda r: r["tokens_per_second"], default=None)


def _spread_entry(invocation: dict) -> dict | None:
    """The original's tokens/s in one invocation (median of its repeats), and its best large fast row's ratio."""
    ok = {r["name"]: r for r in merged_rows(invocation["rows"])}
    original = ok.get("original_fp16")
    if original is None or not any(r["impl"] == "fast" for r in ok.values()):
        return None
    fast = _best_large_fast(ok)
    return {**{k: invocation[k] for k in ("source", "invocation", "device", "date")},
            "original_tokens_per_second": original["tokens_per_second"],
            "original_repeats": original.get("repeats", 1),
            "fast": fast["name"] if fast else None,
            "fast_tokens_per_second": fast["tokens_per_second"] if fast else None,
            "x_original": round(fast["tokens_per_second"] / original["tokens_per_second"], 2) if fast else None}


def _range(values: Sequence[float]) -> dict[str, Any]:
    """``{"n", "min", "median", "max"}`` of ``values`` (None for each but ``n`` when there are none)."""
    if not values:
        return {"n": 0, "min": None, "median": None, "max": None}
    return {"n": len(values), "min": min(values), "median": round(statistics.median(values), 2),
            "max": max(values)}


def spread_paths(patterns: Sequence[str] = SPREAD_SOURCES, folder: Path = RESULTS_DIR) -> list[Path]:
    """The committed files ``patterns`` name under ``folder`` (results/), in the patterns' order."""
    return [path for pattern in patterns for path in sorted(folder.glob(pattern))]


def later_strict_runs(folder: Path = RESULTS_DIR) -> list[tuple[dict, str]]:
    """The later strict runs (``LATER_STRICT_SOURCES``) as ``(report, file name)``, in the order they ran."""
    runs = [(load_report(path), path.name) for path in spread_paths(LATER_STRICT_SOURCES, folder)]
    return sorted(runs, key=lambda run: run[0]["date"])


def original_spread(paths: Sequence[str | Path] | None = None) -> dict[str, Any]:
    """The original configuration (``original_fp16``) across hosts and invocations, from the committed reports.

    Each invocation that measured the original and a fast-path row counts once (a file committed twice, e.g. an
    invocation also kept in ``04_speed_runs_h200.json``, is the same device and date): the original's tokens/s
    (median of its repeats) and, where the invocation has one, its best large fast row within ``BUDGET_GIB``
    reserved and their ratio (``x_original``). Returns the invocations, ``original_tokens_per_second`` and
    ``x_original`` as ``{"n", "min", "median", "max"}``, the devices and the files read. ``paths``: the reports
    (default ``spread_paths()``: ``SPREAD_SOURCES``).
    """
    paths = [resolve_path(p) for p in (spread_paths() if paths is None else paths)]
    entries, seen = [], set()
    for path in paths:
        try:
            source = path.relative_to(REPO_ROOT).as_posix()
        except ValueError:
            source = str(path)
        for invocation in _invocations(load_report(path), source):
            entry = _spread_entry(invocation)
            key = (invocation["device"], invocation["date"])
            if entry is None or key in seen:
                continue
            seen.add(key)
            entries.append(entry)
    return {"invocations": entries,
            "original_tokens_per_second": _range([e["original_tokens_per_second"] for e in entries]),
            "x_original": _range([e["x_original"] for e in entries if e["x_original"] is not None]),
            "devices": sorted({str(e["device"]) for e in entries}),
            "sources": sorted({e["source"] for e in entries})}
