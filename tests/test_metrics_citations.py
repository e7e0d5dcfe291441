"""The task's own metrics: citation extraction and accuracy, invented citations, exact numbers, the error tags,
the strict correctness, the pick rule that cannot put a wrong answer first, and the human rubric's κ."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from utils import evaluation as ev
from utils.data import answer_of, load_records
from utils.paths import TEST_FILE, TRAIN_FILE

COMBINED = ("Según la Ord. 1549, art. 1.2, la Facultad Regional las informa al Consejo Superior en 30 días "
            "hábiles. Según el Anexo de la Disp. 65/07, art. 1.2, en el INSPT se notifican al Rector en un "
            "máximo de 30 días corridos.")
HOURS = "Según la Ord. 973, art. 2, la Práctica Supervisada debe durar como mínimo 200 (doscientas) horas."
SYSTEM_PROMPT = ("Sos un asistente que responde consultas sobre la normativa de la Universidad Tecnológica "
                 "Nacional (UTN, Argentina). Respondé en español, de forma breve, citando la norma y el artículo.")


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, norms", [
    ("Ord. 1549", {("ord", "1549")}),
    ("la Ordenanza Nº 710", {("ord", "710")}),
    ("Res. 1234/15 y la Resolución CS Nº 1234/2015", {("res", "1234/15")}),  # one norm, two spellings
    ("Resolución Ministerial Nº 1232/01", {("res", "1232/01")}),
    ("el Anexo de la Disp. 65/07 y la Disposición Nº 65/07", {("disp", "65/07")}),
    ("la Ley 14.855", {("ley", "14855")}),
    ("las disposiciones generales del reglamento", set()),  # the word, not a norm
])
def test_norms_are_found_in_every_spelling_of_the_corpus(text, norms):
    assert set(ev.extract_citations(text).norms) == norms


def test_articles_and_chapters_with_lists_ranges_and_roman_numerals():
    cited = ev.extract_citations("Ord. 1549 (arts. 1.1 a 1.4), artículo 7º, arts. 2.1 y 2.3; Capítulo III, "
                                 "cap. 8 y capítulos 1 y 2.")
    assert cited.articles == {"1.1", "1.2", "1.3", "1.4", "7", "2.1", "2.3"}
    assert cited.chapters == {"3", "8", "1", "2"}
    assert ev.extract_citations("arts. 1.1–1.2").articles == {"1.1", "1.2"}  # en dash range


def test_numbers_outside_citations_digits_only():
    cited = ev.extract_citations(COMBINED)
    assert cited.numbers == {"30"}  # 1549, 1.2 and 65/07 are citations, not numbers to match
    assert ev.extract_citations(HOURS).numbers == {"200"}  # "doscientas" in words is not read
    assert ev.extract_citations("resolución del 27/02/2004, 1.000 alumnos, 20%").numbers == {
        "27/02/2004", "1000", "20"}


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


def test_citation_accuracy_gives_partial_credit_as_documented():
    ref = ev.extract_citations(COMBINED)
    assert ev.citation_accuracy(ev.extract_citations(COMBINED), ref) == 1.0
    # The right norm with a wrong article: norms 1/2 cited, locators 0/1 → (0.5 + 0) / 2.
    assert ev.citation_accuracy(ev.extract_citations("Ord. 1549, art. 3.1"), ref) == pytest.approx(0.25)
    # One of the two norms with its article: (0.5 + 1) / 2.
    assert ev.citation_accuracy(ev.extract_citations("Ord. 1549, art. 1.2"), ref) == pytest.approx(0.75)
    assert ev.citation_accuracy(ev.extract_citations("Según la Ord. 1549"),
                                ev.extract_citations("Según la Ord. 1549, nada más")) == 1.0
    assert math.isnan(ev.citation_accuracy(ev.extract_citations("x"), ev.extract_citations("sin citas")))


def test_invented_citations_are_the_ones_the_reference_lacks():
    ref = ev.extract_citations(HOURS)
    answer = ev.extract_citations("Según la Ord. 2017, art. 1.3, y la Ord. 973, art. 2.")
    assert ev.invented_citations(answer, ref) == ["Ord. 2017", "art. 1.3"]
    assert ev.invented_citations(ev.extract_citations(HOURS), ref) == []


def test_a_wrong_number_fails_the_number_check_even_when_the_keyword_matches():
    wrong = HOURS.replace("200 (doscientas)", "20")
    scores = ev.score_citations(wrong, HOURS)
    assert scores["number_match"] == 0.0 and scores["citation_accuracy"] == 1.0
    assert ev.keyword_recall(wrong, ["horas"]) == 1.0  # the keyword alone would not see it
    assert ev.score_citations(HOURS, HOURS)["number_match"] == 1.0
    assert math.isnan(ev.score_citations("x", "Sin números acá.")["number_match"])


def test_reference_answers_pass_their_own_checks_and_get_no_tag():
    # Calibration on the shipped corpus: every rule agrees with the reference answers it was written for.
    records = load_records(TEST_FILE) + load_records(TRAIN_FILE)
    system_prompt = ev.system_prompt_of(records)
    for record in records:
        answer = answer_of(record["messages"])
        scores = ev.score_citations(answer, answer)
        assert scores["invented_citation"] == 0.0, record["id"]
        assert scores["citation_accuracy"] in (1.0,) or math.isnan(scores["citation_accuracy"]), record["id"]
        assert scores["number_match"] == 1.0 or math.isnan(scores["number_match"]), record["id"]
        tags = ev.error_tags(answer, answer, record["kind"], record["keywords"], system_prompt)
        assert not any(v == 1.0 for v in tags.values()), (record["id"], tags)
    assert sum(ev.extract_citations(answer_of(r["messages"])).any for r in records) > len(records) / 2


# --------------------------------------------------------------------------------------------
# Error tags and printable text
# --------------------------------------------------------------------------------------------


def test_error_tags_fire_on_the_failures_they_name():
    loop = ev.error_tags("El plazo es de 2000000000000000 días días días", HOURS, "fact", ["200"])
    assert loop["repetition_loop"] == 1.0
    echo = ev.error_tags("Sos un asistente que responde consultas sobre la normativa de la Universidad.",
                         HOURS, "fact", ["200"], SYSTEM_PROMPT)
    assert echo["prompt_echo"] == 1.0 and echo["no_citation"] == 1.0
    invented = ev.error_tags("Según la Ord. 2017, son 200 horas.", HOURS, "fact", ["200"])
    assert invented["invented_norm"] == 1.0 and invented["no_citation"] == 0.0
    refusal = ev.error_tags("La normativa disponible no establece eso.", HOURS, "fact", ["200"])
    assert refusal["wrongful_refusal"] == 1.0
    oos = ev.error_tags("La normativa disponible no establece eso.", "No establece.", "out_of_scope", [])
    assert math.isnan(oos["wrongful_refusal"]) and math.isnan(oos["no_citation"])
    assert not ev.repetition_loop(COMBINED)  # two "Según la ..." sentences that differ are not a loop


def test_degenerate_repetitions_are_collapsed_and_long_answers_cut():
    text = "Son 2000000000000000000 días. Según la Ord. 1549, Según la Ord. 1549, Según la Ord. 1549, fin"
    assert ev.collapse_repetitions(text) == "Son 2000… días. Según la Ord. 1549, […] fin"
    assert ev.truncate_words("uno dos tres cuatro", 2) == "uno dos …"
    assert ev.printable_answer("a  b\n\nc", 10) == "a b c"
    noise = "Quadr(dependimately,title" + "x" * 40 + " ok"  # a random model's "word" LaTeX cannot break
    assert ev.printable_answer(noise, 10) == "Quadr(dependimately,titl… ok"


# --------------------------------------------------------------------------------------------
# Strict correctness, the pick rule, missing fields
# --------------------------------------------------------------------------------------------


def _prediction(answer_base: str, answer_tuned: str, reference: str = HOURS, kind: str = "fact",
                rid: str = "r1") -> dict:
    return {"id": rid, "topic": "t", "kind": kind, "question": "¿Cuántas horas?", "reference": reference,
            "keywords": ["horas"], "reference_tokens": 20, "answer_base": answer_base, "tokens_base": 10,
            "stopped_base": True, "answer_tuned": answer_tuned, "tokens_tuned": 10, "stopped_tuned": True}


def test_strict_correct_needs_every_applicable_check():
    right = ev.score_one(HOURS, _prediction("", ""))
    assert right["strict_correct"] == 1.0
    wrong = ev.score_one(HOURS.replace("200 (doscientas)", "20"), _prediction("", ""))
    assert wrong["strict_correct"] == 0.0 and wrong["keyword_recall"] == 1.0
    oos = ev.score_one("La normativa no establece eso. Te sugiero consultar a la Secretaría Académica.",
                       _prediction("", "", reference="No establece.", kind="out_of_scope"))
    assert oos["strict_correct"] == 1.0


def test_an_echo_of_the_system_prompt_is_not_a_correct_refusal():
    system = (SYSTEM_PROMPT + " Si la normativa disponible no establece lo que se pregunta, decilo y sugerí "
              "consultar a la Secretaría Académica de la Facultad Regional.")
    question = _prediction("", "", reference="La normativa disponible no lo establece.", kind="out_of_scope")
    echo = ev.score_one("Respondé en español, de forma breve, citando la norma y el artículo. Si la normativa "
                        "disponible no establece lo que se pregunta, decilo y sugerí consultar a la Secretaría "
                        "Académica de la Facultad Regional.", question, system)
    assert echo["tag_prompt_echo"] == 1.0 and echo["declines"] == 1.0
    assert echo["refusal_oos"] == 0.0 and echo["refusal_accuracy"] == 0.0 and echo["strict_correct"] == 0.0
    own_words = ev.score_one("La normativa disponible no establece ese plazo. Te sugiero consultar a la Secretaría "
                             "Académica de tu Facultad Regional.", question, system)
    assert own_words["tag_prompt_echo"] == 0.0 and own_words["refusal_oos"] == 1.0


def test_a_wrong_answer_with_high_overlap_is_never_picked_as_the_best():
    # The tuned answer of r1 changes one number (200 → 20): high overlap and the keyword "horas", but wrong.
    # The pick must be r2, whose tuned answer is right though it shares fewer words with its reference.
    wrong = HOURS.replace("200 (doscientas)", "20")
    paraphrase = "La Ord. 973 (art. 2) exige 200 horas de práctica como mínimo."
    predictions = [_prediction("No sé.", wrong, rid="r1"), _prediction("No sé.", paraphrase, rid="r2")]
    scores = ev.score_predictions(predictions)
    overlap = scores.set_index(["id", "model"])["rouge_l"]
    assert overlap[("r1", "tuned")] > overlap[("r2", "tuned")]
    picks, absent = ev.pick_examples(scores)
    helped = picks.set_index("caso").loc["el ajuste acierta y el modelo base no", "id"]
    assert helped == "r2"
    assert "el ajuste empeora: el modelo base acierta y el ajustado no" in absent


def test_missing_fields_leave_their_metrics_out_with_a_spanish_note():
    prediction = _prediction("x", "La normativa disponible no establece eso.")
    scores = ev.score_one(prediction["answer_tuned"], prediction, missing=("keywords", "kind"))
    for name in ("keyword_recall", "wrongful_refusal", "refusal_oos", "refusal_accuracy", "tag_wrongful_refusal"):
        assert math.isnan(scores[name]), name
    assert scores["citation_accuracy"] == 0.0  # citations need neither field
    notes = ev.field_notes(["keywords", "topic"])
    assert len(notes) == 2 and "`keywords`" in notes[0] and "se omiten" in notes[0]
    assert "python -m utils.data annotate" in notes[1]


def test_error_tag_counts_per_system():
    predictions = [_prediction("Según la Ord. 2017, 200 horas.", HOURS, rid=f"r{k}") for k in range(3)]
    counts = ev.error_tag_counts(ev.score_predictions(predictions), ["base", "tuned"]).set_index(["model", "tag"])
    assert counts.loc[("base", "invented_norm"), "count"] == 3 and counts.loc[("tuned", "invented_norm"), "count"] == 0
    assert counts.loc[("base", "invented_norm"), "share"] == 1.0


# --------------------------------------------------------------------------------------------
# Human rubric
# --------------------------------------------------------------------------------------------


def test_blank_rubric_is_never_written_over_a_rater_s_labels(tmp_path):
    predictions = [_prediction("a", "b", rid="r1"), _prediction("c", "d", rid="r2")]
    table = ev.rubric_rows(predictions, ["base", "tuned"])
    assert list(table.columns) == ["id", "question", "reference", "model", "answer", "label", "rater"]
    assert len(table) == 4
    path = tmp_path / ev.BLANK_NAME
    assert ev.write_blank_rubric(table, path)
    filled = table.assign(label="correct")
    filled.to_csv(path, index=False)
    assert not ev.write_blank_rubric(table, path)
    assert (pd.read_csv(path)["label"] == "correct").all()


def test_kappa_of_two_filled_rubrics_matches_scikit_learn(tmp_path):
    from sklearn.metrics import cohen_kappa_score

    predictions = [_prediction("a", "b", rid=f"r{k}") for k in range(4)]
    table = ev.rubric_rows(predictions, ["base", "tuned"])
    first = ["correct", "wrong", "partly", "declined", "correct", "wrong", "wrong", "correct"]
    second = ["correcta", "wrong", "wrong", "declina", "correct", "parcial", "wrong", "correct"]
    table.assign(label=first, rater="ana").to_csv(tmp_path / "05_rubrica_ana.csv", index=False)
    table.assign(label=second, rater="").to_csv(tmp_path / "05_rubrica_beto.csv", index=False)
    table.to_csv(tmp_path / ev.BLANK_NAME, index=False)
    paths = ev.filled_rubrics(tmp_path)
    assert [p.name for p in paths] == ["05_rubrica_ana.csv", "05_rubrica_beto.csv"]
    a, b = (ev.read_filled_rubric(p) for p in paths)
    assert b["rater"].iloc[0] == "beto"  # from the file name when the column is empty
    result = ev.rubric_agreement(a, b)
    canonical = [{"correcta": "correct", "declina": "declined", "parcial": "partly"}.get(x, x) for x in second]
    assert result["kappa"] == pytest.approx(cohen_kappa_score(first, canonical))
    assert result["n"] == 8 and result["agreement"] == pytest.approx(6 / 8)


def test_a_wrong_label_names_the_file_and_line(tmp_path):
    table = ev.rubric_rows([_prediction("a", "b")], ["base", "tuned"]).assign(label=["correct", "bien"])
    path = tmp_path / "05_rubrica_x.csv"
    table.to_csv(path, index=False)
    with pytest.raises(ev.RubricError, match=r"05_rubrica_x.csv, line 3: label 'bien'"):
        ev.read_filled_rubric(path)
