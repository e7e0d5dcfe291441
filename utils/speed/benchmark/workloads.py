"""What the benchmark trains on: fixed rows of random ids, or the shipped training examples (the corpus)."""

from __future__ import annotations

import random
from typing import Sequence

import torch

from utils.config import THESIS
from utils.data import completion_mask, load_records
from utils.modeling import load_tokenizer
from utils.paths import TRAIN_FILE
from utils.speed.benchmark.configs import BenchConfig
from utils.train_step import Batch


def synthetic_batches(config: BenchConfig, vocab: int, seed: int = 0) -> list[Batch]:
    """``accumulation`` fixed micro-batches of random ids, full rows, labels = ids (every step the same)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(config.accumulation):
        ids = torch.randint(0, vocab, (config.micro_batch, config.max_seq_length), generator=gen)
        out.append(Batch(ids, ids.clone(), tokens=ids.numel()))
    return out


def corpus_examples(tokenizer_name: str = "llama-3.2", seed: int = 0, limit: int | None = None,
                    vocab: int | None = None) -> list[dict]:
    """The shipped training examples as token ids and completion-only labels, in a seeded order.

    ``vocab``: fold ids into a smaller vocabulary (only the tiny logic-test twin needs it).
    """
    tokenizer = load_tokenizer(tokenizer_name)
    records = load_records(TRAIN_FILE)
    random.Random(seed).shuffle(records)
    out = []
    for record in records[:limit]:
        ids, mask = completion_mask(tokenizer, record["messages"])
        ids = ids[:THESIS.max_seq_length]
        if vocab is not None:
            ids = [t % vocab for t in ids]
        labels = [t if m else -100 for t, m in zip(ids, mask[:len(ids)])]
        out.append({"ids": ids, "labels": labels})
    return out


def one_row(examples: Sequence[dict]) -> Batch:
    """Examples concatenated into one padding-free row; positions restart at 0 for each example."""
    ids, labels, pos = [], [], []
    for ex in examples:
        ids += ex["ids"]
        labels += [-100] + ex["labels"][1:]  # the first token of an example is not predicted from the previous one
        pos += list(range(len(ex["ids"])))
    t = lambda x: torch.tensor([x], dtype=torch.long)  # noqa: E731
    return Batch(t(ids), t(labels), None, t(pos), len(ids))


def corpus_steps(config: BenchConfig, examples: list[dict], steps: int) -> list[list[Batch]]:
    """Micro-batches of real examples for ``steps`` optimizer steps, cycling through the corpus.

    The Hugging Face path takes ``micro_batch`` examples per micro-batch (batch 1: no padding; more: right-padded
    to the longest). The fast path packs examples into one padding-free row up to ``micro_batch × max_seq_length`` tokens,
    or exactly ``micro_batch`` examples when ``micro_batch`` ≤ 2 (the original recipe: 2 sequences per step).
    """
    out, cursor = [], 0

    def take() -> dict:
        nonlocal cursor
        ex = examples[cursor % len(examples)]
        cursor += 1
        return ex

    for _ in range(steps):
        micro = []
        for _ in range(config.accumulation):
            if config.impl == "fast" and config.micro_batch > 2:
                budget, chosen = config.micro_batch * config.max_seq_length, []
                while sum(len(e["ids"]) for e in chosen) + len(examples[cursor % len(examples)]["ids"]) <= budget:
                    chosen.append(take())
                micro.append(one_row(chosen))
            elif config.impl == "fast":
                micro.append(one_row([take() for _ in range(config.micro_batch)]))
            else:
                chosen = [take() for _ in range(config.micro_batch)]
                width = max(len(e["ids"]) for e in chosen)
                ids = torch.zeros(len(chosen), width, dtype=torch.long)
                labels = torch.full((len(chosen), width), -100, dtype=torch.long)
                mask = torch.zeros(len(chosen), width, dtype=torch.long)
                for i, e in enumerate(chosen):
                    n = len(e["ids"])
                    ids[i, :n] = torch.tensor(e["ids"])
                    labels[i, :n] = torch.tensor(e["labels"])
                    mask[i, :n] = 1
                micro.append(Batch(ids, labels, mask if len(chosen) > 1 else None, None, int(mask.sum())))
        out.append(micro)
    return out
