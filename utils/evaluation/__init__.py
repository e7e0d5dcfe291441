"""Evaluation of a trained LoRA adapter on the held-out test split (notebook 05): the tuned model against its
own base model and against the baselines a committee asks for (retrieval and few-shot prompting).

- ``metrics``: text normalisation, keyword recall, ROUGE-L, chrF++ and the refusal rule, per answer;
- ``citations``: norms, articles, chapters and numbers of an answer, checked against the reference's;
- ``errors``: automatic error tags (repetition loop, system-prompt echo, invented norm, ...), printable text;
- ``scoring``: every score and tag per record and system, the strict correctness, the missing-field notes;
- ``baselines``: the systems (base, tuned, base + BM25, tuned + BM25, few-shot) and their prompts;
- ``loading``: notebook 05's parameters, the profile's trained run, the test records;
- ``predictions``: every system's answers, the test loss on the reference answers, ``ask()``;
- ``summaries``: seeded (paired) bootstrap intervals, ``05_metrics.json``;
- ``tables``: the answers side by side (CSV), the qualitative picks and their printable table, subsets;
- ``rubric``: the human-rubric CSV and Cohen's κ between two raters;
- ``forgetting``: base vs tuned loss on general Spanish questions;
- ``export``: the adapter merged into a 16-bit base, checked by its logits (``gguf``: the GGUF export);
- ``runs``: comparable runs' metrics and loss curves side by side, the committed GPU results.

Figures are in ``utils.plotting.evaluation``, the Spanish findings in ``utils.reports.evaluation``.
"""

from utils.evaluation.baselines import (
    BASELINES, CONTRASTS, SYSTEM_LABELS, SYSTEMS, PromptBuilder, build_prompts, build_retriever, check_systems,
    pick_few_shot, retrieval_hits,
)
from utils.evaluation.citations import (
    Citations, citation_accuracy, extract_citations, invented_citations, number_match, score_citations,
)
from utils.evaluation.errors import (
    ERROR_TAGS, collapse_repetitions, echoes_system_prompt, error_tags, printable_answer, repetition_loop,
    truncate_words,
)
from utils.evaluation.export import MergeCheckError, compare_logits, export_merged, merge_dtype, probe_logits
from utils.evaluation.forgetting import GeneralSetError, forgetting_scores, load_general_records, per_question_losses
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
from utils.evaluation.rubric import (
    BLANK_NAME, RubricError, filled_rubrics, label_shares, read_filled_rubric, rubric_agreement, rubric_rows,
    write_blank_rubric,
)
from utils.evaluation.runs import collect_gpu_results, collect_runs, read_log_history, runs_table
from utils.evaluation.scoring import (
    error_tag_counts, field_notes, score_one, score_predictions, strict_correct, systems_of,
)
from utils.evaluation.summaries import (
    METRICS_FILE, bootstrap_ci, bootstrap_indices, contrasts_table, format_interval, loss_table, metrics_table,
    model_label, read_metrics, summarize_by_group, summarize_scores, write_metrics,
)
from utils.evaluation.tables import (
    check_summary, group_metrics_table, highlight_keywords, pick_examples, picks_table, side_by_side, subset_table,
)
from utils.inference import AdapterNotFoundError  # what ``require_adapter`` raises

__all__ = [
    "AdapterNotFoundError", "BASELINES", "BLANK_NAME", "CONTRASTS", "Citations", "DECLINE_PATTERN", "ERROR_TAGS",
    "GeneralSetError", "KIND_LABELS", "METRICS", "METRICS_FILE", "MODELS", "MODEL_LABELS", "MergeCheckError",
    "PARAMETER_NAMES", "POINTER_PATTERN", "PromptBuilder", "RubricError", "RunMismatchError", "SYSTEMS",
    "SYSTEM_LABELS", "SpanishTokenizer", "add_losses", "bootstrap_ci", "bootstrap_indices", "build_prompts",
    "build_retriever", "check_summary", "check_systems", "chrf", "citation_accuracy", "collapse_repetitions",
    "collect_gpu_results", "collect_runs", "compare_logits", "completion_losses", "contrasts_table", "declines",
    "echoes_system_prompt", "error_tag_counts", "error_tags", "export_merged", "extract_citations", "field_notes",
    "filled_rubrics", "forgetting_scores", "format_interval", "group_metrics_table", "highlight_keywords",
    "invented_citations", "is_refusal", "is_wrongful_refusal", "keyword_hits", "keyword_pattern", "keyword_recall",
    "label_shares", "load_for_evaluation", "load_general_records", "loss_table", "make_ask", "merge_dtype",
    "metrics_table", "model_label", "normalize_text", "number_match", "parameters_of", "per_question_losses",
    "pick_examples", "pick_few_shot", "picks_table", "points_to_office", "printable_answer", "probe_logits",
    "read_filled_rubric", "read_jsonl", "read_log_history", "read_metrics", "repetition_loop", "require_adapter",
    "retrieval_hits", "rouge_l", "rubric_agreement", "rubric_rows", "run_predictions", "runs_table",
    "score_answer", "score_citations", "score_one", "score_predictions", "select_records", "setup_table",
    "side_by_side", "stream_answer", "strict_correct", "subset_table", "summarize_by_group", "summarize_scores",
    "system_prompt_of", "systems_of", "tokenize_spanish", "truncate_words", "write_blank_rubric", "write_jsonl",
    "write_metrics",
]
