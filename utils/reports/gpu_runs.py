"""The committed GPU runs beside this run: tables, figures and the Spanish text of notebooks 04 and 05.

The runs are the folders ``results/<run>/`` that ``python -m utils.runner --profile gpu ... --publish`` writes
(``utils.evaluation.runs.collect_gpu_results`` reads them); the learning curve comes from the recipe sweep on
validation (``results/04_recipe_sweep_gpu.json``). Every function works on whatever is there and says in one
Spanish line what is missing, so the notebooks run the same before and after the GPU campaign.
"""

from __future__ import annotations

import math
import textwrap
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd

from utils.evaluation.metrics import METRICS
from utils.evaluation.runs import gpu_source, seed_noise_check
from utils.numbers import fmt_num, fmt_pct
from utils.plotting import COLORS, CYCLE, legend_outside, new_figure
from utils.reports.training import describe_turn, validation_turn
from utils.training import profile_settings

# Issue #17's targets on the test set: out-of-scope refusals at least 50 %, wrongful refusals at most 10 %, and
# the tuned model's keyword recall above the base model's (the interval of the difference above 0).
TARGETS = {"refusal_oos": 0.5, "wrongful_refusal": 0.10, "keyword_recall": 0.0}
TARGET_PANELS = (("tuned", "refusal_oos"), ("tuned", "wrongful_refusal"), ("delta", "keyword_recall"))
MARKERS = ("o", "s", "^", "D", "v", "P")
LOSS_LABEL = "Pérdida (nats/token)"
STEP_LABEL = "Paso de optimización"
TARGET_STYLE = {"color": COLORS["budget"], "linestyle": "--", "linewidth": 0.8}


def _run_style(k: int) -> tuple[str, str]:
    """Colour and marker of the k-th run (the marker varies too: no finding by colour alone)."""
    return CYCLE[k % len(CYCLE)], MARKERS[k % len(MARKERS)]


def _row(summary: pd.DataFrame, model: str, metric: str) -> pd.Series | None:
    rows = summary[(summary["model"] == model) & (summary["metric"] == metric)] if len(summary) else summary
    return rows.iloc[0] if len(rows) else None


def plot_gpu_targets(summaries: dict[str, pd.DataFrame]) -> plt.Figure:
    """One panel per target of issue #17 (tuned refusals out of scope, tuned wrongful refusals, tuned − base
    keyword recall): each run's value as a dot with its bootstrap interval, the target as a dashed line."""
    runs = [name for name, s in summaries.items() if len(s)]
    fig, axes = new_figure("full", aspect=0.36, ncols=len(TARGET_PANELS), sharey=True, squeeze=False)
    for ax, (model, metric) in zip(axes[0], TARGET_PANELS):
        for k, run in enumerate(runs):
            row = _row(summaries[run], model, metric)
            if row is None:
                continue
            color, marker = _run_style(k)
            ax.hlines(k, row["low"], row["high"], color=color, linewidth=1.0)
            ax.plot(row["value"], k, linestyle="none", marker=marker, color=color, markersize=4, label=run)
        ax.axvline(TARGETS[metric], label="meta del ajuste", **TARGET_STYLE)
        name = METRICS[metric][0]
        ax.set_title(textwrap.fill(name, 24) + ("\n(ajustado − base)" if model == "delta" else "\n(ajustado)"),
                     fontsize=8)
        ax.set_xlim(-0.55 if model == "delta" else -0.04, 1.04)
        ax.set_xlabel("diferencia de proporciones" if model == "delta" else "proporción de preguntas")
        ax.grid(axis="y", visible=False)
        ax.tick_params(axis="y", left=False)
    axes[0][0].set_yticks(range(len(runs)), runs)  # shared y: the run names once, on the left
    axes[0][0].set_ylim(len(runs) - 0.5, -0.5)
    legend_outside(fig, "below", ncol=min(len(runs) + 1, 4))
    return fig


def targets_table(summaries: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Whether each run meets each target of issue #17 on the test set (Spanish, one row per run)."""
    rows = []
    for run, summary in summaries.items():
        row: dict[str, Any] = {"Corrida": run}
        for model, metric in TARGET_PANELS:
            r = _row(summary, model, metric)
            if r is None:
                row[METRICS[metric][0]] = "—"
                continue
            if metric == "keyword_recall":
                met = r["low"] > TARGETS[metric]
                shown = f"{fmt_num(r['value'], 2, signed=True)} [{fmt_num(r['low'], 2, signed=True)}; " \
                        f"{fmt_num(r['high'], 2, signed=True)}]"
            else:
                met = r["value"] >= TARGETS[metric] if metric == "refusal_oos" else r["value"] <= TARGETS[metric]
                shown = fmt_pct(r["value"], 0)
            row[METRICS[metric][0] if model == "tuned" else f"{METRICS[metric][0]} (ajustado − base)"] = \
                f"{shown}: {'cumple' if met else 'no cumple'}"
        rows.append(row)
    return pd.DataFrame(rows).set_index("Corrida") if rows else pd.DataFrame()


def gpu_caption_sources(results: dict[str, dict], notebook: str | None = None) -> str:
    """"gpu: medido en NVIDIA H200, 2026-12-02, commit abc1234; gpu-tuned: ..." for a caption (``notebook``: the
    record of the notebook the figure draws from, see ``gpu_source``)."""
    return "; ".join(f"{name}: {gpu_source(result, notebook)}" for name, result in results.items())


def seed_noise_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The fast-path runs, Spanish columns: run, fast path, seed, final validation loss, tuned test metrics."""
    names = {"run": "Corrida", "fast_path": "Camino rápido", "seed": "Semilla",
             "final_eval_loss": "Pérdida de validación final"}
    table = runs.copy()
    for column in runs.columns:
        if column in METRICS:
            names[column] = f"{METRICS[column][0]} (ajustado, prueba)"
    for column in table.columns:
        if column in ("final_eval_loss", *METRICS):
            table[column] = [fmt_num(v, 3) if not (isinstance(v, float) and math.isnan(v)) else "—"
                             for v in table[column]]
    return table.rename(columns=names).set_index("Corrida")


def describe_seed_noise(runs: pd.DataFrame) -> str:
    """Spanish: for each measure, whether fast_path off and auto agree within seed noise, computed from ``runs``."""
    if runs.empty:
        return ("Todavía no hay corridas comprometidas con el camino rápido apagado y automático "
                "(results/gpu-off-s42 y las demás): no se compara.")
    lines = []
    for column in [c for c in runs.columns if c not in ("run", "fast_path", "seed")]:
        check = seed_noise_check(runs, column)
        name = "pérdida de validación final" if column == "final_eval_loss" else \
            f"{METRICS[column][0].lower()} del ajustado en prueba"
        if check is None:
            lines.append(f"- {name}: faltan dos semillas de cada camino para comparar.")
            continue
        verdict = "coinciden dentro del ruido de semilla" if check["agree"] else \
            "difieren más que el ruido de semilla"
        lines.append(f"- {name}: diferencia media apagado − automático {fmt_num(check['path_gap'], 3)}, ruido de "
                     f"semilla {fmt_num(check['seed_noise'], 3)} (semillas {', '.join(map(str, check['seeds']))}): "
                     f"**{verdict}**.")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Notebook 04: the committed runs' loss curves and the learning curve of the recipe sweep
# --------------------------------------------------------------------------------------------

RUN_TITLES = {"gpu": "Receta de la tesis (NF4 + DQ, lr 1e-4, 2000 × 2)",
              "gpu-tuned": "Receta elegida en validación (lr 1e-3, 610 × 8, sin cuantizar)"}


def plot_gpu_loss_curves(results: dict[str, dict]) -> plt.Figure:
    """One panel per committed run: training and validation loss against the step (memorisation shows as the
    gap between them)."""
    names = [n for n, r in results.items() if len(r["history"])]
    fig, axes = new_figure("full", aspect=0.34, ncols=len(names), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], names):
        history = results[name]["history"]
        for split, color, marker, name_es in (("train", COLORS["train"], None, "entrenamiento"),
                                              ("eval", COLORS["eval"], "o", "validación")):
            part = history[history["split"] == split].sort_values("step")
            ax.plot(part["step"], part["loss"], color=color, marker=marker, markersize=3, linewidth=0.9,
                    label=name_es)
        ax.set_title(textwrap.fill(RUN_TITLES.get(name, name), 36), fontsize=8)
    for ax in axes[0]:
        ax.set_xlabel(STEP_LABEL)
    axes[0][0].set_ylabel(LOSS_LABEL)
    legend_outside(fig, "below", ncol=2)
    return fig


def describe_gpu_curves(results: dict[str, dict]) -> str:
    """Spanish: per committed run, the best validation step and what the validation loss did after it, against the
    final training loss (``utils.reports.training.describe_turn``: a gap alone is not overfitting)."""
    lines = []
    for name, result in results.items():
        history, training = result["history"], result.get("training") or {}
        if not len(history):
            continue
        train = history[history["split"] == "train"].sort_values("step")
        evals = history[history["split"] == "eval"].sort_values("step")
        if not len(train) or not len(evals):
            continue
        turn = validation_turn(evals["step"], evals["loss"])
        steps = fmt_num(training.get("max_steps") or train["step"].max())
        lines.append(f"- **{name}** ({gpu_source(result, '04')}), {steps} pasos: "
                     f"{describe_turn(turn, float(train['loss'].iloc[-1]))}.")
    return "\n".join(lines)


# The sweep's learning-curve variants: lr 1e-3, batch 8 × 1, unquantised, full answers, thesis LoRA; they differ
# in the number of steps (epochs) alone.
CURVE_RECIPE = {"learning_rate": 0.001, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
                "quantization": "none", "model_name": "embedded"}
CURVE_METRICS = (("keyword_recall_fact", "Recall de palabras clave (hecho simple)", None),
                 ("refusal_oos", "Rechazo correcto (fuera de alcance)", TARGETS["refusal_oos"]),
                 ("wrongful_refusal", "Rechazo indebido (respondibles)", TARGETS["wrongful_refusal"]))


def profile_examples(profile: str) -> int:
    """Training examples a profile's notebook 04 sees: steps × batch × accumulation (``--profile`` settings)."""
    settings = profile_settings(profile)
    return settings.max_steps * settings.per_device_train_batch_size * settings.gradient_accumulation_steps


def learning_curve(sweep: dict) -> tuple[pd.DataFrame, dict[str, float]]:
    """(one row per sweep variant of ``CURVE_RECIPE``: variant, training examples seen, validation metrics and the
    question counts behind the refusal rates; the base model's validation metrics, ``{}`` when the sweep did not
    score it)."""
    rows, base = [], {}
    for name, variant in (sweep.get("variants") or {}).items():
        overrides = variant.get("overrides") or {}
        if variant.get("answers", "full") != "full" or set(overrides) != set(CURVE_RECIPE) | {"max_steps",
                                                                                            "warmup_steps"}:
            continue
        if any(overrides[k] != v for k, v in CURVE_RECIPE.items()):
            continue
        steps = int((variant.get("result") or {}).get("global_step") or overrides["max_steps"])
        seen = steps * overrides["per_device_train_batch_size"] * overrides["gradient_accumulation_steps"]
        counts = variant["metrics"].get("n") or {}
        rows.append({"variant": name, "examples": seen, "epochs": seen / variant["train_examples"],
                     **{m: variant["metrics"].get(m) for m, _, _ in CURVE_METRICS},
                     # questions behind each refusal rate: out of scope, and answerable (fact + combined)
                     "n_refusal_oos": counts.get("out_of_scope"),
                     "n_wrongful_refusal": (counts["fact"] + counts["combined"]
                                            if {"fact", "combined"} <= set(counts) else None)})
        if not base and variant.get("base"):
            base = {m: variant["base"]["metrics"].get(m) for m, _, _ in CURVE_METRICS}
    columns = ["variant", "examples", "epochs", *(m for m, _, _ in CURVE_METRICS), "n_refusal_oos",
               "n_wrongful_refusal"]
    return pd.DataFrame(rows, columns=columns).sort_values("examples", ignore_index=True), base


def plot_learning_curve(curve: pd.DataFrame, base: dict[str, float], demo_examples: int) -> plt.Figure:
    """Validation metrics against training examples seen (the sweep's lr 1e-3 variants), the targets and the base
    model as dashed lines, and the demo's training budget as a vertical line."""
    fig, axes = new_figure("full", aspect=0.34, ncols=len(CURVE_METRICS), squeeze=False, sharex=True)
    for ax, (metric, title, target) in zip(axes[0], CURVE_METRICS):
        ax.plot(curve["examples"], curve[metric], color=COLORS["tuned"], marker="s", markersize=3.5, linewidth=0.9,
                label="ajustado (lr 1e-3, lote 8)")
        if base.get(metric) is not None:
            ax.axhline(base[metric], color=COLORS["base"], linestyle=":", linewidth=0.9, label="modelo base")
        if target is not None:
            ax.axhline(target, label="meta del ajuste", **TARGET_STYLE)
        ax.axvline(demo_examples, color=COLORS["reference"], linestyle="-.", linewidth=0.9,
                   label="presupuesto de la demo (CPU)")
        ax.set_title(textwrap.fill(title, 24), fontsize=8)
        ax.set_ylim(-0.04, 1.04)
        ax.set_xlim(0, max(curve["examples"].max() if len(curve) else 0, demo_examples) * 1.05)
    axes[0][len(CURVE_METRICS) // 2].set_xlabel("Ejemplos de entrenamiento vistos")
    axes[0][0].set_ylabel("Validación")
    legend_outside(fig, "below", ncol=2)
    return fig


REFUSAL_NAMES = {"refusal_oos": "rechazo correcto", "wrongful_refusal": "rechazo indebido"}  # as the targets read
REFUSAL_QUESTIONS = {"refusal_oos": "fuera de alcance", "wrongful_refusal": "respondibles"}


def _shortfalls(row: pd.Series) -> dict[str, float]:
    """How far a variant is from each refusal target (0 where it meets it)."""
    return {"refusal_oos": max(0.0, TARGETS["refusal_oos"] - row["refusal_oos"]),
            "wrongful_refusal": max(0.0, row["wrongful_refusal"] - TARGETS["wrongful_refusal"])}


def _nearest_miss(curve: pd.DataFrame) -> str:
    """The variant closest to meeting both refusal targets (smallest total shortfall) and by how much it misses each
    (Spanish, with the question count when the sweep recorded it: a margin of one question reads as one)."""
    row = curve.loc[curve.apply(lambda r: sum(_shortfalls(r).values()), axis=1).idxmin()]
    parts = []
    for metric, miss in _shortfalls(row).items():
        value, target, name = fmt_pct(row[metric], 2), fmt_pct(TARGETS[metric], 0), REFUSAL_NAMES[metric]
        if not miss:
            parts.append(f"cumple la de {name} ({fmt_pct(row[metric], 1)})")
            continue
        sign = "≥" if metric == "refusal_oos" else "≤"
        text = (f"no cumple la de {name} por {fmt_num(100 * miss, 2)} puntos porcentuales ({value} contra "
                f"{sign} {target}")
        n = row.get(f"n_{metric}")
        if n and n == n:
            count, allowed = round(row[metric] * n), TARGETS[metric] * n
            allowed = math.floor(allowed + 1e-9) if metric == "wrongful_refusal" else math.ceil(allowed - 1e-9)
            text += (f": {fmt_num(count)} de {fmt_num(n)} preguntas {REFUSAL_QUESTIONS[metric]}, donde la meta "
                     + (f"admite hasta {fmt_num(allowed)}" if metric == "wrongful_refusal"
                        else f"pide al menos {fmt_num(allowed)}"))
        parts.append(text + ")")
    return (f"la más cercana, la de {fmt_num(row['epochs'], 1)} épocas ({fmt_num(row['examples'])} ejemplos), "
            + " y ".join(parts))


def describe_learning_curve(curve: pd.DataFrame, base: dict[str, float], demo_examples: int) -> str:
    """Spanish: what the demo's budget is against the examples each sweep variant needed to meet the targets, and,
    when none meets both refusal targets, the nearest miss and its margin."""
    if curve.empty:
        return "El barrido de recetas no tiene variantes con lr 1e-3 y lote 8 sin cuantizar: no hay curva."
    met = curve[(curve["refusal_oos"] >= TARGETS["refusal_oos"])
                & (curve["wrongful_refusal"] <= TARGETS["wrongful_refusal"])]
    first = (f"la primera variante que cumple las dos metas de rechazo en validación vio "
             f"{fmt_num(met['examples'].iloc[0])} ejemplos ({fmt_num(met['epochs'].iloc[0], 1)} épocas)"
             if len(met) else
             f"ninguna variante cumple las dos metas de rechazo en validación; {_nearest_miss(curve)}")
    corpus = curve["examples"].iloc[0] / curve["epochs"].iloc[0]
    return (f"La demostración entrena con {fmt_num(demo_examples)} ejemplos "
            f"({fmt_num(demo_examples / corpus, 1)} época del corpus de {fmt_num(corpus)}); en GPU, {first}. "
            f"La variante más corta de esta curva ({fmt_num(curve['examples'].iloc[0])} ejemplos) ya es "
            f"{fmt_num(curve['examples'].iloc[0] / demo_examples, 1)} veces el presupuesto de la demostración.")
