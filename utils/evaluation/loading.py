"""What notebook 05 evaluates: its parameters, the trained run of a profile and the test records.

One model serves both sides: the tuned answers come from the PEFT model, the base answers from the
same weights inside ``model.disable_adapter()``, with the same prompt, chat template, greedy decoding
and ``max_new_tokens``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from utils.data import record_item
from utils.device import dtype_name
from utils.evaluation.baselines import SYSTEM_LABELS
from utils.inference import (
    AdapterNotFoundError, load_trained, model_device, read_run_config, require_run, stop_token_ids,
)
from utils.paths import ADAPTER_DIR, RUNS_DIR
from utils.plotting.labels import label

# The parameters cell of notebook 05, in order (recorded in 05_run.json; a test checks the notebook).
PARAMETER_NAMES = (
    "profile", "model_name", "test_file", "train_file", "max_test_records", "max_new_tokens", "batch_size",
    "loss_batch_size", "max_seq_length", "baselines", "retrieval_k", "few_shot_k", "n_boot", "confidence", "seed",
    "table_word_limit", "rubric_systems", "general_file", "forgetting_max_items", "ask_question",
    "ask_max_new_tokens", "merge_adapter", "merge_dtype", "merge_device", "merge_probe_records", "merge_rtol",
    "export_gguf", "gguf_types", "gguf_probe_records", "gguf_max_new_tokens", "compare_runs", "gpu_memory_cap_gib",
)


def parameters_of(namespace: dict[str, Any]) -> dict[str, Any]:
    """The notebook's parameters with their values (for ``05_run.json`` and ``05_metrics.json``)."""
    return {name: namespace[name] for name in PARAMETER_NAMES}


class RunMismatchError(ValueError):
    """Notebook 05 was given another model than the one notebook 04 trained."""


def require_adapter(profile: str) -> Path:
    """``runs/<profile>/04_adapter``, or one clear error telling to run notebook 04 first."""
    run = RUNS_DIR / profile
    try:
        return require_run(run) / ADAPTER_DIR
    except AdapterNotFoundError as exc:  # told per profile: the files under runs/ and the runner command
        missing = ", ".join(str(p.relative_to(RUNS_DIR.parent)) for p in exc.missing)
        raise AdapterNotFoundError(
            f"no trained adapter for profile {profile!r} (missing {missing}). Run notebook 04 "
            f"first: python -m utils.runner --profile {profile} --only 04", exc.missing
        ) from None


def load_for_evaluation(profile: str, model_name: str, device: str | torch.device | None = None):
    """(model, tokenizer, 04 config) of a profile's trained run, checked against ``model_name``.

    The model is the base loaded as in training (same quantisation) with the adapter on top; the base
    answers come from the same object with the adapter disabled.
    """
    require_adapter(profile)
    run = RUNS_DIR / profile
    config = read_run_config(run)
    if config.get("model_name") != model_name:
        raise RunMismatchError(
            f"notebook 04 trained runs/{profile} on model_name={config.get('model_name')!r}, but notebook 05 "
            f"was given model_name={model_name!r}. Set model_name to the trained one in the profile "
            f"(notebooks/params/{profile}.yaml), or retrain: python -m utils.runner --profile {profile} --only 04"
        )
    model, tokenizer = load_trained(run, device=device)
    return model, tokenizer, config


def setup_table(model, tokenizer, config: dict, records: Sequence[dict], max_new_tokens: int,
                systems: Sequence[str] = ()) -> pd.DataFrame:
    """What is compared: model, quantisation, device, stop tokens, systems, test questions per kind."""
    kinds = pd.Series([r.get("kind") for r in records]).value_counts()
    return pd.Series({
        "modelo base": config.get("model_name"),
        "cuantización (como en el entrenamiento)": config.get("quantization") or "ninguna",
        "dtype de cómputo": dtype_name(next(model.parameters()).dtype),
        "dispositivo": str(model_device(model)),
        "entrenamiento original replicado": "sí" if config.get("replicate_original") else "no",
        "tokens de fin": ", ".join(f"{tokenizer.convert_ids_to_tokens(i)} ({i})"
                                   for i in stop_token_ids(model, tokenizer)),
        "token de relleno": f"{tokenizer.pad_token} ({tokenizer.pad_token_id})",
        "máximo de tokens nuevos": max_new_tokens,
        "sistemas comparados": ", ".join(SYSTEM_LABELS[s] for s in systems) or "—",
        "preguntas de prueba": len(records),
        **{f"  de tipo «{label(str(k))}»": int(v) for k, v in kinds.items()},
    }).to_frame("valor")


def system_prompt_of(records: Sequence[dict]) -> str | None:
    """The most common system message of the records (the one training used), or None."""
    prompts = Counter(m["content"] for r in records for m in r["messages"] if m["role"] == "system")
    return prompts.most_common(1)[0][0] if prompts else None


def select_records(records: Sequence[dict], n: int) -> list[dict]:
    """All records when ``n <= 0``; else ``n`` of them taken round-robin over kinds, and within a kind one question
    of each corpus item (``F001`` of ``F001-q1``…``-q4``, the paraphrases of one fact) before a second of any: four
    paraphrases of one item are not four independent questions for the bootstrap. File order otherwise."""
    if n <= 0 or n >= len(records):
        return list(records)
    by_kind: dict[str, list[dict]] = {}
    for record in records:
        by_kind.setdefault(record.get("kind", ""), []).append(record)
    chosen: list[dict] = []
    queues = [_items_first(v) for v in by_kind.values()]
    while len(chosen) < n:
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(queue.pop(0))
    keep = {id(r) for r in chosen}
    return [r for r in records if id(r) in keep]


def _items_first(records: list[dict]) -> list[dict]:
    """``records`` with every item's first paraphrase (file order) before any item's second, and so on."""
    seen: Counter = Counter()
    rank = {}
    for position, record in enumerate(records):
        item = record_item(record) if isinstance(record.get("id"), str) else str(position)
        rank[id(record)] = (seen[item], position)
        seen[item] += 1
    return sorted(records, key=lambda record: rank[id(record)])
