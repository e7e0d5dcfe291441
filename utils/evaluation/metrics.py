"""Per-answer metrics that suit Spanish: keyword recall, ROUGE-L, chrF++ and the refusal rule.

Text is lower-cased and stripped of accents before matching, and ROUGE-L uses a tokenizer that keeps
non-ASCII letters (``rouge_score``'s default one drops them, so "año" becomes "a" + "o").

Refusal rule (documented in the notebook too), on the normalised answer:

- it *declines* when it matches ``DECLINE_PATTERN`` ("no establece", "no especifica", "no tengo
  información", "no puedo", ...);
- it *refers the student* when it matches ``POINTER_PATTERN``: a referral verb ("consultá",
  "te sugiero", "acudí", "dirigite", "averiguá") followed, in the same sentence, by the Secretaría Académica
  or the Facultad Regional (merely naming the Facultad Regional is not a referral);
- an out-of-scope question is handled correctly when the answer declines **and** refers the student;
- an answerable question is wrongly refused when the answer declines and carries none of the record's
  keywords (the corpus has answerable references that decline a detail after giving the fact, e.g.
  "... el Capítulo 7 trata el Régimen de Cursado. No leí su texto, así que no puedo darte sus reglas").

The refusal accuracy is *balanced*: the mean of the correct-refusal rate on out-of-scope questions and
the no-wrongful-refusal rate on answerable ones. A plain share over all questions would reward a model
that never refuses (about 80 % of the test questions are answerable).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence

import numpy as np
from rouge_score import rouge_scorer
from sacrebleu.metrics import CHRF

MODELS = ("base", "tuned")
MODEL_LABELS = {"base": "Base", "tuned": "Ajustado (LoRA)", "reference": "Referencia"}
KIND_LABELS = {"fact": "hecho simple", "combined": "combinada", "out_of_scope": "fuera de alcance"}

# name -> (Spanish label, higher is better; None = neither: compared with the reference instead)
METRICS: dict[str, tuple[str, bool | None]] = {
    "keyword_recall": ("Recall de palabras clave", True),
    "citation_accuracy": ("Exactitud de citas", True),
    "number_match": ("Números exactos", True),
    "invented_citation": ("Cita inventada", False),
    "strict_correct": ("Correcta en todo lo verificable", True),
    "rouge_l": ("ROUGE-L (F1)", True),
    "chrf": ("chrF++", True),
    "refusal_accuracy": ("Exactitud de rechazo (balanceada)", True),
    "refusal_oos": ("Rechazo correcto (fuera de alcance)", True),
    "wrongful_refusal": ("Rechazo indebido (contestables)", False),
    "stop_rate": ("Tasa de fin con EOS", True),
    "length_tokens": ("Longitud media (tokens)", None),
    "loss": ("Pérdida de prueba (nats/token)", False),
    "perplexity": ("Perplejidad de prueba", False),
}

# Applied to normalised text (lower case, no accents): see ``normalize_text``.
DECLINE_PATTERN = re.compile(
    r"\bno (?:se )?(?:establece|especifica|contempla|preve|menciona|indica|detalla|regula)\b"
    r"|\bno (?:tengo|dispongo de|cuento con|hay) (?:informacion|datos|el texto)\b"
    r"|\bno (?:puedo|podria) (?:responder|confirmar|darte|decirte|indicarte|detallar|precisar)\b"
    r"|\bno lo se\b|\bno lei\b"
)
POINTER_PATTERN = re.compile(
    r"\b(?:consult|suger|recomend|acud|dirig|averigu)\w*\b[^.;]*?"
    r"\b(?:secretaria academica|facultad(?:es)? regional(?:es)?)\b"
)


def normalize_text(text: str) -> str:
    """Lower case without accents (NFKD, combining marks dropped): "Académica" -> "academica", ñ -> n."""
    decomposed = unicodedata.normalize("NFKD", text.lower())
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def tokenize_spanish(text: str) -> list[str]:
    """Words of a Spanish text: lower case, no accents, ``\\w+`` runs (numbers kept whole)."""
    return re.findall(r"\w+", normalize_text(text))


class SpanishTokenizer:
    """``rouge_score`` tokenizer that keeps Spanish letters (the default one drops non-ASCII)."""

    def tokenize(self, text: str) -> list[str]:
        return tokenize_spanish(text)


_ROUGE = rouge_scorer.RougeScorer(["rougeL"], tokenizer=SpanishTokenizer())
_CHRF = CHRF(word_order=2)


def keyword_pattern(keyword: str) -> re.Pattern | None:
    """Whole-word pattern of a keyword on normalised text.

    Punctuation between its words is free and a word may take a Spanish plural ending ("obligatorio"
    matches "obligatorios"); numbers match only whole ("30" is not found in "130" or "300").
    """
    words = tokenize_spanish(keyword)
    if not words:
        return None
    parts = [re.escape(w) + ("" if w.isdigit() else "(?:s|es)?") for w in words]
    return re.compile(r"(?<!\w)" + r"\W+".join(parts) + r"(?!\w)")


def keyword_hits(answer: str, keywords: Sequence[str]) -> list[bool]:
    """For each keyword, whether it appears in the answer as whole words (accent/case-insensitive)."""
    text = normalize_text(answer)
    hits = []
    for keyword in keywords:
        pattern = keyword_pattern(keyword)
        hits.append(bool(pattern and pattern.search(text)))
    return hits


def keyword_recall(answer: str, keywords: Sequence[str]) -> float:
    """Share of ``keywords`` found in ``answer``; NaN when the record has no keywords."""
    hits = keyword_hits(answer, keywords)
    return float(np.mean(hits)) if hits else math.nan


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F1 (0-1) with the Spanish tokenizer (no stemming)."""
    return float(_ROUGE.score(reference, answer)["rougeL"].fmeasure)


def chrf(answer: str, reference: str) -> float:
    """Sentence chrF++ (0-100): character 6-grams plus word 2-grams (sacrebleu ``CHRF(word_order=2)``)."""
    return float(_CHRF.sentence_score(answer, [reference]).score)


def declines(answer: str) -> bool:
    """Whether the answer says the norms do not cover the question (``DECLINE_PATTERN``)."""
    return bool(DECLINE_PATTERN.search(normalize_text(answer)))


def points_to_office(answer: str) -> bool:
    """Whether the answer refers the student to the Secretaría Académica / Facultad Regional."""
    return bool(POINTER_PATTERN.search(normalize_text(answer)))


def is_refusal(answer: str) -> bool:
    """A proper out-of-scope answer: it declines and refers the student to the Facultad Regional."""
    return declines(answer) and points_to_office(answer)


def is_wrongful_refusal(answer: str, keywords: Sequence[str]) -> bool:
    """On an answerable question: declines and gives none of the expected keywords."""
    recall = keyword_recall(answer, keywords)
    return declines(answer) and not (recall > 0)


def score_answer(answer: str, reference: str, keywords: Sequence[str], kind: str) -> dict[str, float]:
    """Every per-answer metric of one answer (refusal metrics NaN where they do not apply)."""
    out_of_scope = kind == "out_of_scope"
    refused = is_refusal(answer)
    wrongful = math.nan if out_of_scope else float(is_wrongful_refusal(answer, keywords))
    return {
        "keyword_recall": keyword_recall(answer, keywords),
        "rouge_l": rouge_l(answer, reference),
        "chrf": chrf(answer, reference),
        "declines": float(declines(answer)),
        "refusal_oos": float(refused) if out_of_scope else math.nan,
        "wrongful_refusal": wrongful,
        "refusal_accuracy": float(refused) if out_of_scope else 1.0 - wrongful,
    }
