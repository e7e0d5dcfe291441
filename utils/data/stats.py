"""Numbers about the splits: examples per kind and topic, token lengths, loss-token share, overlap and verbatim answers.

Each function returns a pandas DataFrame; ``utils.plotting.data`` draws them and ``utils.reports.data``
writes what they show.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import pandas as pd
from trl.data_utils import common_prefix_length

from utils.data.records import DEFAULT_KIND, KINDS, answer_of, normalize_question, question_of


def count_table(splits: dict[str, Sequence[dict]], by: str = "kind") -> pd.DataFrame:
    """Examples per value of ``by`` (``kind`` or ``topic``) and split, with totals (a pandas DataFrame)."""
    frame = pd.DataFrame(
        [{"split": name, by: r[by]} for name, records in splits.items() for r in records],
        columns=["split", by],
    )
    table = pd.crosstab(frame[by], frame["split"], margins=True, margins_name="total")
    columns = [name for name in splits if name in table.columns] + ["total"]
    table = table[columns]
    if by == "kind":
        order = [k for k in (*KINDS, DEFAULT_KIND) if k in table.index] + ["total"]
        table = table.loc[order]
    table.columns.name = None
    return table




def _leading(ids: Sequence[int], token_id: int | None) -> int:
    """How many times ``token_id`` repeats at the start of ``ids`` (2 = a duplicated BOS)."""
    count = 0
    while token_id is not None and count < len(ids) and ids[count] == token_id:
        count += 1
    return count


def token_lengths(splits: dict[str, Sequence[dict]], tokenizer, label: str) -> pd.DataFrame:
    """Tokens of prompt, answer and whole example per record (pandas), split as TRL splits them.

    ``prompt`` counts the masked tokens (system + user + generation prompt), ``respuesta`` the trained
    ones (answer and end-of-turn), ``total`` their sum: the sequence length seen in training.
    """
    rows = []
    for split, records in splits.items():
        chats = [list(r["messages"]) for r in records]
        if not chats:
            continue
        prompts = tokenizer.apply_chat_template(
            [c[:-1] for c in chats], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        full = tokenizer.apply_chat_template(chats, tokenize=True, return_dict=True)["input_ids"]
        # The original full-text training: the rendered chat tokenised as plain text, as TRL does for a
        # "text" column (the tokenizer may add its own BOS in front of the template's).
        texts = tokenizer(tokenizer.apply_chat_template(chats, tokenize=False))["input_ids"]
        for record, prompt_ids, ids, text_ids in zip(records, prompts, full, texts):
            n_prompt = common_prefix_length(prompt_ids, ids)
            rows.append({"tokenizador": label, "split": split, "id": record["id"], "topic": record["topic"],
                         "kind": record["kind"], "prompt": n_prompt, "respuesta": len(ids) - n_prompt,
                         "total": len(ids), "texto_completo": len(text_ids),
                         "bos_texto_completo": _leading(text_ids, tokenizer.bos_token_id)})
    return pd.DataFrame(rows)


def length_summary(lengths: pd.DataFrame, max_seq_length: int = 512) -> pd.DataFrame:
    """Per tokenizer and split: median, 95th percentile and maximum tokens, and the share truncated."""
    grouped = lengths.groupby(["tokenizador", "split"], sort=False)
    summary = grouped.agg(
        ejemplos=("total", "size"),
        prompt_mediana=("prompt", "median"),
        respuesta_mediana=("respuesta", "median"),
        total_mediana=("total", "median"),
        total_p95=("total", lambda x: x.quantile(0.95)),
        total_max=("total", "max"),
        truncados=("total", lambda x: int((x > max_seq_length).sum())),
    )
    summary["truncados_pct"] = 100 * summary["truncados"] / summary["ejemplos"]
    return summary.reset_index()



def loss_token_share(lengths: pd.DataFrame) -> pd.DataFrame:
    """Per tokenizer: tokens that carry loss with prompt–completion vs the original full-text training.

    Full text trains every token of the sequence (including a duplicated BOS, counted in ``bos_al_inicio``).
    """
    grouped = lengths.groupby("tokenizador", sort=False).agg(
        tokens_prompt_completion=("total", "sum"),
        con_perdida_prompt_completion=("respuesta", "sum"),
        tokens_texto_completo=("texto_completo", "sum"),
        bos_al_inicio=("bos_texto_completo", "max"),
    )
    grouped["con_perdida_texto_completo"] = grouped["tokens_texto_completo"]
    grouped["pct_con_perdida_prompt_completion"] = (
        100 * grouped["con_perdida_prompt_completion"] / grouped["tokens_prompt_completion"]
    )
    return grouped.reset_index()


def leaked_ids(train: Sequence[dict], test: Sequence[dict]) -> list[str]:
    """Ids of the test records whose normalised question is also asked in train (a leak of its answer)."""
    train_keys = {normalize_question(question_of(r["messages"])) for r in train}
    return [str(r["id"]) for r in test if normalize_question(question_of(r["messages"])) in train_keys]


def verbatim_answer_ids(train: Sequence[dict], records: Sequence[dict]) -> list[str]:
    """Ids of ``records`` whose reference answer is, word for word, the answer of a train example.

    In the shipped corpus these are exactly the held-out ``fact`` examples (a new question on a taught fact
    keeps its answer): on them a low loss or a high ROUGE partly measures recall of a trained answer.
    """
    train_answers = {answer_of(r["messages"]).strip() for r in train}
    return [str(r["id"]) for r in records if answer_of(r["messages"]).strip() in train_answers]


def verbatim_counts(splits: dict[str, Sequence[dict]], reference: str = "train") -> dict[str, tuple[Counter, Counter]]:
    """Per held-out split: (verbatim-answer examples per kind, examples per kind); the train answers as reference."""
    train = splits.get(reference, [])
    counts = {}
    for name, records in splits.items():
        if name == reference:
            continue
        verbatim = set(verbatim_answer_ids(train, records))
        counts[name] = (Counter(r["kind"] for r in records if str(r["id"]) in verbatim),
                        Counter(r["kind"] for r in records))
    return counts


def verbatim_answer_table(splits: dict[str, Sequence[dict]], reference: str = "train") -> pd.DataFrame:
    """Per kind and held-out split: ``"<verbatim> of <examples>"`` answers that are also a train answer."""
    columns = {}
    for name, (hits, kinds) in verbatim_counts(splits, reference).items():
        column = {kind: f"{hits[kind]} of {kinds[kind]}" for kind in (*KINDS, DEFAULT_KIND) if kinds[kind]}
        column["total"] = f"{sum(hits.values())} of {sum(kinds.values())}"
        columns[name] = column
    table = pd.DataFrame(columns).fillna("0 of 0")
    order = [k for k in (*KINDS, DEFAULT_KIND) if k in table.index] + ["total"]
    return table.loc[order]


def sequence_lengths(records: Sequence[dict], tokenizer) -> list[tuple[int, int]]:
    """``(prompt, total)`` tokens of each record, split as TRL's prompt–completion tokenisation splits them.

    ``prompt`` = the masked tokens (every turn but the last + the generation prompt), ``total`` = the whole
    chat; the answer and its end-of-turn are the ``total - prompt`` tokens after the prompt.
    """
    chats = [list(r["messages"]) for r in records]
    if not chats:
        return []
    prompts = tokenizer.apply_chat_template(
        [c[:-1] for c in chats], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    full = tokenizer.apply_chat_template(chats, tokenize=True, return_dict=True)["input_ids"]
    return [(common_prefix_length(p, ids), len(ids)) for p, ids in zip(prompts, full)]


def overlap_checks(splits: dict[str, Sequence[dict]], reference: str = "train") -> pd.DataFrame:
    """Duplicates, the same wording in two splits, untaught held-out facts and verbatim train answers (pandas).

    Every pair of splits is compared. A held-out answer that is word for word a train answer is expected for
    new phrasings of a fact. Columns ``chequeo`` (Spanish, for the notebook), ``par`` (the splits compared), ``resultado`` (a count).
    """
    rows = []
    keys = {name: [normalize_question(question_of(r["messages"])) for r in records]
            for name, records in splits.items()}
    for name, found in keys.items():
        repeated = sum(c - 1 for c in Counter(found).values() if c > 1)
        rows.append({"chequeo": "preguntas repetidas dentro del conjunto", "par": name, "resultado": repeated})
    names = list(splits)
    for k, first in enumerate(names):
        for second in names[k + 1:]:
            shared = len(set(keys[first]) & set(keys[second]))
            rows.append({"chequeo": "misma redacción normalizada en los dos conjuntos", "par": f"{first} / {second}",
                         "resultado": shared})
    train = splits.get(reference, [])
    taught = {f for r in train for f in r["facts"]}
    for name, records in splits.items():
        if name == reference:
            continue
        rows.append({"chequeo": "ejemplos sobre hechos que entrenamiento no enseña", "par": f"{name} / {reference}",
                     "resultado": sum(any(f not in taught for f in r["facts"]) for r in records)})
        rows.append({"chequeo": "respuestas idénticas a una de entrenamiento (esperado en los hechos: otra redacción)",
                     "par": f"{name} / {reference}", "resultado": len(verbatim_answer_ids(train, records))})
    return pd.DataFrame(rows, columns=["chequeo", "par", "resultado"])
