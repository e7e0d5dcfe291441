"""Scores per record and system: the overlap and refusal metrics, the citation and number checks, the error tags.

``strict_correct`` puts the automatic checks together. An answerable question's answer passes when every check
that applies to it passes: all the keywords (``keyword_recall`` = 1), every cited norm and article
(``citation_accuracy`` = 1), every number (``number_match`` = 1), and no citation its reference lacks
(``invented_citation`` = 0); NaN when the reference gives none of the first three to check. An out-of-scope
answer passes when it declines and refers the student, and invents no citation.

Data without ``keywords`` or ``kind`` (a student's own file) leaves the metrics that need them NaN, and
``field_notes`` says, in Spanish, which ones were left out and how to add the fields.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from utils.evaluation.citations import score_citations
from utils.evaluation.errors import ERROR_TAGS, error_tags
from utils.evaluation.metrics import score_answer

# field -> metrics (and error tags) that need it
FIELD_NEEDS: dict[str, tuple[str, ...]] = {
    "keywords": ("keyword_recall", "wrongful_refusal", "refusal_accuracy", "tag_wrongful_refusal"),
    "kind": ("refusal_oos", "wrongful_refusal", "refusal_accuracy", "tag_wrongful_refusal"),
}
FIELD_WORDS = {"keywords": "palabras clave", "kind": "tipo de pregunta", "topic": "tema"}
NEEDS_TEXT = {
    "keywords": "el recall de palabras clave y el rechazo indebido (y con él la exactitud de rechazo balanceada)",
    "kind": ("las tasas de rechazo (correcto e indebido), la exactitud de rechazo balanceada y el informe por "
             "subconjunto de test"),
    "topic": "el desglose por tema",
}


def field_notes(missing: Sequence[str]) -> list[str]:
    """Spanish lines: for each missing field, what is left out and how to add it."""
    return [f"Los registros de test no tienen el campo `{field}` ({FIELD_WORDS[field]}) en todos los casos: se "
            f"omiten {NEEDS_TEXT[field]}. Para agregarlo: `python -m utils.data annotate` (ver el README)."
            for field in missing if field in NEEDS_TEXT]


def strict_correct(scores: dict[str, float], kind: str | None) -> float:
    """1 when every automatic check that applies passes, 0 when one fails, NaN when none applies."""
    invented = scores["invented_citation"] == 1.0
    if kind == "out_of_scope":
        refused = scores.get("refusal_oos", math.nan)
        return math.nan if math.isnan(refused) else float(refused == 1.0 and not invented)
    checks = [scores[m] for m in ("keyword_recall", "citation_accuracy", "number_match")
              if not math.isnan(scores[m])]
    if not checks:
        return math.nan
    return float(all(c == 1.0 for c in checks) and not invented)


def score_one(answer: str, prediction: dict, system_prompt: str | None = None,
              missing: Sequence[str] = ()) -> dict[str, float]:
    """Every per-answer score and error tag (``tag_*``) of one answer to one prediction row's question."""
    kind = None if "kind" in missing else prediction.get("kind")
    keywords = None if "keywords" in missing else list(prediction.get("keywords") or [])
    scores = score_answer(answer, prediction["reference"], keywords or [], kind or "")
    scores.update(score_citations(answer, prediction["reference"]))
    tags = error_tags(answer, prediction["reference"], kind, keywords, system_prompt)
    scores.update({f"tag_{name}": value for name, value in tags.items()})
    if tags["prompt_echo"] == 1.0 and kind == "out_of_scope":
        # A copy of the system prompt holds its own decline-and-refer sentence: that is an echo, not a refusal
        scores["refusal_oos"] = scores["refusal_accuracy"] = 0.0
    for field in missing:
        for name in FIELD_NEEDS.get(field, ()):
            scores[name] = math.nan
    scores["strict_correct"] = strict_correct(scores, kind)
    return scores


def systems_of(predictions: Sequence[dict]) -> list[str]:
    """The systems that answered, in the order of the prediction rows' ``answer_<system>`` keys."""
    return [key.removeprefix("answer_") for key in predictions[0] if key.startswith("answer_")] if predictions else []


def score_predictions(predictions: Sequence[dict], system_prompt: str | None = None,
                      missing: Sequence[str] = ()) -> pd.DataFrame:
    """Per record and system (and the reference answer as a calibration row): every metric and tag.

    The reference row checks the rules themselves: its keyword recall, citation accuracy, number match and
    refusal accuracy should be 1, no tag should fire; ROUGE-L, chrF, stop rate and loss do not apply (NaN).
    """
    rows = []
    for p in predictions:
        meta = {"id": p["id"], "topic": p.get("topic"), "kind": p.get("kind")}
        for name in (*systems_of(predictions), "reference"):
            answer = p["reference"] if name == "reference" else p[f"answer_{name}"]
            scores = score_one(answer, p, system_prompt, missing)
            if name == "reference":
                scores.update(rouge_l=math.nan, chrf=math.nan, stop_rate=math.nan,
                              length_tokens=p["reference_tokens"], nll=math.nan, loss_tokens=math.nan)
            else:
                scores.update(stop_rate=float(p[f"stopped_{name}"]), length_tokens=p[f"tokens_{name}"],
                              nll=p.get(f"nll_{name}", math.nan), loss_tokens=p.get("loss_tokens", math.nan))
            rows.append({**meta, "model": name, **scores})
    return pd.DataFrame(rows)


def error_tag_counts(scores: pd.DataFrame, systems: Sequence[str]) -> pd.DataFrame:
    """Per tag and system: answers tagged, answers the tag applies to, and their share (tidy rows)."""
    rows = []
    for system in systems:
        data = scores[scores["model"] == system]
        for tag in ERROR_TAGS:
            values = data[f"tag_{tag}"].dropna()
            rows.append({"model": system, "tag": tag, "count": int(values.sum()), "n": int(len(values)),
                         "share": float(values.mean()) if len(values) else math.nan})
    return pd.DataFrame(rows)
