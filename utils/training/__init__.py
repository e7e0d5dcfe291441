"""QLoRA training of the original script on today's API (TRL 1.x, transformers 5.x), with its traps fixed.

Notebook ``04_training.ipynb`` calls these functions one step per cell; ``python -m utils.training`` runs the
same functions in the same order (also under ``accelerate launch``). One module per topic:

- ``settings``: ``TrainingSettings`` (the notebook's parameters), ``plan_training`` → ``TrainingPlan``, errors;
- ``data``: tokenizer, datasets, one BOS per example; ``model``: memory check, model, ``SFTConfig``, trainer;
- ``callbacks``: log history as CSV, the progress file, throughput, live plot; ``checkpoints``: the last complete
  checkpoint;
- ``run``: train, save the outputs, ``04_config.json`` and ``04_run.json``; ``inspect``: the traps as tables;
- ``estimate``: hours for 2000 steps on the RTX 2070 SUPER, from the work per step and the card's peak;
- ``campaign``: the GPU campaign's runs and the JSON that collects them (``summarize-campaign``);
- ``cli``: the command line (profiles and flags).

Figures are in ``utils.plotting.training``, the Spanish prose in ``utils.reports.training``; a trained run is
loaded back with ``utils.inference.load_trained``. ``lifecycle``: the run folder's lock, a finished run kept
aside in ``previous/``, one error for a folder that cannot be written.
"""

import os
import sys

# ``python -m utils.training`` imports this package, and torch with it, before ``__main__`` runs, and libgomp
# reads OMP_WAIT_POLICY once, when torch loads it: so it is set here, for that command only (see __main__).
if sys.orig_argv[1:3] == ["-m", "utils.training"]:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


from utils.training.callbacks import (
    HistoryCsvCallback, LivePlotCallback, ProgressFileCallback, ThroughputCallback, history_frame, write_progress,
)
from utils.training.campaign import CAMPAIGN_FILE, CAMPAIGN_RUNS, load_campaign, summarize_campaign
from utils.training.checkpoints import find_last_checkpoint
from utils.training.cli import build_parser, main, profile_settings
from utils.training.data import (
    TrainingData, bos_counts, check_bos, expected_bos, load_training_data, load_training_tokenizer,
    strip_template_bos, tokenizer_adds_bos,
)
from utils.training.errors import TrainingConfigError, TrainingOutOfMemoryError, TrainingOutputError
from utils.training.inspect import (
    answers_table, compare_stop_rates, describe_labels, double_bos_table, label_table, settings_table,
    stop_rate_records, trainable_parameter_counts,
)
from utils.training.model import (
    OriginalPadMaskingCollator, build_sft_config, build_trainer, build_training_lora_config, check_fast_path_model,
    check_memory, estimate_training_memory, keep_trainable_dtypes, load_training_model, recast_trainable_parameters,
    trainable_dtypes, use_flat_optimizer,
)
from utils.training.run import (
    best_validation, load_history, oom_message, run_training, save_training_outputs, success_line, train,
    write_config, write_training_record,
)
from utils.training.lifecycle import (
    LOCK_FILE, PREVIOUS_DIR, acquire_lock, is_finished_run, move_finished_run, read_lock, release_lock,
)
from utils.training.settings import (
    FAST_PATH_CHOICES, NOTEBOOK, NOTEBOOK_ONLY, OPTIMIZERS, QUANTIZATION_CHOICES, RENAMED_SETTINGS,
    RESUME_MUST_MATCH, RUN_FILE, SAMPLING_CHOICES, SCHEDULERS, TrainingPlan, TrainingSettings, plan_training,
)

__all__ = [
    "CAMPAIGN_FILE", "CAMPAIGN_RUNS", "FAST_PATH_CHOICES", "LOCK_FILE", "NOTEBOOK", "NOTEBOOK_ONLY", "OPTIMIZERS",
    "PREVIOUS_DIR", "QUANTIZATION_CHOICES", "RENAMED_SETTINGS", "RESUME_MUST_MATCH", "RUN_FILE", "SAMPLING_CHOICES",
    "SCHEDULERS",
    "HistoryCsvCallback", "LivePlotCallback", "OriginalPadMaskingCollator", "ProgressFileCallback",
    "ThroughputCallback", "TrainingConfigError",
    "TrainingData", "TrainingOutOfMemoryError", "TrainingOutputError", "TrainingPlan", "TrainingSettings",
    "acquire_lock", "is_finished_run", "move_finished_run", "read_lock", "release_lock",
    "answers_table", "best_validation", "bos_counts", "build_parser", "build_sft_config", "build_trainer", "build_training_lora_config",
    "check_bos", "check_fast_path_model", "check_memory", "compare_stop_rates", "describe_labels",
    "double_bos_table", "estimate_training_memory", "expected_bos", "find_last_checkpoint", "history_frame",
    "keep_trainable_dtypes",
    "label_table", "load_campaign", "load_history", "load_training_data", "load_training_model", "load_training_tokenizer", "main",
    "oom_message", "plan_training", "profile_settings", "recast_trainable_parameters", "run_training",
    "save_training_outputs", "settings_table", "stop_rate_records", "strip_template_bos", "success_line",
    "summarize_campaign",
    "tokenizer_adds_bos", "train", "trainable_dtypes", "trainable_parameter_counts", "use_flat_optimizer",
    "write_config", "write_progress", "write_training_record",
]
