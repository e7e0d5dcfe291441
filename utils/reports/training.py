"""Notebook 04's prose: what a training run's numbers show (Spanish Markdown), and the label table as HTML."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import pandas as pd

from utils.training import TrainingPlan, TrainingSettings


def labels_html(table: pd.DataFrame) -> str:
    """HTML of a label table: grey = masked (-100), green = carries loss."""
    spans = []
    for token, trained in zip(table["token"], table["con_pérdida"]):
        style = "background:#b7e4c7;" if trained else "background:#e9ecef;color:#6c757d;"
        shown = html.escape(token).replace("\n", "↵<br>")
        spans.append(f'<span style="{style}border-right:1px solid #fff;font-family:monospace">{shown}</span>')
    return "<div style='line-height:1.9'>" + "".join(spans) + "</div>"


def _run_lines(plan: TrainingPlan, result: dict[str, Any]) -> list[str]:
    """Steps, speed and peak memory; the train and eval loss from first to last."""
    lines = [
        f"- Se entrenaron **{result['global_step']} pasos** en `{plan.device}` en {result['train_seconds']:.0f} s "
        f"(**{result['tokens_per_second']} tokens/s** sin contar relleno; pico de memoria "
        f"{result['peak_memory_gib']} GiB, {result['peak_memory_kind']})."
    ]
    if result["first_train_loss"] is not None and result["last_train_loss"] is not None:
        lines.append(f"- Pérdida de entrenamiento: **{result['first_train_loss']:.3f} → {result['last_train_loss']:.3f}**.")
    first, last = result["first_eval_loss"], result["last_eval_loss"]
    if first is not None and last is not None:
        change = 100 * (last - first) / first
        verdict = "baja" if last < first else "no baja"
        lines.append(f"- Pérdida de evaluación (test): **{first:.3f} → {last:.3f}** ({change:+.1f}%): {verdict}.")
    return lines


def _labels_line(labels: dict[str, Any]) -> str:
    """Which tokens of the decoded example carry loss, and whether the closing EOS is among them."""
    return (
        f"- En el ejemplo decodificado, {labels['tokens_con_pérdida']} de {labels['tokens']} tokens llevan pérdida; "
        + ("entre ellos el EOS que cierra la respuesta, así que el modelo aprende a cortar."
           if labels["eos_final_con_pérdida"] else "**el EOS que cierra la respuesta no lleva pérdida**: el modelo "
           "no aprende a cortar.")
        + f" pad = eos: {labels['pad_es_eos']}; BOS por ejemplo: {labels['bos']}."
    )


def _stop_line(stop_summary: pd.DataFrame) -> str:
    """How many answers end with EOS, base against tuned."""
    rates = stop_summary.set_index("modelo")
    n = int(rates.loc["ajustado", "preguntas"])
    return (
        f"- Con `max_new_tokens = {int(rates.loc['ajustado', 'max_new_tokens'])}`, el modelo base termina con EOS "
        f"en **{int(rates.loc['base', 'terminan_con_eos'])}/{n}** respuestas y el ajustado en "
        f"**{int(rates.loc['ajustado', 'terminan_con_eos'])}/{n}**."
    )


def _clipping_line(history: pd.DataFrame, max_grad_norm: float) -> str:
    """How often the gradient norm went over ``max_grad_norm`` (so clipping set the step size)."""
    norms = history["grad_norm"].dropna()
    clipped = int((norms > max_grad_norm).sum())
    mostly = clipped > 0.8 * len(norms)
    return (
        f"- La norma del gradiente superó `max_grad_norm = {max_grad_norm:g}` en **{clipped} de "
        f"{len(norms)}** pasos registrados (mediana {norms.median():.2f}): el recorte actuó "
        + ("en todos" if clipped == len(norms) else "en casi todos" if mostly else "sólo en algunos")
        + (", así que fija el tamaño de cada paso junto con la tasa de aprendizaje." if mostly else ".")
    )


def _setup_lines(settings: TrainingSettings, plan: TrainingPlan, result: dict[str, Any]) -> list[str]:
    """Precision, optimiser, and what this machine changed from the settings (CPU fallbacks, recast, resume)."""
    dtypes = ", ".join(f"{k}" for k in result["trainable_dtypes"])
    lines = [f"- Parámetros entrenables en {dtypes}; precisión de cómputo {plan.compute_dtype}, optimizador "
             f"`{plan.optim}`."]
    if plan.optim != settings.optim:
        lines.append(f"- `{settings.optim}` necesita CUDA: en `{plan.device}` se usó `{plan.optim}`.")
    if settings.quantization == "auto" and plan.quantization is None:
        lines.append("- En CPU el modelo base se entrenó sin cuantizar (fp32); en GPU `auto` usa NF4 con doble "
                     "cuantización, como el original.")
    if plan.recast_trainable_fp32:
        lines.append("- Cómputo fp16: los parámetros entrenables se devolvieron a fp32 después de construir el "
                     "trainer, y el escalador de gradientes funcionó.")
    if plan.resume_from:
        lines.append(f"- La corrida continuó desde `{Path(plan.resume_from).name}`.")
    return lines


def describe_run(settings: TrainingSettings, plan: TrainingPlan, result: dict[str, Any], labels: dict[str, Any],
                 stop_summary: pd.DataFrame | None = None, history: pd.DataFrame | None = None) -> str:
    """Markdown bullets (Spanish) stating what this run's numbers show, for the closing section."""
    lines = _run_lines(plan, result)
    lines.append(_labels_line(labels))
    if stop_summary is not None and len(stop_summary):
        lines.append(_stop_line(stop_summary))
    if history is not None and "grad_norm" in history:
        lines.append(_clipping_line(history, settings.max_grad_norm))
    lines.extend(_setup_lines(settings, plan, result))
    return "\n".join(lines)
