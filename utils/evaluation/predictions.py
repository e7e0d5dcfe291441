"""Every system's answers to the test questions, the loss on the reference answers, and ``ask()``.

Generation itself is ``utils.inference.generate_answers`` (greedy, left-padded batches); this module asks it
once per system (``utils.evaluation.baselines``: the adapter off or on, the plain, retrieval or few-shot
prompt) and lays the answers out as one flat row per record (the predictions JSONL).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import TextStreamer

from utils.data import answer_of, completion_mask, question_of, system_prompt_policy
from utils.evaluation.baselines import SYSTEMS, PromptBuilder
from utils.evaluation.metrics import MODELS
from utils.files import atomic_write_text
from utils.inference import adapter_state, generate_answers, model_device, stop_token_ids

Encoded = tuple[list[int], list[int]]  # token ids and the completion mask (1 = scored)


# --------------------------------------------------------------------------------------------
# Test loss on the reference answers
# --------------------------------------------------------------------------------------------


def _padded_batch(batch: Sequence[Encoded], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) of right-padded sequences; labels -100 outside the completion."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, mask) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        labels[row, : len(ids)] = torch.tensor([t if m else -100 for t, m in zip(ids, mask)])
    return input_ids, attention, labels


def _batch_losses(model, batch: Sequence[Encoded], pad: int) -> list[tuple[float, int]]:
    """(summed NLL, scored tokens) of each sequence of one batch."""
    input_ids, attention, labels = _padded_batch(batch, pad)
    device = model_device(model)
    width = input_ids.shape[1]
    # Logits only from the position before the first scored token on: the prompt's logits
    # (most of the sequence) would cost a vocabulary-wide matmul each for nothing.
    offset = max(min(mask.index(1) if 1 in mask else len(mask) for _, mask in batch) - 1, 0)
    logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                   logits_to_keep=width - offset).logits
    target = labels[:, offset + 1 :].to(device)
    losses = []
    for row in range(len(batch)):
        keep = target[row] != -100
        nll = F.cross_entropy(logits[row, :-1][keep].float(), target[row][keep], reduction="sum")
        losses.append((float(nll), int(keep.sum())))
    return losses


def completion_losses(
    model,
    tokenizer,
    records: Sequence[dict],
    max_seq_length: int = 512,
    batch_size: int = 4,
    adapter: bool = True,
) -> list[tuple[float, int]]:
    """Per record: (summed NLL in nats, number of scored tokens) over the reference answer.

    The scored tokens are the completion as TRL's ``SFTTrainer`` masks it (``utils.data.completion_mask``:
    the answer and its end-of-turn), after truncation to ``max_seq_length``.
    """
    encoded = []
    for record in records:
        ids, mask = completion_mask(tokenizer, record["messages"])
        encoded.append((ids[:max_seq_length], mask[:max_seq_length]))
    # Longest first: each batch holds sequences of similar length (little padding to compute).
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    results: list[tuple[float, int]] = [(math.nan, 0)] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        with adapter_state(model, adapter), torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                losses = _batch_losses(model, [encoded[i] for i in rows], tokenizer.pad_token_id)
                for i, loss in zip(rows, losses):
                    results[i] = loss
    finally:
        model.train(was_training)
    return results


# --------------------------------------------------------------------------------------------
# Predictions of both models
# --------------------------------------------------------------------------------------------


def _prediction_row(record: dict, tokenizer) -> dict[str, Any]:
    """The record's side of a prediction row: id, kind, topic, question, reference and keywords."""
    reference = answer_of(record["messages"])
    return {
        "id": record["id"], "topic": record.get("topic"), "kind": record.get("kind"),
        "question": question_of(record["messages"]), "reference": reference,
        "keywords": list(record.get("keywords") or []),
        "reference_tokens": len(tokenizer(reference, add_special_tokens=False)["input_ids"]),
    }


def run_predictions(
    model,
    tokenizer,
    records: Sequence[dict],
    max_new_tokens: int,
    batch_size: int = 8,
    progress: bool = True,
    systems: Sequence[str] = MODELS,
    prompts: PromptBuilder | None = None,
    timings: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Every system's answer to every record, one flat dict per record (the predictions JSONL).

    ``systems`` are names of ``utils.evaluation.baselines.SYSTEMS``; ``prompts`` builds their chats (default:
    the plain prompt of base and tuned). Retrieval systems add ``retrieved`` (the passage indices) and
    ``retrieval_hit`` (the reference answer was among them). ``timings`` receives each system's seconds.
    """
    policy = system_prompt_policy(records)  # as training applies it to a record without a system turn
    prompts = prompts or PromptBuilder(policy)
    rows = [_prediction_row(record, tokenizer) for record in records]
    for system in systems:
        label, adapter, _ = SYSTEMS[system]
        chats, hits = prompts.chats(system, records)
        start = time.perf_counter()
        answers = generate_answers(model, tokenizer, chats, max_new_tokens, batch_size, adapter=adapter,
                                   desc=label, progress=progress, system_prompt=policy)
        if timings is not None:
            timings[system] = time.perf_counter() - start
        for row, answer, hit in zip(rows, answers, hits):
            row[f"answer_{system}"] = answer["answer"]
            row[f"tokens_{system}"] = answer["n_tokens"]
            row[f"stopped_{system}"] = answer["stopped"]
            if hit:
                row["retrieved"] = hit
                row["retrieval_hit"] = row["reference"].strip() in {prompts.retriever.passages[i] for i in hit}
    return rows


def add_losses(
    predictions: list[dict[str, Any]],
    model,
    tokenizer,
    records: Sequence[dict],
    max_seq_length: int = 512,
    batch_size: int = 4,
) -> list[dict[str, Any]]:
    """Add ``nll_<model>`` and ``loss_tokens`` (reference-answer loss) to each prediction row."""
    for name in MODELS:
        losses = completion_losses(model, tokenizer, records, max_seq_length, batch_size, adapter=name == "tuned")
        for row, (nll, count) in zip(predictions, losses):
            row[f"nll_{name}"] = nll
            row["loss_tokens"] = count
    return predictions


def write_jsonl(rows: Sequence[dict], path: Path) -> Path:
    """Write rows as UTF-8 JSON lines (atomically)."""
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    """Read UTF-8 JSON lines."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# Interactive use
# --------------------------------------------------------------------------------------------


def stream_answer(
    model,
    tokenizer,
    question: str,
    system_prompt: str | None = None,
    adapter: bool = True,
    max_new_tokens: int = 256,
) -> str:
    """Print a greedy answer token by token (``TextStreamer``) and return it; ``adapter=False`` = base."""
    chat = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": question}
    ]
    enc = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True).to(model_device(model))
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    model.eval()
    with adapter_state(model, adapter), torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                             eos_token_id=stop_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def make_ask(model, tokenizer, system_prompt: str | None, max_new_tokens: int = 256) -> Callable[..., str]:
    """``ask("¿...?", adapter=True)``: stream an answer from the loaded model, adapter on or off."""

    def ask(question: str, adapter: bool = True, max_new_tokens: int = max_new_tokens) -> str:
        return stream_answer(model, tokenizer, question, system_prompt, adapter, max_new_tokens)

    return ask
