"""The training data: the tokenizer as the plan wants it, both datasets in the loss's form, one BOS per example.

Training reads the training file and the validation file (``validation_file``): every evaluation during training,
early stopping and the stop-rate check use validation. The test split (``utils.paths.TEST_FILE``) is read by
notebook 05 only; here only its questions are compared with validation's, so that validation can never stand in
for test. Before any dataset is built, ``load_training_data`` refuses what would train or select silently on the
wrong thing: a train/validation leak (or one file for both), validation and test as one file or sharing questions,
chat-template special tokens inside a turn, and examples that ``max_seq_length`` would drop entirely; it applies
the dataset's system prompt to records without one and reports, by id, the examples whose answer
``max_seq_length`` cuts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Sequence

from utils.data import (
    SPECIAL_TOKENS,
    DatasetError,
    apply_system_prompt,
    leaked_ids,
    load_records,
    same_file,
    sequence_lengths,
    special_tokens_in,
    system_prompt_policy,
    to_prompt_completion,
    to_text_dataset,
    tokenizer_special_tokens,
)
from utils.modeling import load_tokenizer, use_original_padding
from utils.paths import TEST_FILE, resolve_path
from utils.training.settings import TrainingConfigError, TrainingPlan, TrainingSettings

DROP_FIXES = ("raise max_seq_length, shorten the system prompt, or remove these examples from the file "
              "(allow_dropping_long_examples=True drops them instead)")


@dataclass
class TrainingData:
    """The training and validation datasets, in the form the loss needs, and the records behind them.

    ``truncated_ids`` / ``dropped_ids``: training examples whose answer ``max_seq_length`` cuts (no end-of-turn
    left) or that it drops (the prompt alone fills it: nothing left to train); ``eval_*`` the same for the
    validation examples. ``notes``: one line per thing the caller must print (truncation, dropping, system prompts).
    """

    train: Any
    eval: Any
    train_records: list[dict]
    validation_records: list[dict]
    truncated_ids: list[str] = field(default_factory=list)
    dropped_ids: list[str] = field(default_factory=list)
    eval_truncated_ids: list[str] = field(default_factory=list)
    eval_dropped_ids: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _shown(ids: Sequence[str]) -> str:
    """The first 10 ids and the count."""
    return ", ".join(ids[:10]) + (f", ... ({len(ids)} in all)" if len(ids) > 10 else f" ({len(ids)})")


def sample_records(records: list[dict], limit: int, seed: int) -> list[dict]:
    """A seeded subset of ``limit`` records across all topics (the files are ordered by fact)."""
    if not limit or limit >= len(records):
        return list(records)
    return random.Random(seed).sample(list(records), limit)


def load_training_tokenizer(settings: TrainingSettings, plan: TrainingPlan):
    """The model's tokenizer: pad distinct from EOS, or pad = EOS when replicating the original."""
    tokenizer = load_tokenizer(settings.model_name)
    if plan.pad_is_eos:
        use_original_padding(tokenizer)
    return tokenizer


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether plain-text tokenisation prepends the BOS token (Llama-3 does; SmolLM2 does not)."""
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


def _without_template_bos(text: str, tokenizer) -> str:
    """``text`` without the template's leading BOS when the tokenizer adds its own (one BOS, not two)."""
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer_adds_bos(tokenizer):
        return text[len(bos):]
    return text


def strip_template_bos(dataset, tokenizer):
    """Drop the template's leading BOS from ``text`` when the tokenizer adds its own (one BOS, not two)."""
    bos = tokenizer.bos_token
    if not bos or not tokenizer_adds_bos(tokenizer):
        return dataset
    return dataset.map(lambda ex: {"text": ex["text"][len(bos):] if ex["text"].startswith(bos) else ex["text"]})


def _overlap_problem(a_name: str, a_path, a: list[dict], b_name: str, b_path, b: list[dict]) -> str | None:
    """What is wrong when two splits are one file or share questions (None when they are apart)."""
    if same_file(a_path, b_path):
        return (f"{a_name} and {b_name} are the same file ({a_path}): the {b_name.split('_')[0]} answers are "
                f"the {a_name.split('_')[0]} answers, and the loss on them measures memorisation")
    leaked = leaked_ids(a, b)
    if not leaked:
        return None
    return (f"{len(leaked)} questions of {b_path} ({b_name}) are also asked in {a_path} ({a_name}; same normalised "
            f"question), leaked ids: {_shown(leaked)}")


def check_split_files(settings: TrainingSettings, train: list[dict], validation: list[dict],
                      test_file: str | None = None) -> list[str]:
    """Refuse what would make validation measure memorisation, or stand in for test.

    ``train_file`` = ``validation_file``, or a question both ask: refused unless ``allow_split_overlap``.
    ``validation_file`` = the test split notebook 05 reads (``utils.paths.TEST_FILE`` unless ``test_file``):
    always refused. Validation and test sharing a question: refused unless ``allow_split_overlap``.
    """
    allowed = bool(getattr(settings, "allow_split_overlap", False))  # a TrainingSettings field (LIFECYCLE)
    train_path, validation_path = resolve_path(settings.train_file), resolve_path(settings.validation_file)
    test_path = resolve_path(test_file or TEST_FILE)
    problems = [_overlap_problem("train_file", train_path, train, "validation_file", validation_path, validation)]
    if test_path.is_file():
        if same_file(validation_path, test_path):
            raise DatasetError(
                f"validation_file is the test split ({test_path}): choices made on validation (the checkpoint, "
                "early stopping, hyperparameters) would be made on test, and notebook 05's numbers would no longer "
                "be an unseen check. Point validation_file at the validation split (dataset/utn_sample_validation"
                ".jsonl, built by `python -m utils.data build`) or at your own validation file.")
        problems.append(_overlap_problem("validation_file", validation_path, validation, "test split", test_path,
                                         load_records(test_path)))
    problems = [p for p in problems if p]
    if not problems:
        return []
    if allowed:
        return [f"{p}; allowed by allow_split_overlap=True" for p in problems]
    raise DatasetError(f"{'; '.join(problems)} — rebuild the splits (`python -m utils.data build`) or fix the files; "
                       "set allow_split_overlap=True only to train on overlapping splits knowingly")


def check_special_tokens(records: Sequence[dict], tokenizer, path: str) -> None:
    """Refuse chat-template special tokens (and every special token of the tokenizer) inside any turn's content."""
    tokens = tuple(dict.fromkeys([*SPECIAL_TOKENS, *tokenizer_special_tokens(tokenizer)]))
    found = [(r["id"], n, t) for r in records for n, m in enumerate(r["messages"], 1)
             for t in special_tokens_in(m["content"], tokens)]
    if found:
        where = "; ".join(f"id {i} message {n}: {t}" for i, n, t in found[:10])
        raise DatasetError(f"{path}: {len(found)} special tokens inside turns ({where}) — the tokenizer reads each "
                           "as one control token, and a chat marker would open or close a turn in training; remove "
                           "them (`python -m utils.data validate` lists each with its line)")


def long_examples(records: Sequence[dict], tokenizer, max_seq_length: int, full_text: bool
                  ) -> tuple[list[str], list[str]]:
    """Ids whose answer ``max_seq_length`` cuts, and ids it drops (prompt alone ≥ max: fully masked).

    Prompt–completion: TRL truncates to ``max_seq_length`` and drops an example with no trained token left.
    Full text (the original): every token is trained, nothing is dropped; an example over the limit is cut.
    """
    if tokenizer is None or not records:
        return [], []
    truncated, dropped = [], []
    if full_text:
        texts = [_without_template_bos(tokenizer.apply_chat_template(r["messages"], tokenize=False), tokenizer)
                 for r in records]
        lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
        return [str(r["id"]) for r, n in zip(records, lengths) if n > max_seq_length], []
    for record, (prompt, total) in zip(records, sequence_lengths(records, tokenizer)):
        if prompt >= max_seq_length:
            dropped.append(str(record["id"]))
        elif total > max_seq_length:
            truncated.append(str(record["id"]))
    return truncated, dropped


def _length_notes(split: str, truncated: list[str], dropped: list[str], max_seq_length: int) -> list[str]:
    """What ``max_seq_length`` does to a split's examples, one line each."""
    notes = []
    if truncated:
        notes.append(f"{len(truncated)} {split} examples are longer than max_seq_length={max_seq_length}: their "
                     f"answer is cut and loses its end-of-turn token (ids: {_shown(truncated)}); raise "
                     "max_seq_length or shorten those answers")
    if dropped:
        notes.append(f"{len(dropped)} {split} examples were dropped: their prompt alone fills "
                     f"max_seq_length={max_seq_length} (ids: {_shown(dropped)}); allowed by "
                     "allow_dropping_long_examples=True")
    return notes


def apply_length_policy(settings: TrainingSettings, records: list[dict], tokenizer, full_text: bool,
                        split: str) -> tuple[list[dict], list[str], list[str], list[str]]:
    """Records kept, truncated ids, dropped ids and notes; refuse dropping unless ``allow_dropping_long_examples``."""
    max_len = settings.max_seq_length
    truncated, dropped = long_examples(records, tokenizer, max_len, full_text)
    file = settings.train_file if split == "training" else settings.validation_file
    if dropped and not getattr(settings, "allow_dropping_long_examples", False):  # a TrainingSettings field
        raise TrainingConfigError(
            f"{len(dropped)} {split} examples of {file} would be dropped: their prompt alone is at least "
            f"max_seq_length={max_len} tokens, so no answer token is left to train (ids: {_shown(dropped)}) — "
            f"{DROP_FIXES}")
    gone = set(dropped)
    kept = [r for r in records if str(r["id"]) not in gone]
    if not kept and records:
        limit = "train_limit" if split == "training" else "eval_limit"
        raise TrainingConfigError(
            f"no {split} example is left: allow_dropping_long_examples=True dropped all {len(records)} of {file} "
            f"(prompt alone ≥ max_seq_length={max_len}; {limit}={getattr(settings, limit)}) — raise "
            "max_seq_length or shorten the system prompt")
    return kept, truncated, dropped, _length_notes(split, truncated, dropped, max_len)


def load_training_data(settings: TrainingSettings, plan: TrainingPlan, tokenizer) -> TrainingData:
    """Read and validate the training and validation files (``DatasetError`` lists every problem), build datasets.

    Fixed: prompt–completion (the loss covers the answer and its end-of-turn token). Original: one
    ``text`` column rendered by the chat template (the loss covers every token). Refuses leaked or shared splits,
    special tokens in content and silently dropped examples; ``notes`` says what was truncated or added.
    ``eval_limit`` takes a seeded sample of the validation examples (the same one at every evaluation).
    """
    all_train, all_validation = load_records(settings.train_file), load_records(settings.validation_file)
    notes = check_split_files(settings, all_train, all_validation)
    check_special_tokens(all_train, tokenizer, settings.train_file)
    check_special_tokens(all_validation, tokenizer, settings.validation_file)
    policy = system_prompt_policy(all_train)
    train_records, train_notes = apply_system_prompt(
        sample_records(all_train, settings.train_limit, settings.seed), policy)
    validation_records, validation_notes = apply_system_prompt(
        sample_records(all_validation, settings.eval_limit, settings.seed), policy)
    notes += [f"training: {n}" for n in train_notes] + [f"validation: {n}" for n in validation_notes]
    full_text = plan.loss == "full_text"
    train_records, truncated, dropped, train_len_notes = apply_length_policy(
        settings, train_records, tokenizer, full_text, "training")
    validation_records, eval_truncated, eval_dropped, validation_len_notes = apply_length_policy(
        settings, validation_records, tokenizer, full_text, "validation")
    notes += train_len_notes + validation_len_notes
    if full_text:
        train = strip_template_bos(to_text_dataset(train_records, tokenizer), tokenizer)
        evaluation = strip_template_bos(to_text_dataset(validation_records, tokenizer), tokenizer)
    else:
        train = to_prompt_completion(train_records)
        evaluation = to_prompt_completion(validation_records)
    return TrainingData(train, evaluation, train_records, validation_records, truncated, dropped, eval_truncated,
                        eval_dropped, notes)


def bos_counts(dataset, tokenizer) -> list[int]:
    """BOS tokens per tokenised example."""
    bos = tokenizer.bos_token_id
    return [ids.count(bos) for ids in dataset["input_ids"]]


def expected_bos(tokenizer) -> int | None:
    """BOS tokens one chat should hold: 1 for Llama-3; None when BOS also opens each turn (ChatML)."""
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    ids = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
    n = ids.count(tokenizer.bos_token_id) if tokenizer.bos_token_id is not None else 0
    return 1 if n == 1 else None


def check_bos(dataset, tokenizer) -> None:
    """Raise if a tokenised example holds more or less than its template's BOS (a doubled BOS, say)."""
    expected = expected_bos(tokenizer)
    if expected is None:
        return
    counts = bos_counts(dataset, tokenizer)
    wrong = [i for i, c in enumerate(counts) if c != expected]
    if wrong:
        raise TrainingConfigError(
            f"{len(wrong)} training examples hold {counts[wrong[0]]} BOS tokens ({tokenizer.bos_token}) instead "
            f"of {expected} (first: example {wrong[0]}). The text already starts with BOS and the tokenizer "
            "adds another: drop it from the text (strip_template_bos) or tokenise without special tokens."
        )
