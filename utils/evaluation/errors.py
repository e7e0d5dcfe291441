"""Automatic error tags of an answer, and the text clean-up the printed tables need.

Tags (each True/False per answer, NaN where it cannot apply), on text lower-cased without accents:

- ``repetition_loop``: a degenerate repetition, i.e. a run of one character 10 or more times
  ("2000000000…"), a group of 1 to 12 words repeated 3 or more times in a row, or one sentence of 4 or
  more words written twice;
- ``prompt_echo``: the answer copies the system prompt: it holds 8 consecutive words of it that the
  reference does not hold (the out-of-scope references legitimately share "consultar a la Secretaría
  Académica");
- ``invented_norm``: the answer cites a norm that its reference does not (``utils.evaluation.citations``);
- ``wrongful_refusal``: on an answerable question, the answer declines and gives none of the record's
  keywords (``utils.evaluation.metrics.is_wrongful_refusal``); NaN on out-of-scope questions, and on data
  without ``kind`` or ``keywords``;
- ``no_citation``: the reference cites a norm, article or chapter and the answer cites none.
"""

from __future__ import annotations

import math
import re
from collections import Counter

from utils.evaluation.citations import extract_citations
from utils.evaluation.metrics import is_wrongful_refusal, normalize_text, tokenize_spanish

# name -> Spanish label (tables and figures)
ERROR_TAGS: dict[str, str] = {
    "repetition_loop": "Bucle de repetición",
    "prompt_echo": "Eco del mensaje de sistema",
    "invented_norm": "Norma inventada",
    "wrongful_refusal": "Rechazo de una pregunta contestable",
    "no_citation": "Respuesta sin cita",
}
CHAR_RUN = re.compile(r"(\S)\1{9,}")
ECHO_WORDS = 8
MAX_GROUP_WORDS = 12
SENTENCE_SPLIT = re.compile(r"(?<=[.;:!?])\s+(?=[A-ZÁÉÍÓÚÑ¿¡])")  # not after "Ord." before a number
WORD = re.compile(r"\d+(?:[.,/–-]\d+)*|\w+")  # "1.1–1.2" is one word, not four


def _words(text: str) -> list[str]:
    """Words of a text for the repetition check: normalised, numbers with their points kept whole."""
    return WORD.findall(normalize_text(text))


def _repeats_in_a_row(words: list[str], times: int = 3) -> bool:
    """Whether some group of 1..MAX_GROUP_WORDS words appears ``times`` times in a row."""
    for n in range(1, MAX_GROUP_WORDS + 1):
        for start in range(0, len(words) - n * times + 1):
            group = words[start : start + n]
            if all(words[start + k * n : start + (k + 1) * n] == group for k in range(1, times)):
                return True
    return False


def repetition_loop(text: str) -> bool:
    """A degenerate repetition (see the module docstring)."""
    if CHAR_RUN.search(text):
        return True
    if _repeats_in_a_row(_words(text)):
        return True
    sentences = [" ".join(_words(s)) for s in SENTENCE_SPLIT.split(text)]
    counts = Counter(s for s in sentences if len(s.split()) >= 4)
    return any(c >= 2 for c in counts.values())


def _shingles(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[k : k + n]) for k in range(len(words) - n + 1)}


def echoes_system_prompt(answer: str, system_prompt: str | None, reference: str = "") -> bool:
    """Whether the answer holds ``ECHO_WORDS`` consecutive words of the system prompt absent from the reference."""
    if not system_prompt:
        return False
    copied = _shingles(tokenize_spanish(answer), ECHO_WORDS) & _shingles(tokenize_spanish(system_prompt), ECHO_WORDS)
    return bool(copied - _shingles(tokenize_spanish(reference), ECHO_WORDS))


def error_tags(answer: str, reference: str, kind: str | None, keywords: list[str] | None,
               system_prompt: str | None = None) -> dict[str, float]:
    """The five tags of one answer: 1.0 / 0.0, NaN where a tag does not apply."""
    ours, theirs = extract_citations(answer), extract_citations(reference)
    answerable = None if kind is None else kind != "out_of_scope"
    wrongful = (math.nan if answerable is not True or keywords is None
                else float(is_wrongful_refusal(answer, keywords)))
    return {
        "repetition_loop": float(repetition_loop(answer)),
        "prompt_echo": float(echoes_system_prompt(answer, system_prompt, reference)),
        "invented_norm": float(bool(ours.norms - theirs.norms)),
        "wrongful_refusal": wrongful,
        "no_citation": float(not ours.any) if theirs.any else math.nan,
    }


# --------------------------------------------------------------------------------------------
# Text for printed tables
# --------------------------------------------------------------------------------------------


def collapse_repetitions(text: str) -> str:
    """Degenerate repetitions shortened: a character run to three characters and "…", a word group
    repeated in a row to one copy and "[…]" ("2000000000000" → "2000…")."""
    text = CHAR_RUN.sub(lambda m: m.group(1) * 3 + "…", text)
    words = text.split()
    out: list[str] = []
    k = 0
    while k < len(words):
        for n in range(1, MAX_GROUP_WORDS + 1):
            group = [normalize_text(w) for w in words[k : k + n]]
            copies = 1
            while [normalize_text(w) for w in words[k + copies * n : k + (copies + 1) * n]] == group:
                copies += 1
            if copies >= 3:
                out.extend(words[k : k + n] + ["[…]"])
                k += copies * n
                break
        else:
            out.append(words[k])
            k += 1
    return " ".join(out)


def truncate_words(text: str, limit: int) -> str:
    """At most ``limit`` words, with "…" where the text was cut (whitespace folded to single spaces)."""
    words = text.split()
    return " ".join(words) if len(words) <= limit else " ".join(words[:limit]) + " …"


# The longest word a printed table keeps whole: longer runs without a space (a random model's output, code, a URL)
# cannot be broken by LaTeX and overflow the column; Spanish words of the corpus stay under 20 characters.
MAX_WORD_CHARS = 24


def cut_long_words(text: str, limit: int = MAX_WORD_CHARS) -> str:
    """Every word longer than ``limit`` characters cut to ``limit`` and "…" (whitespace folded to single spaces)."""
    return " ".join(w if len(w) <= limit else w[:limit] + "…" for w in text.split())


def printable_answer(text: str, limit: int) -> str:
    """An answer as a printed table shows it: repetitions collapsed, cut to ``limit`` words, long words cut."""
    return cut_long_words(truncate_words(collapse_repetitions(text), limit))
