"""Notebook 05 in words: the findings (Spanish Markdown, es-AR numbers) and a picked example in HTML."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from utils.evaluation import ERROR_TAGS, METRICS, SYSTEM_LABELS, check_summary, highlight_keywords, model_label
from utils.evaluation.runs import gpu_source
from utils.files import read_json
from utils.modeling import ModelNotAvailableError, resolve_model
from utils.numbers import fmt_num, fmt_pct
from utils.paths import CONFIG_FILE, HISTORY_FILE, REPO_ROOT
from utils.plotting.labels import label


def _value(x: float, metric: str, signed: bool = False) -> str:
    """A metric value in es-AR: 1 decimal for chrF++, lengths and perplexity, 3 for the rest."""
    digits = 1 if metric in {"chrf", "length_tokens", "perplexity"} else 3
    return fmt_num(x, digits, signed=signed)


def _interval(row: pd.Series, metric: str) -> str:
    return f"[{_value(row['low'], metric, True)}; {_value(row['high'], metric, True)}]"


def _verdict(get: pd.DataFrame, metric: str, confidence: float, first: str, second: str, name: str) -> str:
    """One Markdown bullet: ``first`` vs ``second`` on ``metric`` and what the paired interval says."""
    label, higher = METRICS[metric]
    a, b, delta = get.loc[(first, metric)], get.loc[(second, metric)], get.loc[(name, metric)]
    better = delta["value"] > 0 if higher else delta["value"] < 0
    sure = delta["low"] > 0 or delta["high"] < 0
    # "mejora"/"empeora" only where the paired interval excludes 0; otherwise the observed side, said as such
    word = ("no cambia" if delta["value"] == 0 else ("mejora" if better else "empeora") if sure
            else "diferencia no concluyente")
    if higher is None:
        word = "alarga las respuestas" if delta["value"] > 0 else "acorta las respuestas" if delta["value"] < 0 \
            else "no cambia la longitud"
    leaning = (f"en esta muestra a favor de {model_label(first) if better else model_label(second)}; "
               if higher is not None and delta["value"] != 0 and not sure else "")
    ci = (f"{leaning}IC {fmt_pct(confidence, 0)} de la diferencia {_interval(delta, metric)}"
          + (", que excluye el 0" if sure else ", que incluye el 0"))
    if delta["low"] == delta["high"] == delta["value"] == 0:
        ci = "el mismo valor por pregunta en ambos"
    return (f"- **{label}**: {model_label(second)} {_value(b['value'], metric)}, {model_label(first)} "
            f"{_value(a['value'], metric)} → **{word}** ({ci}).")


def describe_results(summary: pd.DataFrame, confidence: float = 0.95, first: str = "tuned",
                     second: str = "base", metrics: Sequence[str] | None = None) -> str:
    """Spanish Markdown bullets stating, metric by metric, how ``first`` compares with ``second`` (paired CI)."""
    get = summary.set_index(["model", "metric"])
    name = "delta" if (first, second) == ("tuned", "base") else f"delta:{first}:{second}"
    return "\n".join(_verdict(get, metric, confidence, first, second, name) for metric in (metrics or METRICS)
                     if all((m, metric) in get.index for m in (first, second, name)))


def _training_facts(run: Path | None) -> str | None:
    """"N pasos (E épocas) sobre <modelo>" from a run's 04_config.json and 04_log_history.csv."""
    if run is None or not (Path(run) / CONFIG_FILE).is_file():
        return None
    config = read_json(Path(run) / CONFIG_FILE)
    steps = (config.get("parameters") or {}).get("max_steps")
    text = f"{fmt_num(steps)} pasos de optimización" if steps else "el entrenamiento de la notebook 04"
    history = Path(run) / HISTORY_FILE
    if history.is_file():
        epochs = pd.read_csv(history).get("epoch")
        if epochs is not None and epochs.notna().any():
            text += f" ({fmt_num(epochs.max(), 2)} épocas)"
    try:
        name = resolve_model(config.get("model_name", "")).label
    except ModelNotAvailableError:
        name = config.get("model_name")
    return text + f" sobre {name}"


def acceptance_statement(summary: pd.DataFrame, run: Path | None = None) -> str:
    """Plain Spanish statement of the targets of issue #17 on this test: tuned beats base on keyword recall with an
    interval that excludes 0, at least 50 % correct refusals out of scope, at most 10 % wrongful refusals."""
    get = summary.set_index(["model", "metric"])
    lines = []
    if ("delta", "keyword_recall") in get.index:
        d = get.loc[("delta", "keyword_recall")]
        met = d["low"] > 0
        lines.append(f"- Recall de palabras clave, ajustado − base: {_value(d['value'], 'keyword_recall', True)} "
                     f"{_interval(d, 'keyword_recall')}: **{'cumple' if met else 'no cumple'}** la meta (que el "
                     "intervalo excluya el 0 por encima).")
    for metric, goal, higher in (("refusal_oos", 0.5, True), ("wrongful_refusal", 0.10, False)):
        if ("tuned", metric) in get.index:
            value = get.loc[("tuned", metric), "value"]
            met = value >= goal if higher else value <= goal
            lines.append(f"- {METRICS[metric][0]} del ajustado: {fmt_pct(value, 1)} (meta "
                         f"{'≥' if higher else '≤'} {fmt_pct(goal, 0)}): **{'cumple' if met else 'no cumple'}**.")
    facts = _training_facts(run)
    if facts:
        lines.append(f"- El adaptador evaluado viene de {facts}.")
    return "\n".join(lines)


def central_question(summary: pd.DataFrame, confidence: float = 0.95) -> str:
    """The thesis's question in one paragraph: does tuning teach the regulations better than retrieving them?"""
    get = summary.set_index(["model", "metric"])
    name = "delta:tuned:base_rag"
    metrics = [m for m in ("strict_correct", "keyword_recall", "citation_accuracy", "number_match")
               if (name, m) in get.index]
    if not metrics:
        return "Sin el sistema «Base + BM25» no se puede comparar ajuste con recuperación en esta corrida."
    parts = []
    for metric in metrics:
        d = get.loc[(name, metric)]
        who = ("el ajustado" if d["value"] > 0 else "la recuperación" if d["value"] < 0 else "ninguno")
        sure = d["low"] > 0 or d["high"] < 0
        parts.append(f"{METRICS[metric][0].lower()}: {_value(get.loc[('tuned', metric), 'value'], metric)} el "
                     f"ajustado contra {_value(get.loc[('base_rag', metric), 'value'], metric)} base + BM25 "
                     f"(diferencia {_value(d['value'], metric, True)} {_interval(d, metric)}; "
                     + (f"gana {who}" if sure else "el intervalo incluye el 0") + ")")
    return ("¿Enseña el ajuste la normativa mejor que recuperarla? En este conjunto de prueba, " + "; ".join(parts)
            + f". Intervalos bootstrap pareados del {fmt_pct(confidence, 0)}.")


def subset_note(subsets: pd.DataFrame) -> str:
    """What the verbatim counts mean for reading loss and ROUGE on each subset (Spanish)."""
    column = "Respuesta idéntica a una de entrenamiento"
    lines = [f"- **{r['Subconjunto']}** ({r['Preguntas']} {'pregunta' if r['Preguntas'] == '1' else 'preguntas'}): "
             f"{r['Qué mide']}; respuesta de referencia "
             f"idéntica a una de entrenamiento en {r[column]}." for _, r in subsets.iterrows()]
    return "\n".join(lines) + (
        "\n\nDonde la respuesta de referencia aparece palabra por palabra en el entrenamiento, la pérdida de prueba, "
        "la perplejidad y ROUGE miden sobre todo cuánto recuerda el modelo una respuesta enseñada; la pregunta sí es "
        "nueva. Las citas, los números y las palabras clave siguen midiendo si la respuesta es correcta.")


def forgetting_statement(summary: pd.DataFrame, confidence: float = 0.95) -> str:
    """Base vs tuned loss on the general questions, and whether the paired interval shows forgetting."""
    get = summary.set_index(["model", "metric"])
    if ("delta", "loss") not in get.index:
        return "No hay pérdida de ambos modelos sobre las preguntas generales."
    base, tuned, d = get.loc[("base", "loss")], get.loc[("tuned", "loss")], get.loc[("delta", "loss")]
    verdict = ("el ajuste **empeoró** la pérdida en español general (olvido)" if d["low"] > 0 else
               "el ajuste **mejoró** la pérdida en español general" if d["high"] < 0 else
               "el intervalo incluye el 0: no hay evidencia de olvido ni de mejora")
    return (f"Pérdida sobre las preguntas generales: base {_value(base['value'], 'loss')}, ajustado "
            f"{_value(tuned['value'], 'loss')} nats/token; diferencia {_value(d['value'], 'loss', True)} "
            f"{_interval(d, 'loss')} (IC {fmt_pct(confidence, 0)}): {verdict}.")


def kappa_statement(agreement: dict) -> str:
    """Cohen's κ of two raters in one Spanish sentence (κ = 1: full agreement; 0: what chance gives)."""
    kappa = agreement["kappa"]
    if kappa is None or math.isnan(kappa):
        return (f"κ no está definido: {agreement['rater_1']} y {agreement['rater_2']} usaron una sola etiqueta "
                "en las respuestas comunes (no hay variación que concordar).")
    return (f"κ de Cohen entre {agreement['rater_1']} y {agreement['rater_2']}: {fmt_num(kappa, 2)} sobre "
            f"{fmt_num(agreement['n'])} respuestas, con un acuerdo observado del {fmt_pct(agreement['agreement'], 0)} "
            "(κ = 1: acuerdo total; κ = 0: el que daría el azar con las mismas proporciones de etiquetas).")


def example_html(prediction: dict, scores: pd.DataFrame, case: str, systems: Sequence[str]) -> str:
    """One picked question in full: question, reference and every system's answer with its checks."""
    keywords = prediction.get("keywords") or []
    by_model = scores[scores["id"] == prediction["id"]].set_index("model")

    def block(title: str, text: str, extra: str = "") -> str:
        return (f"<p style='margin:0.3em 0'><b>{html.escape(title)}</b>{html.escape(extra)}</p><div style='white-"
                f"space:pre-wrap;border-left:3px solid #ccc;padding-left:0.6em'>{highlight_keywords(text, keywords)}"
                "</div>")

    head = (f"<h4>{html.escape(case[:1].upper() + case[1:])}: {html.escape(str(prediction['id']))} "
            f"({html.escape(label(str(prediction.get('kind'))))}, {html.escape(label(str(prediction.get('topic'))))})"
            "</h4>")
    parts = [head, block("Pregunta", prediction["question"]), block("Referencia", prediction["reference"])]
    for system in systems:
        ending = "terminó con EOS" if prediction[f"stopped_{system}"] else "cortada por el límite de tokens"
        extra = f" — {fmt_num(prediction[f'tokens_{system}'])} tokens, {ending}; {check_summary(by_model.loc[system])}"
        parts.append(block(SYSTEM_LABELS[system], prediction[f"answer_{system}"], extra))
    return "".join(parts)


def generation_note(timings: dict[str, float], n_records: int, max_new_tokens: int) -> str:
    """Seconds each system took to answer the test questions (Spanish, es-AR)."""
    parts = [f"{SYSTEM_LABELS[s]} {fmt_num(t, 0)} s" for s, t in timings.items()]
    return (f"Generación de {fmt_num(n_records)} respuestas por sistema (máximo {fmt_num(max_new_tokens)} tokens "
            f"nuevos): " + "; ".join(parts) + ".")


def retrieval_note(predictions: Sequence[dict], k: int) -> str:
    """How often BM25 put the reference answer among the ``k`` passages, per question kind (Spanish)."""
    counts: dict[str, list[int]] = {}
    for p in predictions:
        hit = counts.setdefault(str(p.get("kind")), [0, 0])
        hit[0] += bool(p.get("retrieval_hit"))
        hit[1] += 1
    parts = [f"{label(kind)}: {fmt_num(h)} de {fmt_num(n)}" for kind, (h, n) in counts.items()]
    return (f"Acierto de la recuperación (la respuesta de referencia entre los {fmt_num(k)} pasajes): "
            + "; ".join(parts) + ".")


def error_tag_table(counts: pd.DataFrame, systems: Sequence[str]) -> pd.DataFrame:
    """Rows = error tags, columns = systems, cells "n de N (p %)" (es-AR)."""
    table = pd.DataFrame(index=list(ERROR_TAGS.values()))
    for system in systems:
        data = counts[counts["model"] == system].set_index("tag")
        table[SYSTEM_LABELS[system]] = [
            f"{fmt_num(data.loc[t, 'count'])} de {fmt_num(data.loc[t, 'n'])} ({fmt_pct(data.loc[t, 'share'], 0)})"
            if data.loc[t, "n"] else "—" for t in ERROR_TAGS]
    return table.rename_axis("Etiqueta")


def merge_table(report: dict) -> pd.DataFrame:
    """The merge check in Spanish (es-AR numbers)."""
    check = report["merged_vs_adapter"]
    rows = {
        "carpeta": _shown_path(report["folder"]), "tipo de dato": report["dtype"], "dispositivo": report["device"],
        "tamaño de los pesos": f"{fmt_num(report['safetensors_gib'], 3)} GiB",
        "ejemplos de la verificación": fmt_num(report["probe_chats"]),
        "diferencia media de logits (fusionado − adaptador)": fmt_num(check["mean_abs_diff"], 5),
        "diferencia máxima de logits": fmt_num(check["max_abs_diff"], 4),
        "en unidades del redondeo del tipo": fmt_num(report["rounding_units"], 2),
        "tolerancia (unidades)": fmt_num(report["rtol"], 1),
        "mismo token más probable": fmt_pct(check["top1_agreement"], 1),
        "verificación": "aprobada" if report["passed"] else "fallida",
    }
    if "merged_vs_evaluated_model" in report:  # the model notebook 05 evaluated: 4-bit or not, its own dtype
        rows["diferencia media de logits con el modelo evaluado (su cuantización y su tipo de dato)"] = fmt_num(
            report["merged_vs_evaluated_model"]["mean_abs_diff"], 5)
    return pd.Series(rows).to_frame("valor")


def _shown_path(path: str) -> str:
    """A folder as a reader should see it: relative to the repository when inside it (no build machine's path)."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def gguf_table(report: dict) -> pd.DataFrame:
    """Per GGUF type: file, size, export seconds and the round-trip numbers against the merged model (es-AR)."""
    rows = {}
    for type_name, info in report["files"].items():
        trip = report.get("roundtrip", {}).get(type_name, {})
        rows[type_name] = {
            "archivo": Path(info["path"]).name, "tamaño": f"{fmt_num(info['gib'], 3)} GiB",
            "exportación": f"{fmt_num(info['seconds'], 1)} s",
            "diferencia máxima de logits": fmt_num(trip.get("max_abs_diff"), 4),
            "diferencia máxima relativa al mayor logit": fmt_pct(trip.get("max_rel_diff"), 2),
            "mismo token más probable": fmt_pct(trip.get("top1_agreement"), 1),
            "respuestas voraces idénticas": fmt_pct(trip.get("greedy_agreement"), 0),
            "tokenización idéntica": fmt_pct(trip.get("tokenizer_agreement"), 0),
            "verificación": ("aprobada" if trip.get("passed") else "fallida") if trip else "—",
        }
    table = pd.DataFrame(rows)
    table.columns = [c.upper() for c in table.columns]
    return table.rename_axis("Tipo de GGUF")


def gpu_heading(name: str, result: dict) -> str:
    """A Markdown heading that labels a committed GPU run as such: name, model, test size, where and when measured."""
    identity = result["identity"]
    details = [f"modelo {label(str(identity.get('model_name')))}",
               f"{fmt_num(identity.get('n_test_records'))} preguntas de prueba", gpu_source(result, "05")]
    return (f"#### Corrida de GPU «{name}» (publicada en results/{name}/, no es de esta ejecución)\n\n"
            + "; ".join(details))
