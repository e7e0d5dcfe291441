"""Presentation of notebook 01: the loss mask in HTML, the thesis summary table and its LaTeX file, the findings.

Everything here takes what ``utils.data`` computed (records, ``token_lengths``, ``overlap_checks``) and returns
text or a table for a reader; nothing here is read back by the computation.
"""

from __future__ import annotations

import html
from collections import Counter
from pathlib import Path
from typing import Sequence

import pandas as pd

from utils.data import completion_mask, loss_token_share
from utils.files import atomic_write_text
from utils.paths import figures_dir


def loss_mask_html(tokenizer, messages: Sequence[dict]) -> str:
    """HTML of a chat token by token: grey = masked prompt, green = tokens that carry the loss."""
    input_ids, mask = completion_mask(tokenizer, messages)
    spans = []
    for token_id, trained in zip(input_ids, mask):
        piece = tokenizer.decode([token_id])
        shown = html.escape(piece).replace("\n", "↵<br>")
        style = "background:#b7e4c7;" if trained else "background:#e9ecef;color:#6c757d;"
        spans.append(f'<span style="{style}border-right:1px solid #fff;font-family:monospace">{shown}</span>')
    n_trained = sum(mask)
    legend = (f"<p><b>{len(input_ids)} tokens</b>: <span style='background:#e9ecef'>{len(input_ids) - n_trained} "
              f"enmascarados (prompt, etiqueta -100)</span> · <span style='background:#b7e4c7'>{n_trained} con "
              "pérdida (respuesta y fin de turno)</span></p>")
    return legend + "<div style='line-height:1.9'>" + "".join(spans) + "</div>"


def dataset_summary(splits: dict[str, Sequence[dict]], lengths: pd.DataFrame,
                    max_seq_length: int = 512) -> pd.DataFrame:
    """Summary table of the splits (examples per kind, facts, topics, token lengths) for the thesis."""
    table = {}
    for name, records in splits.items():
        kinds = Counter(r["kind"] for r in records)
        column = {"Ejemplos": len(records)}
        kind_labels = (("fact", "Hechos simples"), ("combined", "Combinadas"), ("out_of_scope", "Fuera de alcance"))
        for kind, label in kind_labels:
            column[label] = kinds.get(kind, 0)
        column["Hechos distintos"] = len({f for r in records for f in r["facts"]})
        column["Temas"] = len({r["topic"] for r in records})
        for label, data in lengths[lengths["split"] == name].groupby("tokenizador", sort=False):
            column[f"Tokens (mediana) — {label}"] = int(data["total"].median())
            column[f"Tokens (máx.) — {label}"] = int(data["total"].max())
            column[f"Más de {max_seq_length} tokens — {label}"] = int((data["total"] > max_seq_length).sum())
        table[name] = column
    return pd.DataFrame(table)


def describe_findings(splits: dict[str, Sequence[dict]], lengths: pd.DataFrame, checks: pd.DataFrame,
                      max_seq_length: int = 512) -> str:
    """Markdown bullets (Spanish) stating what the measured numbers show, for the notebook's conclusions."""
    total = sum(len(r) for r in splits.values())
    test = len(splits.get("test", []))
    lines = [f"- El corpus tiene **{total} ejemplos**; test guarda **{test}** ({test / max(total, 1):.1%})."]
    for label, data in lengths.groupby("tokenizador", sort=False):
        over = int((data["total"] > max_seq_length).sum())
        lines.append(
            f"- Con el tokenizador **{label}** el ejemplo más largo mide **{int(data['total'].max())} tokens** "
            f"(mediana {int(data['total'].median())}); **{over}** de {len(data)} superan `max_seq_length = "
            f"{max_seq_length}`" + (" y se truncarían." if over else ": con este corpus no se trunca nada.")
        )
    share = loss_token_share(lengths)
    for _, row in share.iterrows():
        lines.append(
            f"- {row['tokenizador']}: con prompt–completion la pérdida cae sobre el "
            f"**{row['pct_con_perdida_prompt_completion']:.1f}%** de los tokens (la respuesta y su fin de turno); "
            "el entrenamiento original sobre `text` la calcula sobre todos"
            + (f", incluido un BOS repetido ({int(row['bos_al_inicio'])} al inicio)."
               if row["bos_al_inicio"] > 1 else ".")
        )
    leaks = checks.set_index("chequeo")["resultado"]
    bad = {k: int(v) for k, v in leaks.items() if v and not k.startswith("respuestas de test")}
    lines.append("- Solapamiento: " + ("ninguna pregunta de test aparece en train (redacción normalizada), no hay "
                 "duplicados y todo hecho evaluado se enseña en train." if not bad else
                 "**hay problemas**: " + "; ".join(f"{k}: {v}" for k, v in bad.items()) + "."))
    return "\n".join(lines)


def save_latex_table(table: pd.DataFrame, name: str, caption: str, label: str | None = None) -> Path:
    """Write ``figures/<name>.tex`` (a ``table`` environment made by ``DataFrame.to_latex``)."""
    path = figures_dir() / f"{name}.tex"
    latex = table.to_latex(caption=caption, label=label or f"tab:{name}", position="htbp",
                           float_format="%.1f", escape=True)
    return atomic_write_text(path, latex)
