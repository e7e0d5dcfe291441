"""utils.evaluation: Spanish metrics on hand-made answers, the refusal rule on the shipped split, the
seeded bootstrap, batched generation and test loss on the embedded model, the merge export, and the
notebook end to end on the smoke profile."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from utils import evaluation as ev
from utils.inference import generate_answers
from utils.paths import TEST_FILE, TRAIN_FILE

REFERENCE = ("Según la Ord. 1549, art. 1.2, la Facultad Regional tiene 30 días hábiles para informar sus "
             "normas complementarias al Consejo Superior.")
KEYWORDS = ["30", "días hábiles", "Consejo Superior"]
PARAPHRASE = ("La Ordenanza 1549 fija un plazo de treinta (30) dias habiles: dentro de ese lapso la Facultad "
              "debe comunicar al consejo superior las normas que dicte.")
WRONG_NUMBER = REFERENCE.replace("30", "60")
REFUSAL = ("La normativa disponible no establece ese plazo. Te sugiero consultar a la Secretaría Académica "
           "de tu Facultad Regional.")


# --------------------------------------------------------------------------------------------
# Metrics on hand-made answers
# --------------------------------------------------------------------------------------------


def test_exact_answer_scores_perfectly():
    scores = ev.score_answer(REFERENCE, REFERENCE, KEYWORDS, "fact")
    assert scores["keyword_recall"] == 1.0
    assert scores["rouge_l"] == pytest.approx(1.0)
    assert scores["chrf"] == pytest.approx(100.0)
    assert scores["wrongful_refusal"] == 0.0 and scores["refusal_accuracy"] == 1.0


def test_paraphrase_keeps_keywords_but_loses_overlap():
    scores = ev.score_answer(PARAPHRASE, REFERENCE, KEYWORDS, "fact")
    # Accents and case do not matter for keywords ("dias habiles", "consejo superior").
    assert scores["keyword_recall"] == 1.0
    assert 0.1 < scores["rouge_l"] < 0.5
    assert 20 < scores["chrf"] < 70


def test_wrong_number_is_caught_by_keywords_not_by_overlap():
    scores = ev.score_answer(WRONG_NUMBER, REFERENCE, KEYWORDS, "fact")
    assert scores["keyword_recall"] == pytest.approx(2 / 3)
    assert scores["rouge_l"] > 0.9  # one token of twenty differs: overlap metrics barely move
    assert scores["chrf"] > 85


def test_refusal_on_answerable_is_wrongful_and_on_out_of_scope_is_correct():
    answerable = ev.score_answer(REFUSAL, REFERENCE, KEYWORDS, "fact")
    assert answerable["keyword_recall"] == 0.0
    assert answerable["wrongful_refusal"] == 1.0 and answerable["refusal_accuracy"] == 0.0
    assert math.isnan(answerable["refusal_oos"])
    oos = ev.score_answer(REFUSAL, REFUSAL, ["no establece", "secretaría académica"], "out_of_scope")
    assert oos["refusal_oos"] == 1.0 and oos["refusal_accuracy"] == 1.0
    assert math.isnan(oos["wrongful_refusal"])
    # Declining without referring the student is not a proper out-of-scope answer; naming the
    # Facultad Regional is not a referral either.
    assert not ev.is_refusal("La normativa no establece ese dato.")
    assert not ev.is_refusal("La normativa disponible no establece la nota de la Facultad Regional.")
    assert ev.is_refusal("No tengo información sobre eso; consultá en tu facultad regional.")


def test_keywords_match_whole_words_only():
    assert ev.keyword_recall("El plazo es de 130 días.", ["30"]) == 0.0
    assert ev.keyword_recall("Son 300 días.", ["30"]) == 0.0
    assert ev.keyword_recall("Ambos son obligatorios.", ["obligatorio"]) == 1.0  # Spanish plural
    assert ev.keyword_recall("Ord. 1549", ["ord 1549"]) == 1.0
    assert ev.keyword_recall("sin palabras clave", []) != ev.keyword_recall("sin palabras clave", [])  # NaN


def test_default_rouge_tokenizer_breaks_spanish_words_ours_does_not():
    from rouge_score import rouge_scorer

    default = rouge_scorer.RougeScorer(["rougeL"])
    # The default tokenizer replaces non-ASCII letters by spaces: "año" becomes "a o", so a different
    # text scores as identical, and "Académica" splits into pieces.
    assert default.score("año", "a o")["rougeL"].fmeasure == 1.0
    assert ev.rouge_l("a o", "año") == 0.0
    assert ev.tokenize_spanish("Secretaría Académica, Nº 1549") == ["secretaria", "academica", "no", "1549"]
    assert ev.rouge_l("Secretaría Académica", "secretaria academica") == 1.0


def test_highlight_is_accent_insensitive_and_escapes_html():
    out = ev.highlight_keywords("Tiene 30 DIAS hábiles <b>", KEYWORDS)
    assert out == "Tiene <mark>30</mark> <mark>DIAS hábiles</mark> &lt;b&gt;"


def test_refusal_rule_agrees_with_the_shipped_reference_answers():
    # Calibration: every out-of-scope reference is a refusal; no answerable reference is a wrongful one.
    from utils.data import answer_of, load_records

    records = load_records(TEST_FILE) + load_records(TRAIN_FILE)
    oos = [r for r in records if r["kind"] == "out_of_scope"]
    answerable = [r for r in records if r["kind"] != "out_of_scope"]
    assert oos and answerable
    assert all(ev.is_refusal(answer_of(r["messages"])) for r in oos)
    wrongful = [r["id"] for r in answerable if ev.is_wrongful_refusal(answer_of(r["messages"]), r["keywords"])]
    assert wrongful == []
    assert all(ev.keyword_recall(answer_of(r["messages"]), r["keywords"]) == 1.0 for r in records if r["keywords"])


# --------------------------------------------------------------------------------------------
# Bootstrap and summaries
# --------------------------------------------------------------------------------------------


def test_bootstrap_is_seeded_and_reproducible():
    values = np.random.default_rng(0).random(40)
    a = ev.bootstrap_ci(values, n_boot=500, seed=7)
    assert a == ev.bootstrap_ci(values, n_boot=500, seed=7)
    assert a != ev.bootstrap_ci(values, n_boot=500, seed=8)
    mean, low, high = a
    assert mean == pytest.approx(values.mean()) and low < mean < high
    assert ev.bootstrap_ci([0.5] * 10, n_boot=100, seed=0) == (0.5, 0.5, 0.5)
    # NaN = not applicable: ignored, not counted as zero.
    assert ev.bootstrap_ci([1.0, math.nan, 1.0], n_boot=100, seed=0) == (1.0, 1.0, 1.0)


def _fake_scores(n: int = 12) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        kind = "out_of_scope" if i % 4 == 0 else "fact"
        base = {"keyword_recall": rng.random(), "rouge_l": rng.random(), "chrf": 100 * rng.random()}
        for model, shift in (("base", 0.0), ("tuned", 0.25)):
            rows.append({
                "id": f"r{i:02d}", "topic": "t", "kind": kind, "model": model,
                "keyword_recall": base["keyword_recall"] + shift, "rouge_l": base["rouge_l"],
                "chrf": base["chrf"], "declines": 0.0,
                "refusal_oos": float(model == "tuned") if kind == "out_of_scope" else math.nan,
                "wrongful_refusal": math.nan if kind == "out_of_scope" else 0.0,
                "refusal_accuracy": float(model == "tuned") if kind == "out_of_scope" else 1.0,
                "stop_rate": 1.0, "length_tokens": 10 + i,
                "nll": (i + 1) * (2.0 if model == "base" else 1.0), "loss_tokens": i + 1,
            })
    return pd.DataFrame(rows)


def test_summary_pairs_models_and_weights_loss_by_tokens():
    summary = ev.summarize_scores(_fake_scores(), n_boot=300, seed=3).set_index(["model", "metric"])
    delta = summary.loc[("delta", "keyword_recall")]
    # Same resamples for both models: a constant shift has a zero-width paired interval.
    assert delta["value"] == pytest.approx(0.25) and delta["low"] == pytest.approx(0.25)
    assert delta["high"] == pytest.approx(0.25)
    assert summary.loc[("base", "loss"), "value"] == pytest.approx(2.0)
    assert summary.loc[("tuned", "perplexity"), "value"] == pytest.approx(math.e)
    assert summary.loc[("tuned", "refusal_oos"), "n"] == 3
    # Balanced: a model that never refuses gets 0.5, not the share of answerable questions (0.75).
    assert summary.loc[("base", "refusal_accuracy"), "value"] == pytest.approx(0.5)
    assert summary.loc[("tuned", "refusal_accuracy"), "value"] == pytest.approx(1.0)
    again = ev.summarize_scores(_fake_scores(), n_boot=300, seed=3)
    pd.testing.assert_frame_equal(again.set_index(["model", "metric"]), summary)


def test_pick_examples_ranks_out_of_scope_answers_by_correctness_then_keywords():
    scores = _fake_scores()
    for column, value in (("citation_accuracy", math.nan), ("number_match", math.nan), ("invented_citation", 0.0)):
        scores[column] = value
    scores["strict_correct"] = scores["refusal_oos"].where(scores["kind"] == "out_of_scope", 0.0)
    picks, absent = ev.pick_examples(scores)
    oos = scores[(scores["model"] == "tuned") & (scores["kind"] == "out_of_scope")]
    # every tuned refusal passes, citations and numbers do not apply: the keyword recall decides
    assert picks.set_index("caso")["id"]["fuera de alcance"] == oos.loc[oos["keyword_recall"].idxmax(), "id"]
    assert "el ajuste acierta y el modelo base no" in absent  # no answerable answer passes: no pick, no filler


def test_an_echo_of_the_system_prompt_declines_and_refers_but_is_said_not_to_count():
    system = ("Sos un asistente que responde consultas sobre la normativa de la UTN. Si la normativa disponible no "
              "establece lo que se pregunta, decilo y sugerí consultar a la Secretaría Académica de la Facultad "
              "Regional.")
    reference = "La normativa disponible no lo contempla; consultá a la Secretaría Académica de tu Facultad Regional."
    echo = ("Según la normativa disponible no establece lo que se pregunta, decilo y sugerí consultar a la "
            "Secretaría Académica de la Facultad Regional.")
    prediction = {"id": "o1", "kind": "out_of_scope", "topic": "t", "question": "¿Cuánto cuesta el comedor?",
                  "reference": reference, "keywords": [], "reference_tokens": 20,
                  "answer_tuned": echo, "tokens_tuned": 30, "stopped_tuned": True}
    scores = ev.score_predictions([prediction], system_prompt=system)
    row = scores[scores["model"] == "tuned"].iloc[0]
    assert row["declines"] == 1 and row["tag_prompt_echo"] == 1 and row["refusal_oos"] == 0
    assert "declina y deriva copiando el mensaje de sistema: eco, no cuenta como rechazo" in ev.check_summary(row)
    picks, _ = ev.pick_examples(scores)
    note = picks.set_index("caso")["nota"]["fuera de alcance"]
    assert note.startswith("ninguna respuesta del ajustado fuera de alcance pasa") and "(eco)" in note


def test_conclusions_call_a_difference_a_gain_or_a_loss_only_when_its_interval_excludes_zero():
    from utils.reports.evaluation import describe_results

    def rows(metric, delta, low, high):
        return [{"model": "base", "metric": metric, "value": 0.1, "low": 0.0, "high": 0.2},
                {"model": "tuned", "metric": metric, "value": 0.1 + delta, "low": 0.0, "high": 0.5},
                {"model": "delta", "metric": metric, "value": delta, "low": low, "high": high}]

    summary = pd.DataFrame(rows("keyword_recall", 0.27, -0.02, 0.54) + rows("citation_accuracy", 0.2, 0.05, 0.4)
                           + rows("wrongful_refusal", 0.25, 0.0, 0.62))
    recall, citations, wrongful = describe_results(summary).splitlines()
    assert "**diferencia no concluyente** (en esta muestra a favor de Ajustado (LoRA); IC 95\xa0%" in recall
    assert recall.endswith("que incluye el 0).") and "mejora" not in recall
    assert "→ **mejora** (IC 95\xa0%" in citations and citations.endswith("que excluye el 0).")
    assert "a favor de Base" in wrongful and "empeora" not in wrongful  # lower is better: the base leads


def test_merge_table_shows_the_folder_inside_the_repository_and_names_what_the_last_row_compares():
    from utils.paths import REPO_ROOT
    from utils.reports.evaluation import merge_table

    report = {"folder": str(REPO_ROOT / "runs" / "demo" / "05_merged"), "dtype": "bf16", "device": "cpu",
              "safetensors_gib": 0.25, "probe_chats": 1, "rounding_units": 1.2, "rtol": 4.0, "passed": True,
              "merged_vs_adapter": {"mean_abs_diff": 0.000123, "max_abs_diff": 0.02, "top1_agreement": 1.0},
              "merged_vs_evaluated_model": {"mean_abs_diff": 0.1164}}
    table = merge_table(report)["valor"]
    assert table["carpeta"] == "runs/demo/05_merged"
    assert table["diferencia media de logits con el modelo evaluado (su cuantización y su tipo de dato)"] == "0,11640"
    assert merge_table({**report, "folder": "/elsewhere/05_merged"})["valor"]["carpeta"] == "/elsewhere/05_merged"


def test_select_records_keeps_every_kind():
    records = [{"id": f"{k}{i}", "kind": k} for k in ("fact", "combined", "out_of_scope") for i in range(5)]
    chosen = ev.select_records(records, 4)
    assert {r["kind"] for r in chosen} == {"fact", "combined", "out_of_scope"} and len(chosen) == 4
    assert ev.select_records(records, 0) == records


def test_select_records_takes_one_paraphrase_of_each_item_before_a_second():
    """The test file holds each item's paraphrases in a row (F001-q1…q4): file order would pick one item four times."""
    records = [{"id": f"{item}-q{q}", "kind": kind} for kind, items in (("fact", ("F1", "F2", "F3")),
                                                                         ("out_of_scope", ("O1", "O2")))
               for item in items for q in (1, 2, 3)]
    chosen = [r["id"] for r in ev.select_records(records, 6)]
    assert chosen == ["F1-q1", "F2-q1", "F3-q1", "O1-q1", "O1-q2", "O2-q1"]  # 3 of each kind, in file order


# --------------------------------------------------------------------------------------------
# Tables, run collection, error messages
# --------------------------------------------------------------------------------------------


def test_picks_print_as_a_longtable_with_cut_and_collapsed_answers(tmp_path):
    from utils.latex import write_table

    reference = "Según la Ord. 1549, art. 1.2, son 30 días hábiles."
    prediction = {"id": "r1", "kind": "fact", "topic": "t", "question": "¿50% & $x_1$?", "reference": reference,
                  "keywords": ["30"], "reference_tokens": 12,
                  "answer_base": "Son " + "2" + "0" * 200 + " días " + "muy " * 80, "tokens_base": 128,
                  "stopped_base": False, "answer_tuned": reference, "tokens_tuned": 12, "stopped_tuned": True}
    scores = ev.score_predictions([prediction])
    picks, _ = ev.pick_examples(scores)
    table = ev.picks_table(picks, [prediction], scores, ["base", "tuned"], word_limit=10)
    assert list(table["Texto"]) == ["Pregunta", "Referencia", "Base", "Ajustado (LoRA)"]
    base = table.loc[table["Texto"] == "Base", "Contenido"].iloc[0]
    assert base == "Son 2000… días muy […]" and len(base.split()) <= 11
    assert table.loc[table["Texto"] == "Ajustado (LoRA)", "Verificación"].iloc[0].endswith("correcta")
    text = write_table(table, "05_respuestas", caption="Casos", widths=[0.17, 0.14, 0.47, 0.22], long=True,
                       directory=tmp_path).read_text()
    assert r"\begin{longtable}" in text and r"50\% \& \$x\_1\$" in text


def test_missing_adapter_says_to_run_notebook_04(tmp_path, monkeypatch):
    monkeypatch.setattr("utils.evaluation.loading.RUNS_DIR", tmp_path / "runs")
    with pytest.raises(ev.AdapterNotFoundError) as info:
        ev.require_adapter("nada")
    message = str(info.value)
    assert "python -m utils.runner --profile nada --only 04" in message
    assert "runs/nada/04_adapter/adapter_model.safetensors" in message


# --------------------------------------------------------------------------------------------
# Generation, loss and merge on the embedded model
# --------------------------------------------------------------------------------------------

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Write the word hello three times, then stop."}],
]


def test_left_padded_batches_match_one_by_one(embedded_model, embedded_tokenizer):
    batched = generate_answers(embedded_model, embedded_tokenizer, CHATS, 10, batch_size=3, progress=False)
    single = generate_answers(embedded_model, embedded_tokenizer, CHATS, 10, batch_size=1, progress=False)
    assert [b["answer"] for b in batched] == [s["answer"] for s in single]
    assert embedded_tokenizer.padding_side == "right"  # restored after generation
    assert "Paris" in batched[0]["answer"]


def test_stop_flag_and_token_count(embedded_model, embedded_tokenizer):
    short = generate_answers(embedded_model, embedded_tokenizer, CHATS[:1], 3, progress=False)[0]
    assert short == {**short, "n_tokens": 3, "stopped": False}
    long = generate_answers(embedded_model, embedded_tokenizer, CHATS[:1], 60, progress=False)[0]
    assert long["stopped"] and long["n_tokens"] < 60


def test_completion_loss_matches_the_model_loss_on_answer_tokens(embedded_model, embedded_tokenizer):
    from utils.data import completion_mask

    record = {"messages": [{"role": "system", "content": "Respondé en español."},
                           {"role": "user", "content": "¿Cuántos capítulos tiene la Ord. 1549?"},
                           {"role": "assistant", "content": "Según la Ord. 1549, tiene 10 capítulos."}]}
    other = {"messages": [{"role": "user", "content": "¿Y cuántos tiene el reglamento del INSPT, según su índice?"},
                          {"role": "assistant", "content": "Según su índice, 9 capítulos."}]}
    (nll, count), (nll2, count2) = ev.completion_losses(embedded_model, embedded_tokenizer, [record, other])
    alone = ev.completion_losses(embedded_model, embedded_tokenizer, [other], batch_size=1)[0]
    assert alone[1] == count2 and alone[0] == pytest.approx(nll2, rel=1e-4)  # padding and batching do not matter
    ids, mask = completion_mask(embedded_tokenizer, record["messages"])
    assert count == sum(mask)  # every answer token plus its end-of-turn is scored
    labels = torch.tensor([[t if m else -100 for t, m in zip(ids, mask)]])
    with torch.no_grad():
        mean = embedded_model(input_ids=torch.tensor([ids]), labels=labels).loss
    assert nll / count == pytest.approx(float(mean), rel=1e-4)


@pytest.fixture(scope="module")
def random_adapter(tmp_path_factory, embedded_tokenizer):
    from peft import LoraConfig, get_peft_model

    from utils.modeling import load_model

    folder = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    model = get_peft_model(load_model("embedded", device="cpu"),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                      init_lora_weights=False, task_type="CAUSAL_LM"))
    model.save_pretrained(folder)
    embedded_tokenizer.save_pretrained(folder)
    return model, folder


def test_base_answers_come_from_the_disabled_adapter(random_adapter, embedded_model, embedded_tokenizer):
    peft_model, _ = random_adapter
    base = generate_answers(peft_model, embedded_tokenizer, CHATS[:2], 8, adapter=False, progress=False)
    plain = generate_answers(embedded_model, embedded_tokenizer, CHATS[:2], 8, progress=False)
    tuned = generate_answers(peft_model, embedded_tokenizer, CHATS[:2], 8, adapter=True, progress=False)
    assert base == plain
    assert tuned != plain


def test_merged_export_reproduces_the_adapter_logits(random_adapter, embedded_tokenizer, tmp_path):
    peft_model, folder = random_adapter
    probe = [CHATS[0] + [{"role": "assistant", "content": "Paris."}]]
    report = ev.export_merged(folder, "embedded", tmp_path / "merged", probe, dtype=torch.bfloat16,
                              reference_logits=ev.probe_logits(peft_model, embedded_tokenizer, probe))
    assert report["passed"] and report["merged_vs_adapter"]["top1_agreement"] > 0.9
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()
    assert report["rounding_units"] < 4


def test_merge_check_catches_a_merge_that_loses_the_adapter(random_adapter, tmp_path, monkeypatch):
    from peft.tuners.tuners_utils import BaseTuner

    _, folder = random_adapter
    probe = [CHATS[0] + [{"role": "assistant", "content": "Paris."}]]
    monkeypatch.setattr(BaseTuner, "merge_and_unload", lambda self, **kw: self.unload())
    with pytest.raises(ev.MergeCheckError, match="merge_rtol"):
        ev.export_merged(folder, "embedded", tmp_path / "broken", probe, dtype=torch.bfloat16)


def test_notebook_declares_the_recorded_parameters():
    import papermill as pm

    from utils.paths import NOTEBOOKS_DIR

    declared = pm.inspect_notebook(str(NOTEBOOKS_DIR / "05_evaluation.ipynb"))
    assert set(declared) == set(ev.PARAMETER_NAMES)


@pytest.mark.parametrize("n_systems", [1, 2, 5])
def test_group_figure_fits_the_page_with_few_systems(n_systems):
    """A run without baselines (base and tuned only) drew the kind row too short for its title (GPU run 43)."""
    from utils.plotting import check_print_standard
    from utils.plotting.evaluation import plot_metrics_by_group

    systems = ["base", "tuned", "rag", "few_shot", "tuned_rag"][:n_systems]
    groups = {"kind": ["fact", "combined", "out_of_scope"], "topic": [f"tema {i}" for i in range(11)]}
    rows = [{"model": s, "metric": m, "value": 0.5, "low": 0.4, "high": 0.6, "n": 10, "group_by": by, "group": g}
            for by, names in groups.items() for g in names for s in systems
            for m in ("keyword_recall", "citation_accuracy")]
    fig = plot_metrics_by_group(pd.DataFrame(rows), systems)
    assert check_print_standard(fig, "05_metricas_por_tipo_y_tema") >= 8
