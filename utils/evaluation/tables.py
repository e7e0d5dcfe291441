"""The answers side by side (CSV), the qualitative picks and the table that prints them.

Pick rule (``pick_examples``): answers are ranked by their correctness first and their overlap second, so a
wrong answer can never rank above a right one. The key of an answer, compared in this order:

1. ``strict_correct`` (every automatic check passes; missing = 0);
2. ``citation_accuracy`` (missing, i.e. nothing to cite = 1);
3. ``number_match`` (missing, i.e. no number to give = 1);
4. no invented citation;
5. ``keyword_recall`` (missing = 0);
6. overlap: the mean of ROUGE-L and chrF++/100.

The cases shown: a question the tuned model gets right and the base model does not (the highest-ranked such
tuned answer), one the base gets right and the tuned does not, where retrieval was run one that base + BM25
gets right and the tuned model does not and one the other way round, and the out-of-scope question with the
best-ranked tuned answer. A case with no such question is reported as absent, not filled with a wrong answer.
Ties go to the first id in sorted order.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import pandas as pd

from utils.evaluation.baselines import SYSTEM_LABELS
from utils.evaluation.errors import printable_answer
from utils.evaluation.metrics import KIND_LABELS, METRICS, keyword_pattern, normalize_text
from utils.evaluation.summaries import format_interval
from utils.numbers import fmt_num, fmt_pct
from utils.plotting.labels import label

KEY_COLUMNS = ("strict_correct", "citation_accuracy", "number_match", "no_invented", "keyword_recall", "overlap")
# (case label, short label for the printed table, system that must be right, system that must be wrong)
CASES = (
    ("el ajuste acierta y el modelo base no", "ajuste acierta, base no", "tuned", "base"),
    ("el ajuste empeora: el modelo base acierta y el ajustado no", "ajuste empeora", "base", "tuned"),
    ("la recuperación acierta y el ajuste no", "BM25 acierta, ajuste no", "base_rag", "tuned"),
    ("el ajuste acierta y la recuperación no", "ajuste acierta, BM25 no", "tuned", "base_rag"),
)
OUT_OF_SCOPE_CASE = ("fuera de alcance", "fuera de alcance")


def answer_keys(scores: pd.DataFrame, system: str) -> pd.DataFrame:
    """Per id: the ranking key of ``system``'s answer (``KEY_COLUMNS``, higher is better) and its kind."""
    data = scores[scores["model"] == system].set_index("id").sort_index()
    return pd.DataFrame({
        "kind": data["kind"],
        "strict_correct": data["strict_correct"].fillna(0.0),
        "citation_accuracy": data["citation_accuracy"].fillna(1.0),
        "number_match": data["number_match"].fillna(1.0),
        "no_invented": 1.0 - data["invented_citation"].fillna(0.0),
        "keyword_recall": data["keyword_recall"].fillna(0.0),
        "overlap": pd.concat([data["rouge_l"], data["chrf"] / 100], axis=1).mean(axis=1).fillna(0.0),
    })


def _best(keys: pd.DataFrame) -> str | None:
    """The id with the highest key (ties: first id), or None when ``keys`` is empty."""
    if keys.empty:
        return None
    ranked = keys.reset_index().sort_values([*KEY_COLUMNS, "id"], ascending=[False] * len(KEY_COLUMNS) + [True],
                                            kind="stable")
    return str(ranked["id"].iloc[0])


def pick_examples(scores: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The qualitative picks by the module's rule: rows (``caso``, ``corto``, ``id``, ``nota``), and the absent
    cases (their Spanish labels)."""
    systems = set(scores["model"])
    picks, absent = [], []
    for case, short, right, wrong in CASES:
        if not {right, wrong} <= systems:
            continue
        good, bad = answer_keys(scores, right), answer_keys(scores, wrong)
        mask = (good["kind"] != "out_of_scope") & (good["strict_correct"] == 1) & (bad["strict_correct"] == 0)
        chosen = _best(good[mask])
        if chosen is None:
            absent.append(case)
        else:
            picks.append({"caso": case, "corto": short, "id": chosen, "nota": ""})
    if "tuned" in systems:
        tuned = answer_keys(scores, "tuned")
        chosen = _best(tuned[tuned["kind"] == "out_of_scope"])
        if chosen is not None:
            row = scores[(scores["model"] == "tuned") & (scores["id"] == chosen)].iloc[0]
            note = "" if row["strict_correct"] == 1 else ("ninguna respuesta del ajustado fuera de alcance pasa "
                                                          "las verificaciones: declinar y derivar sin inventar citas")
            if note and row.get("tag_prompt_echo") == 1 and row.get("declines") == 1:
                note += "; esta declina y deriva copiando el mensaje de sistema (eco), lo que no cuenta como rechazo"
            picks.append({"caso": OUT_OF_SCOPE_CASE[0], "corto": OUT_OF_SCOPE_CASE[1], "id": chosen, "nota": note})
    return pd.DataFrame(picks, columns=["caso", "corto", "id", "nota"]), absent


def check_summary(row: pd.Series | dict) -> str:
    """What the automatic checks say of one answer, in Spanish: "citas 50 %; números: no; inventa una cita"."""
    parts = []
    if not math.isnan(row["citation_accuracy"]):
        parts.append(f"citas {fmt_pct(row['citation_accuracy'], 0)}")
    if not math.isnan(row["number_match"]):
        parts.append(f"números: {'sí' if row['number_match'] == 1 else 'no'}")
    if not math.isnan(row["keyword_recall"]):
        parts.append(f"palabras clave {fmt_pct(row['keyword_recall'], 0)}")
    if row["invented_citation"] == 1:
        parts.append("inventa una cita")
    refused = row.get("refusal_oos", math.nan)
    if not math.isnan(refused):
        if refused == 1:
            parts.append("declina y deriva")
        elif row.get("tag_prompt_echo") == 1 and row.get("declines") == 1:
            parts.append("declina y deriva copiando el mensaje de sistema: eco, no cuenta como rechazo")
        else:
            parts.append("no declina y deriva")
    elif row.get("declines") == 1:
        parts.append("declina")
    verdict = row["strict_correct"]
    if not math.isnan(verdict):
        parts.append("correcta" if verdict == 1 else "no pasa las verificaciones")
    return "; ".join(parts) or "sin verificaciones aplicables"


def side_by_side(predictions: Sequence[dict], scores: pd.DataFrame, systems: Sequence[str]) -> pd.DataFrame:
    """One row per test question: question, reference, each system's answer and its checks (the full CSV)."""
    by_key = scores.set_index(["id", "model"])
    rows = []
    for p in predictions:
        row = {"id": p["id"], "tipo": p.get("kind"), "tema": p.get("topic"), "pregunta": p["question"],
               "referencia": p["reference"], "palabras_clave": "; ".join(p.get("keywords") or [])}
        for system in systems:
            score = by_key.loc[(p["id"], system)]
            row[system] = p[f"answer_{system}"]
            row[f"verificacion_{system}"] = check_summary(score)
            row[f"fin_{system}"] = "sí" if p[f"stopped_{system}"] else "no"
        rows.append(row)
    return pd.DataFrame(rows)


def picks_table(picks: pd.DataFrame, predictions: Sequence[dict], scores: pd.DataFrame, systems: Sequence[str],
                word_limit: int = 40) -> pd.DataFrame:
    """The picks as a printable table: per pick, the question, the reference and every system's answer (cut to
    ``word_limit`` words, degenerate repetitions collapsed) with what the checks say."""
    by_id = {p["id"]: p for p in predictions}
    by_key = scores.set_index(["id", "model"])
    rows = []
    for number, pick in enumerate(picks.itertuples(), 1):
        p = by_id[pick.id]
        case = f"{number}. {pick.corto} ({pick.id})"
        rows.append({"Caso": case, "Texto": "Pregunta", "Contenido": printable_answer(p["question"], word_limit),
                     "Verificación": ""})
        rows.append({"Caso": "", "Texto": "Referencia", "Contenido": printable_answer(p["reference"], word_limit),
                     "Verificación": ""})
        for system in systems:
            rows.append({"Caso": "", "Texto": SYSTEM_LABELS[system],
                         "Contenido": printable_answer(p[f"answer_{system}"], word_limit) or "(vacía)",
                         "Verificación": check_summary(by_key.loc[(pick.id, system)])})
    return pd.DataFrame(rows, columns=["Caso", "Texto", "Contenido", "Verificación"])


# --------------------------------------------------------------------------------------------
# HTML (notebook)
# --------------------------------------------------------------------------------------------


def _keyword_marks(text: str, keywords: Sequence[str]) -> list[bool]:
    """For each character of ``text``, whether it lies inside a keyword match (matched on normalised text)."""
    folded, origin = [], []
    for i, ch in enumerate(text):
        for c in normalize_text(ch):
            folded.append(c)
            origin.append(i)
    norm = "".join(folded)
    marked = [False] * len(text)
    for keyword in keywords:
        pattern = keyword_pattern(keyword)
        for match in pattern.finditer(norm) if pattern else ():
            for k in range(origin[match.start()], origin[match.end() - 1] + 1):
                marked[k] = True
    return marked


def highlight_keywords(text: str, keywords: Sequence[str]) -> str:
    """HTML-escaped ``text`` with every keyword occurrence wrapped in ``<mark>`` (accent-insensitive)."""
    out, inside = [], False
    for ch, flag in zip(text, _keyword_marks(text, keywords)):
        if flag != inside:
            out.append("<mark>" if flag else "</mark>")
            inside = flag
        out.append(html.escape(ch))
    if inside:
        out.append("</mark>")
    return "".join(out)


def subset_table(records: Sequence[dict], verbatim_ids: Sequence[str]) -> pd.DataFrame:
    """Per test subset (kind): what it measures, its size, and how many of its reference answers are, word for
    word, a training answer (there the loss and ROUGE measure recall of a taught answer)."""
    meaning = {"fact": "hechos enseñados, preguntados con otra redacción",
               "combined": "preguntas que combinan dos hechos enseñados",
               "out_of_scope": "preguntas que la normativa no responde (debe declinar y derivar)"}
    verbatim = set(verbatim_ids)
    kinds = pd.Series([r.get("kind") for r in records]).value_counts()
    order = [k for k in meaning if k in kinds.index] + [k for k in kinds.index if k not in meaning]
    rows = []
    for kind in order:
        same = sum(1 for r in records if r.get("kind") == kind and str(r["id"]) in verbatim)
        rows.append({"Subconjunto": KIND_LABELS.get(kind, kind), "Qué mide": meaning.get(kind, "—"),
                     "Preguntas": fmt_num(int(kinds[kind])),
                     "Respuesta idéntica a una de entrenamiento": f"{fmt_num(same)} de {fmt_num(int(kinds[kind]))}"})
    return pd.DataFrame(rows)


def group_metrics_table(by_group: pd.DataFrame, by: str, systems: Sequence[str],
                        metrics: Sequence[str]) -> pd.DataFrame:
    """Long table: one row per (group, system), one column per metric, "value [low; high]" (es-AR)."""
    data = by_group[by_group["group_by"] == by]
    rows = []
    for group in sorted(data["group"].unique(), key=lambda g: (list(KIND_LABELS).index(g) if g in KIND_LABELS
                                                                else len(KIND_LABELS), str(g))):
        for system in systems:
            row = {"Grupo": label(str(group)), "Sistema": SYSTEM_LABELS[system]}
            for metric in metrics:
                cell = data[(data["group"] == group) & (data["model"] == system) & (data["metric"] == metric)]
                row[METRICS[metric][0]] = ("—" if cell.empty else
                                           format_interval(*cell[["value", "low", "high"]].iloc[0], 2))
            rows.append(row)
    return pd.DataFrame(rows)
