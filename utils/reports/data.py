"""Presentation of notebook 01: the loss mask in HTML, the thesis summary table and its LaTeX file, the findings.

Everything here takes what ``utils.data`` computed (records, ``token_lengths``, ``overlap_checks``) and returns
text or a table for a reader, in Spanish with es-AR numbers; nothing here is read back by the computation.
"""

from __future__ import annotations

import html
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from utils.data import KINDS, completion_mask, loss_token_share, missing_fields, verbatim_answer_ids
from utils.data.stats import verbatim_counts
from utils.latex import write_table
from utils.numbers import fmt_num, fmt_pct
from utils.plotting import label

# What each metadata field feeds, to say what is skipped when a student's data lacks it.
FIELD_USES = {
    "kind": "se omiten los conteos por tipo (hecho, combinada, fuera de alcance) y las métricas de rechazo",
    "topic": "se omiten los conteos y la figura por tema",
    "keywords": "se omite la cobertura de palabras clave (notebook 05)",
}


def _cap(text: str) -> str:
    """``text`` with its first letter upper-case (the rest kept: "INSPT", "Ord. 908")."""
    return text[:1].upper() + text[1:]


def loss_mask_html(tokenizer, messages: Sequence[dict]) -> str:
    """HTML of a chat token by token: grey = masked prompt, blue = tokens that carry the loss."""
    input_ids, mask = completion_mask(tokenizer, messages)
    spans = []
    for token_id, trained in zip(input_ids, mask):
        piece = tokenizer.decode([token_id])
        shown = html.escape(piece).replace("\n", "↵<br>")
        style = "background:#b3d9f2;" if trained else "background:#e9ecef;color:#6c757d;"
        spans.append(f'<span style="{style}border-right:1px solid #fff;font-family:monospace">{shown}</span>')
    n_trained = sum(mask)
    legend = (f"<p><b>{fmt_num(len(input_ids))} tokens</b>: <span style='background:#e9ecef'>"
              f"{fmt_num(len(input_ids) - n_trained)} enmascarados (prompt, etiqueta −100)</span> · "
              f"<span style='background:#b3d9f2'>{fmt_num(n_trained)} con pérdida (respuesta y fin de turno)</span></p>")
    return legend + "<div style='line-height:1.9'>" + "".join(spans) + "</div>"


def describe_missing(splits: dict[str, Sequence[dict]], fields: Sequence[str] = ("kind", "topic", "keywords")) -> str:
    """A Spanish note naming the fields some split lacks and what is skipped for it ("" when nothing is missing)."""
    lacking = {name: missing_fields(records, fields) for name, records in splits.items()}
    absent = [f for f in fields if any(f in found for found in lacking.values())]
    if not absent:
        return ""
    where = {f: ", ".join(label(n) for n, found in lacking.items() if f in found) for f in absent}
    lines = [f"- **Falta `{f}`** en algún ejemplo de {where[f]}: {FIELD_USES.get(f, 'se omite lo que lo usa')}."
             for f in absent]
    lines.append("- Para agregarlos: `python -m utils.data annotate-template <datos.jsonl> --out campos.csv`, "
                 "completar la planilla y `python -m utils.data annotate <datos.jsonl> --fields campos.csv --out "
                 "<nuevo.jsonl>` (ver `dataset/README.md`).")
    return "\n".join(lines)


def count_display(table: pd.DataFrame, by: str) -> pd.DataFrame:
    """A ``count_table`` for a reader: Spanish row and column names, es-AR numbers."""
    shown = table.rename(index=lambda k: "Total" if k == "total" else _cap(label(str(k))),
                         columns=lambda c: "Total" if c == "total" else _cap(label(str(c))))
    shown.index.name = "Tipo" if by == "kind" else "Tema"
    return shown.map(lambda v: fmt_num(int(v)))


def validation_display(reports: dict[str, Any]) -> pd.DataFrame:
    """One row per split: its file, format, examples, errors and warnings (``ValidationReport`` by split name)."""
    rows = [{"Conjunto": _cap(label(name)), "Archivo": Path(report.path).name,
             "Formato": report.file_format or "—", "Ejemplos": fmt_num(len(report.records)),
             "Errores": fmt_num(len(report.errors)), "Avisos": fmt_num(len(report.warnings))}
            for name, report in reports.items()]
    return pd.DataFrame(rows).set_index("Conjunto")


def fmt_median(values: pd.Series) -> str:
    """A median of token counts in es-AR: whole, or with its one decimal when it falls between two counts (163,5)."""
    median = float(values.median())
    return fmt_num(median, 0 if median.is_integer() else 1)


def tokenizer_display(tokenizers: dict[str, Any]) -> pd.DataFrame:
    """Each tokenizer's vocabulary (``len``: special tokens included), its last token, EOS and PAD."""
    rows = {}
    for name, tok in tokenizers.items():
        last = len(tok) - 1
        rows[name] = {"Vocabulario (tokens)": fmt_num(len(tok)),
                      "Último token (id)": f"{tok.convert_ids_to_tokens(last)} ({last})",
                      "EOS": tok.eos_token, "PAD": tok.pad_token if tok.pad_token is not None else "—"}
    shown = pd.DataFrame(rows).T
    shown.index.name = "Tokenizador"
    return shown


def length_display(summary: pd.DataFrame) -> pd.DataFrame:
    """``length_summary`` for a reader: Spanish column names, split names, es-AR numbers."""
    names = {"tokenizador": "Tokenizador", "split": "Conjunto", "ejemplos": "Ejemplos",
             "prompt_mediana": "Prompt (mediana)", "respuesta_mediana": "Respuesta (mediana)",
             "total_mediana": "Total (mediana)", "total_p95": "Total (percentil 95)", "total_max": "Total (máximo)",
             "truncados": "Truncados"}
    shown = summary.assign(split=summary["split"].map(lambda n: _cap(label(n))))
    for column in names:
        if column not in ("tokenizador", "split"):
            shown[column] = shown[column].map(lambda v: fmt_num(v, 0 if float(v).is_integer() else 1))
    shown["Truncados (%)"] = summary["truncados_pct"].map(lambda v: fmt_pct(v / 100))
    return shown.rename(columns=names).drop(columns="truncados_pct").set_index(["Tokenizador", "Conjunto"])


def loss_share_display(share: pd.DataFrame) -> pd.DataFrame:
    """``loss_token_share`` for a reader: tokens with loss under each way of training, es-AR."""
    return pd.DataFrame({
        "Tokens (prompt–completion)": share["tokens_prompt_completion"].map(fmt_num),
        "Con pérdida (prompt–completion)": share["con_perdida_prompt_completion"].map(fmt_num),
        "Con pérdida (%)": share["pct_con_perdida_prompt_completion"].map(lambda v: fmt_pct(v / 100)),
        "Tokens y con pérdida (texto completo)": share["tokens_texto_completo"].map(fmt_num),
        "BOS al inicio (texto completo)": share["bos_al_inicio"].map(fmt_num),
    }).set_axis(share["tokenizador"].rename("Tokenizador"))


def checks_display(checks: pd.DataFrame) -> pd.DataFrame:
    """``overlap_checks`` for a reader: split names in Spanish, counts es-AR."""
    def pair(text: str) -> str:
        return " / ".join(label(part) for part in text.split(" / "))

    return pd.DataFrame({"Chequeo": checks["chequeo"], "Conjuntos": checks["par"].map(pair),
                         "Resultado": checks["resultado"].map(fmt_num)})


def dataset_summary(splits: dict[str, Sequence[dict]], lengths: pd.DataFrame,
                    max_seq_length: int = 512) -> pd.DataFrame:
    """Summary of the splits for the thesis: examples per kind, facts, topics, token lengths (es-AR strings).

    Rows that need ``kind`` or ``topic`` are left out when some example lacks them (``describe_missing``).
    """
    table = {}
    for name, records in splits.items():
        kinds = Counter(r["kind"] for r in records)
        column = {"Ejemplos": fmt_num(len(records))}
        if not missing_fields(records, ("kind",)):
            column.update({_cap(label(k)): fmt_num(kinds.get(k, 0)) for k in KINDS})
            column["Hechos distintos"] = fmt_num(len({f for r in records for f in r["facts"]}))
        if not missing_fields(records, ("topic",)):
            column["Temas"] = fmt_num(len({r["topic"] for r in records}))
        for tokenizer, data in lengths[lengths["split"] == name].groupby("tokenizador", sort=False):
            column[f"{tokenizer}: tokens, mediana"] = fmt_median(data["total"])
            column[f"{tokenizer}: tokens, máximo"] = fmt_num(int(data["total"].max()))
            column[f"{tokenizer}: más de {fmt_num(max_seq_length)} tokens"] = fmt_num(
                int((data["total"] > max_seq_length).sum()))
        table[_cap(label(name))] = column
    summary = pd.DataFrame(table).fillna("—")
    summary.index.name = "Medida"
    return summary


def write_summary_table(summary: pd.DataFrame, name: str, caption: str) -> Path:
    """Write the summary as ``<figures>/<name>.tex`` (booktabs, ragged-right columns) with ``utils.latex``."""
    table = summary.reset_index()
    first = 0.40
    rest = (1.0 - first) / max(1, len(table.columns) - 1)
    return write_table(table, name, caption=caption, widths=[first] + [rest] * (len(table.columns) - 1),
                       align_right=[str(c) for c in table.columns[1:]])


def verbatim_display(splits: dict[str, Sequence[dict]], reference: str = "train") -> pd.DataFrame:
    """Per kind and held-out split: examples whose reference answer is word for word a train answer (es-AR)."""
    rows = {}
    for name, (hits, kinds) in verbatim_counts(splits, reference).items():
        column = {_cap(label(k)): f"{fmt_num(hits[k])} de {fmt_num(n)}" for k, n in kinds.items()}
        column["Total"] = f"{fmt_num(sum(hits.values()))} de {fmt_num(sum(kinds.values()))}"
        rows[_cap(label(name))] = column
    shown = pd.DataFrame(rows).fillna("—")
    shown.index.name = "Tipo"
    return shown


def _length_lines(lengths: pd.DataFrame, max_seq_length: int) -> list[str]:
    lines = []
    for tokenizer, data in lengths.groupby("tokenizador", sort=False):
        over = int((data["total"] > max_seq_length).sum())
        lines.append(
            f"- Con el tokenizador **{tokenizer}** el ejemplo más largo mide **{fmt_num(int(data['total'].max()))} "
            f"tokens** (mediana de los tres conjuntos juntos: {fmt_median(data['total'])}); **{fmt_num(over)}** de "
            f"{fmt_num(len(data))} "
            f"superan `max_seq_length = {max_seq_length}`"
            + (" y se truncarían." if over else ": con estos datos no se trunca nada."))
    for _, row in loss_token_share(lengths).iterrows():
        lines.append(
            f"- {row['tokenizador']}: con *prompt–completion* la pérdida cae sobre el "
            f"**{fmt_pct(row['pct_con_perdida_prompt_completion'] / 100)}** de los tokens (la respuesta y su fin "
            "de turno); el entrenamiento original sobre `text` la calcula sobre todos.")
    return lines


def _split_lines(splits: dict[str, Sequence[dict]]) -> list[str]:
    total = sum(len(r) for r in splits.values())
    shares = ", ".join(f"{label(n)} **{fmt_num(len(r))}** ({fmt_pct(len(r) / max(total, 1))})"
                       for n, r in splits.items())
    lines = [f"- Los datos tienen **{fmt_num(total)} ejemplos**: {shares}."]
    train = splits.get("train", [])
    for name, records in splits.items():
        if name == "train" or not records or missing_fields(records, ("kind",)):
            continue
        facts = [r for r in records if r["kind"] == "fact"]
        verbatim = set(verbatim_answer_ids(train, records))
        others = sum(str(r["id"]) in verbatim for r in records if r["kind"] != "fact")
        lines.append(
            f"- En {label(name)}, **{fmt_num(sum(str(r['id']) in verbatim for r in facts))} de {fmt_num(len(facts))}** "
            "preguntas sobre hechos tienen, palabra por palabra, la respuesta de un ejemplo de entrenamiento (son "
            f"otra redacción de un hecho enseñado); de las combinadas y fuera de alcance, {fmt_num(others)}. La "
            "pérdida y el ROUGE sobre los hechos miden en parte el recuerdo de una respuesta entrenada: el "
            "notebook 05 los informa por tipo.")
    return lines


def describe_findings(splits: dict[str, Sequence[dict]], lengths: pd.DataFrame, checks: pd.DataFrame,
                      max_seq_length: int = 512) -> str:
    """Markdown bullets (Spanish, es-AR numbers) stating what the measured numbers show, for the conclusions."""
    lines = _split_lines(splits) + _length_lines(lengths, max_seq_length)
    expected = checks["chequeo"].str.startswith("respuestas idénticas")
    bad = checks[~expected & (checks["resultado"] > 0)]
    if bad.empty:
        lines.append("- Solapamiento: ningún par de conjuntos comparte una pregunta (redacción normalizada), no hay "
                     "duplicados dentro de un conjunto y todo hecho evaluado se enseña en entrenamiento.")
    else:
        found = "; ".join(f"{row.chequeo} ({row.par}): {fmt_num(row.resultado)}" for row in bad.itertuples())
        lines.append(f"- Solapamiento: **hay problemas**: {found}.")
    missing = describe_missing(splits)
    return "\n".join(lines + ([missing] if missing else []))
