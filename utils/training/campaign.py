"""The GPU campaign of notebook 04: the runs it makes, and the one JSON that collects them for the notebook.

Two questions a CPU cannot answer in the demo's budget, measured on a GPU with the embedded model and the
thesis recipe (``tools/gpu_campaign/run.py`` starts the runs, one ``python -m utils.training`` process each, so
they share one GPU at the same time):

- ``validation_2000``: the thesis recipe for its 2000 steps (about 4.9 epochs of the shipped corpus at 1 × 2 examples), validation
  loss every 100 steps: where validation stops falling while training loss keeps falling (overfitting);
- ``random`` and ``group_by_length``: 300 steps of the original micro-batches (1 × 2, fast path off), the loss
  logged at every step, with random batches and with the original's length-grouped sampler (the saw-tooth).

``python -m utils.training summarize-campaign DIR --out results/04_gpu_campaign.json`` reads every finished
run folder of ``DIR`` (``04_config.json``, ``04_log_history.csv``, ``04_run.json``) into one file with its
provenance: GPU, library versions, commit (``QLORA_COMMIT`` on a machine without the git history), command and
date of each run. Notebook 04 draws its two figures from that committed file when it is there.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from utils.files import read_json, save_json
from utils.paths import CONFIG_FILE, HISTORY_FILE, RESULTS_DIR, resolve_path
from utils.provenance import result_provenance

CAMPAIGN_FILE = RESULTS_DIR / "04_gpu_campaign.json"
HISTORY_COLUMNS = ("step", "epoch", "loss", "eval_loss", "learning_rate", "grad_norm")
SETTING_KEYS = ("profile", "model_name", "max_steps", "learning_rate", "warmup_steps", "per_device_train_batch_size",
                "gradient_accumulation_steps", "max_seq_length", "lora_r", "lora_alpha", "eval_steps",
                "logging_steps", "train_file", "validation_file", "eval_limit", "train_sampling_strategy",
                "fast_path", "seed")
PLAN_KEYS = ("device", "quantization", "compute_dtype", "optim", "fast_path", "train_sampling_strategy", "loss")
TRAINING_KEYS = ("global_step", "train_seconds", "tokens_per_second", "peak_memory_gib", "first_train_loss",
                 "last_train_loss", "first_eval_loss", "last_eval_loss", "best_eval_step", "best_eval_loss")
RUN_FILE = "04_run.json"

# Every run: the thesis profile on the embedded model; each adds its own flags (python -m utils.training).
COMMON_ARGS = ("--profile", "thesis", "--model", "embedded")
CAMPAIGN_RUNS: dict[str, tuple[str, ...]] = {
    "validation_2000": ("--eval-steps", "100", "--save-steps", "500", "--logging-steps", "10"),
    "random": ("--max-steps", "300", "--logging-steps", "1", "--eval-steps", "100", "--save-steps", "100",
               "--fast-path", "off", "--train-sampling-strategy", "random"),
    "group_by_length": ("--max-steps", "300", "--logging-steps", "1", "--eval-steps", "100", "--save-steps", "100",
                        "--fast-path", "off", "--train-sampling-strategy", "group_by_length"),
}


class CampaignError(ValueError):
    """A campaign folder that cannot be summarised (no finished run, a run cut short)."""


def campaign_command(name: str, folder: str | Path, extra: tuple[str, ...] = ()) -> list[str]:
    """The ``python -m utils.training`` command of run ``name``, writing into ``folder/name``."""
    return [sys.executable, "-m", "utils.training", *COMMON_ARGS, *CAMPAIGN_RUNS[name],
            "--output-dir", str(Path(folder) / name), *extra]


def _clean(value: Any) -> Any:
    """``value`` as strict JSON: NaN and infinities become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def history_records(path: str | Path) -> list[dict[str, Any]]:
    """The log history's columns the figures use, one record per logged event (missing values as null)."""
    history = pd.read_csv(path)
    columns = [c for c in HISTORY_COLUMNS if c in history]
    return [{k: _clean(v) for k, v in row.items()} for row in history[columns].to_dict(orient="records")]


def summarize_run(folder: Path) -> dict[str, Any]:
    """One finished run: provenance, the settings that define it, what it measured, its log history."""
    config = read_json(folder / CONFIG_FILE)
    record = read_json(folder / RUN_FILE)
    parameters, plan, training = config.get("parameters", {}), config.get("plan", {}), record.get("training", {})
    return {
        "command": config.get("command"),
        "date": config.get("date"),
        "commit": config.get("commit"),
        "device_name": config.get("device_name"),
        "versions": config.get("versions", {}),
        "settings": {k: parameters.get(k) for k in SETTING_KEYS},
        "plan": {k: plan.get(k) for k in PLAN_KEYS},
        "training": {k: _clean(training.get(k)) for k in TRAINING_KEYS},
        "wall_time_s": record.get("wall_time_s"),
        "history": history_records(folder / HISTORY_FILE),
    }


def summarize_campaign(folder: str | Path, out: str | Path = CAMPAIGN_FILE) -> Path:
    """Collect every finished run of ``folder`` into ``out`` (JSON); a run without its outputs stops it."""
    folder = resolve_path(folder)
    if not folder.is_dir():
        raise CampaignError(f"{folder} is not a folder: give the folder tools/gpu_campaign/run.py wrote (--out).")
    candidates = sorted(p for p in folder.iterdir() if p.is_dir() and (p / CONFIG_FILE).is_file())
    unfinished = [p.name for p in candidates if not ((p / RUN_FILE).is_file() and (p / HISTORY_FILE).is_file())]
    if unfinished:
        raise CampaignError(f"{folder}: the runs {', '.join(unfinished)} have no {RUN_FILE} (not finished or "
                            "crashed; see their .log). Finish them (rerun the same command: it resumes) first.")
    if not candidates:
        raise CampaignError(f"{folder} holds no run folder ({CONFIG_FILE}): run tools/gpu_campaign/run.py first.")
    runs = {p.name: summarize_run(p) for p in candidates}
    devices = sorted({r["device_name"] for r in runs.values() if r["device_name"]})
    summary = {
        "what": "GPU campaign of notebook 04 (utils.training.campaign): the thesis recipe on the embedded model",
        "device_name": ", ".join(devices),
        "date": max((r["date"] for r in runs.values() if r["date"]), default=None),
        "commits": sorted({r["commit"] for r in runs.values() if r["commit"]}),
        "summarized": result_provenance(),
        "runs": runs,
    }
    return save_json(summary, resolve_path(out))


def load_campaign(path: str | Path = CAMPAIGN_FILE) -> dict[str, Any] | None:
    """The committed campaign summary, or None when it is not there (the notebook then skips its figures)."""
    path = resolve_path(path)
    return read_json(path) if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    """``python -m utils.training summarize-campaign DIR --out FILE``."""
    parser = argparse.ArgumentParser(prog="python -m utils.training summarize-campaign",
                                     description="Collect a GPU campaign's finished runs into one JSON file.")
    parser.add_argument("folder", help="the folder tools/gpu_campaign/run.py wrote (one subfolder per run)")
    parser.add_argument("--out", default=str(CAMPAIGN_FILE), help=f"JSON to write (default {CAMPAIGN_FILE})")
    args = parser.parse_args(argv)
    try:
        path = summarize_campaign(args.folder, args.out)
    except CampaignError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"campaign summary written to {path}")
    return 0
