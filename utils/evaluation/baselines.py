"""The systems notebook 05 compares, and the prompts each one answers.

- ``base``: the base model (adapter disabled), the question under the dataset's system prompt;
- ``tuned``: the same prompt, adapter enabled;
- ``base_rag`` / ``tuned_rag``: retrieval-augmented answering: the ``k`` training answers that BM25 ranks
  highest for the question (``bm25s``, Lucene variant, k1 = 1,5, b = 0,75; Robertson and Zaragoza, 2009) are
  put before the question in the user turn;
- ``few_shot``: the base model with ``k`` training examples as earlier chat turns (the same examples for every
  question, taken round-robin over ``kind`` with a fixed seed, and, where the corpus allows it, on facts that
  no evaluated question asks about, so that no example hands over a test answer).

Every system answers with the same chat template, greedy decoding and ``max_new_tokens``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass

# bm25s runs ``jax.lax.top_k`` when it is imported, wherever JAX is installed (Colab, many CUDA images). JAX then
# starts on the GPU and takes 75 % of its memory for its own allocator, memory that training and generation in the
# same kernel no longer have: 107.9 of 143.8 GB on the H200, from notebook 04's imports alone. BM25's top-k over a
# few hundred scores needs no GPU, so JAX stays on the CPU unless the user set JAX_PLATFORMS.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import bm25s  # noqa: E402
from bm25s.stopwords import STOPWORDS_SPANISH  # noqa: E402

from utils.data import answer_of, question_of  # noqa: E402
from utils.evaluation.metrics import normalize_text, tokenize_spanish  # noqa: E402
from utils.inference import prompt_of  # noqa: E402

# name -> (Spanish label, adapter enabled, prompt: "plain" | "retrieval" | "few_shot")
SYSTEMS: dict[str, tuple[str, bool, str]] = {
    "base": ("Base", False, "plain"),
    "base_rag": ("Base + BM25", False, "retrieval"),
    "few_shot": ("Base con ejemplos", False, "few_shot"),
    "tuned": ("Ajustado (LoRA)", True, "plain"),
    "tuned_rag": ("Ajustado + BM25", True, "retrieval"),
}
SYSTEM_LABELS = {name: spec[0] for name, spec in SYSTEMS.items()}
BASELINES = ("base_rag", "few_shot", "tuned_rag")
# Paired differences reported besides tuned − base ("delta"): the thesis's central question is tuned vs base_rag.
CONTRASTS = (("tuned", "base"), ("base_rag", "base"), ("few_shot", "base"), ("tuned", "base_rag"),
             ("tuned_rag", "tuned"))
RETRIEVAL_HEADER = "Fragmentos de la normativa recuperados (pueden no ser pertinentes):"
QUESTION_HEADER = "Pregunta:"
_STOPWORDS = frozenset(normalize_text(w) for w in STOPWORDS_SPANISH)


def check_systems(baselines: Sequence[str]) -> list[str]:
    """The systems to evaluate: base, tuned and the ``baselines`` (in ``SYSTEMS`` order); one clear error else."""
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"baselines={list(baselines)!r}: {unknown} unknown. Use any of {list(BASELINES)} "
                         "(base and tuned are always evaluated), or [] for none.")
    return [name for name in SYSTEMS if name in {"base", "tuned", *baselines}]


def retrieval_tokens(text: str) -> list[str]:
    """Words BM25 indexes: normalised Spanish words without stopwords (numbers kept: "1549", "30")."""
    return [w for w in tokenize_spanish(text) if w not in _STOPWORDS]


@dataclass
class Retriever:
    """BM25 over the distinct answers of the training records."""

    passages: list[str]
    index: bm25s.BM25

    def search(self, question: str, k: int) -> list[int]:
        """Indices of the ``k`` passages BM25 ranks highest for ``question`` (fewer when the corpus is smaller)."""
        tokens = retrieval_tokens(question) or ["?"]
        k = min(k, len(self.passages))
        known = [t for t in tokens if t in self.index.vocab_dict] or None
        if known is None:  # no word of the question is in the passages: nothing to rank by
            return list(range(k))
        docs, _ = self.index.retrieve([known], k=k, show_progress=False)
        return [int(i) for i in docs[0]]


def build_retriever(train_records: Sequence[dict]) -> Retriever:
    """A ``Retriever`` over the distinct training answers (in file order)."""
    passages = list(dict.fromkeys(answer_of(r["messages"]).strip() for r in train_records))
    if not passages:
        raise ValueError("retrieval needs training answers: the training file has no records.")
    index = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
    index.index([retrieval_tokens(p) or ["?"] for p in passages], show_progress=False)
    return Retriever(passages, index)


def retrieval_prompt(question: str, passages: Sequence[str]) -> str:
    """The user turn of a retrieval-augmented question: numbered passages, then the question."""
    numbered = "\n".join(f"[{k}] {p}" for k, p in enumerate(passages, 1))
    return f"{RETRIEVAL_HEADER}\n{numbered}\n\n{QUESTION_HEADER} {question}"


def pick_few_shot(train_records: Sequence[dict], evaluated: Sequence[dict], k: int, seed: int) -> list[dict]:
    """``k`` training records taken round-robin over ``kind`` (seeded), preferring facts no evaluated record asks."""
    asked = {f for r in evaluated for f in (r.get("facts") or [])}
    clean = [r for r in train_records if not set(r.get("facts") or []) & asked]
    pool = clean if len(clean) >= k else list(train_records)
    rng = random.Random(seed)
    by_kind: dict[str, list[dict]] = {}
    for record in pool:
        by_kind.setdefault(str(record.get("kind")), []).append(record)
    queues = [rng.sample(v, len(v)) for _, v in sorted(by_kind.items())]
    chosen: list[dict] = []
    while len(chosen) < min(k, len(pool)):
        for queue in queues:
            if queue and len(chosen) < k:
                chosen.append(queue.pop())
    return chosen


def few_shot_chat(record: dict, examples: Sequence[dict], system_prompt: str | None) -> list[dict]:
    """System prompt, then each example as a user/assistant pair, then the record's question."""
    chat = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for example in examples:
        chat += [{"role": "user", "content": question_of(example["messages"])},
                 {"role": "assistant", "content": answer_of(example["messages"])}]
    return chat + [{"role": "user", "content": question_of(record["messages"])}]


def retrieval_chat(record: dict, passages: Sequence[str], system_prompt: str | None) -> list[dict]:
    """The record's prompt with the retrieved passages put before the question in its last user turn."""
    chat = [dict(m) for m in prompt_of(record, system_prompt)]
    chat[-1]["content"] = retrieval_prompt(chat[-1]["content"], passages)
    return chat


@dataclass
class PromptBuilder:
    """Everything the baselines need to build their prompts: the retriever, the few-shot examples, ``k``."""

    system_prompt: str | None
    retriever: Retriever | None = None
    examples: tuple[dict, ...] = ()
    retrieval_k: int = 3

    def chats(self, system: str, records: Sequence[dict]) -> tuple[list[list[dict]], list[list[int]]]:
        """The chats ``system`` answers, and per record the retrieved passage indices ([] without retrieval)."""
        kind = SYSTEMS[system][2]
        if kind == "plain":
            return [prompt_of(r, self.system_prompt) for r in records], [[] for _ in records]
        if kind == "few_shot":
            return [few_shot_chat(r, self.examples, self.system_prompt) for r in records], [[] for _ in records]
        hits = [self.retriever.search(question_of(r["messages"]), self.retrieval_k) for r in records]
        chats = [retrieval_chat(r, [self.retriever.passages[i] for i in h], self.system_prompt)
                 for r, h in zip(records, hits)]
        return chats, hits


def build_prompts(systems: Sequence[str], train_records: Sequence[dict], records: Sequence[dict],
                  system_prompt: str | None, retrieval_k: int = 3, few_shot_k: int = 3, seed: int = 42) -> PromptBuilder:
    """The ``PromptBuilder`` for ``systems`` (the retriever and the examples only where a system needs them)."""
    kinds = {SYSTEMS[s][2] for s in systems}
    retriever = build_retriever(train_records) if "retrieval" in kinds else None
    examples = tuple(pick_few_shot(train_records, records, few_shot_k, seed)) if "few_shot" in kinds else ()
    return PromptBuilder(system_prompt, retriever, examples, retrieval_k)


def retrieval_hits(builder: PromptBuilder, records: Sequence[dict]) -> list[bool]:
    """Per record: whether its reference answer is, word for word, one of the passages retrieved for it."""
    if builder.retriever is None:
        return []
    _, hits = builder.chats("base_rag", records)
    passages = builder.retriever.passages
    return [answer_of(r["messages"]).strip() in {passages[i] for i in h} for r, h in zip(records, hits)]
