"""The training data: the tokenizer as the plan wants it, both datasets in the loss's form, one BOS per example."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from utils.data import load_records, to_prompt_completion, to_text_dataset
from utils.modeling import load_tokenizer, use_original_padding
from utils.training.settings import TrainingConfigError, TrainingPlan, TrainingSettings


@dataclass
class TrainingData:
    """The training and evaluation datasets, in the form the loss needs, and the records behind them."""

    train: Any
    eval: Any
    train_records: list[dict]
    test_records: list[dict]


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


def strip_template_bos(dataset, tokenizer):
    """Drop the template's leading BOS from ``text`` when the tokenizer adds its own (one BOS, not two)."""
    bos = tokenizer.bos_token
    if not bos or not tokenizer_adds_bos(tokenizer):
        return dataset
    return dataset.map(lambda ex: {"text": ex["text"][len(bos):] if ex["text"].startswith(bos) else ex["text"]})


def load_training_data(settings: TrainingSettings, plan: TrainingPlan, tokenizer) -> TrainingData:
    """Read and validate both files (``DatasetError`` lists every problem) and build the datasets.

    Fixed: prompt–completion (the loss covers the answer and its end-of-turn token). Original: one
    ``text`` column rendered by the chat template (the loss covers every token).
    """
    train_records = sample_records(load_records(settings.train_file), settings.train_limit, settings.seed)
    test_records = sample_records(load_records(settings.test_file), settings.eval_limit, settings.seed)
    if plan.loss == "full_text":
        train = strip_template_bos(to_text_dataset(train_records, tokenizer), tokenizer)
        evaluation = strip_template_bos(to_text_dataset(test_records, tokenizer), tokenizer)
    else:
        train = to_prompt_completion(train_records)
        evaluation = to_prompt_completion(test_records)
    return TrainingData(train, evaluation, train_records, test_records)


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
