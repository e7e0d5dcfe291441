"""Notebook 04's prose and figure captions say only what the numbers show: the validation minimum, overfitting and
the Spanish table names (utils.reports.training, utils.plotting.training)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from utils.plotting import training as training_plots
from utils.reports import training as training_report
from utils.training import load_campaign


def _history(eval_losses: list[float], train_losses: list[float] | None = None) -> pd.DataFrame:
    """A log history with one training and one validation row per step (steps 0, 10, 20, ...)."""
    steps = [10 * k for k in range(len(eval_losses))]
    train = train_losses or [loss - 0.5 for loss in eval_losses]
    return pd.DataFrame([{"step": s, "loss": t, "eval_loss": None, "epoch": s / 100} for s, t in zip(steps, train)]
                        + [{"step": s, "loss": None, "eval_loss": e, "epoch": s / 100}
                           for s, e in zip(steps, eval_losses)])


def _has_minimum_line(history: pd.DataFrame) -> bool:
    fig = training_plots.plot_loss_curve(history)
    lines = [line for line in fig.axes[0].get_lines() if line.get_linestyle() == ":"]
    plt.close(fig)
    return bool(lines)


def test_the_caption_says_a_dotted_line_only_when_the_figure_draws_it():
    turned = _history([3.0, 2.0, 1.5, 1.7])
    assert training_plots.marked_minimum(turned) == (20, 1.5)
    assert _has_minimum_line(turned)
    assert "la línea punteada marca el mínimo" in training_plots.minimum_caption(turned)
    assert "paso 20" in training_plots.minimum_caption(turned)
    falling = _history([3.0, 2.0, 1.5, 1.4])  # the minimum is the last evaluation: no line
    assert training_plots.marked_minimum(falling) is None and not _has_minimum_line(falling)
    assert training_plots.minimum_caption(falling).startswith("sin línea")
    assert "última evaluación" in training_plots.minimum_caption(falling)
    assert "dos evaluaciones o menos" in training_plots.minimum_caption(_history([3.0, 2.0]))


def test_a_gap_between_training_and_validation_is_not_called_overfitting():
    # validation still falling at the end, training far below it: no overfitting
    falling = training_report.validation_turn([0, 100, 200], [3.0, 1.0, 0.8])
    assert falling["trend"] == "falling" and falling["best_step"] == 200
    text = training_report.describe_turn(falling, 0.1)
    assert "no aparece sobreajuste" in text and "no es sobreajuste" in text
    # a rise under FLAT_RISE of the minimum: flattened, not overfitting
    flat = training_report.validation_turn([0, 100, 200], [3.0, 0.7468, 0.7481])
    assert flat["trend"] == "flat" and "se aplana" in training_report.describe_turn(flat, 0.28)
    assert "(sobreajuste)" not in training_report.describe_turn(flat, 0.28)
    # a clear rise while training keeps falling: overfitting, with the step and the rise
    rising = training_report.validation_turn([0, 61, 122, 183], [3.0, 0.557, 0.57, 0.59])
    assert rising["trend"] == "rising" and rising["best_step"] == 61
    text = training_report.describe_turn(rising, 0.01)
    assert "(sobreajuste)" in text and "paso 61" in text and "+5,9\xa0%" in text


def test_the_campaign_text_reads_steps_epochs_and_evaluation_interval_from_the_file():
    campaign = load_campaign()
    run = campaign["runs"]["validation_2000"]
    text = training_report.describe_campaign(campaign)
    settings = run["settings"]
    assert f"validación cada {settings['eval_steps']} pasos" in text
    epochs = pd.DataFrame(run["history"]).dropna(subset=["epoch"])["epoch"].iloc[-1]
    assert f"({training_report.fmt_num(epochs, 1)} épocas del corpus)" in text
    sampler = campaign["runs"]["random"]["settings"]
    assert f"Muestreo, {sampler['max_steps']} pasos" in text
    assert "d533af8-dirty" in text  # the recorded commit, not cut inside its suffix
    evals = pd.DataFrame(run["history"]).dropna(subset=["eval_loss"])
    if evals["eval_loss"].idxmin() == evals.index[-1]:  # the committed run: lowest at its last evaluation
        assert "no aparece sobreajuste" in text and "(sobreajuste)" not in text


def test_tables_show_spanish_names_not_identifiers():
    labels = {"tokens": 217, "tokens_con_pérdida": 59, "texto_con_pérdida": "a", "texto_enmascarado": "b",
              "eos_en_el_ejemplo": 3, "eos_con_pérdida": 1, "eos_final_con_pérdida": True, "bos": 3,
              "pad_es_eos": False}
    table = training_report.values_table(labels)
    assert not [name for name in table.index if "_" in name]
    assert table.loc["pad igual a EOS", "valor"] == "no"
    stops = pd.DataFrame([{"modelo": "base", "preguntas": 8, "terminan_con_eos": 3, "tasa_de_corte": 0.375,
                           "tokens_nuevos_mediana": 136.0, "max_new_tokens": 136}])
    shown = training_report.format_frame(stops)
    assert list(shown.columns) == ["modelo", "preguntas", "terminan con EOS", "tasa de corte",
                                   "tokens nuevos (mediana)", "max_new_tokens"]
    assert shown.loc[0, "tasa de corte"] == "0,375"
    assert list(stops.columns)[2] == "terminan_con_eos"  # the data keep their keys (describe_run reads them)
    assert training_report.fmt_value({"fp32": 9768960}) == "fp32: 9.768.960"


def test_the_run_summary_calls_a_flat_end_flat_and_a_rise_a_rise():
    result = {"global_step": 12, "train_seconds": 120.0, "tokens_per_second": 83.5, "peak_memory_gib": 2.6,
              "first_train_loss": 3.4, "last_train_loss": 1.9, "first_eval_loss": 3.1, "best_eval_step": 6}
    plan = type("Plan", (), {"device": "cpu"})
    flat = "\n".join(training_report._run_lines(plan, {**result, "best_eval_loss": 2.2, "last_eval_loss": 2.21}))
    assert "se aplanó" in flat and "se ajusta al conjunto de entrenamiento" not in flat
    rise = "\n".join(training_report._run_lines(plan, {**result, "best_eval_loss": 2.0, "last_eval_loss": 2.2}))
    assert "se ajusta al conjunto de entrenamiento" in rise and "+10,0\xa0%" in rise
