"""Evaluation of a trained LoRA adapter against its own base model on the held-out test split (notebook 05).

- ``metrics``: text normalisation, keyword recall, ROUGE-L, chrF++ and the refusal rule, per answer;
- ``loading``: notebook 05's parameters, the profile's trained run, the test records;
- ``predictions``: both models' answers, the test loss on the reference answers, ``ask()``;
- ``summaries``: scores per record, seeded (paired) bootstrap intervals, ``05_metrics.json``;
- ``tables``: answers side by side (notebook, CSV, LaTeX) and the examples shown in full;
- ``export``: the adapter merged into a 16-bit base, checked by its logits;
- ``runs``: every run's metrics and loss curves, side by side.

Figures are in ``utils.plotting.evaluation``, the Spanish findings in ``utils.reports.evaluation``.
"""

from utils.evaluation.export import MergeCheckError, compare_logits, export_merged, merge_dtype, probe_logits
from utils.evaluation.loading import (
    PARAMETER_NAMES, RunMismatchError, load_for_evaluation, parameters_of, require_adapter, select_records,
    setup_table, system_prompt_of,
)
from utils.evaluation.metrics import (
    DECLINE_PATTERN, KIND_LABELS, METRICS, MODEL_LABELS, MODELS, POINTER_PATTERN, SpanishTokenizer, chrf,
    declines, is_refusal, is_wrongful_refusal, keyword_hits, keyword_pattern, keyword_recall, normalize_text,
    points_to_office, rouge_l, score_answer, tokenize_spanish,
)
from utils.evaluation.predictions import (
    add_losses, completion_losses, make_ask, read_jsonl, run_predictions, stream_answer, write_jsonl,
)
from utils.evaluation.runs import collect_runs, read_log_history, runs_table
from utils.evaluation.summaries import (
    METRICS_FILE, bootstrap_ci, bootstrap_indices, loss_table, metrics_table, read_metrics, score_predictions,
    summarize_by_group, summarize_scores, write_metrics,
)
from utils.evaluation.tables import (
    highlight_keywords, pick_examples, side_by_side, style_side_by_side, write_latex_longtable,
)
from utils.inference import AdapterNotFoundError  # what ``require_adapter`` raises

__all__ = [
    "AdapterNotFoundError", "DECLINE_PATTERN", "KIND_LABELS", "METRICS", "METRICS_FILE", "MODELS", "MODEL_LABELS",
    "MergeCheckError", "PARAMETER_NAMES", "RunMismatchError", "POINTER_PATTERN", "SpanishTokenizer", "add_losses", "bootstrap_ci",
    "bootstrap_indices", "chrf", "collect_runs", "compare_logits", "completion_losses", "declines",
    "export_merged", "highlight_keywords", "is_refusal", "is_wrongful_refusal", "keyword_hits",
    "keyword_pattern", "keyword_recall", "load_for_evaluation", "loss_table", "make_ask", "merge_dtype",
    "metrics_table", "normalize_text", "parameters_of", "pick_examples", "points_to_office", "probe_logits",
    "read_jsonl", "read_log_history", "read_metrics", "require_adapter", "rouge_l", "run_predictions",
    "runs_table", "score_answer", "score_predictions", "select_records", "setup_table", "side_by_side",
    "stream_answer", "style_side_by_side", "summarize_by_group", "summarize_scores", "system_prompt_of",
    "tokenize_spanish", "write_jsonl", "write_latex_longtable", "write_metrics",
]
