"""The dataset (notebook 01): both JSONL formats, their validation, the converter, the seeded three-way split.

Two formats are read, one per file:

- **messages** (canonical): ``{"id", "messages": [system, user, assistant], "source", "topic", "kind",
  "keywords", "facts"}``; only ``messages`` is required;
- **text** (the original script's ``train_v3_combined_split.jsonl``): ``{"text": "<|begin_of_text|><|start_header_id|>
  system<|end_header_id|>\\n\\n...<|eot_id|>..."}``, the whole Llama-3 chat in one string.

Modules: ``records`` (record access, the text layout, writing JSONL, the datasets TRL trains on),
``validate`` (the validator, ``load_records``, ``convert_file``), ``corpus`` (the corpus YAML, the seeded
train/validation/test split, the datasheet counts, ``build_dataset``), ``stats`` (counts, token lengths,
loss-token share, overlap, answers verbatim in train), ``annotate`` (bring your own data: ``kind``, ``topic``,
``keywords`` from a CSV), ``tokenizers`` (loading the tokenizers that measure it) and ``cli``
(``python -m utils.data``).

Data a student brings may lack ``keywords``, ``kind`` or ``topic``: every consumer asks
``missing_fields(records, ("keywords", ...))`` and skips what needs them with a message.
Figures are in ``utils.plotting.data``, the notebook's prose and LaTeX table in ``utils.reports.data``.
"""

from utils.data.annotate import annotate_file, read_fields_csv, write_fields_template
from utils.data.cli import main
from utils.data.corpus import (
    CORPUS_FILE,
    COUNTS_END,
    COUNTS_START,
    DEFAULT_SEED,
    DEFAULT_TEST_FRACTION,
    DEFAULT_VALIDATION_FRACTION,
    HELD_OUT,
    MIN_TRAIN_QUESTIONS_PER_FACT,
    README_FILE,
    SPLITS,
    build_dataset,
    check_fractions,
    check_split,
    corpus_records,
    counts_markdown,
    load_corpus,
    record_item,
    split_records,
    update_counts_block,
)
from utils.data.records import (
    ASSISTANT,
    BOT,
    DEFAULT_KIND,
    DEFAULT_TOPIC,
    END_HEADER,
    EOT,
    KINDS,
    LAYOUTS,
    OUT_OF_SCOPE_SOURCE,
    RECORD_KEYS,
    ROLES,
    SPECIAL_TOKENS,
    START_HEADER,
    SYSTEM,
    USER,
    DatasetError,
    TextLayout,
    answer_of,
    apply_system_prompt,
    completion_mask,
    detect_layout,
    has_field,
    messages_to_text,
    missing_fields,
    normalize_question,
    question_of,
    record_to_json,
    special_tokens_in,
    system_prompt_policy,
    text_to_messages,
    to_prompt_completion,
    to_text_dataset,
    write_jsonl,
)
from utils.data.stats import (
    count_table,
    leaked_ids,
    length_summary,
    loss_token_share,
    overlap_checks,
    sequence_lengths,
    token_lengths,
    verbatim_answer_ids,
    verbatim_answer_table,
)
from utils.data.tokenizers import (
    load_tokenizer_or_fallback,
    load_tokenizers,
    tokenizer_label,
    tokenizer_special_tokens,
)
from utils.data.validate import (
    SPLIT_OVERLAP,
    Problem,
    ValidationReport,
    check_reports,
    convert_file,
    load_records,
    same_file,
    validate_file,
)

__all__ = [
    "ASSISTANT", "BOT", "CORPUS_FILE", "COUNTS_END", "COUNTS_START", "DEFAULT_KIND", "DEFAULT_SEED",
    "DEFAULT_TEST_FRACTION", "DEFAULT_TOPIC", "DEFAULT_VALIDATION_FRACTION", "END_HEADER", "EOT", "HELD_OUT",
    "KINDS", "LAYOUTS", "MIN_TRAIN_QUESTIONS_PER_FACT", "OUT_OF_SCOPE_SOURCE", "README_FILE", "RECORD_KEYS",
    "ROLES", "SPECIAL_TOKENS", "SPLITS", "SPLIT_OVERLAP", "START_HEADER", "SYSTEM", "USER",
    "DatasetError", "Problem", "TextLayout", "ValidationReport",
    "annotate_file", "answer_of", "apply_system_prompt", "build_dataset", "check_fractions", "check_reports",
    "check_split", "completion_mask", "convert_file", "corpus_records", "count_table", "counts_markdown",
    "detect_layout", "has_field", "leaked_ids", "length_summary", "load_corpus", "load_records",
    "load_tokenizer_or_fallback", "load_tokenizers", "loss_token_share", "main", "messages_to_text",
    "missing_fields", "normalize_question", "overlap_checks", "question_of", "read_fields_csv", "record_item", "record_to_json",
    "same_file", "sequence_lengths", "special_tokens_in", "split_records", "system_prompt_policy",
    "text_to_messages", "to_prompt_completion", "to_text_dataset", "token_lengths", "tokenizer_label",
    "tokenizer_special_tokens", "update_counts_block", "validate_file", "verbatim_answer_ids",
    "verbatim_answer_table", "write_fields_template", "write_jsonl",
]
