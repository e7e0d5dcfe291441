"""Forgetting: the loss of the base and the tuned model on general Spanish questions the tuning never saw.

The questions and reference answers come from ``dataset/sources/general_es.yaml``: either a list of items or a
mapping with ``items`` (and an optional ``system_prompt``); each item has an ``answer`` and a ``question`` or a
list of ``questions``. Each question becomes one chat (the file's system prompt, the question, the answer),
scored as the test loss is (``completion_losses``: nats per answer token). A tuned loss above the base loss
means the adapter made general Spanish less likely: forgetting.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import yaml

from utils.evaluation.predictions import completion_losses
from utils.paths import resolve_path


class GeneralSetError(ValueError):
    """The general-questions file is not the list of question/answer items it should be."""


def _items_of(data: object, path: Path) -> tuple[list, str | None]:
    """(items, system prompt) of the parsed YAML, or one error naming the file and the expected layout."""
    system_prompt = None
    if isinstance(data, dict):
        system_prompt = data.get("system_prompt")
        data = data.get("items")
    if not isinstance(data, list) or not data:
        raise GeneralSetError(f"{path}: expected a list of items (or a mapping with 'items'), each with 'question' "
                              "(or 'questions') and 'answer'.")
    return data, system_prompt


def _questions_of(item: object, k: int, path: Path) -> list[str]:
    """The question(s) of item ``k``, or one error naming the item and the missing key."""
    if not isinstance(item, dict) or not isinstance(item.get("answer"), str):
        raise GeneralSetError(f"{path}: item {k + 1} needs an 'answer' text (and 'question' or 'questions').")
    questions = item.get("questions", [item.get("question")])
    questions = [questions] if isinstance(questions, str) else questions
    if not questions or not all(isinstance(q, str) and q.strip() for q in questions):
        raise GeneralSetError(f"{path}: item {k + 1} ({item.get('id', 'sin id')}) needs a 'question' text.")
    return questions


def load_general_records(path: str | Path, max_items: int = 0) -> list[dict]:
    """One chat record per question of the file (``max_items > 0``: the first items only)."""
    path = resolve_path(path)
    data, system_prompt = _items_of(yaml.safe_load(path.read_text(encoding="utf-8")), path)
    records = []
    for k, item in enumerate(data[: max_items or None]):
        for j, question in enumerate(_questions_of(item, k, path)):
            chat = [{"role": "system", "content": system_prompt}] if system_prompt else []
            chat += [{"role": "user", "content": question}, {"role": "assistant", "content": item["answer"]}]
            records.append({"id": f"{item.get('id', f'G{k + 1:03d}')}-{j + 1}", "topic": item.get("topic"),
                            "messages": chat})
    return records


def forgetting_scores(model, tokenizer, records: Sequence[dict], max_seq_length: int = 512,
                      batch_size: int = 4) -> pd.DataFrame:
    """Per question and model (base, tuned): summed NLL and scored tokens of the reference answer."""
    rows = []
    for name, adapter in (("base", False), ("tuned", True)):
        losses = completion_losses(model, tokenizer, records, max_seq_length, batch_size, adapter=adapter)
        rows += [{"id": r["id"], "topic": r.get("topic"), "model": name, "nll": nll, "loss_tokens": count}
                 for r, (nll, count) in zip(records, losses)]
    return pd.DataFrame(rows)


def per_question_losses(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per question: base and tuned loss (nats/token) and their difference (tuned − base)."""
    data = scores.assign(loss=scores["nll"] / scores["loss_tokens"])
    wide = data.pivot(index="id", columns="model", values="loss")
    wide["delta"] = wide["tuned"] - wide["base"]
    return wide.reset_index()
