"""The human rubric: a blank CSV for the raters, their filled copies read back, and Cohen's κ between two.

Each row is one answer of one system to one test question; a rater writes one label per row:

- ``correct`` (correcta): the answer gives the reference's facts, with the right norm and article;
- ``partly`` (parcial): some of the facts, or the facts without the right citation;
- ``wrong`` (incorrecta): wrong facts, an invented citation, or text that does not answer;
- ``declined`` (declina): the answer says the norms do not cover the question.

The Spanish words in brackets are accepted too. Agreement between two raters is Cohen's (1960) κ, computed
with scikit-learn's ``cohen_kappa_score`` (unweighted: the four labels are not an ordered scale).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from sklearn.metrics import cohen_kappa_score

from utils.files import atomic_write_text

COLUMNS = ("id", "question", "reference", "model", "answer", "label", "rater")
LABELS = ("correct", "partly", "wrong", "declined")
LABEL_ALIASES = {"correcta": "correct", "correcto": "correct", "parcial": "partly", "incorrecta": "wrong",
                 "incorrecto": "wrong", "declina": "declined", "declinada": "declined", "rechaza": "declined"}
LABEL_NAMES = {"correct": "correcta", "partly": "parcial", "wrong": "incorrecta", "declined": "declina"}
BLANK_NAME = "05_rubrica_en_blanco.csv"
FILLED_GLOB = "05_rubrica_*.csv"


class RubricError(ValueError):
    """A filled rubric that cannot be read: a wrong label, a missing column, two raters in one file."""


def rubric_rows(predictions: Sequence[dict], systems: Sequence[str]) -> pd.DataFrame:
    """The blank rubric: one row per (question, system), ordered by id then system, label and rater empty."""
    rows = [{"id": p["id"], "question": p["question"], "reference": p["reference"], "model": system,
             "answer": p[f"answer_{system}"], "label": "", "rater": ""}
            for p in predictions for system in systems if f"answer_{system}" in p]
    return pd.DataFrame(rows, columns=list(COLUMNS))


def write_blank_rubric(table: pd.DataFrame, path: Path) -> bool:
    """Write the blank rubric; False (and nothing written) when ``path`` already holds labels: a rater's work
    is never overwritten."""
    path = Path(path)
    if path.is_file():
        existing = pd.read_csv(path, dtype=str, keep_default_na=False)
        if "label" in existing and existing["label"].str.strip().ne("").any():
            return False
    atomic_write_text(path, table.to_csv(index=False))
    return True


def _normalize_labels(data: pd.DataFrame, path: Path) -> pd.Series:
    """The label column in canonical form; a ``RubricError`` naming file, line and allowed values otherwise."""
    labels = data["label"].str.strip().str.lower().map(lambda x: LABEL_ALIASES.get(x, x))
    bad = labels[(labels != "") & ~labels.isin(LABELS)]
    if len(bad):
        line = int(bad.index[0]) + 2  # header is line 1
        raise RubricError(f"{path}, line {line}: label {data.loc[bad.index[0], 'label']!r} is not one of "
                          f"{', '.join(LABELS)} (or correcta, parcial, incorrecta, declina). Fix it and run again.")
    return labels


def read_filled_rubric(path: Path) -> pd.DataFrame:
    """A rater's filled copy: (id, model, label, rater) of the labelled rows, labels in canonical form."""
    path = Path(path)
    data = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in ("id", "model", "label") if c not in data]
    if missing:
        raise RubricError(f"{path}: missing column(s) {missing}; copy {BLANK_NAME} and fill its 'label' column.")
    data["label"] = _normalize_labels(data, path)
    raters = sorted(set(data.get("rater", pd.Series(dtype=str)).str.strip()) - {""})
    if len(raters) > 1:
        raise RubricError(f"{path}: one file per rater, but it names {raters}. Split it in one file per rater.")
    rater = raters[0] if raters else path.stem.removeprefix("05_rubrica_")
    labelled = data[data["label"] != ""]
    return labelled[["id", "model", "label"]].assign(rater=rater).reset_index(drop=True)


def filled_rubrics(folder: Path) -> list[Path]:
    """The raters' copies in ``folder`` (``05_rubrica_<rater>.csv``, the blank one excluded), sorted."""
    return sorted(p for p in Path(folder).glob(FILLED_GLOB) if p.name != BLANK_NAME)


def rubric_agreement(first: pd.DataFrame, second: pd.DataFrame) -> dict[str, float | int | str]:
    """Cohen's κ and the observed agreement on the answers both raters labelled."""
    both = first.merge(second, on=["id", "model"], suffixes=("_1", "_2"))
    if len(both) == 0:
        raise RubricError("the two raters labelled no answer in common: κ needs the same answers labelled twice.")
    kappa = cohen_kappa_score(both["label_1"], both["label_2"], labels=list(LABELS))
    return {"rater_1": str(first["rater"].iloc[0]), "rater_2": str(second["rater"].iloc[0]),
            "n": int(len(both)), "agreement": float((both["label_1"] == both["label_2"]).mean()),
            "kappa": float(kappa)}


def label_shares(rated: pd.DataFrame) -> pd.DataFrame:
    """Share of each label per system (rows: systems; columns: the labels in Spanish), all raters pooled."""
    table = pd.crosstab(rated["model"], rated["label"], normalize="index")
    table = table.reindex(columns=list(LABELS), fill_value=0.0)
    return table.rename(columns=LABEL_NAMES)
