"""Notebook 04's prose: what a training run's numbers show (Spanish Markdown, es-AR numbers), the label table as
HTML, the time estimate for the RTX 2070 SUPER as a table, and what the GPU campaign measured."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from utils.numbers import fmt_num, fmt_pct, fmt_unit
from utils.training import TrainingPlan, TrainingSettings


def labels_html(table: pd.DataFrame) -> str:
    """HTML of a label table: grey = masked (-100), blue = carries loss (colour-blind safe)."""
    spans = []
    for token, trained in zip(table["token"], table["con_pérdida"]):
        style = "background:#b3d7f0;" if trained else "background:#e9ecef;color:#6c757d;"
        shown = html.escape(token).replace("\n", "↵<br>")
        spans.append(f'<span style="{style}border-right:1px solid #fff;font-family:monospace">{shown}</span>')
    return "<div style='line-height:1.9'>" + "".join(spans) + "</div>"


def _run_lines(plan: TrainingPlan, result: dict[str, Any]) -> list[str]:
    """Steps, speed and peak memory; the training and validation loss from first to last, and their minimum."""
    lines = [
        f"- Se entrenaron **{fmt_num(result['global_step'])} pasos** en `{plan.device}` en "
        f"{fmt_unit(result['train_seconds'], 's')} (**{fmt_num(result['tokens_per_second'], 1)} tokens/s** sin contar "
        f"relleno; pico de memoria {fmt_unit(result['peak_memory_gib'], 'GiB', 2)})."
    ]
    if result["first_train_loss"] is not None and result["last_train_loss"] is not None:
        lines.append(f"- Pérdida de entrenamiento: **{fmt_num(result['first_train_loss'], 3)} → "
                     f"{fmt_num(result['last_train_loss'], 3)}**.")
    first, last = result["first_eval_loss"], result["last_eval_loss"]
    if first is not None and last is not None:
        change = (last - first) / first
        verdict = "baja" if last < first else "no baja"
        lines.append(f"- Pérdida de validación: **{fmt_num(first, 3)} → {fmt_num(last, 3)}** "
                     f"({fmt_pct(change, 1, signed=True)}): {verdict}.")
    best_step, best_loss = result.get("best_eval_step"), result.get("best_eval_loss")
    if best_step is not None and best_loss is not None and best_step != result["global_step"] and last is not None:
        rise = last - best_loss
        lines.append(f"- El mínimo de la pérdida de validación fue {fmt_num(best_loss, 3)} en el paso "
                     f"{fmt_num(best_step)}, antes del último, y terminó en {fmt_num(last, 3)} "
                     f"({fmt_pct(rise / best_loss, 1, signed=True)}): "
                     + ("se aplanó sin subir de forma apreciable." if rise < FLAT_RISE * best_loss else
                        "a partir de ahí el modelo se ajusta al conjunto de entrenamiento más que a preguntas nuevas."))
    if result.get("stopped_early"):
        lines.append(f"- La detención temprana cortó la corrida en el paso {fmt_num(result['global_step'])} de "
                     f"{fmt_num(result['max_steps'])}; el adaptador guardado es el del paso "
                     f"{fmt_num(result['adapter_step'])}, el de menor pérdida de validación.")
    return lines


def _labels_line(labels: dict[str, Any]) -> str:
    """Which tokens of the decoded example carry loss, and whether the closing EOS is among them."""
    return (
        f"- En el ejemplo decodificado, {fmt_num(labels['tokens_con_pérdida'])} de {fmt_num(labels['tokens'])} "
        "tokens llevan pérdida; "
        + ("entre ellos el EOS que cierra la respuesta, así que el modelo aprende a cortar."
           if labels["eos_final_con_pérdida"] else "**el EOS que cierra la respuesta no lleva pérdida**: el modelo "
           "no aprende a cortar.")
        + f" Pad igual a EOS: {'sí' if labels['pad_es_eos'] else 'no'}; BOS por ejemplo: {fmt_num(labels['bos'])}."
    )


def _stop_line(stop_summary: pd.DataFrame) -> str:
    """How many validation answers end with EOS, base against tuned."""
    rates = stop_summary.set_index("modelo")
    n = int(rates.loc["ajustado", "preguntas"])
    return (
        f"- Con `max_new_tokens = {int(rates.loc['ajustado', 'max_new_tokens'])}`, sobre preguntas de validación, el "
        f"modelo base termina con EOS en **{fmt_num(int(rates.loc['base', 'terminan_con_eos']))} de {fmt_num(n)}** "
        f"respuestas y el ajustado en **{fmt_num(int(rates.loc['ajustado', 'terminan_con_eos']))} de {fmt_num(n)}**."
    )


def _clipping_line(history: pd.DataFrame, max_grad_norm: float) -> str:
    """How often the gradient norm went over ``max_grad_norm`` (so clipping set the step size)."""
    norms = history["grad_norm"].dropna()
    clipped = int((norms > max_grad_norm).sum())
    mostly = clipped > 0.8 * len(norms)
    return (
        f"- La norma del gradiente superó `max_grad_norm = {fmt_num(max_grad_norm, 2)}` en **{fmt_num(clipped)} de "
        f"{fmt_num(len(norms))}** pasos registrados (mediana {fmt_num(norms.median(), 2)}): el recorte actuó "
        + ("en todos" if clipped == len(norms) else "en casi todos" if mostly else "solo en algunos")
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


# --------------------------------------------------------------------------------------------
# The time estimate for the RTX 2070 SUPER (utils.training.estimate)
# --------------------------------------------------------------------------------------------

RECIPES = {"original": "configuración original", "fast_path": "camino rápido"}
WORKLOADS = {"corpus": "corpus incluido", "max_length": "512 tokens por ejemplo"}


def _range(low: float, high: float, decimals: int) -> str:
    """``a–b`` in es-AR (one number when both round the same)."""
    a, b = fmt_num(low, decimals), fmt_num(high, decimals)
    return a if a == b else f"{a}–{b}"


def estimate_table(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The estimate as a Spanish table, numbers formatted es-AR (one row per configuration and workload)."""
    return pd.DataFrame([{
        "configuración": RECIPES[r["recipe"]],
        "ejemplos": WORKLOADS[r["workload"]],
        "tokens por paso": fmt_num(r["tokens_per_step"]),
        "GFLOP por token": fmt_num(r["gflop_per_token"], 1),
        "TFLOP por paso": fmt_num(r["tflop_per_step"], 1),
        "GB descuantizados por paso": fmt_num(r["dequant_gb_per_step"], 0),
        "s de GPU por paso": _range(r["gpu_s_low"], r["gpu_s_high"], 2),
        "piso de la CPU (s por paso)": _range(r["host_s_low"], r["host_s_high"], 2),
        "s por paso": _range(r["step_s_low"], r["step_s_high"], 2),
        f"horas para {fmt_num(r['steps'])} pasos": _range(r["hours_low"], r["hours_high"], 2),
    } for r in rows])


def describe_estimate(rows: Sequence[dict[str, Any]], peak_tflops: float, card: str) -> str:
    """What the estimate says about the seed's "2–3 h" (Spanish Markdown bullets)."""
    by = {(r["recipe"], r["workload"]): r for r in rows}
    corpus_o, corpus_f = by[("original", "corpus")], by[("fast_path", "corpus")]
    long_o = by[("original", "max_length")]
    return "\n".join([
        f"- **Es una estimación, no una medición**: nadie corrió esto en una {card}. Pico usado: "
        f"{fmt_unit(peak_tflops, 'TFLOPS', 1)} fp16 con acumulación en fp32; utilización entre "
        f"{fmt_pct(corpus_o['utilisation_low'], 0)} (supuesta) y {fmt_pct(corpus_o['utilisation_high'], 0)} (medida "
        "en la H200).",
        f"- Con los ejemplos del corpus incluido ({fmt_num(corpus_o['tokens_per_step'])} tokens por paso), la "
        f"configuración original tardaría **{_range(corpus_o['hours_low'], corpus_o['hours_high'], 1)} h** en "
        f"{fmt_num(corpus_o['steps'])} pasos y el camino rápido **{_range(corpus_f['hours_low'], corpus_f['hours_high'], 1)} h**.",
        f"- Con todos los ejemplos en el máximo de 512 tokens, la original quedaría en "
        f"{_range(long_o['hours_low'], long_o['hours_high'], 1)} h. "
        + ("Las «2–3 horas» del script original piden una utilización menor que la supuesta, ejemplos más largos que "
           "los de este corpus o demoras que la estimación no incluye (el controlador de pantalla de Windows, el "
           "optimizador paginado escribiendo a la memoria del sistema, una GPU que baja su frecuencia por temperatura)."
           if long_o["hours_high"] < 2 else
           "Las «2–3 horas» del script original caen dentro de lo estimado para ejemplos largos."),
    ])


# --------------------------------------------------------------------------------------------
# The GPU campaign (results/04_gpu_campaign.json)
# --------------------------------------------------------------------------------------------


def campaign_source(summary: dict[str, Any]) -> str:
    """``medido en GPU NVIDIA H200, 2026-12-02``: where and when the campaign's numbers come from."""
    return f"medido en GPU {summary['device_name']}, {str(summary['date'])[:10]}"


def step_autocorrelation(history: pd.DataFrame, window: int = 51) -> float:
    """Lag-1 autocorrelation of the training loss minus its centred moving mean: ~0 for independent batches,
    near 1 when the loss moves in blocks (the length-grouped sampler's saw-tooth)."""
    loss = history.dropna(subset=["loss"])["loss"].reset_index(drop=True)
    detrended = loss - loss.rolling(window, center=True, min_periods=1).mean()
    return float(detrended.autocorr(1))


# A validation loss that ends less than this fraction above its minimum has flattened rather than turned up: two
# seeds of the thesis recipe end further apart than that (results/gpu and results/gpu-auto-s43).
FLAT_RISE = 0.01


def validation_turn(steps: Sequence[float], losses: Sequence[float]) -> dict[str, Any]:
    """Where the validation loss is lowest and what it does after: ``trend`` is "falling" (lowest at the last
    evaluation), "flat" (it ends less than ``FLAT_RISE`` above its minimum) or "rising"; ``rise`` is last − lowest."""
    evals = pd.DataFrame({"step": list(steps), "loss": list(losses)}).dropna().sort_values("step")
    best = evals.loc[evals["loss"].idxmin()]
    last = evals.iloc[-1]
    rise = float(last["loss"] - best["loss"])
    trend = ("falling" if best["step"] >= last["step"] else "flat" if rise < FLAT_RISE * float(best["loss"])
             else "rising")
    return {"best_step": int(best["step"]), "best_loss": float(best["loss"]), "last_step": int(last["step"]),
            "last_loss": float(last["loss"]), "rise": rise, "trend": trend}


def describe_turn(turn: dict[str, Any], train_loss: float, decimals: int = 3, epoch: float | None = None) -> str:
    """What the validation loss did, against the training loss, in Spanish (no leading capital, no final period).

    A training loss below the validation loss is expected (the model sees those answers) and is not by itself
    overfitting; overfitting is validation rising while training keeps falling.
    """
    step = f"el paso {fmt_num(turn['best_step'])}"
    epoch_text = f"época {fmt_num(epoch, 1)}" if epoch is not None else ""
    at = step + (f" ({epoch_text})" if epoch_text else "")
    best, last = fmt_num(turn["best_loss"], decimals), fmt_num(turn["last_loss"], decimals)
    train = f"la de entrenamiento termina en {fmt_num(train_loss, decimals)}"
    if turn["trend"] == "falling":
        where = step + (f", {epoch_text}" if epoch_text else "")
        gap = ("que la de entrenamiento quede más abajo no es sobreajuste mientras la de validación siga bajando; "
               if train_loss < turn["last_loss"] else "")
        return (f"la pérdida de validación baja hasta la última evaluación ({best} en {where}) y {train}: {gap}no "
                "aparece sobreajuste dentro de esta corrida")
    change = fmt_pct(turn["rise"] / turn["best_loss"], 1, signed=True)
    if turn["trend"] == "flat":
        return (f"la pérdida de validación llega a su mínimo ({best}) en {at} y termina en {last} ({change}) "
                f"mientras {train}: se aplana sin subir de forma apreciable, así que más pasos ya casi no la mejoran, "
                "pero tampoco aparece sobreajuste dentro de esta corrida")
    return (f"la pérdida de validación llega a su mínimo ({best}) en {at} y después sube hasta {last} ({change}) "
            f"mientras {train}: desde ese paso, más pasos ajustan el entrenamiento sin mejorar en preguntas nuevas "
            "(sobreajuste)")


def _epoch_at(history: pd.DataFrame, step: int) -> float | None:
    """The epoch the history logged nearest to ``step`` (None when it logged none)."""
    epochs = history.dropna(subset=["epoch"]) if "epoch" in history else history.iloc[:0]
    return float(epochs.loc[(epochs["step"] - step).abs().idxmin(), "epoch"]) if len(epochs) else None


def _short_commit(commit: str) -> str:
    """``d533af8-dirty`` as recorded; a full hash cut to 12 characters, its suffix kept."""
    sha, _, suffix = commit.partition("-")
    return sha[:12] + (f"-{suffix}" if suffix else "")


def _batch(settings: dict[str, Any]) -> str:
    """``1 × 2``: examples per micro-batch × micro-batches per step, as the run's settings say."""
    return f"{settings['per_device_train_batch_size']} × {settings['gradient_accumulation_steps']}"


def describe_campaign(summary: dict[str, Any]) -> str:
    """What the campaign measured: whether and where validation loss stops falling, and the sampler's saw-tooth
    (Spanish; steps, batch, evaluation interval and epochs read from the summary)."""
    lines = [f"- Corridas de `results/04_gpu_campaign.json`, {campaign_source(summary)} "
             f"(commit {', '.join(_short_commit(c) for c in summary['commits'])})."]
    run = summary["runs"].get("validation_2000")
    if run:
        history = pd.DataFrame(run["history"])
        evals, train = _logged_rows(history, "eval_loss"), _logged_rows(history, "loss")
        if len(evals) and len(train):
            settings = run["settings"]
            turn = validation_turn(evals["step"], evals["eval_loss"])
            last_epoch = _epoch_at(history, int(history["step"].max()))
            lines.append(
                f"- Receta de la tesis, {fmt_num(settings['max_steps'])} pasos de {_batch(settings)} ejemplos"
                + (f" ({fmt_num(last_epoch, 1)} épocas del corpus)" if last_epoch is not None else "")
                + (f", validación cada {fmt_num(settings['eval_steps'])} pasos" if settings.get("eval_steps") else "")
                + f": {describe_turn(turn, float(train['loss'].iloc[-1]), 3, _epoch_at(history, turn['best_step']))}.")
    sawtooth = [summary["runs"].get(k) for k in ("random", "group_by_length")]
    if all(sawtooth):
        random_r, grouped_r = (step_autocorrelation(pd.DataFrame(r["history"])) for r in sawtooth)
        verdict = ("la pérdida sube y baja en bloques con el largo de los ejemplos, no con el aprendizaje (el diente "
                   "de sierra)" if grouped_r - random_r > 0.2 else "no aparece un diente de sierra marcado")
        settings = sawtooth[0]["settings"]
        lines.append(
            f"- Muestreo, {fmt_num(settings['max_steps'])} pasos con los micro-lotes del original "
            f"({_batch(settings)}): la autocorrelación de la pérdida entre pasos consecutivos (sin la tendencia) es "
            f"{fmt_num(random_r, 2)} con lotes aleatorios y {fmt_num(grouped_r, 2)} agrupando por longitud: {verdict}.")
    return "\n".join(lines)


def _logged_rows(history: pd.DataFrame, column: str) -> pd.DataFrame:
    """The rows of ``history`` that logged ``column`` (none when the column is missing)."""
    return history.dropna(subset=[column]) if column in history else history.iloc[:0]


def utilisation_table(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The H200 corpus rows: tokens and seconds per step, and the fraction of the peak the products reached."""
    names = {"original_corpus_fp16": "configuración original (2 × 1, fp16)",
             "fast_2x1_corpus_fp16": "camino rápido (2 × 1, fp16)",
             "fast_mb32_corpus_bf16": "camino rápido (micro-lote 32, bf16)"}
    return pd.DataFrame([{"configuración (corpus, H200)": names[r["name"]],
                          "tokens por paso": fmt_num(r["tokens_per_step"], 1),
                          "s por paso": fmt_num(r["seconds_per_step"], 3),
                          "fracción del pico": fmt_pct(r["utilisation"], 1)} for r in rows])


# --------------------------------------------------------------------------------------------
# Tables shown in the notebook: every number in es-AR
# --------------------------------------------------------------------------------------------


def fmt_value(value: Any) -> Any:
    """A table cell as an Argentine reader reads it: integers grouped, decimals with a comma (up to 6, trimmed),
    booleans as sí/no, a missing value as a dash, a dict as ``key: value`` pairs; text and other objects unchanged."""
    if isinstance(value, bool):
        return "sí" if value else "no"
    if value is None or isinstance(value, float) and value != value:
        return "—"
    if isinstance(value, dict):  # e.g. trainable parameters per dtype: fp32: 9.768.960
        return "; ".join(f"{k}: {fmt_value(v)}" for k, v in value.items())
    if not isinstance(value, (int, float)):
        return value
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1:
        return fmt_num(value)
    if value and abs(value) < 1e-4:  # a learning rate near the end of its decay: 1,50e-07
        return f"{value:.2e}".replace(".", ",")
    text = fmt_num(value, 6)
    return text.rstrip("0").rstrip(",") if "," in text else text


def format_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with every numeric cell formatted by ``fmt_value`` and its columns by their Spanish names
    (``COLUMN_NAMES``), for display; the data stay numbers."""
    return frame.apply(lambda column: column.map(fmt_value)).rename(columns=COLUMN_NAMES)


# Spanish names of the keys notebook 04 shows as tables (the memory estimate, the run's result)
TABLE_NAMES = {
    "weights_gib": "pesos", "lora_params_gib": "parámetros LoRA", "lora_grads_gib": "gradientes LoRA",
    "optimizer_states_gib": "estados del optimizador", "lm_head_cast_gib": "copia de lm_head en fp32",
    "checkpoints_gib": "entradas guardadas por el checkpointing", "layer_activations_gib": "activaciones de las capas",
    "logits_gib": "logits", "optimizer_paged_gib": "optimizador paginado a la CPU", "total_gib": "total estimado",
    "budget_gib": "memoria disponible",
    "global_step": "pasos", "resumed_from": "continuó desde", "train_seconds": "segundos de entrenamiento",
    "train_runtime_s": "segundos según el trainer", "tokens_trained": "tokens entrenados (sin relleno)",
    "tokens_per_second": "tokens por segundo", "steady_tokens_per_second": "tokens por segundo (régimen)",
    "world_size": "procesos", "peak_memory_gib": "pico de memoria (GiB)", "peak_memory_kind": "cómo se midió el pico",
    "first_train_loss": "primera pérdida de entrenamiento", "last_train_loss": "última pérdida de entrenamiento",
    "first_eval_loss": "primera pérdida de validación", "last_eval_loss": "última pérdida de validación",
    "best_eval_step": "paso de la menor pérdida de validación", "best_eval_loss": "menor pérdida de validación",
    "max_steps": "pasos pedidos", "stopped_early": "detención temprana", "adapter_step": "paso del adaptador guardado",
    "trainable_dtypes": "parámetros entrenables por tipo",
    # the decoded example's label facts (utils.training.inspect.describe_labels)
    "tokens": "tokens del ejemplo", "tokens_con_pérdida": "tokens con pérdida",
    "texto_con_pérdida": "texto con pérdida", "texto_enmascarado": "texto enmascarado",
    "eos_en_el_ejemplo": "EOS en el ejemplo", "eos_con_pérdida": "EOS con pérdida",
    "eos_final_con_pérdida": "el EOS final lleva pérdida", "bos": "BOS en el ejemplo", "pad_es_eos": "pad igual a EOS",
}
# Column names of the stop-rate tables (utils.training.inspect.compare_stop_rates) as the notebook shows them
COLUMN_NAMES = {"terminan_con_eos": "terminan con EOS", "tasa_de_corte": "tasa de corte",
                "tokens_nuevos_mediana": "tokens nuevos (mediana)", "tokens_nuevos": "tokens nuevos"}
VALUE_NAMES = {"max_memory_allocated": "máximo asignado por PyTorch en la GPU",
               "peak RSS of the process": "memoria residente máxima del proceso"}


def values_table(values: dict[str, Any], column: str = "valor") -> pd.DataFrame:
    """A dict as a one-column table: keys by their Spanish name (``TABLE_NAMES``), numbers in es-AR."""
    shown = [VALUE_NAMES.get(v, v) if isinstance(v, str) else fmt_value(v) for v in values.values()]
    return pd.DataFrame({column: shown}, index=[TABLE_NAMES.get(k, k) for k in values])
