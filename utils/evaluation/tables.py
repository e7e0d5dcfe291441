"""The answers side by side (notebook table, CSV, LaTeX longtable) and the examples shown in full."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from pandas.io.formats.style import Styler

from utils.evaluation.metrics import MODELS, keyword_pattern, normalize_text
from utils.files import atomic_write_text


def side_by_side(predictions: Sequence[dict], scores: pd.DataFrame) -> pd.DataFrame:
    """One row per test question: question, reference, base and tuned answers, and per-answer scores."""
    wide = scores[scores["model"].isin(MODELS)].pivot(index="id", columns="model",
                                                       values=["keyword_recall", "rouge_l"])
    rows = []
    for p in predictions:
        rows.append({
            "id": p["id"], "tipo": p["kind"], "tema": p["topic"], "pregunta": p["question"],
            "referencia": p["reference"], "base": p["answer_base"], "ajustado": p["answer_tuned"],
            "recall_base": wide.loc[p["id"], ("keyword_recall", "base")],
            "recall_ajustado": wide.loc[p["id"], ("keyword_recall", "tuned")],
            "rougeL_base": wide.loc[p["id"], ("rouge_l", "base")],
            "rougeL_ajustado": wide.loc[p["id"], ("rouge_l", "tuned")],
            "fin_base": p["stopped_base"], "fin_ajustado": p["stopped_tuned"],
            "palabras_clave": "; ".join(p["keywords"]),
        })
    return pd.DataFrame(rows)


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


def style_side_by_side(table: pd.DataFrame) -> Styler:
    """Styler for the notebook: wrapped text, keywords highlighted, scores coloured 0 (red) – 1 (green)."""
    shown = table.drop(columns=["tema", "palabras_clave"]).copy()
    keywords = table["palabras_clave"].str.split("; ")
    for column in ("referencia", "base", "ajustado"):
        shown[column] = [highlight_keywords(t, k) for t, k in zip(table[column], keywords)]
    shown["pregunta"] = table["pregunta"].map(html.escape)
    for column in ("fin_base", "fin_ajustado"):
        shown[column] = table[column].map({True: "sí", False: "no"})
    scores = ["recall_base", "recall_ajustado", "rougeL_base", "rougeL_ajustado"]
    headers = {"recall_base": "recall base", "recall_ajustado": "recall ajustado", "rougeL_base": "ROUGE-L base",
               "rougeL_ajustado": "ROUGE-L ajustado", "fin_base": "fin base", "fin_ajustado": "fin ajustado"}
    return (
        shown.style.hide(axis="index")
        .relabel_index([headers.get(c, c) for c in shown.columns], axis="columns")
        .format("{:.2f}", subset=scores, na_rep="—")
        .background_gradient(cmap="RdYlGn", vmin=0, vmax=1, subset=scores)
        .set_properties(subset=["pregunta", "referencia", "base", "ajustado"],
                        **{"white-space": "pre-wrap", "text-align": "left", "vertical-align": "top",
                           "min-width": "14em", "max-width": "26em"})
        .set_table_styles([{"selector": "th", "props": "text-align: left;"},
                           {"selector": "mark", "props": "background-color: #ffe08a; padding: 0;"}])
    )


def write_latex_longtable(table: pd.DataFrame, path: Path, caption: str, label: str = "tab:05_respuestas") -> Path:
    """Question, reference, base and tuned answers as an escaped LaTeX ``longtable`` (needs ``longtable``)."""
    columns = {"pregunta": "Pregunta", "referencia": "Referencia", "base": "Modelo base",
               "ajustado": "Modelo ajustado"}
    data = table[list(columns)].rename(columns=columns)
    # A blank line inside a p{} cell would end the paragraph: keep each answer on one line.
    data = data.apply(lambda col: col.str.replace(r"\s+", " ", regex=True).str.strip())
    latex = data.to_latex(
        index=False, longtable=True, escape=True, caption=caption, label=label,
        column_format=r"p{0.19\linewidth}p{0.25\linewidth}p{0.25\linewidth}p{0.25\linewidth}",
    )
    latex = latex.replace("Continued on next page", "Continúa en la página siguiente")
    header = "% UTF-8 text. Needs \\usepackage{longtable} and \\usepackage{booktabs}.\n"
    return atomic_write_text(path, header + latex)


def _quality_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Per record: kind, quality of each model's answer, their difference and the refusal gain."""
    data = scores[scores["model"].isin(MODELS)].copy()
    data["quality"] = pd.concat([data["keyword_recall"], data["rouge_l"], data["chrf"] / 100], axis=1).mean(axis=1)
    wide = data.pivot(index="id", columns="model", values=["quality", "refusal_accuracy"]).sort_index()
    kinds = data.drop_duplicates("id").set_index("id")["kind"].reindex(wide.index)
    table = pd.DataFrame({
        "kind": kinds,
        "quality_base": wide[("quality", "base")], "quality_tuned": wide[("quality", "tuned")],
        "refusal_gain": wide[("refusal_accuracy", "tuned")] - wide[("refusal_accuracy", "base")],
    })
    table["delta"] = table["quality_tuned"] - table["quality_base"]
    return table


def pick_examples(scores: pd.DataFrame) -> pd.DataFrame:
    """The records the notebook shows in full, by a fixed rule.

    Quality of an answer = mean of keyword recall, ROUGE-L and chrF/100 (NaN ignored); Δ = tuned − base.
    *helped most* = answerable record with the largest Δ, *hurt most* = answerable record with the
    smallest Δ, *out of scope* = out-of-scope record with the largest gain in refusal correctness, then
    the largest Δ. Ties go to the first id in sorted order.
    """
    table = _quality_table(scores)
    answerable = table[table["kind"] != "out_of_scope"]
    oos = table[table["kind"] == "out_of_scope"]
    picks = []
    if len(answerable):
        picks.append(("mejor mejora", answerable["delta"].idxmax()))
        picks.append(("peor empeoramiento", answerable["delta"].idxmin()))
    if len(oos):
        best = oos.sort_values(["refusal_gain", "delta"], ascending=False, kind="stable").index[0]
        picks.append(("fuera de alcance", best))
    rows = [{"caso": role, "id": rid, **table.loc[rid].to_dict()} for role, rid in picks]
    return pd.DataFrame(rows)
