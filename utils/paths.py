"""Every path of the project, derived from the repository root."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

REPO_ROOT = Path(__file__).resolve().parents[1]

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
PARAMS_DIR = NOTEBOOKS_DIR / "params"
DATASET_DIR = REPO_ROOT / "dataset"
RESULTS_DIR = REPO_ROOT / "results"
RUNS_DIR = REPO_ROOT / "runs"
CACHE_DIR = Path(os.environ.get("QLORA_CACHE_DIR", REPO_ROOT / ".cache"))
MODELS_CACHE_DIR = CACHE_DIR / "models"
ASSETS_DIR = Path(__file__).resolve().parent / "assets"

TWIN_CONFIG_FILE = ASSETS_DIR / "llama-3.2-3b-config.json"

# The shipped sample corpus (built from ``dataset/sources/utn_qa.yaml``): named so that it cannot be mistaken
# for the student's own files (``train_v3_combined_split.jsonl`` in the original script). Validation drives every
# choice during training; test is read only by notebook 05.
TRAIN_FILE = DATASET_DIR / "utn_sample_train.jsonl"
VALIDATION_FILE = DATASET_DIR / "utn_sample_validation.jsonl"
TEST_FILE = DATASET_DIR / "utn_sample_test.jsonl"

# What a training run (notebook 04, ``python -m utils.training``) writes into its run folder; notebook 05 and
# ``utils.inference`` read it back.
CHECKPOINTS_DIR = "04_checkpoints"
ADAPTER_DIR = "04_adapter"
CONFIG_FILE = "04_config.json"
HISTORY_FILE = "04_log_history.csv"
PROGRESS_FILE = "04_progress.json"  # {"step": n, "max_steps": m}, rewritten each step: the runner's progress bar
TENSORBOARD_DIR = "04_tensorboard"  # TensorBoard event files of the run (when tensorboard is installed)


FIGURES_DIR = REPO_ROOT / "figures"


@contextlib.contextmanager
def scoped_environ(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of a block, then put back what was there (or nothing).

    The runner and the figure command set ``QLORA_PROFILE``, ``QLORA_FIGURES_DIR`` and ``QLORA_COMMAND`` for the
    kernels and figures they start; called from a notebook or a test, they must not leave them set for what runs
    next in that process (a later benchmark would record the runner's command as its own).
    """
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def figures_dir() -> Path:
    """Folder where ``save_figure`` and the tables write: ``runs/<profile>/figures`` (git-ignored).

    The runner sets the profile (``QLORA_PROFILE``); an interactive session without it writes under
    ``runs/thesis/figures``, the notebooks' own default profile. The committed, citable copies are
    ``figures/<profile>/``, refreshed only on request (``python -m utils.runner --publish``).
    """
    default = RUNS_DIR / os.environ.get("QLORA_PROFILE", "thesis") / "figures"
    return Path(os.environ.get("QLORA_FIGURES_DIR", default))


def published_figures_dir(profile: str) -> Path:
    """``figures/<profile>/``: the committed figures of a profile (a demo figure never stands for a thesis one)."""
    return FIGURES_DIR / profile


def published_results_dir(run: str) -> Path:
    """``results/<run>/``: the committed small data files of a published GPU run (``--publish``)."""
    return RESULTS_DIR / run


def run_dir(profile: str) -> Path:
    """Folder of one profile's outputs (executed notebooks, adapter, logs, ``NN_run.json``)."""
    path = RUNS_DIR / profile
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_path(path: str | os.PathLike) -> Path:
    """Return ``path`` as absolute, reading a relative one from the repository root."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path
