"""Notebook 05 in words: the findings (Spanish Markdown), a picked example in HTML, the LaTeX preview."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from utils.evaluation import METRICS, highlight_keywords
from utils.files import read_json
from utils.modeling import ModelNotAvailableError, resolve_model
from utils.paths import CONFIG_FILE, HISTORY_FILE


def _verdict(get: pd.DataFrame, metric: str, confidence: float) -> str:
    """One Markdown bullet: base and tuned values of ``metric``, what tuning did and what the CI says."""
    label, higher = METRICS[metric]
    base, tuned, delta = (get.loc[(m, metric)] for m in ("base", "tuned", "delta"))
    better = delta["value"] > 0 if higher else delta["value"] < 0
    sure = delta["low"] > 0 or delta["high"] < 0
    word = "mejora" if better else ("no cambia" if delta["value"] == 0 else "empeora")
    if higher is None:
        word = ("alarga las respuestas" if delta["value"] > 0 else "acorta las respuestas"
                if delta["value"] < 0 else "no cambia la longitud")
        if ("reference", metric) in get.index:
            word += f" (referencia: {get.loc[('reference', metric), 'value']:.1f})"
    ci = (f"IC {confidence:.0%} de la diferencia [{delta['low']:+.3f}, {delta['high']:+.3f}]"
          + (", que excluye el 0" if sure else ", que incluye el 0: con este test la diferencia no es concluyente"))
    if delta["low"] == delta["high"] == delta["value"] == 0:
        ci = "el mismo valor por pregunta en ambos modelos"
    return (f"- **{label}**: base {base['value']:.3f}, ajustado {tuned['value']:.3f} → el ajuste "
            f"**{word}** ({ci}).")


def describe_results(summary: pd.DataFrame, confidence: float = 0.95) -> str:
    """Spanish Markdown bullets stating, metric by metric, whether tuning helped (and if the CI says so)."""
    get = summary.set_index(["model", "metric"])
    lines = [_verdict(get, metric, confidence) for metric in METRICS
             if all((m, metric) in get.index for m in ("base", "tuned", "delta"))]
    return "\n".join(lines)


def _training_facts(run: Path | None) -> str | None:
    """"N pasos (E épocas) sobre <modelo>" from a run's 04_config.json and 04_log_history.csv."""
    if run is None or not (Path(run) / CONFIG_FILE).is_file():
        return None
    config = read_json(Path(run) / CONFIG_FILE)
    steps = (config.get("parameters") or {}).get("max_steps")
    text = f"{steps} pasos de optimización" if steps else "el entrenamiento de la notebook 04"
    history = Path(run) / HISTORY_FILE
    if history.is_file():
        epochs = pd.read_csv(history).get("epoch")
        if epochs is not None and epochs.notna().any():
            text += f" ({epochs.max():.2f} épocas)"
    try:
        label = resolve_model(config.get("model_name", "")).label
    except ModelNotAvailableError:
        label = config.get("model_name")
    return text + f" sobre {label}"


def _failure_reasons(get: pd.Series, failed: list[str], run: Path | None) -> list[str]:
    """Why the tuned model does not beat the base on the ``failed`` metrics, as the numbers tell it."""

    def pair(metric: str, fmt: str = ".3f") -> str:
        return f"{get[('base', metric)]:{fmt}} → {get[('tuned', metric)]:{fmt}}"

    reasons = []
    if "keyword_recall" in failed:
        if ("delta", "loss") in get.index and get[("delta", "loss")] >= 0:
            reasons.append(f"la pérdida de test no bajó ({pair('loss')} nats/token): el adaptador no aprendió las "
                           "respuestas de referencia")
        else:
            reasons.append(f"la pérdida de test bajó ({pair('loss')} nats/token), pero generando solo el modelo "
                           "todavía no da los datos de la referencia")
    if "refusal_accuracy" in failed and ("tuned", "refusal_oos") in get.index:
        reasons.append(
            f"en las preguntas fuera de alcance rechaza y deriva correctamente {pair('refusal_oos', '.0%')}, y en "
            f"las respondibles rechaza indebidamente {pair('wrongful_refusal', '.0%')}"
            + (": aprendió la fórmula «la normativa disponible no establece» pero la aplica también a preguntas "
               "que sí tienen respuesta" if get[("delta", "wrongful_refusal")] > 0 else "")
            + ("; y casi nunca termina derivando a la Secretaría Académica"
               if get[("tuned", "refusal_oos")] < 0.5 else "")
        )
    if failed and ("tuned", "stop_rate") in get.index and get[("tuned", "stop_rate")] < 0.5:
        reasons.append(f"el modelo ajustado termina con EOS sólo en el {get[('tuned', 'stop_rate')]:.0%} de las "
                       "respuestas: las cortadas por max_new_tokens pierden contenido")
    facts = _training_facts(run)
    if failed and facts:
        reasons.append(f"el adaptador viene de {facts}: más pasos o un modelo base más capaz son las "
                       "palancas a probar")
    return reasons


def acceptance_statement(summary: pd.DataFrame, run: Path | None = None) -> str:
    """Plain statement (Spanish) of whether the tuned model beats the base on keyword recall and refusal
    accuracy, and, where it does not, what the numbers say about why (``run``: the 04 outputs)."""
    table = summary.set_index(["model", "metric"])
    get = table["value"]
    parts, failed = [], []
    for metric in ("keyword_recall", "refusal_accuracy"):
        if ("delta", metric) not in get.index:
            continue
        label = METRICS[metric][0].lower()
        beats = get[("delta", metric)] > 0
        failed += [] if beats else [metric]
        low, high = table.loc[("delta", metric), ["low", "high"]]
        unsure = ", aunque el IC de la diferencia incluye el 0: no es concluyente" if low <= 0 <= high else ""
        pair = f"{get[('base', metric)]:.3f} → {get[('tuned', metric)]:.3f}"
        parts.append(f"{'supera' if beats else '**no** supera'} al base en {label} ({pair}{unsure})")
    text = "El modelo ajustado " + " y ".join(parts) + "."
    reasons = _failure_reasons(get, failed, run)
    if reasons:
        text += " Por qué, según los números: " + "; ".join(reasons) + "."
    return text


def example_html(prediction: dict, role: str, delta: float) -> str:
    """One picked example in full: question, reference and both answers, keywords highlighted."""
    keywords = prediction["keywords"]

    def block(title: str, text: str, extra: str = "") -> str:
        return (f"<p style='margin:0.3em 0'><b>{title}</b>{extra}</p><div style='white-space:pre-wrap;"
                f"border-left:3px solid #ccc;padding-left:0.6em'>{highlight_keywords(text, keywords)}</div>")

    def ending(name: str) -> str:
        tokens, stopped = prediction[f"tokens_{name}"], prediction[f"stopped_{name}"]
        return f" — {tokens} tokens, {'terminó con EOS' if stopped else 'cortada por max_new_tokens'}"

    head = (f"<h4>{html.escape(role.capitalize())}: {html.escape(prediction['id'])} "
            f"({html.escape(str(prediction['kind']))}, {html.escape(str(prediction['topic']))}; "
            f"Δ calidad = {delta:+.3f})</h4>")
    return (head + block("Pregunta", prediction["question"]) + block("Referencia", prediction["reference"])
            + block("Base", prediction["answer_base"], ending("base"))
            + block("Ajustado", prediction["answer_tuned"], ending("tuned")))


def latex_preview(path: Path, lines: int = 24) -> str:
    """Markdown code block with the first ``lines`` lines of a ``.tex`` file (and how many follow)."""
    text = Path(path).read_text(encoding="utf-8").splitlines()
    rest = f"\n% … {len(text) - lines} líneas más en {Path(path).name}" if len(text) > lines else ""
    return "```latex\n" + "\n".join(text[:lines]) + rest + "\n```"
